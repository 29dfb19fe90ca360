"""Endpoint use cases: change settings, start, suspend, restart (Neon's endpoint API)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from argon import ids, model, safefs
from argon.compute import tenant_settings
from argon.compute.osuser import project_user
from argon.compute.params import gucs_for_cu
from argon.control.autoscale import CU_STEPS, limits_for
from argon.control.plane import ControlPlane
from argon.control.services import Control
from argon.errors import UserError
from argon.failpoints import failpoint_async


@dataclass(frozen=True)
class EndpointPatch:
    autoscaling_limit_min_cu: float | None = None
    autoscaling_limit_max_cu: float | None = None
    suspend_timeout_seconds: int | None = None
    disabled: bool | None = None
    name: str | None = None
    pg_settings: dict[str, str] | None = None  # the whole map (checked: argon.compute.tenant_settings)


def check_cu(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{field} must be a number of compute units, e.g. 0.25, 0.5, 1, 2")
    if float(value) not in CU_STEPS:
        raise UserError(f"{field} must be one of {', '.join(f'{s:g}' for s in CU_STEPS)}")
    return float(value)


def check_suspend_timeout(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError("suspend_timeout_seconds must be an integer number of seconds")
    if not -1 <= value <= model.MAX_SUSPEND_TIMEOUT:
        raise UserError(f"suspend_timeout_seconds must be between -1 (never) and {model.MAX_SUSPEND_TIMEOUT}; "
                        "0 means the platform default")
    return value


def check_settings_for(plane: ControlPlane, project_id: str, pg_settings: dict[str, str]) -> None:
    """pg_settings against the project's installation (its time zones); a UserError names the setting."""
    install = plane.installs.get(plane.project(project_id).pg_version)
    if install is not None and pg_settings:
        try:
            tenant_settings.check_for(pg_settings, install)
        except ValueError as exc:
            raise UserError(f"pg_settings.{exc}") from None


@dataclass(frozen=True)
class Applied:
    """What a PATCH changed on the running compute at once, and what waits for its next start."""

    now: tuple[str, ...] = ()
    next_start: tuple[str, ...] = ()


async def update_endpoint(control: Control, project_id: str, endpoint_id: str,
                          patch: EndpointPatch) -> tuple[model.Endpoint, list[model.Operation], Applied]:
    """Change an endpoint's settings. New CU limits move a running compute's CPU and memory limits
    at once (no restart, connections stay); the settings that follow its size and need a restart
    (`shared_buffers`, `max_connections`, ...) follow at its next start. New `pg_settings` replace
    the old ones: a running compute reloads those a reload applies; the rest wait for its next start.
    `Applied` says which went where."""
    plane = control.plane
    async with plane.project_lock(project_id):
        ep = plane.endpoint(project_id, endpoint_id)
        started = time.monotonic()
        changes: dict[str, object] = {k: v for k, v in patch.__dict__.items() if v is not None}
        lo = changes.get("autoscaling_limit_min_cu", ep.autoscaling_limit_min_cu)
        hi = changes.get("autoscaling_limit_max_cu", ep.autoscaling_limit_max_cu)
        assert isinstance(lo, float) and isinstance(hi, float)
        if lo > hi:
            raise UserError("autoscaling_limit_min_cu must not be greater than autoscaling_limit_max_cu")
        running = plane.is_running(ep.id)
        per_cu = plane.settings.compute_memory_per_cu
        old = gucs_for_cu(ep.autoscaling_limit_max_cu, limits_for(ep.autoscaling_limit_min_cu, per_cu).memory_bytes)
        new_gucs = gucs_for_cu(hi, limits_for(lo, per_cu).memory_bytes)
        sized = sorted(k for k, v in new_gucs.items() if old.get(k) != v)  # need a restart
        if hi != ep.autoscaling_limit_max_cu:
            sized.append("temp_file_limit")
        new = ep.replace(**changes)
        check_settings_for(plane, project_id, new.pg_settings)
        changed_settings = sorted(k for k in set(ep.pg_settings) | set(new.pg_settings)
                                  if ep.pg_settings.get(k) != new.pg_settings.get(k))
        live_settings, start_settings = tenant_settings.split_live(changed_settings)
        # The metadata first: a kill -9 after it leaves settings a start applies (as for those only a
        # start applies), never a compute running settings the metadata lacks.
        await plane.commit(put=[new])
        await failpoint_async("endpoint.update.after_metadata")
        try:
            reloaded = bool(live_settings) and not patch.disabled and await control.computes.reconfigure(ep, new)
        except UserError:  # the compute refused a value: the old settings stay, in the metadata too
            await plane.commit(put=[plane.endpoint(project_id, endpoint_id).replace(
                **{k: getattr(ep, k) for k in changes})])
            raise
        ops = [await plane.record(project_id, model.OperationAction.APPLY_CONFIG, branch_id=ep.branch_id,
                                  endpoint_id=ep.id, started=started)]
        now: list[str] = [f"pg_settings.{k}" for k in live_settings] if reloaded else []
        later: list[str] = [f"pg_settings.{k}" for k in (start_settings if reloaded else changed_settings)]
        if patch.disabled:
            if await control.computes.stop(ep.id, reason="endpoint disabled", project_locked=True):
                ops.append(await plane.record(project_id, model.OperationAction.SUSPEND_COMPUTE,
                                              branch_id=ep.branch_id, endpoint_id=ep.id))
        elif (lo, hi) != (ep.autoscaling_limit_min_cu, ep.autoscaling_limit_max_cu):
            limits = ("autoscaling_limit_min_cu", "autoscaling_limit_max_cu")
            live = running and await control.autoscaler.apply_bounds(new)
            (now if live else later).extend(limits)
            later.extend(sized)
        return plane.endpoint(project_id, endpoint_id), ops, Applied(tuple(now), tuple(later))


async def wake(control: Control, endpoint_id: str, *, reason: str) -> list[model.Operation]:
    """Start the endpoint's compute if it is not running; a start is an operation (one, recorded here)."""
    plane = control.plane
    started = time.monotonic()
    address = await control.computes.ensure_running(endpoint_id, reason=reason)
    if not address.cold_start:
        return []
    ep = plane.endpoint(None, endpoint_id)
    return [await plane.record(ep.project_id, model.OperationAction.START_COMPUTE, branch_id=ep.branch_id,
                               endpoint_id=ep.id, started=started)]


async def start_endpoint(control: Control, project_id: str, endpoint_id: str) -> list[model.Operation]:
    ep = control.plane.endpoint(project_id, endpoint_id)
    if ep.disabled:
        raise UserError("endpoint is disabled; enable it (disabled: false) before starting it")
    return await wake(control, endpoint_id, reason="API start")


async def suspend_endpoint(control: Control, project_id: str, endpoint_id: str) -> list[model.Operation]:
    plane = control.plane
    ep = plane.endpoint(project_id, endpoint_id)
    started = time.monotonic()
    if not await control.computes.stop(endpoint_id, reason="API suspend"):
        return []
    return [await plane.record(project_id, model.OperationAction.SUSPEND_COMPUTE, branch_id=ep.branch_id,
                               endpoint_id=ep.id, started=started)]


async def restart_endpoint(control: Control, project_id: str, endpoint_id: str) -> list[model.Operation]:
    ops = await suspend_endpoint(control, project_id, endpoint_id)
    return ops + await start_endpoint(control, project_id, endpoint_id)


async def create_endpoint(control: Control, project_id: str, branch_id: str, *, type_: str,
                          settings: model.EndpointSettings | None = None,
                          name: str | None = None, disabled: bool = False,
                          pg_settings: dict[str, str] | None = None) -> tuple[model.Endpoint, list[model.Operation]]:
    plane = control.plane
    if type_ not in ("read_write", "read_only"):
        raise UserError("endpoint type must be read_write or read_only")
    kind = model.EndpointType(type_)
    async with plane.project_lock(project_id):
        project = plane.project(project_id)
        check_settings_for(plane, project_id, pg_settings or {})
        plane.branch(project_id, branch_id)
        await plane.creating.settled(project_id, branch_id)  # a stopped branch being copied must not start
        await asyncio.to_thread(plane.branch_spares.drop, branch_id)  # it may start: no longer compute-less
        if kind is model.EndpointType.READ_WRITE and plane.primary(project_id, branch_id) is not None:
            raise UserError(f"branch {branch_id!r} already has a read_write endpoint; a branch can have only one")
        s = settings or project.default_endpoint_settings
        now = model.utcnow()
        ep = model.Endpoint(id=ids.endpoint_id(), project_id=project_id, branch_id=branch_id, created_at=now,
                            updated_at=now, autoscaling_limit_min_cu=s.autoscaling_limit_min_cu,
                            autoscaling_limit_max_cu=s.autoscaling_limit_max_cu,
                            suspend_timeout_seconds=s.suspend_timeout_seconds, name=name, type=kind,
                            disabled=disabled, pg_settings=dict(pg_settings or {}),
                            address=plane.new_endpoint_address())
        await plane.commit(put=[ep])
        if kind is model.EndpointType.READ_WRITE:
            control.computes.mark_needs_spec(ep.id)  # a replica's roles come from its primary's WAL
        op = await plane.record(project_id, model.OperationAction.CREATE_COMPUTE, branch_id=branch_id,
                                endpoint_id=ep.id)
        return ep, [op]


async def delete_endpoint(control: Control, project_id: str,
                          endpoint_id: str) -> tuple[model.Endpoint, list[model.Operation]]:
    plane = control.plane
    async with plane.project_lock(project_id):
        ep = plane.endpoint(project_id, endpoint_id)
        ops = []
        if await control.computes.retire(endpoint_id, reason="endpoint deleted", project_locked=True):
            ops.append(await plane.record(project_id, model.OperationAction.SUSPEND_COMPUTE, branch_id=ep.branch_id,
                                          endpoint_id=ep.id))
        await plane.commit(delete=[ep])
        plane.writes.forget(endpoint_id)
        await asyncio.to_thread(safefs.rmtree, plane.layout.socket_dir(endpoint_id))
        if ep.type is model.EndpointType.READ_ONLY:
            await asyncio.to_thread(safefs.rmtree, plane.layout.replica_dir(project_id, ep.branch_id, ep.id))
        return ep, ops


async def read_log(control: Control, project_id: str, endpoint_id: str, tail: int) -> str:
    """The last `tail` lines of a compute's Postgres log. The log is the compute's own file: never
    read through a link it put there, nor if it belongs to another user."""
    plane = control.plane
    ep = plane.endpoint(project_id, endpoint_id)
    path = (plane.layout.replica_dir(project_id, ep.branch_id, ep.id) / "log" / "postgres.log"
            if ep.type is model.EndpointType.READ_ONLY else plane.layout.compute_log(project_id, ep.branch_id))
    owner = project_user(plane.project(project_id).os_uid)
    try:
        data = await asyncio.to_thread(safefs.read_tail, path, limit=256 * tail, owner=owner)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise UserError(f"the compute's log cannot be read: {exc}") from None
    lines = data.decode(errors="replace").splitlines()
    return "\n".join(lines[-tail:]) + ("\n" if lines else "")

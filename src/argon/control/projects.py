"""Projects: create (clone the pristine template, register, start in the background) and delete.

A new project never runs initdb: its `main` branch is a clone of the already-initialised template
cluster of its Postgres version, which carries the default role and database. The metadata is
written in one transaction after the data directory exists, so a crash leaves at most an orphan
directory (removed by the reconciler), never a project without data.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from argon import ids, model, safefs
from argon.compute.osuser import OsUser, kill_all, running_as_root
from argon.control import retention
from argon.control.endpoints import restart_endpoint
from argon.control.plane import ControlPlane
from argon.control.roles import check_db_name, check_role_name
from argon.control.services import Control
from argon.control.spec import NEON_SUPERUSER, database_grant, neon_superuser_sql, role_attributes
from argon.errors import StorageError, UserError
from argon.failpoints import failpoint_async
from argon.wire.scram import ScramSecret

log = logging.getLogger(__name__)

DEFAULT_ROLE_SUFFIX = "_owner"


@dataclass(frozen=True)
class ProjectRequest:
    name: str | None = None
    region_id: str | None = None
    pg_version: int | None = None
    branch_name: str = model.DEFAULT_BRANCH_NAME
    database_name: str = model.DEFAULT_DATABASE_NAME
    role_name: str | None = None
    settings: model.EndpointSettings = field(default_factory=model.EndpointSettings)
    history_retention_seconds: int = model.DEFAULT_HISTORY_RETENTION
    project_settings: model.ProjectSettings = field(default_factory=model.ProjectSettings)


@dataclass(frozen=True)
class CreatedProject:
    project: model.Project
    branch: model.Branch
    endpoint: model.Endpoint
    role: model.Role
    password: str
    database: model.Database
    operations: list[model.Operation]


def template_setup_sql(pg_version: int) -> list[str]:
    """What every template carries, so that a default project needs only its password set."""
    attrs = role_attributes(pg_version).as_string(None)  # type: ignore[arg-type]
    owner = model.DEFAULT_DATABASE_NAME + DEFAULT_ROLE_SUFFIX
    return [
        neon_superuser_sql(pg_version).as_string(None),  # type: ignore[arg-type]
        f'CREATE ROLE "{owner}" WITH {attrs} IN ROLE "{NEON_SUPERUSER}"',
        f'CREATE DATABASE "{model.DEFAULT_DATABASE_NAME}" OWNER "{owner}"',
        database_grant(model.DEFAULT_DATABASE_NAME).as_string(None),  # type: ignore[arg-type]
    ]


def available_regions() -> list[str]:
    return [model.REGION_ID]


async def create_project(control: Control, req: ProjectRequest) -> CreatedProject:
    plane = control.plane
    started = time.monotonic()
    versions = sorted(plane.installs)
    version = req.pg_version or plane.settings.default_pg_version or (versions[-1] if versions else None)
    if version not in plane.installs:
        offered = ", ".join(map(str, versions)) or "none"
        raise UserError(f"PostgreSQL {version} is not available on this server; available versions: {offered}")
    region = req.region_id or model.REGION_ID
    if region not in available_regions():
        raise UserError(f"region_id {region!r} is not a region of this server; available regions: "
                        f"{', '.join(available_regions())}")
    role_name = check_role_name(req.role_name or req.database_name + DEFAULT_ROLE_SUFFIX)
    database_name = check_db_name(req.database_name)
    template = await plane.template_for(version)
    if template is None:
        raise UserError(f"PostgreSQL {version}'s template could not be prepared (the log of `argon up` says why); "
                        "restart `argon up` to try again, or choose another pg_version")

    await asyncio.to_thread(control.disk.check_room, "a new project")  # 507 within the reserve (ADR 0025)
    pid, bid, eid = ids.project_id(), ids.branch_id(), ids.endpoint_id()
    uid = await plane.db(_allocate_uid, plane, pid) if running_as_root() else None
    pgdata = plane.layout.pgdata(pid, bid)
    try:
        await asyncio.to_thread(_make_branch_data, plane, pid, template, pgdata, uid)
    except BaseException as exc:
        await asyncio.to_thread(safefs.rmtree, plane.layout.project_dir(pid))  # never a half project
        if isinstance(exc, OSError):
            raise StorageError(f"could not create the project's data directory: {exc.strerror or exc}. "
                               "Check free disk space and permissions of the data directory.") from exc
        raise
    await failpoint_async("project.create.after_data")

    password = ids.password()
    verifier = ScramSecret.from_password(password).to_string()
    now = model.utcnow()
    project = model.Project(id=pid, name=req.name or pid, region_id=region, pg_version=version, created_at=now,
                            updated_at=now, history_retention_seconds=req.history_retention_seconds,
                            default_endpoint_settings=req.settings, os_uid=uid, settings=req.project_settings)
    branch = model.Branch(id=bid, project_id=pid, name=req.branch_name, created_at=now, updated_at=now, default=True)
    endpoint = model.Endpoint(id=eid, project_id=pid, branch_id=bid, created_at=now, updated_at=now,
                              autoscaling_limit_min_cu=req.settings.autoscaling_limit_min_cu,
                              autoscaling_limit_max_cu=req.settings.autoscaling_limit_max_cu,
                              suspend_timeout_seconds=req.settings.suspend_timeout_seconds,
                              address=plane.new_endpoint_address())
    role = model.Role(branch_id=bid, name=role_name, created_at=now, updated_at=now, verifier=verifier,
                      password_enc=plane.secrets.encrypt(password))
    database = model.Database(id=0, branch_id=bid, name=database_name, owner_name=role_name,
                              created_at=now, updated_at=now)  # its id is taken in the transaction
    op_timeline = model.Operation(id=ids.operation_id(), project_id=pid, action=model.OperationAction.CREATE_TIMELINE,
                                  status=model.OperationStatus.FINISHED, created_at=now, updated_at=now, branch_id=bid,
                                  total_duration_ms=int((time.monotonic() - started) * 1000))
    op_start = model.Operation(id=ids.operation_id(), project_id=pid, action=model.OperationAction.START_COMPUTE,
                               status=model.OperationStatus.RUNNING, created_at=now, updated_at=now, branch_id=bid,
                               endpoint_id=eid)
    try:
        # the first start applies the password, even if argon dies before it (the reconciler)
        await asyncio.to_thread(control.computes.spec_pending, eid)
        stored = await plane.commit(put=[project, branch, endpoint, role, database, op_timeline, op_start])
    except Exception:
        await asyncio.to_thread(safefs.rmtree, plane.layout.project_dir(pid))
        raise
    database = stored[4]
    await failpoint_async("project.create.after_metadata")
    try:
        await asyncio.to_thread(retention.start_from_template, plane, project, bid, template)
    except Exception as exc:  # the project works without it; point in time starts at the first suspend
        log.warning("could not start the history of project %s: %s", pid, exc)
    await failpoint_async("project.create.after_history")
    control.computes.mark_needs_spec(eid)
    log.info("project %s (%s) created with endpoint %s in %.0f ms", pid, project.name, eid,
             (time.monotonic() - started) * 1000)
    # Like Neon, a new project's compute starts right away, so the first connection finds it warm.
    plane.spawn(first_start(control, op_start), f"first start of {eid}")
    plane.spawn(asyncio.to_thread(plane.spares.refill, template), "refilling the spare template copies")
    return CreatedProject(project, branch, endpoint, role, password, database, [op_timeline, op_start])


async def first_start(control: Control, op: model.Operation, *, reason: str = "project created") -> None:
    """Start a new endpoint's compute right away (like Neon), so the first connection finds it warm;
    `op` is its `start_compute` operation, written as running with the endpoint and finished here."""
    plane = control.plane
    started = time.monotonic()
    assert op.endpoint_id is not None
    try:
        await control.computes.ensure_running(op.endpoint_id, reason=reason)
        status, error = model.OperationStatus.FINISHED, None
    except Exception as exc:
        status, error = model.OperationStatus.FAILED, getattr(exc, "user_message", str(exc))
    if plane.has_project(op.project_id):
        await plane.commit(put=[op.replace(status=status, error=error,
                                           total_duration_ms=int((time.monotonic() - started) * 1000))])


def _allocate_uid(plane: ControlPlane, project_id: str) -> int:
    """A uid no project ever had (ADR 0016: processes or files a deleted project left on the host
    must never reach a new one)."""
    s = plane.settings
    uid = plane.store.allocate_uid(s.compute_uid_base, s.compute_uid_count, project_id, model.utcnow())
    if uid is None:
        raise StorageError(f"all {s.compute_uid_count} compute uids from {s.compute_uid_base} on have been given to "
                           "projects (a uid is never reused); raise ARGON_COMPUTE_UID_COUNT or move "
                           "ARGON_COMPUTE_UID_BASE to a free range", retryable=False)
    return uid


def _make_branch_data(plane: ControlPlane, project_id: str, template: Path, pgdata: Path, uid: int | None) -> None:
    """The project's tree, built while it is still root's (0700): its uid gets the project
    directory last, so it never sees the tree before it is complete."""
    project_dir = plane.layout.project_dir(project_id)
    project_dir.mkdir(mode=0o700, parents=True, exist_ok=False)
    user = OsUser(uid, uid) if uid is not None else None
    log_dir = plane.layout.compute_log(project_id, pgdata.parent.name).parent
    for path in (pgdata.parent, log_dir):
        safefs.makedirs(path)
    plane.spares.take(template, pgdata, user)  # a ready copy is a rename; else copy now
    with safefs.parent(pgdata) as (d, name):
        d.chmod_dir(name, 0o700)
    if user is not None:
        for path in (log_dir, pgdata.parent, pgdata.parent.parent, project_dir):
            safefs.chown(path, user)


async def update_project(control: Control, project_id: str, *, name: str | None = None,
                         endpoint_settings: model.EndpointSettings | None = None,
                         history_retention_seconds: int | None = None,
                         settings: Callable[[model.ProjectSettings], model.ProjectSettings] | None = None,
                         ) -> tuple[model.Project, list[model.Operation]]:
    """Rename a project, change the defaults of its new computes, its history retention or its
    settings (`settings` makes the new ones from the current ones, under the project's lock). Enabling logical replication restarts the running computes with `wal_level = logical`
    (Neon suspends them): the operations list says so, one `suspend_compute` + `start_compute` each."""
    if history_retention_seconds is not None and not 0 <= history_retention_seconds <= model.MAX_HISTORY_RETENTION:
        raise UserError(f"history_retention_seconds must be between 0 and {model.MAX_HISTORY_RETENTION}")
    plane = control.plane
    async with plane.project_lock(project_id):
        p = plane.project(project_id)
        changes: dict[str, object] = {}
        if name is not None and name != p.name:
            changes["name"] = ids.check_display_name(name, "project")
        if endpoint_settings is not None and endpoint_settings != p.default_endpoint_settings:
            changes["default_endpoint_settings"] = endpoint_settings
        if history_retention_seconds is not None and history_retention_seconds != p.history_retention_seconds:
            changes["history_retention_seconds"] = history_retention_seconds
        new_settings = settings(p.settings) if settings is not None else p.settings
        if new_settings != p.settings:
            changes["settings"] = new_settings
        ops = []
        if changes:
            logical = new_settings.enable_logical_replication and not p.settings.enable_logical_replication
            p = p.replace(**changes)
            await plane.commit(put=[p])
            action = (model.OperationAction.APPLY_STORAGE_CONFIG if "history_retention_seconds" in changes
                      else model.OperationAction.APPLY_CONFIG)
            ops.append(await plane.record(project_id, action))
            if logical:
                ops += await _restart_for_logical_replication(control, p)
    return p, ops


async def _restart_for_logical_replication(control: Control, project: model.Project) -> list[model.Operation]:
    """`wal_level = logical` and the roles' replication privileges at each read-write compute's next
    start: now for the running ones (restarted), at their wake for the others."""
    ops: list[model.Operation] = []
    for branch in control.plane.branches(project.id):  # copies of compute-less branches need the spec too
        control.computes.leave_step(branch.id)
    for ep in control.plane.endpoints(project.id):
        if ep.type is not model.EndpointType.READ_WRITE:
            continue  # a replica replays its primary's WAL; its own wal_level does not matter
        control.computes.mark_needs_spec(ep.id)
        if control.plane.is_running(ep.id):
            ops += await restart_endpoint(control, project.id, ep.id)
    return ops


async def delete_project(control: Control, project_id: str) -> model.Project:
    plane = control.plane
    project = plane.project(project_id)
    async with plane.project_lock(project_id):
        await plane.creating.settled(project_id)  # branch creates copying data (as its uid) finish first
        for b in plane.branches(project_id):
            await asyncio.to_thread(plane.branch_spares.drop, b.id)
        endpoints = plane.endpoints(project_id)
        # All at once: each stop waits for its postmaster, and a project may have many computes.
        await asyncio.gather(*(control.computes.retire(ep.id, reason="project deleted", mode="immediate")
                               for ep in endpoints))
        await failpoint_async("project.delete.after_stop")
        await plane.commit(delete=[project])  # the commit point
        await failpoint_async("project.delete.after_metadata")
        if project.os_uid is not None and running_as_root():  # nothing may run as a deleted project's uid
            killed = await asyncio.to_thread(kill_all, project.os_uid)
            if killed:
                log.warning("project %s: killed %d process(es) still running as its uid %d", project_id, killed,
                            project.os_uid)
        await asyncio.to_thread(safefs.rmtree, plane.layout.project_dir(project_id))
        await failpoint_async("project.delete.after_rmtree")
        for ep in endpoints:
            plane.writes.forget(ep.id)
            await asyncio.to_thread(safefs.rmtree, plane.layout.socket_dir(ep.id))
        if project.os_uid is not None:
            await plane.db(plane.store.release_uid, project.os_uid, model.utcnow())
    log.info("project %s deleted", project_id)
    return project

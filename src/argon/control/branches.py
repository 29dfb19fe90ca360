"""Branches: create from the parent's head (a copy-on-write or plain copy of its cluster), rename,
set as default, restore from another branch, delete.

Policy only; the copy itself is `argon.storage.branching`. A new branch inherits the parent's roles
(same verifiers and stored passwords) and databases, because its cluster is the parent's at the
moment of the request. The parent's endpoint lock is held while its cluster is copied: a stopped
parent cannot start under the copy, a running one cannot be suspended in the middle of the backup.
Point-in-time branches (`parent_lsn`, `parent_timestamp`) and restores to a past point are rebuilt
from the parent's history (`argon.control.pitr`); every new data state starts a history epoch
(`argon.control.retention`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from argon import ids, model, safefs
from argon.compute import postmaster
from argon.compute.admin import connect_admin
from argon.compute.osuser import project_user
from argon.control import pitr, retention
from argon.control.endpoints import check_settings_for
from argon.control.lifecycle import spec_key
from argon.control.plane import ControlPlane
from argon.control.projects import first_start
from argon.control.replicas import remove_replicas
from argon.control.schema import schema_only_copy
from argon.control.services import Control
from argon.errors import Conflict, Locked, NotFound, Precondition, UserError
from argon.failpoints import failpoint, failpoint_async
from argon.storage import branch_spares, branching, wal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BranchRequest:
    name: str | None = None
    parent_id: str | None = None
    parent_lsn: str | None = None
    parent_timestamp: str | None = None
    protected: bool = False
    init_source: str = "parent-data"
    expires_at: datetime | None = None
    endpoints: list[model.EndpointSettings] = field(default_factory=list)
    endpoint_type: model.EndpointType = model.EndpointType.READ_WRITE  # of the one endpoint asked for
    endpoint_pg_settings: dict[str, str] = field(default_factory=dict)  # checked (tenant_settings)


@dataclass(frozen=True)
class CreatedBranch:
    branch: model.Branch
    endpoints: list[model.Endpoint]
    roles: list[model.Role]
    databases: list[model.Database]
    operations: list[model.Operation]


MAX_EXPIRY_DAYS = 30  # Neon's limit for expires_at


def check_expiry(expires_at: datetime | None) -> datetime | None:
    """A branch expiry must lie in the future, within Neon's 30 days."""
    if expires_at is None:
        return None
    if expires_at.tzinfo is None:
        raise UserError("expires_at needs a time zone (RFC 3339, e.g. 2026-12-01T00:00:00Z)")
    now = model.utcnow()
    if expires_at <= now:
        raise UserError("expires_at must be in the future")
    if (expires_at - now).days >= MAX_EXPIRY_DAYS:
        raise UserError(f"expires_at must be within {MAX_EXPIRY_DAYS} days")
    return expires_at


async def delete_expired(control: Control) -> list[str]:
    """Delete branches whose `expires_at` has passed, with their computes (run by the monitor)."""
    plane = control.plane
    now = model.utcnow()
    deleted = []
    for b in [b for b in plane.all_branches() if b.expires_at is not None and b.expires_at <= now]:
        try:
            await delete_branch(control, b.project_id, b.id, expired=True)
            deleted.append(b.id)
        except Exception as exc:  # e.g. it gained children: keep it, say why once per look
            log.warning("expired branch %s of %s not deleted: %s", b.id, b.project_id,
                        getattr(exc, "user_message", exc))
    return deleted


def touch_figures(control: Control, project_id: str) -> None:
    """A branch made, deleted or restored changes its relatives' files too (a parent's snapshot copied
    and linked into a child's history, link counts that split a file's blocks): measure them all."""
    for b in control.plane.branches(project_id):
        control.figures.touch(b.id)


def default_branch(plane: ControlPlane, project_id: str) -> model.Branch:
    for b in plane.branches(project_id):
        if b.default:
            return b
    raise NotFound(f"project {project_id!r} has no default branch")


@contextlib.asynccontextmanager
async def _parent_quiet(plane: ControlPlane, parent: model.Branch) -> AsyncIterator[model.Endpoint | None]:
    """Hold the lock of the parent's read-write endpoint (if any) while its cluster is copied."""
    primary = plane.primary(parent.project_id, parent.id)
    if primary is None:
        yield None
        return
    async with plane.endpoint_lock(primary.id):
        yield primary


def _make_branch_dir(plane: ControlPlane, project: model.Project, branch_id: str) -> None:
    user = project_user(project.os_uid)
    safefs.makedirs(plane.layout.branch_dir(project.id, branch_id), owner=user)
    safefs.makedirs(plane.layout.compute_log(project.id, branch_id).parent, owner=user)


async def _copy_parent(plane: ControlPlane, project: model.Project, parent: model.Branch, target: Path, *,
                       make_dir: bool = True) -> tuple[str | None, wal.ControlData | None, Path | None]:
    """Copy the head of `parent` into `target` (a new directory); returns the LSN it reflects and,
    for a stopped parent, its `pg_controldata` (the copy's too: read once, not again on the copy),
    and, when the copy was a spare's (`argon.storage.branch_spares`), the rest of the spare's
    directory: what was made ahead for the history, for the caller to use and remove.
    `make_dir`: `target` is a branch's pgdata whose branch directory is made first."""
    source = plane.layout.pgdata(project.id, parent.id)
    user = project_user(project.os_uid)  # the copy runs as the project's uid (argon.storage.clone)
    if make_dir:
        await asyncio.to_thread(_make_branch_dir, plane, project, target.parent.name)
    async with _parent_quiet(plane, parent) as ep:
        if ep is not None and plane.is_running(ep.id):
            conn = await connect_admin(plane.layout.socket_dir(ep.id))
            try:
                return await branching.clone_running(conn, plane.backend, source, target, user), None, None
            finally:
                await conn.close()
        if await asyncio.to_thread(postmaster.alive_on, source):  # not ours yet: starting, or in crash recovery
            raise Locked(f"branch {parent.name!r} is starting up (recovering after a restart); please retry later")
        spare = await asyncio.to_thread(_take_spare, plane, parent.id, source)
        if spare is not None:  # made ahead of time from exactly this data: a rename
            await asyncio.to_thread(safefs.rename, spare.pgdata, target)
            log.debug("branch %s: a spare copy of %s taken", target.parent.name, parent.id)
            return spare.control.checkpoint_lsn, spare.control, spare.path
        install = plane.installs.get(project.pg_version)
        stopped = await asyncio.to_thread(wal.control_data, install.bindir, source, user) if install else None
        await asyncio.to_thread(branching.clone_stopped, plane.backend, source, target, stopped, user)
        return (stopped.checkpoint_lsn, stopped, None) if stopped else (None, None, None)


SPARES_MAX = 4  # ready copies kept of one compute-less parent: as many as were branched at once, up to this


def spares_wanted(plane: ControlPlane, branch_id: str) -> int:
    """How many spare copies of a compute-less parent to keep: on a backend that shares blocks
    (reflink) a copy costs only its metadata, so SPARES_MAX from the first branch on (a test run's
    first `--parallel 4` finds four); on a byte-copy backend as many as were branched at once."""
    if plane.backend.name == "reflink":
        return SPARES_MAX
    return min(plane.creating.peak(branch_id), SPARES_MAX)


def _take_spare(plane: ControlPlane, parent_id: str, source: Path) -> branch_spares.Spare | None:
    if not plane.branch_spares.count(parent_id):
        return None
    return plane.branch_spares.take(parent_id, branch_spares.stamp(source))


def wants_spares(plane: ControlPlane, project_id: str, branch_id: str) -> bool:
    """Spares are kept of branches without any compute (templates, such as Django's test database
    templates): nothing changes their data, and they are branched again and again."""
    return plane.find_branch(branch_id) is not None and not plane.endpoints(project_id, branch_id)


async def refill_spares(control: Control, project_id: str, branch_id: str) -> None:
    """In the background after a branch of a compute-less parent: copies of the parent made ahead
    (`spares_wanted`), so the next creates are renames. Each copy
    reads the parent as a create does (registered in `creating`: no restore, start or delete of it
    meanwhile); one refill per parent at a time."""
    plane = control.plane
    pool = plane.branch_spares
    if branch_id in pool.refilling:
        return
    pool.refilling.add(branch_id)
    try:
        while pool.count(branch_id) < spares_wanted(plane, branch_id):
            token = f"spare-{ids.branch_id()}"
            async with plane.project_lock(project_id):
                if not wants_spares(plane, project_id, branch_id):
                    return
                plane.creating.begin(project_id, token, None, reads=branch_id)
            try:
                project = plane.project(project_id)
                install = plane.installs.get(project.pg_version)
                source = plane.layout.pgdata(project_id, branch_id)
                user = project_user(project.os_uid)
                if install is None or await asyncio.to_thread(postmaster.alive_on, source):
                    return
                stopped = await asyncio.to_thread(wal.control_data, install.bindir, source, user)
                def prepare(spare: Path, project: model.Project = project, stopped: wal.ControlData = stopped) -> None:
                    retention.prepare_epoch_from_parent(plane, project, branch_id, spare, stopped)

                if not await asyncio.to_thread(pool.make, branch_id, source, stopped, user, prepare):
                    return
            finally:
                plane.creating.done_reading(token, branch_id)
        log.debug("branch %s: %d spare copies ready", branch_id, pool.count(branch_id))
    except Exception as exc:  # a spare only saves time: the next create copies
        log.warning("could not prepare a spare copy of branch %s: %s", branch_id, getattr(exc, "user_message", exc))
    finally:
        pool.refilling.discard(branch_id)
        if plane.find_branch(branch_id) is None or not wants_spares(plane, project_id, branch_id):
            await asyncio.to_thread(pool.drop, branch_id)  # deleted, or given a compute, meanwhile


async def point_in_time(control: Control, project: model.Project, branch: model.Branch, target: Path, *,
                        lsn: str | None, timestamp: str | datetime | None) -> pitr.PointInTime:
    """`branch` as of `lsn`/`timestamp` in `target`: from the local history, or, for a point it no
    longer reaches, from the backup bucket (ADR 0018)."""
    try:
        return await pitr.materialize(control.plane, project, branch, target, lsn=lsn, timestamp=timestamp)
    except pitr.BeyondLocalHistory:
        if control.backup is None:
            raise
        log.info("branch %s at %s: beyond the local history, rebuilding it from the backup", branch.id,
                 timestamp or lsn)
        return await control.backup.materialize(
            project, branch, target, pitr.parse_timestamp(timestamp) if timestamp is not None else None, lsn)


def name_taken(plane: ControlPlane, project_id: str, name: str) -> bool:
    """A branch of the project has `name`, or a branch being created will (under the project lock)."""
    return any(b.name == name for b in plane.branches(project_id)) or plane.creating.name_taken(project_id, name)


async def _make_data(control: Control, project: model.Project, parent: model.Branch, bid: str,
                     req: BranchRequest) -> tuple[str | None, datetime | None]:
    """The new branch's data directory and first history epoch, outside the project lock; returns
    the LSN it reflects and the time it is of (a point in time's)."""
    plane = control.plane
    pgdata = plane.layout.pgdata(project.id, bid)
    parent_at = None
    copied = None  # the copy's pg_controldata, when read already
    linked = False  # the history base links the parent's (a plain copy of its head only)
    if req.init_source == "schema-only":
        await asyncio.to_thread(_make_branch_dir, plane, project, bid)
        await schema_only_copy(control, project, parent, pgdata)
        await failpoint_async("branch.create_schema_only.after_restore")
        lsn = None
    elif req.parent_lsn or req.parent_timestamp:
        await asyncio.to_thread(_make_branch_dir, plane, project, bid)
        point = await point_in_time(control, project, parent, pgdata, lsn=req.parent_lsn,
                                    timestamp=req.parent_timestamp)
        lsn, parent_at = point.lsn, point.at
        await failpoint_async("branch.create_at_point.after_recovery")
    else:
        began = time.monotonic()
        lsn, copied, prepared = await _copy_parent(plane, project, parent, pgdata)
        try:
            await failpoint_async("branch.create.after_copy")
            copied_at = time.monotonic()
            linked = await asyncio.to_thread(retention.begin_epoch_from_parent, plane, project, bid, pgdata,
                                             parent.id, consistent_lsn=lsn, control=copied, prepared=prepared)
        finally:
            if prepared is not None:
                await asyncio.to_thread(safefs.rmtree, prepared)
        log.debug("branch %s: copy %.0f ms, history %.0f ms", bid, (copied_at - began) * 1000,
                  (time.monotonic() - copied_at) * 1000)
    if not linked:
        await asyncio.to_thread(retention.begin_epoch, plane, project, bid, pgdata, reason="branch created",
                                consistent_lsn=lsn, fresh=True, control=copied)
    await failpoint_async("branch.create.after_epoch")
    return lsn, parent_at


async def _commit_created(control: Control, project_id: str, parent_id: str, bid: str, name: str,
                          req: BranchRequest, *, lsn: str | None, parent_at: datetime | None,
                          started: float, endpoint_ids: list[str], spec_written: bool) -> CreatedBranch:
    """Under the project lock: the new branch, its roles, databases, endpoints and operations in one
    transaction (the commit point). The parent is looked up again: a project deleted meanwhile is a
    404 (its directory, the new branch's with it, went with it). `spec_written`: the endpoints'
    spec intents are on disk already (else they are written here, before the commit)."""
    plane = control.plane
    parent = plane.branch(project_id, parent_id)
    now = model.utcnow()
    branch = model.Branch(id=bid, project_id=project_id, name=name, created_at=now, updated_at=now,
                          parent_id=parent.id, parent_lsn=lsn, parent_timestamp=parent_at or now, protected=req.protected,
                          init_source=req.init_source, expires_at=check_expiry(req.expires_at))
    roles = [r.replace(branch_id=bid, created_at=now) for r in await plane.db(plane.store.list_roles, parent.id)]
    parent_dbs = await plane.db(plane.store.list_databases, parent.id)
    endpoints = [model.Endpoint(id=eid, project_id=project_id, branch_id=bid, created_at=now,
                                updated_at=now, autoscaling_limit_min_cu=s.autoscaling_limit_min_cu,
                                autoscaling_limit_max_cu=s.autoscaling_limit_max_cu,
                                suspend_timeout_seconds=s.suspend_timeout_seconds, type=req.endpoint_type,
                                pg_settings=dict(req.endpoint_pg_settings), address=plane.new_endpoint_address())
                 for eid, s in zip(endpoint_ids, req.endpoints, strict=True)]
    ops = [model.Operation(id=ids.operation_id(), project_id=project_id,
                           action=model.OperationAction.CREATE_BRANCH, status=model.OperationStatus.FINISHED,
                           created_at=now, updated_at=now, branch_id=bid,
                           total_duration_ms=int((time.monotonic() - started) * 1000))]
    ops += [model.Operation(id=ids.operation_id(), project_id=project_id,
                            action=model.OperationAction.START_COMPUTE, status=model.OperationStatus.RUNNING,
                            created_at=now, updated_at=now, branch_id=bid, endpoint_id=e.id) for e in endpoints]
    databases = [model.Database(**{**d.__dict__, "id": 0, "branch_id": bid, "created_at": now, "updated_at": now})
                 for d in parent_dbs]  # their ids are taken in the transaction
    if not spec_written:
        await _spec_pending(control, endpoint_ids)
    stored = await plane.commit(put=[branch, *roles, *databases, *endpoints, *ops])
    databases = [d for d in stored if isinstance(d, model.Database)]
    return CreatedBranch(branch, endpoints, roles, databases, ops)


async def _spec_pending(control: Control, endpoint_ids: list[str]) -> None:
    """The new endpoints' first start applies the roles and databases, even after a crash (the
    reconciler drops these intents for endpoints that never reached the metadata)."""
    for eid in endpoint_ids:
        await asyncio.to_thread(control.computes.spec_pending, eid)


def _step_mark(control: Control, parent: model.Branch, req: BranchRequest) -> int | None:
    """The parent's mark in step (`Lifecycle.step_mark`) when the new branch is a copy of its head;
    equal before the copy and at the commit, the copy holds what the metadata gives it: its computes
    need no spec (no intent, no admin session at their first start: ADR 0033)."""
    if req.init_source != "parent-data" or req.parent_lsn or req.parent_timestamp:
        return None
    return control.computes.step_mark(parent.id)


async def create_branch(control: Control, project_id: str, req: BranchRequest) -> CreatedBranch:
    plane = control.plane
    started = time.monotonic()
    project = plane.project(project_id)
    if req.parent_lsn and req.parent_timestamp:
        raise UserError("give parent_lsn or parent_timestamp, not both")
    if req.init_source not in ("parent-data", "schema-only"):
        raise UserError("init_source must be parent-data or schema-only")
    if req.init_source == "schema-only" and (req.parent_lsn or req.parent_timestamp):
        raise UserError("a schema-only branch copies the parent's current schema; omit parent_lsn and "
                        "parent_timestamp")
    if len(req.endpoints) > 1:
        raise UserError("create a branch with one endpoint; add more with POST /projects/{project_id}/endpoints")
    check_settings_for(plane, project_id, req.endpoint_pg_settings)
    await asyncio.to_thread(control.disk.check_room, "a new branch")  # 507 within the reserve (ADR 0025)
    parent_id = req.parent_id or default_branch(plane, project_id).id
    await control.restored(plane.branch(project_id, parent_id).id, reason="a branch is created from it")
    # The project lock is held for the name check and the id (then the name is taken in `creating`),
    # and again for the metadata commit; the data is made outside it, so creates run side by side
    # (ADR 0033). Meanwhile the parent can be neither deleted, restored, nor given a new compute.
    async with plane.project_lock(project_id):
        parent = plane.branch(project_id, req.parent_id) if req.parent_id else default_branch(plane, project_id)
        bid = ids.branch_id()
        name = req.name or bid
        if name_taken(plane, project_id, name):
            raise Conflict(f"branch {name!r} already exists")
        plane.creating.begin(project_id, bid, name, reads=parent.id)
        mark = _step_mark(control, parent, req)
    endpoint_ids = [ids.endpoint_id() for _ in req.endpoints]
    in_step = False
    try:
        data_began = time.monotonic()
        lsn, parent_at = await _make_data(control, project, parent, bid, req)
        data_ms = (time.monotonic() - data_began) * 1000
        plane.creating.done_reading(bid, parent.id)
        if mark is None:
            await _spec_pending(control, endpoint_ids)  # outside the lock: an intent of no endpoint yet
            await failpoint_async("branch.create.after_spec_intent")
        async with plane.project_lock(project_id):
            in_step = mark is not None and _step_mark(control, parent, req) == mark
            created = await _commit_created(control, project_id, parent.id, bid, name, req, lsn=lsn,
                                            parent_at=parent_at, started=started, endpoint_ids=endpoint_ids,
                                            spec_written=in_step or mark is None)
    except BaseException:
        await asyncio.to_thread(safefs.rmtree, plane.layout.branch_dir(project_id, bid))
        for eid in endpoint_ids:
            await asyncio.to_thread(plane.intents.remove, spec_key(eid))
        raise
    finally:
        plane.creating.end(project_id, bid, parent.id)
    await failpoint_async("branch.create.after_metadata")
    ops = created.operations
    if req.init_source == "parent-data" and not (req.parent_lsn or req.parent_timestamp) and \
            wants_spares(plane, project_id, parent.id):
        plane.spawn(refill_spares(control, project_id, parent.id), f"spare copies of {parent.id}")
    touch_figures(control, project_id)
    log.info("branch %s (%s) of %s created from %s at %s in %.0f ms (its data %.0f ms)", bid, name, project_id,
             parent.id, lsn, (time.monotonic() - started) * 1000, data_ms)
    if in_step:
        control.computes.enter_step(bid)  # no compute of it has started yet
    for op in ops[1:]:
        if req.endpoint_type is model.EndpointType.READ_WRITE and not in_step:  # a replica's roles: the WAL's
            control.computes.mark_needs_spec(op.endpoint_id or "")
        plane.spawn(first_start(control, op, reason="branch created"), f"first start of {op.endpoint_id}")
    return created


_KEEP = object()  # update_branch: "leave expires_at as it is" (None clears it)


async def update_branch(control: Control, project_id: str, branch_id: str, *, name: str | None = None,
                        protected: bool | None = None, expires_at: datetime | object | None = _KEEP
                        ) -> model.Branch:
    """Rename, protect or unprotect a branch, or set or clear its expiry (the API's PATCH, the console's
    rename). Unchanged values are no-ops; a name already taken is a conflict."""
    plane = control.plane
    async with plane.project_lock(project_id):
        branch = plane.branch(project_id, branch_id)
        changes: dict[str, object] = {}
        if name is not None and name != branch.name:
            name = ids.check_display_name(name, "branch")
            if name_taken(plane, project_id, name):
                raise Conflict(f"branch {name!r} already exists")
            changes["name"] = name
        if protected is not None:
            changes["protected"] = protected
        if expires_at is not _KEEP:
            if expires_at is not None and branch.default:
                raise UserError("the default branch cannot expire")
            changes["expires_at"] = check_expiry(expires_at if isinstance(expires_at, datetime) else None)
        if changes:
            branch = branch.replace(**changes)
            await plane.commit(put=[branch])
    return branch


async def set_default_branch(control: Control, project_id: str, branch_id: str) -> model.Branch:
    """Make a branch the project's default (the one `connection_uri` and new branches use)."""
    plane = control.plane
    async with plane.project_lock(project_id):
        target = plane.branch(project_id, branch_id)
        changed = [b.replace(default=False) for b in plane.branches(project_id) if b.default and b.id != branch_id]
        if not target.default:
            target = target.replace(default=True)
            changed.append(target)
        if changed:
            await plane.commit(put=changed)
    return target


def _check_deletable(plane: ControlPlane, project_id: str, branch_id: str, *, expired: bool) -> model.Branch:
    branch = plane.branch(project_id, branch_id)
    if expired and (branch.expires_at is None or branch.expires_at > model.utcnow()):
        raise Conflict("the branch's expiry changed meanwhile")
    if branch.default:
        raise Precondition("the default branch cannot be deleted; make another branch the default first")
    if branch.protected:
        raise Precondition(f"branch {branch.name!r} is protected; unprotect it before deleting it")
    children = [b.name for b in plane.branches(project_id) if b.parent_id == branch_id]
    if children:
        raise Precondition(f"branch {branch.name!r} has child branches ({', '.join(children)}); delete them first")
    if plane.creating.children_of(branch_id):
        raise Precondition(f"branch {branch.name!r} is being copied into a new branch; delete it once that "
                           "branch is created (and deleted)")
    return branch


async def delete_branch(control: Control, project_id: str, branch_id: str, *,
                        expired: bool = False) -> tuple[model.Branch, list[model.Operation]]:
    plane = control.plane
    # Its computes are stopped before the project lock (checked as under it first), so that the deletes
    # of several branches at once (a test run's clones) stop theirs side by side; under the lock they
    # are checked again and stopped for good (a compute woken meanwhile). What SQL changed is not read
    # back: the branch goes. Should the delete be refused after all (a child made meanwhile), the
    # compute starts again at its next connection, as after a suspend.
    _check_deletable(plane, project_id, branch_id, expired=expired)
    await asyncio.gather(*(control.computes.stop(ep.id, reason="branch deleted", mode="immediate", sync=False)
                           for ep in plane.endpoints(project_id, branch_id)))
    async with plane.project_lock(project_id):
        branch = _check_deletable(plane, project_id, branch_id, expired=expired)
        await plane.creating.settled(project_id, branch_id)  # a spare copy being made of it
        ops = []
        endpoints = plane.endpoints(project_id, branch_id)
        await asyncio.gather(*(control.computes.retire(ep.id, reason="branch deleted", mode="immediate")
                               for ep in endpoints))
        await failpoint_async("branch.delete.after_stop")
        await plane.commit(delete=[branch])  # its endpoints, roles and databases with it: the commit point
        control.computes.leave_step(branch_id)
        await failpoint_async("branch.delete.after_metadata")
        for ep in endpoints:
            plane.writes.forget(ep.id)
        ops.append(await plane.record(project_id, model.OperationAction.DELETE_TIMELINE, branch_id=branch_id))
    # Its files go in the background, outside the lock: no metadata names the directory any more (a
    # `kill -9` before it is gone leaves an orphan the start-up reconciler removes), and a caller
    # deleting several branches at once (a test run's) waits for none of it.
    plane.spawn(_remove_files(plane, project_id, branch_id, [ep.id for ep in endpoints]),
                f"removing the files of branch {branch_id}")
    touch_figures(control, project_id)
    log.info("branch %s of %s deleted%s", branch_id, project_id, " (expired)" if expired else "")
    return branch.replace(state=model.BranchState.ARCHIVED), ops


async def _remove_files(plane: ControlPlane, project_id: str, branch_id: str, endpoint_ids: list[str]) -> None:
    """A deleted branch's directory, its spare copies and its computes' socket directories."""
    for eid in endpoint_ids:
        await asyncio.to_thread(safefs.rmtree, plane.layout.socket_dir(eid))
    await asyncio.to_thread(safefs.rmtree, plane.layout.branch_dir(project_id, branch_id))
    await asyncio.to_thread(plane.branch_spares.drop, branch_id)
    await failpoint_async("branch.delete.after_rmtree")


async def restore_branch(control: Control, project_id: str, branch_id: str, source_branch_id: str, *,
                         source_lsn: str | None = None, source_timestamp: str | None = None,
                         preserve_under_name: str | None = None,
                         build: Callable[[Path], Awaitable[str | None]] | None = None,
                         snapshot_id: str | None = None) -> tuple[model.Branch, list[model.Operation]]:
    """Replace a branch's data with the head of another branch ("reset from parent"), keeping its id,
    endpoint and connection string. Its compute is stopped (connected clients get Postgres' own
    "terminating connection" error) and starts on the next connection with the new data.
    `preserve_under_name` keeps the old data as a new branch, which becomes the restored one's parent.
    `build` (a snapshot's restore, `argon.control.snapshots`) lays out the new data instead of a
    copy of the source; `snapshot_id` is recorded as the branch's `restored_from`."""
    plane = control.plane
    started = time.monotonic()
    project = plane.project(project_id)
    if source_lsn and source_timestamp:
        raise UserError("give source_lsn or source_timestamp, not both")
    if source_branch_id == branch_id and not (source_lsn or source_timestamp or build):
        raise UserError("restoring a branch from its own head changes nothing; give source_lsn or "
                        "source_timestamp to restore it to its own past, or another source_branch_id")
    # A lazy restore's branch: its data first, else the fetch would land over the restored data.
    await control.restored(plane.branch(project_id, branch_id).id, plane.branch(project_id, source_branch_id).id,
                           reason="a restore")
    async with plane.project_lock(project_id):
        target = plane.branch(project_id, branch_id)
        source = plane.branch(project_id, source_branch_id)
        if target.protected:
            raise Precondition(f"branch {target.name!r} is protected; unprotect it before restoring it")
        if preserve_under_name is not None:
            preserve_under_name = ids.check_display_name(preserve_under_name, "branch")
            if name_taken(plane, project_id, preserve_under_name):
                raise Conflict(f"branch {preserve_under_name!r} already exists")
        await plane.creating.settled(project_id, branch_id)  # a create copying its data finishes first
        await asyncio.to_thread(plane.branch_spares.drop, branch_id)  # its data is about to change
        endpoints = plane.endpoints(project_id, branch_id)
        async with contextlib.AsyncExitStack() as stack:
            for ep in endpoints:
                await stack.enter_async_context(plane.endpoint_lock(ep.id))
                await control.computes.stop_locked(ep.id, reason="branch restored", project_locked=True)
            if preserve_under_name is None and control.backup is not None and retention.enabled(project):
                # Its current state goes for good: the bucket must have it first (ADR 0018).
                await control.backup.ship_before_discard(project, target)
            pgdata = plane.layout.pgdata(project_id, branch_id)
            fresh = pgdata.with_name("pgdata.restoring")
            await asyncio.to_thread(safefs.rmtree, fresh)
            try:
                if build is not None:
                    lsn = await build(fresh)
                elif source_lsn or source_timestamp:
                    point = await point_in_time(control, project, source, fresh, lsn=source_lsn,
                                                timestamp=source_timestamp)
                    lsn = point.lsn
                else:
                    lsn, _, prepared = await _copy_parent(plane, project, source, fresh)
                    if prepared is not None:  # a spare's: its history parts are a new branch's, not these
                        await asyncio.to_thread(safefs.rmtree, prepared)
            except BaseException:
                await asyncio.to_thread(safefs.rmtree, fresh)
                raise
            await failpoint_async("branch.restore.after_copy")
            intent = {"project": project_id, "branch": branch_id, "source": source.id, "lsn": lsn,
                      "backup_id": ids.branch_id() if preserve_under_name is not None else None,
                      "backup_name": preserve_under_name, "operation": ids.operation_id(), "snapshot": snapshot_id}
            await asyncio.to_thread(plane.intents.put, restore_key(branch_id), intent)
            await failpoint_async("branch.restore.after_intent")
            await asyncio.to_thread(_swap_in, plane, project, intent)
            restored, ops = await finish_restore(control, intent, duration_ms=int((time.monotonic() - started) * 1000))
    backup = intent["backup_id"]
    touch_figures(control, project_id)
    log.info("branch %s of %s restored from %s at %s%s in %.0f ms", branch_id, project_id, source.id, lsn,
             f" (old state kept as {backup})" if backup else "", (time.monotonic() - started) * 1000)
    return restored, ops


# A restore, step by step (docs/architecture.md, "Crash consistency"): the new data is built in
# `pgdata.restoring`; the intent is recorded; the old data is moved aside (to `pgdata.old`, or into
# the preserved branch's directory); the new data is renamed into place: the commit point. Then the
# history epochs, the metadata (roles, databases, parent, the preserved branch, the operation, in one
# transaction), and the old data is deleted. The reconciler rolls an intent back while
# `pgdata.restoring` exists and finishes it otherwise (`finish_restore` is idempotent: the operation
# row says whether the metadata is in).

def restore_key(branch_id: str) -> str:
    return f"restore-{branch_id}"


def _aside(plane: ControlPlane, intent: dict[str, Any]) -> Path:
    """Where a restore moves the branch's old data: the preserved branch, or `pgdata.old`."""
    if intent["backup_id"]:
        return plane.layout.pgdata(intent["project"], intent["backup_id"])
    return plane.layout.pgdata(intent["project"], intent["branch"]).with_name("pgdata.old")


def _swap_in(plane: ControlPlane, project: model.Project, intent: dict[str, Any]) -> None:
    branch_id = intent["branch"]
    pgdata = plane.layout.pgdata(project.id, branch_id)
    if intent["backup_id"]:
        _make_branch_dir(plane, project, intent["backup_id"])
    retention.end_epoch(plane, project, branch_id, pgdata)
    failpoint("branch.restore.after_end_epoch")
    safefs.rename(pgdata, _aside(plane, intent))
    failpoint("branch.restore.after_aside")
    safefs.rename(pgdata.with_name("pgdata.restoring"), pgdata)  # the commit point
    failpoint("branch.restore.after_swap")


def undo_restore(plane: ControlPlane, intent: dict[str, Any]) -> None:
    """The reconciler, for a restore cut short before its commit point: the old data back in place,
    the new copy and the preserved branch's directory removed, the history epoch reopened."""
    project = plane.project(intent["project"])
    pgdata = plane.layout.pgdata(project.id, intent["branch"])
    aside = _aside(plane, intent)
    if not safefs.lexists(pgdata) and safefs.lexists(aside):
        safefs.rename(aside, pgdata)
    safefs.rmtree(pgdata.with_name("pgdata.restoring"))
    if intent["backup_id"] and intent["backup_id"] not in {b.id for b in plane.branches(project.id)}:
        safefs.rmtree(plane.layout.branch_dir(project.id, intent["backup_id"]))
    retention.reopen_epoch(plane, project, intent["branch"])
    plane.intents.remove(restore_key(intent["branch"]))


async def finish_restore(control: Control, intent: dict[str, Any], *,
                         duration_ms: int = 0) -> tuple[model.Branch, list[model.Operation]]:
    """Everything after a restore's commit point; idempotent, so the reconciler can run it again."""
    plane = control.plane
    project_id, branch_id = intent["project"], intent["branch"]
    project = plane.project(project_id)
    target = plane.branch(project_id, branch_id)
    pgdata = plane.layout.pgdata(project_id, branch_id)
    op = await plane.db(plane.store.get_operation, intent["operation"])
    if op is None:  # the metadata is not in yet
        source = plane.branch(project_id, intent["source"])
        lsn = intent["lsn"]
        now = model.utcnow()
        await asyncio.to_thread(remove_replicas, plane, project_id, branch_id)  # they copy the new data
        backup: model.Branch | None = None
        if intent["backup_id"]:
            backup = model.Branch(id=intent["backup_id"], project_id=project_id, name=intent["backup_name"],
                                  created_at=now, updated_at=now, parent_id=target.parent_id,
                                  parent_lsn=target.parent_lsn, parent_timestamp=target.parent_timestamp)
            await asyncio.to_thread(retention.begin_epoch, plane, project, backup.id,
                                    plane.layout.pgdata(project_id, backup.id),
                                    reason=f"kept when {target.name} was restored", fresh=True)
        # The restored branch keeps its older epochs: it can go back to before this restore.
        await asyncio.to_thread(retention.begin_epoch, plane, project, branch_id, pgdata,
                                reason="restored from own past" if source.id == branch_id else
                                f"restored from {source.name}", consistent_lsn=lsn)
        await failpoint_async("branch.restore.after_epochs")
        old_roles = await plane.db(plane.store.list_roles, branch_id)
        old_dbs = await plane.db(plane.store.list_databases, branch_id)
        parent = backup.id if backup else target.parent_id if source.id == branch_id else source.id
        restored = target.replace(parent_id=parent, parent_lsn=lsn, parent_timestamp=now,
                                  restored_from=intent.get("snapshot") or target.restored_from,
                                  restore_status="finalized" if intent.get("snapshot") else target.restore_status)
        new_roles = [r.replace(branch_id=branch_id) for r in await plane.db(plane.store.list_roles, source.id)]
        src_dbs = await plane.db(plane.store.list_databases, source.id)
        op = model.Operation(id=intent["operation"], project_id=project_id,
                             action=model.OperationAction.CREATE_TIMELINE, status=model.OperationStatus.FINISHED,
                             created_at=now, updated_at=now, branch_id=branch_id, total_duration_ms=duration_ms)
        put: list[object] = []
        if backup is not None:
            put += [backup, *(role.replace(branch_id=backup.id) for role in old_roles)]
            put += [model.Database(**{**db.__dict__, "id": 0, "branch_id": backup.id}) for db in old_dbs]
        put += [restored, *new_roles]
        put += [model.Database(**{**db.__dict__, "id": 0, "branch_id": branch_id, "created_at": now,
                                  "updated_at": now}) for db in src_dbs]
        await plane.commit(delete=[*old_roles, *old_dbs], put=[*put, op])
        await failpoint_async("branch.restore.after_metadata")
    control.computes.leave_step(branch_id)  # new data (and roles) in place
    for ep in plane.endpoints(project_id, branch_id):
        control.computes.mark_needs_spec(ep.id)
    await asyncio.to_thread(safefs.rmtree, pgdata.with_name("pgdata.old"))
    await failpoint_async("branch.restore.after_cleanup")
    await asyncio.to_thread(plane.intents.remove, restore_key(branch_id))
    return plane.branch(project_id, branch_id), [op]

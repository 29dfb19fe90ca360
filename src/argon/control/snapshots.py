"""Snapshots (Neon's snapshots API, ADR 0028): a named copy of a branch at one point, restorable to
a new branch or onto a branch, kept until deleted or until its `expires_at`.

A snapshot is a stopped cluster of its own under the project's tree
(`<project>/snapshots/<id>/pgdata`): the branch's head copied as a branch is, or the branch at an
LSN or time rebuilt from its history (`argon.control.pitr`). It does not depend on the branch's
history or on the branch itself, which may be reset, pruned or deleted. With continuous backup
the bases loop uploads it as a base backup (`snapshots/<project>/<id>.json`, chunks shared with
every other base in the bucket), and a restore on a machine that lost it (after `argon restore`)
fetches it back from there.

Restoring (`restore_snapshot`):
- without a target that differs from nothing, or with `finalize_restore: false` (Neon's default),
  a new branch holds the snapshot's data, `restore_status: restored`, to look at before
  `finalize_restore` swaps it in for the target;
- with `finalize_restore: true` the target's data is replaced in place (its id, endpoints and
  connection strings stay), the target's old state kept as a branch of its own (Neon keeps the
  replaced branch too), by the crash-safe restore of `argon.control.branches.restore_branch`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from pathlib import Path

from argon import ids, model, safefs
from argon.compute.osuser import project_user
from argon.control import branches, retention
from argon.control.services import Control
from argon.errors import Conflict, NotFound, Precondition, UserError
from argon.failpoints import failpoint_async
from argon.storage import branching

log = logging.getLogger(__name__)

KEEP = object()  # update_snapshot: leave expires_at as it is (None clears it)


async def get(control: Control, project_id: str, snapshot_id: str) -> model.Snapshot:
    plane = control.plane
    plane.project(project_id)
    snap = await plane.db(plane.store.get_snapshot, snapshot_id)
    if snap is None or snap.project_id != project_id:
        raise NotFound(f"snapshot {snapshot_id!r} not found")
    return snap


async def list_snapshots(control: Control, project_id: str) -> list[model.Snapshot]:
    plane = control.plane
    plane.project(project_id)
    return await plane.db(plane.store.list_snapshots, project_id)


def _expiry(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise UserError("expires_at needs a time zone (RFC 3339, e.g. 2026-12-31T23:59:59Z)")
    if value <= model.utcnow():
        raise UserError("expires_at must be in the future")
    return value


def parse_time(value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("z", "Z"))
    except ValueError:
        raise UserError(f"{what} {value!r} is not a time; use RFC 3339, e.g. 2026-12-31T23:59:59Z") from None
    if parsed.tzinfo is None:
        raise UserError(f"{what} needs a time zone (RFC 3339, e.g. 2026-12-31T23:59:59Z)")
    return parsed


async def create_snapshot(control: Control, project_id: str, branch_id: str, *, name: str | None = None,
                          lsn: str | None = None, timestamp: str | None = None, expires_at: datetime | None = None,
                          manual: bool = True) -> tuple[model.Snapshot, list[model.Operation]]:
    """Copy `branch_id` (its head, or as of `lsn` / `timestamp`) into a new snapshot."""
    plane = control.plane
    started = time.monotonic()
    if lsn and timestamp:
        raise UserError("give lsn or timestamp, not both")
    expires_at = _expiry(expires_at)
    if name is not None:
        name = ids.check_display_name(name, "snapshot")
    project = plane.project(project_id)
    user = project_user(project.os_uid)
    await control.restored(plane.branch(project_id, branch_id).id, reason="a snapshot")
    async with plane.project_lock(project_id):
        branch = plane.branch(project_id, branch_id)
        sid = ids.snapshot_id()
        home = plane.layout.snapshot_dir(project_id, sid)
        target = home / "pgdata"
        try:
            await asyncio.to_thread(safefs.makedirs, home, owner=user)
            if lsn or timestamp:
                point = await branches.point_in_time(control, project, branch, target, lsn=lsn, timestamp=timestamp)
                at_lsn, at = point.lsn, point.at
            else:
                (at_lsn, _, prepared), at = (await branches._copy_parent(plane, project, branch, target, make_dir=False),
                                             model.utcnow())
                if prepared is not None:  # a spare copy's history parts: a new branch's, not a snapshot's
                    await asyncio.to_thread(safefs.rmtree, prepared)
            now = model.utcnow()
            snap = model.Snapshot(id=sid, project_id=project_id, name=name or f"{branch.name}-{now:%Y%m%d%H%M%S}",
                                  created_at=now, updated_at=now, source_branch_id=branch.id, lsn=at_lsn, timestamp=at,
                                  expires_at=expires_at, manual=manual, full_size=branch.logical_size)
            op = model.Operation(id=ids.operation_id(), project_id=project_id,
                                 action=model.OperationAction.CREATE_TIMELINE, status=model.OperationStatus.FINISHED,
                                 created_at=now, updated_at=now, branch_id=branch.id,
                                 total_duration_ms=int((time.monotonic() - started) * 1000))
            await failpoint_async("snapshot.create.after_copy")
            await plane.commit(put=[snap, op])
        except BaseException:
            await asyncio.to_thread(safefs.rmtree, home)
            raise
    if control.backup is not None:
        control.backup.nudge()  # the bases loop uploads it
    log.info("snapshot %s (%s) of branch %s taken at %s in %.0f ms", sid, snap.name, branch.id, at_lsn,
             (time.monotonic() - started) * 1000)
    return snap, [op]


async def update_snapshot(control: Control, project_id: str, snapshot_id: str, *, name: str | None = None,
                          expires_at: datetime | object | None = KEEP) -> model.Snapshot:
    plane = control.plane
    async with plane.project_lock(project_id):
        snap = await get(control, project_id, snapshot_id)
        changes: dict[str, object] = {}
        if name is not None:
            changes["name"] = ids.check_display_name(name, "snapshot")
        if expires_at is not KEEP:
            changes["expires_at"] = _expiry(expires_at if isinstance(expires_at, datetime) else None)
        if changes:
            snap = snap.replace(**changes)
            await plane.commit(put=[snap])
    return snap


async def delete_snapshot(control: Control, project_id: str, snapshot_id: str) -> list[model.Operation]:
    plane = control.plane
    async with plane.project_lock(project_id):
        snap = await get(control, project_id, snapshot_id)
        await plane.commit(delete=[snap])  # the commit point: its files and bucket copy go after
        await failpoint_async("snapshot.delete.after_metadata")
        await asyncio.to_thread(safefs.rmtree, plane.layout.snapshot_dir(project_id, snap.id))
        op = await plane.record(project_id, model.OperationAction.DELETE_TIMELINE, branch_id=snap.source_branch_id)
    if control.backup is not None:
        await control.backup.forget_snapshot(project_id, snap.id)
    log.info("snapshot %s of %s deleted", snapshot_id, project_id)
    return [op]


async def delete_expired(control: Control) -> list[str]:
    """Delete snapshots whose `expires_at` has passed (run by the monitor beside expired branches)."""
    plane = control.plane
    now = model.utcnow()
    gone = []
    for snap in await plane.db(plane.store.list_all_snapshots):
        if snap.expires_at is not None and snap.expires_at <= now:
            try:
                await delete_snapshot(control, snap.project_id, snap.id)
                gone.append(snap.id)
            except Exception as exc:
                log.warning("expired snapshot %s not deleted: %s", snap.id, getattr(exc, "user_message", exc))
    return gone


async def remove_orphans(control: Control) -> int:
    """Snapshot directories no snapshot record owns (`kill -9` between a snapshot's copy and its
    record, or between a delete's record and the removal of its files): removed by start-up
    reconciliation, never through a link (`argon.safefs`). Returns how many."""
    plane = control.plane
    known = {(s.project_id, s.id) for s in await plane.db(plane.store.list_all_snapshots)}
    removed = 0
    for project in plane.projects():
        top = plane.layout.project_dir(project.id) / "snapshots"
        if not await asyncio.to_thread(safefs.is_dir, top):
            continue
        for name in await asyncio.to_thread(safefs.listdir, top):
            if (project.id, name) not in known:
                await asyncio.to_thread(safefs.rmtree, top / name)
                removed += 1
    if removed:
        log.warning("removed %d snapshot directory(ies) that no snapshot owns (an interrupted create or delete)",
                    removed)
    return removed


async def _lay_out(control: Control, project: model.Project, snap: model.Snapshot, target: Path) -> str | None:
    """A copy of the snapshot's cluster at `target` (new), from the local copy or, when this disk no
    longer has it (restored from the bucket), from the backup."""
    plane = control.plane
    user = project_user(project.os_uid)
    source = plane.layout.snapshot_dir(project.id, snap.id) / "pgdata"
    if not await asyncio.to_thread(safefs.is_dir, source):
        if control.backup is None:
            raise Precondition(f"snapshot {snap.id!r} has no data on this machine and backup is off "
                               "(ARGON_BACKUP_URL), so it cannot be restored")
        await asyncio.to_thread(safefs.makedirs, source.parent, owner=user)
        await control.backup.fetch_snapshot(project, snap, source)
    await asyncio.to_thread(branching.clone_stopped, plane.backend, source, target, None, user)
    return snap.lsn


async def restore_snapshot(control: Control, project_id: str, snapshot_id: str, *, name: str | None = None,
                           target_branch_id: str | None = None, finalize: bool = False
                           ) -> tuple[model.Branch, list[model.Operation]]:
    plane = control.plane
    project = plane.project(project_id)
    snap = await get(control, project_id, snapshot_id)
    target_id = target_branch_id or snap.source_branch_id
    if target_id is None or target_id not in {b.id for b in plane.branches(project_id)}:
        if target_branch_id is not None or finalize:
            plane.branch(project_id, target_branch_id or "")  # 404 naming it
        target_id = None  # the source branch is gone: restore to a new branch only
    if finalize:
        assert target_id is not None
        target = plane.branch(project_id, target_id)
        return await branches.restore_branch(
            control, project_id, target_id, target_id, preserve_under_name=_replaced_name(target, name),
            build=lambda fresh: _lay_out(control, project, snap, fresh), snapshot_id=snap.id)
    return await _new_branch(control, project, snap, name, target_id)


def _replaced_name(target: model.Branch, name: str | None) -> str:
    """The name the replaced branch keeps: given, or `<name>_old_<time>` as Neon makes them."""
    if name:
        return name
    return f"{target.name}_old_{model.utcnow():%Y-%m-%dT%H:%M:%S}"


async def _new_branch(control: Control, project: model.Project, snap: model.Snapshot, name: str | None,
                      target_id: str | None) -> tuple[model.Branch, list[model.Operation]]:
    plane = control.plane
    started = time.monotonic()
    async with plane.project_lock(project.id):
        bid = ids.branch_id()
        name = ids.check_display_name(name, "branch") if name else f"{snap.name}_restored_{bid[-8:]}"
        if any(b.name == name for b in plane.branches(project.id)):
            raise Conflict(f"branch {name!r} already exists")
        pgdata = plane.layout.pgdata(project.id, bid)
        try:
            await asyncio.to_thread(branches._make_branch_dir, plane, project, bid)
            lsn = await _lay_out(control, project, snap, pgdata)
            await asyncio.to_thread(retention.begin_epoch, plane, project, bid, pgdata,
                                    reason=f"restored from snapshot {snap.id}", consistent_lsn=None, fresh=True)
        except BaseException:
            await asyncio.to_thread(safefs.rmtree, plane.layout.branch_dir(project.id, bid))
            raise
        now = model.utcnow()
        roles_from = target_id or snap.source_branch_id or branches.default_branch(plane, project.id).id
        if roles_from not in {b.id for b in plane.branches(project.id)}:
            roles_from = branches.default_branch(plane, project.id).id
        branch = model.Branch(id=bid, project_id=project.id, name=name, created_at=now, updated_at=now,
                              parent_id=target_id, parent_lsn=lsn, parent_timestamp=snap.timestamp or now,
                              restored_from=snap.id, restore_status="restored", restore_target=target_id)
        roles = [r.replace(branch_id=bid, created_at=now) for r in await plane.db(plane.store.list_roles, roles_from)]
        dbs = [model.Database(**{**d.__dict__, "id": 0, "branch_id": bid, "created_at": now, "updated_at": now})
               for d in await plane.db(plane.store.list_databases, roles_from)]
        op = model.Operation(id=ids.operation_id(), project_id=project.id, action=model.OperationAction.CREATE_BRANCH,
                             status=model.OperationStatus.FINISHED, created_at=now, updated_at=now, branch_id=bid,
                             total_duration_ms=int((time.monotonic() - started) * 1000))
        try:
            await failpoint_async("snapshot.restore.after_copy")
            await plane.commit(put=[branch, *roles, *dbs, op])
        except BaseException:
            await asyncio.to_thread(safefs.rmtree, plane.layout.branch_dir(project.id, bid))
            raise
    log.info("snapshot %s restored to new branch %s in %.0f ms", snap.id, bid, (time.monotonic() - started) * 1000)
    return branch, [op]


async def finalize_restore(control: Control, project_id: str, branch_id: str, *,
                           name: str | None = None) -> list[model.Operation]:
    """Swap a restored (previewed) branch in for its target: the target's data becomes the preview's
    (its id, endpoints and connection strings stay), its old state is kept as a branch named `name`,
    and the preview branch, now merged into the target, is deleted."""
    plane = control.plane
    preview = plane.branch(project_id, branch_id)
    if preview.restore_status != "restored" or not preview.restore_target:
        raise UserError(f"branch {preview.name!r} is not a restored snapshot waiting to be finalized")
    target = plane.branch(project_id, preview.restore_target)
    _restored, ops = await branches.restore_branch(
        control, project_id, target.id, preview.id, preserve_under_name=_replaced_name(target, name),
        snapshot_id=preview.restored_from)
    _, more = await branches.delete_branch(control, project_id, preview.id)
    return [*ops, *more]

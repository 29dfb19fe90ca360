"""History retention and point in time: when epochs begin and end, when snapshots are taken and
pruned, and how a request for "this branch at LSN x / time t" becomes a cluster.

Semantics (documented in docs/architecture.md, "Point in time"):

- **LSN** `L`: the result holds every WAL record that *starts* before `L`. An LSN read with
  `pg_current_wal_lsn()` right after a commit therefore includes that commit.
- **Timestamp** `T` (RFC 3339, microseconds): the result holds every transaction whose commit
  timestamp is at or before `T` and none after it. The platform maps `T` to an LSN itself (the first
  commit record later than `T`, found with `pg_waldump`), so a `T` after the last commit, on a quiet
  database, still works: it means "everything".
- Targets must lie within the project's `history_retention_seconds` and after the branch got its
  current data; anything else is a clear 400.

The mechanism (manifest, WAL files, rebuilding) is `argon.storage.history`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from argon import model, safefs
from argon.compute import postmaster
from argon.compute.admin import connect_admin
from argon.compute.manager import ComputeSpec, prepare
from argon.compute.osuser import OsUser, project_user
from argon.compute.params import gucs_for_cu
from argon.compute.postmaster import ComputeStartError
from argon.errors import NotFound, StorageError, UserError
from argon.storage import branching
from argon.storage import history as hs
from argon.storage.spares import template_key

if TYPE_CHECKING:
    from argon.control.plane import ControlPlane

log = logging.getLogger(__name__)

RECOVERY_TIMEOUT = 3600.0  # replaying a day of busy WAL can take a while
WAL_SNAPSHOT_TRIGGER = 256 * 1024 * 1024  # this much WAL since the newest snapshot: take one at the next stop


@dataclass(frozen=True)
class PointInTime:
    """What a rebuilt cluster holds: WAL up to `lsn` (exclusive), i.e. the state at `at`."""

    lsn: str
    at: datetime


def branch_history(plane: ControlPlane, project_id: str, branch_id: str) -> hs.BranchHistory:
    try:
        owner = project_user(plane.project(project_id).os_uid)
    except NotFound:
        owner = None
    return hs.BranchHistory(plane.layout.branch_dir(project_id, branch_id) / "history", owner)


def _user(project: model.Project) -> OsUser | None:
    return project_user(project.os_uid)


def enabled(project: model.Project) -> bool:
    return project.history_retention_seconds > 0


def _epoch_id() -> str:
    return f"e{int(time.time() * 1000):x}{secrets.token_hex(2)}"


def _make_wal_dir(history: hs.BranchHistory, project: model.Project, epoch_id: str) -> None:
    safefs.makedirs(history.wal_dir(epoch_id), owner=_user(project))


def current_epoch(plane: ControlPlane, project_id: str, branch_id: str) -> hs.Epoch | None:
    """The branch's current epoch; None without history, or when its manifest is unusable (the
    compute's uid can write it: the branch then runs without point in time, and says so in the log)."""
    try:
        return branch_history(plane, project_id, branch_id).load().current
    except hs.ManifestError as exc:
        log.warning("branch %s runs without history: %s", branch_id, exc.user_message)
        return None


def archive_settings(plane: ControlPlane, project: model.Project, branch_id: str) -> dict[str, str]:
    """The compute's archiving GUCs: its WAL goes to the current epoch's archive, or nowhere."""
    if not enabled(project):
        return {"archive_mode": "off"}
    current = current_epoch(plane, project.id, branch_id)
    if current is None:
        return {"archive_mode": "off"}
    wal = branch_history(plane, project.id, branch_id).wal_dir(current.id)
    return {"archive_mode": "on", "archive_command": hs.archive_command(wal), "archive_timeout": "0"}


# --- Epochs ---------------------------------------------------------------------------------------------

def start_from_template(plane: ControlPlane, project: model.Project, branch_id: str, template: Path) -> None:
    """A new project's first epoch: its cluster is a byte copy of the pristine template, so the
    template is the base snapshot (copied into the history in the background, see `materialize_base`)."""
    if not enabled(project):
        return
    install = plane.installs[project.pg_version]
    snap, control = hs.describe_snapshot(install.bindir, template, "base", project.created_at)
    snap = hs.Snapshot(name=snap.name, taken_at=snap.taken_at, redo_lsn=snap.redo_lsn,
                       consistent_lsn=snap.consistent_lsn, template=template_key(template))
    epoch = hs.Epoch(id=_epoch_id(), started_at=project.created_at, start_lsn=control.checkpoint_lsn,
                     timeline=control.timeline, segsize=control.segsize, reason="project created", snapshots=(snap,))
    history = branch_history(plane, project.id, branch_id)
    history.save(hs.Manifest((epoch,)))
    _make_wal_dir(history, project, epoch.id)


def materialize_base(plane: ControlPlane, project: model.Project, branch_id: str) -> None:
    """Copy template-backed snapshots into the history (idempotent; a copy in progress is a temp dir)."""
    history = branch_history(plane, project.id, branch_id)
    for epoch in history.load().epochs:
        for snap in epoch.snapshots:
            if snap.template is not None:
                _template_snapshot(plane, project, history, epoch, snap)


async def materialize_base_soon(plane: ControlPlane, project: model.Project, branch_id: str) -> None:
    """`materialize_base` in the background, under the project lock (a delete must not race it)."""
    async with plane.project_lock(project.id):
        if any(p.id == project.id for p in plane.projects()):
            await asyncio.to_thread(materialize_base, plane, project, branch_id)


def _template_snapshot(plane: ControlPlane, project: model.Project, history: hs.BranchHistory, epoch: hs.Epoch,
                       snap: hs.Snapshot) -> Path:
    path = history.snapshot_dir(epoch.id, snap.name)
    if safefs.lexists(path):
        return path
    template = plane.templates.get(project.pg_version)
    if template is None or template_key(template) != snap.template:
        raise StorageError("the base of this branch's history was a template that has since been rebuilt; "
                           "history before the branch's first suspend is not available")
    safefs.makedirs(path.parent, owner=_user(project))
    tmp = path.with_name(f".tmp-{snap.name}-{secrets.token_hex(3)}")
    plane.spares.copy(template, tmp, _user(project))  # a root-owned template: copied where only root goes
    try:
        safefs.rename(tmp, path)
    except OSError:  # another copy won
        safefs.rmtree(tmp)
    return path


def begin_epoch(plane: ControlPlane, project: model.Project, branch_id: str, pgdata: Path, *, reason: str,
                consistent_lsn: str | None = None, fresh: bool = False) -> None:
    """The branch's data was just replaced by the (not yet started) cluster at `pgdata`: end the
    current epoch, if any, and start a new one whose base is a copy of `pgdata`. `fresh`: forget
    the older epochs (the branch is new, or its old history moved to a preserved branch)."""
    if not enabled(project):
        return
    history = branch_history(plane, project.id, branch_id)
    manifest = hs.Manifest() if fresh else history.load()
    install = plane.installs[project.pg_version]
    now = plane.clock()
    snap, control = hs.describe_snapshot(install.bindir, pgdata, "base", now, consistent_lsn, _user(project))
    label = hs.backup_label_fields(pgdata)
    epoch = hs.Epoch(id=_epoch_id(), started_at=now, start_lsn=snap.consistent_lsn,
                     timeline=label[1] if label else control.timeline, segsize=control.segsize, reason=reason,
                     snapshots=(snap,))
    base = history.snapshot_dir(epoch.id, "base")
    _make_wal_dir(history, project, epoch.id)
    plane.backend.clone_tree(pgdata, base, owner=_user(project))
    history.save(manifest.with_epoch(epoch))


def begin_epoch_from_parent(plane: ControlPlane, project: model.Project, branch_id: str, pgdata: Path,
                            parent_id: str, *, consistent_lsn: str | None) -> bool:
    """A new branch's first epoch without a second copy of its data, on the copy backend: the new
    cluster at `pgdata` is the parent's data at the copy, i.e. the parent's newest snapshot before it
    plus the parent's WAL since. So the base is that snapshot, hard-linked (snapshots and archived
    segments are never written in place), and the parent's archived segments up to the first one
    the copy holds are hard-linked into the new epoch's archive (segments still in the parent's
    live pg_wal are copied: Postgres reuses those files), followed by copies of the copy's own.
    Recovery from the base then replays the parent's WAL into the branch's own, which continues on
    the same timeline. Returns False, having made nothing, when the parent's history cannot serve
    (the caller then copies a base)."""
    if not enabled(project) or plane.backend.name == "reflink":  # a reflink base costs nothing anyway
        return False
    parent = branch_history(plane, project.id, parent_id)
    pe = parent.load().current
    if pe is None or not pe.snapshots:
        return False
    install = plane.installs[project.pg_version]
    user = _user(project)
    control = hs.control_data(install.bindir, pgdata, user)
    label = hs.backup_label_fields(pgdata)
    if label is not None:
        start, timeline = hs.parse_lsn(label[0]), label[1]
    elif control.state == "shut down":
        start, timeline = hs.parse_lsn(control.redo_lsn), control.timeline
    else:
        return False  # a crashed parent's copy: its WAL's end is unknown here
    if timeline != pe.timeline or control.segsize != pe.segsize:
        return False
    usable = [s for s in pe.snapshots if hs.parse_lsn(s.consistent_lsn) <= start]
    if not usable:
        return False
    snap = usable[-1]
    source = _template_snapshot(plane, project, parent, pe, snap) if snap.template else \
        parent.snapshot_dir(pe.id, snap.name)
    if not safefs.is_dir(source):
        return False
    own = sorted((seg[1], name) for name in safefs.listdir(pgdata / "pg_wal")
                 if (seg := hs.segment_start(name, pe.segsize)) is not None and seg[0] == timeline)
    if not own:
        return False
    first_own = own[0][0]
    needed = [hs.segment_name(timeline, lsn, pe.segsize)
              for lsn in range(hs.parse_lsn(snap.redo_lsn) // pe.segsize * pe.segsize, first_own, pe.segsize)]
    history = branch_history(plane, project.id, branch_id)
    now = plane.clock()
    epoch = hs.Epoch(id=_epoch_id(), started_at=now, start_lsn=consistent_lsn or control.checkpoint_lsn,
                     timeline=timeline, segsize=pe.segsize, reason="branch created",
                     snapshots=(hs.Snapshot(name="base", taken_at=now, redo_lsn=snap.redo_lsn,
                                            consistent_lsn=snap.consistent_lsn),))
    _make_wal_dir(history, project, epoch.id)
    wal = history.wal_dir(epoch.id)
    archive, live = parent.wal_dir(pe.id), plane.layout.pgdata(project.id, parent_id) / "pg_wal"
    try:
        # All of these are the compute's files: linked without following links, copied only when
        # they are regular files of the project's uid (safefs).
        with safefs.Dir(wal) as to, safefs.Dir(archive) as arch, safefs.Dir(live) as lv, \
                safefs.Dir(pgdata / "pg_wal") as mine:
            for name in needed:
                try:
                    arch.link(name, to, name)
                except FileNotFoundError:  # not archived yet: it is still in the parent's pg_wal...
                    try:
                        lv.copy(name, to, name, owner=user)
                    except FileNotFoundError:  # ...unless it was archived and removed just now
                        arch.link(name, to, name)
            # The copy's own segments, as copied: its first start replays them and may recycle them
            # without archiving (they were not written there); the one it goes on writing is archived
            # again, whole, when it is full.
            for _lsn, name in own:
                mine.copy(name, to, name, owner=user)
        base = history.snapshot_dir(epoch.id, "base")
        safefs.makedirs(base.parent, owner=user)
        hs.link_tree(source, base, user)
    except OSError as exc:  # a segment gone from both places, or no hard links here
        log.info("branch %s: copying a history base (the parent's history could not be linked: %s)", branch_id, exc)
        hs.remove_tree(history.root)
        return False
    history.save(hs.Manifest((epoch,)))
    log.debug("branch %s: history base linked to %s/%s of %s, %d segment(s) of its WAL", branch_id, pe.id,
              snap.name, parent_id, len(needed))
    return True


def end_epoch(plane: ControlPlane, project: model.Project, branch_id: str, old_pgdata: Path) -> None:
    """Before a branch's stopped cluster is replaced: keep its not yet archived WAL tail in the
    epoch's archive and record where the epoch ended."""
    if not enabled(project):
        return
    history = branch_history(plane, project.id, branch_id)
    manifest = history.load()
    epoch = manifest.current
    if epoch is None or not safefs.is_dir(old_pgdata):
        return
    install = plane.installs[project.pg_version]
    control = hs.control_data(install.bindir, old_pgdata, _user(project))
    newest = epoch.snapshots[-1] if epoch.snapshots else None
    start = hs.parse_lsn(newest.redo_lsn) if newest else 0
    wal = history.wal_dir(epoch.id)
    safefs.makedirs(wal, owner=_user(project))
    plane.backend.copy_into(hs.wal_files(old_pgdata / "pg_wal", epoch.timeline, epoch.segsize, start), wal,
                            tolerate_vanished=True, owner=_user(project))
    history.save(manifest.with_epoch(epoch.replace(ended_at=plane.clock(), end_lsn=control.checkpoint_lsn)))


# --- Snapshots at suspend, pruning ----------------------------------------------------------------------

def _snapshot_due(plane: ControlPlane, project: model.Project, epoch: hs.Epoch, wal_since: int) -> bool:
    if wal_since < epoch.segsize:
        return False  # (almost) nothing written since the newest snapshot
    if wal_since >= WAL_SNAPSHOT_TRIGGER:
        return True
    age = (plane.clock() - epoch.snapshots[-1].taken_at).total_seconds() if epoch.snapshots else float("inf")
    # A reflink snapshot costs next to nothing: take one every 1/24 of the window (hourly for a
    # day). A plain copy costs the cluster's size: every half window, so about three are kept.
    interval = project.history_retention_seconds / (24 if plane.backend.name == "reflink" else 2)
    return age >= max(60.0, interval)


def after_stop(plane: ControlPlane, project: model.Project, branch_id: str) -> None:
    """Called with the endpoint lock held, right after a clean stop: take a snapshot when one is due,
    then prune what fell out of the retention window."""
    if not enabled(project):
        return
    history = branch_history(plane, project.id, branch_id)
    manifest = history.load()
    epoch = manifest.current
    if epoch is None:
        return
    pgdata = plane.layout.pgdata(project.id, branch_id)
    install = plane.installs[project.pg_version]
    control = hs.control_data(install.bindir, pgdata, _user(project))
    newest = epoch.snapshots[-1] if epoch.snapshots else None
    wal_since = hs.parse_lsn(control.checkpoint_lsn) - (hs.parse_lsn(newest.consistent_lsn) if newest else 0)
    if control.state == "shut down" and control.timeline == epoch.timeline and \
            _snapshot_due(plane, project, epoch, wal_since):
        name = f"s{int(time.time() * 1000):x}"
        target = history.snapshot_dir(epoch.id, name)
        safefs.makedirs(target.parent, owner=_user(project))
        branching.clone_stopped(plane.backend, pgdata, target, control, _user(project))  # without recycled WAL
        snap, _ = hs.describe_snapshot(install.bindir, target, name, plane.clock(), owner=_user(project))
        epoch = epoch.replace(snapshots=(*epoch.snapshots, snap))
        manifest = manifest.with_epoch(epoch)
        history.save(manifest)
        log.info("snapshot %s of branch %s taken at %s", name, branch_id, snap.consistent_lsn)
    prune(plane, project, branch_id)


def prune(plane: ControlPlane, project: model.Project, branch_id: str) -> int:
    """Drop epochs, snapshots and archived WAL no target inside the retention window needs; returns
    the bytes freed. For each epoch the newest snapshot taken before the window starts is kept (a
    target right at the window's start replays from it), everything older goes."""
    history = branch_history(plane, project.id, branch_id)
    manifest = history.load()
    if not manifest.epochs:
        return 0
    window = plane.clock() - timedelta(seconds=project.history_retention_seconds)
    freed = 0
    for epoch in manifest.epochs[:-1]:
        if epoch.ended_at is not None and epoch.ended_at < window:
            freed += _tree_bytes(history.epoch_dir(epoch.id))
            manifest = manifest.without(epoch.id)
            history.save(manifest)
            hs.remove_tree(history.epoch_dir(epoch.id))
    for epoch in manifest.epochs:
        older = [s for s in epoch.snapshots if s.taken_at < window]
        drop = older[:-1]
        if drop:
            kept = tuple(s for s in epoch.snapshots if s not in drop)
            manifest = manifest.with_epoch(epoch.replace(snapshots=kept))
            history.save(manifest)
            for snap in drop:
                freed += _tree_bytes(history.snapshot_dir(epoch.id, snap.name))
                hs.remove_tree(history.snapshot_dir(epoch.id, snap.name))
            epoch = epoch.replace(snapshots=kept)
        if epoch.snapshots:
            freed += hs.prune_wal(history.wal_dir(epoch.id), epoch.timeline, epoch.segsize,
                                  hs.parse_lsn(epoch.snapshots[0].redo_lsn))
    if freed:
        log.info("pruned %.1f MB of history of branch %s", freed / 1e6, branch_id)
    return freed


def _tree_bytes(path: Path) -> int:
    return safefs.tree_bytes(path)


async def maintain(plane: ControlPlane) -> None:
    """Every minute (the monitor): computes that never suspend get their snapshots online, and every
    branch's history is pruned. Under the project lock, so no restore changes epochs meanwhile."""
    for project in plane.projects():
        if not enabled(project):
            continue
        for branch in plane.branches(project.id):
            try:
                async with plane.project_lock(project.id):
                    if project.id not in {p.id for p in plane.projects()}:
                        break
                    await _snapshot_running(plane, project, branch.id)
                    await asyncio.to_thread(prune, plane, project, branch.id)
            except Exception as exc:
                log.warning("history maintenance of branch %s failed: %s", branch.id,
                            getattr(exc, "user_message", exc))


async def _snapshot_running(plane: ControlPlane, project: model.Project, branch_id: str) -> None:
    """An online snapshot (the clone protocol) of a running compute, when one is due. The compute
    keeps serving; if it stops meanwhile, the backup is aborted and nothing is recorded."""
    ep = next((e for e in plane.endpoints(project.id, branch_id) if e.type is model.EndpointType.READ_WRITE), None)
    if ep is None or not plane.is_running(ep.id):
        return
    history = branch_history(plane, project.id, branch_id)
    epoch = (await asyncio.to_thread(history.load)).current
    if epoch is None or not epoch.snapshots:
        return
    conn = await connect_admin(plane.layout.socket_dir(ep.id))
    try:
        cur = await conn.execute("SELECT pg_current_wal_lsn()::text")
        row = await cur.fetchone()
        wal_since = hs.parse_lsn(row[0] if row else "0/0") - hs.parse_lsn(epoch.snapshots[-1].consistent_lsn)
        if not _snapshot_due(plane, project, epoch, wal_since):
            return
        name = f"s{int(time.time() * 1000):x}"
        target = history.snapshot_dir(epoch.id, name)
        await asyncio.to_thread(safefs.makedirs, target.parent, owner=_user(project))
        try:
            stop_lsn = await branching.clone_running(conn, plane.backend, plane.layout.pgdata(project.id, branch_id),
                                                     target, _user(project))
        except BaseException:
            await asyncio.to_thread(safefs.rmtree, target)
            raise
    finally:
        await conn.close()
    install = plane.installs[project.pg_version]

    def record() -> None:
        snap, _ = hs.describe_snapshot(install.bindir, target, name, plane.clock(), stop_lsn, _user(project))
        manifest = history.load()  # re-read: a stop may have added a snapshot meanwhile
        current = manifest.current
        if current is None or current.id != epoch.id:
            safefs.rmtree(target)
            return
        history.save(manifest.with_epoch(current.replace(snapshots=(*current.snapshots, snap))))
        log.info("online snapshot %s of branch %s taken at %s", name, branch_id, stop_lsn)

    await asyncio.to_thread(record)


# --- Point in time ----------------------------------------------------------------------------------------

def parse_timestamp(value: str | datetime) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(value.strip().replace("z", "Z"))
        except ValueError:
            raise UserError(f"{value!r} is not a timestamp; use RFC 3339, e.g. 2026-11-24T13:00:00.000Z") from None
    if parsed.tzinfo is None:
        raise UserError("the timestamp needs a time zone (RFC 3339, e.g. 2026-11-24T13:00:00Z)")
    return parsed


def parse_lsn(value: str) -> int:
    try:
        return hs.parse_lsn(value)
    except ValueError:
        raise UserError(f"{value!r} is not an LSN; use the form 0/16B3748 (pg_current_wal_lsn())") from None


async def materialize(plane: ControlPlane, project: model.Project, branch: model.Branch, target: Path, *,
                      lsn: str | None = None, timestamp: str | datetime | None = None) -> PointInTime:
    """Build, in the new directory `target`, `branch`'s cluster as it was at `lsn` or `timestamp`
    (promoted onto a new timeline, cleanly shut down, ready to be a branch's data)."""
    if (lsn is None) == (timestamp is None):
        raise UserError("give either an LSN or a timestamp")
    if not enabled(project):
        raise UserError("this project keeps no history (history_retention_seconds is 0); "
                        "raise it to branch or restore from a point in time")
    now = plane.clock()
    window = now - timedelta(seconds=project.history_retention_seconds)
    when = parse_timestamp(timestamp) if timestamp is not None else None
    point = parse_lsn(lsn) if lsn is not None else None
    if when is not None:
        if when > now + timedelta(seconds=1):
            raise UserError(f"timestamp {when.isoformat()} is in the future")
        if when < window:
            raise UserError(f"timestamp {when.isoformat()} is outside the project's history retention window "
                            f"({project.history_retention_seconds} s, back to {window.isoformat(timespec='seconds')})")
    history = branch_history(plane, project.id, branch.id)
    manifest = await asyncio.to_thread(history.load)
    epoch, snap = _choose(manifest, branch, when, point)
    if when is not None and when < epoch.started_at:
        raise UserError(f"branch {branch.name!r} has no data before {epoch.started_at.isoformat()}")
    install = plane.installs[project.pg_version]
    pgdata = plane.layout.pgdata(project.id, branch.id)
    current = epoch is manifest.current
    ep = next((e for e in plane.endpoints(project.id, branch.id) if e.type is model.EndpointType.READ_WRITE), None)
    live: Path | None = None
    end_lsn = hs.parse_lsn(epoch.end_lsn) if epoch.end_lsn else None
    if current:
        live = pgdata / "pg_wal"
        if ep is not None and plane.is_running(ep.id):
            end_lsn = None  # open-ended: a record is written now, so every earlier target is inside the WAL
            conn = await connect_admin(plane.layout.socket_dir(ep.id))
            try:
                cur = await conn.execute("SELECT pg_current_wal_insert_lsn()::text")
                row = await cur.fetchone()
                head = hs.parse_lsn(row[0]) if row else 0
                if point is not None and point > head:
                    raise UserError(f"LSN {lsn} is ahead of branch {branch.name!r} (its WAL is at {row[0] if row else '?'})")
                await conn.execute("SELECT pg_logical_emit_message(false, 'argon', 'point in time')")
                await conn.execute("SELECT pg_switch_wal()")
            finally:
                await conn.close()
        else:
            control = await asyncio.to_thread(hs.control_data, install.bindir, pgdata, _user(project))
            end_lsn = hs.parse_lsn(control.checkpoint_lsn)
    if point is not None and end_lsn is not None and point > end_lsn + 8192:
        raise UserError(f"LSN {lsn} is ahead of branch {branch.name!r} (its WAL ends at {hs.format_lsn(end_lsn)})")

    snapshot_dir = history.snapshot_dir(epoch.id, snap.name)
    if snap.template is not None:
        snapshot_dir = await asyncio.to_thread(_template_snapshot, plane, project, history, epoch, snap)
    started = time.monotonic()

    def lay_out() -> None:
        wal_dir = history.wal_dir(epoch.id)
        start = hs.parse_lsn(snap.redo_lsn)
        archived = hs.wal_files(wal_dir, epoch.timeline, epoch.segsize, start)
        sources = [archived]
        if live is not None:
            sources.append(hs.wal_files(live, epoch.timeline, epoch.segsize, start))
        hs.assemble(plane.backend, snapshot_dir, sources, target, _user(project))
        # A segment archived and removed from pg_wal while we copied: take it from the archive now.
        have = set(safefs.listdir(target / "pg_wal"))
        late = [p for p in hs.wal_files(wal_dir, epoch.timeline, epoch.segsize, start) if p.name not in have]
        plane.backend.copy_into(late, target / "pg_wal", tolerate_vanished=True, owner=_user(project))

    try:
        await asyncio.to_thread(lay_out)
        target_lsn: str | None
        if when is not None:
            target_lsn = await asyncio.to_thread(hs.first_commit_after, install.bindir, target / "pg_wal",
                                                 snap.consistent_lsn, epoch.timeline, when, _user(project))
        else:
            assert point is not None
            target_lsn = lsn if end_lsn is None or point <= end_lsn else None
        settings = hs.recovery_settings(target_lsn)
        if target_lsn is not None and hs.parse_lsn(target_lsn) <= hs.parse_lsn(snap.consistent_lsn):
            settings = {k: v for k, v in settings.items() if not k.startswith("recovery_target_lsn")
                        and k != "recovery_target_inclusive"} | {"recovery_target": "immediate"}
        control = await _recover(plane, project, branch.id, target, settings)
    except BaseException:
        await asyncio.to_thread(safefs.rmtree, target)
        raise
    reached = target_lsn or control.redo_lsn
    log.info("rebuilt branch %s at %s (%s) in %.0f ms", branch.id, lsn or when, reached,
             (time.monotonic() - started) * 1000)
    return PointInTime(lsn=lsn or reached, at=when or now)


def _choose(manifest: hs.Manifest, branch: model.Branch, when: datetime | None,
            point: int | None) -> tuple[hs.Epoch, hs.Snapshot]:
    if not manifest.epochs:
        raise UserError(f"branch {branch.name!r} has no history yet (it predates history retention, or it "
                        "was never started); branch from its head instead")
    if when is not None:
        epochs = [e for e in manifest.epochs if e.started_at <= when]
        epoch = epochs[-1] if epochs else manifest.epochs[0]
        snaps = [s for s in epoch.snapshots if s.taken_at <= when]
    else:
        assert point is not None
        epochs = [e for e in manifest.epochs if hs.parse_lsn(e.start_lsn) <= point]
        if not epochs:
            raise UserError(f"LSN {hs.format_lsn(point)} is before the start of branch {branch.name!r}'s history "
                            f"({manifest.epochs[0].start_lsn})")
        epoch = epochs[-1]
        snaps = [s for s in epoch.snapshots if hs.parse_lsn(s.consistent_lsn) <= point]
    if not snaps:
        raise UserError("that point is no longer in the branch's retained history (older history was pruned)")
    return epoch, snaps[-1]


async def _recover(plane: ControlPlane, project: model.Project, branch_id: str, target: Path,
                   settings: dict[str, str]) -> hs.ControlData:
    """One recovery run of the assembled cluster: start it, wait until it promoted, stop it cleanly."""
    install = plane.installs[project.pg_version]
    user = _user(project)  # the assembled tree is the project's uid's already (copied as it)
    socket_dir = plane.layout.run_dir / f"rc-{secrets.token_hex(4)}"
    log_file = plane.layout.compute_log(project.id, branch_id).with_name("recovery.log")
    spec = ComputeSpec(endpoint_id=socket_dir.name, install=install, pgdata=target, socket_dir=socket_dir,
                       log_file=log_file, user=user, argon_os_user=plane.os_user,
                       gucs=plane.compute_gucs(project.pg_version, gucs_for_cu(0.25) | settings, serving=False))
    await asyncio.to_thread(prepare, spec)
    pm = postmaster.start(install, target, log_file, user)
    try:
        try:
            await pm.wait_ready(timeout=RECOVERY_TIMEOUT)  # "ready" (not "standby") once it promoted
        except ComputeStartError as exc:
            raise StorageError(f"rebuilding the branch at that point failed: {exc.user_message}") from None
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while True:
            try:
                conn = await connect_admin(socket_dir)
            except psycopg.OperationalError:
                row = None
                if pm.alive:
                    raise
            else:
                try:
                    cur = await conn.execute("SELECT pg_is_in_recovery()")
                    row = await cur.fetchone()
                finally:
                    await conn.close()
            if row and not row[0]:
                break
            if not pm.alive:
                why = await asyncio.to_thread(_last_error, log_file)
                log.warning("recovery of branch %s stopped: %s", branch_id, why)
                raise StorageError(f"rebuilding the branch at that point failed: recovery stopped ({why}); see "
                                   f"{log_file}")
            if time.monotonic() > deadline:
                raise StorageError("rebuilding the branch at that point timed out")
            await asyncio.sleep(0.05)
        await pm.stop("fast")
    finally:
        if pm.alive:
            pm.kill_group()
        await asyncio.to_thread(safefs.rmtree, socket_dir)
    control = await asyncio.to_thread(hs.control_data, install.bindir, target, user)
    await asyncio.to_thread(hs.tidy_after_recovery, target, control)
    await asyncio.to_thread(safefs.write_file, target / "postgresql.auto.conf", b"", owner=user)
    return control


def _last_error(log_file: Path) -> str:
    """The last FATAL or PANIC line of a Postgres log, for an error message."""
    try:
        lines = safefs.read_tail(log_file, limit=65536).decode(errors="replace").splitlines()[-200:]
    except OSError:
        return "no log"
    found = [line for line in lines if "FATAL:" in line or "PANIC:" in line]
    return (found[-1] if found else (lines[-1] if lines else "empty log")).strip()[-300:]


@contextlib.asynccontextmanager
async def cluster_at(plane: ControlPlane, project: model.Project, branch: model.Branch, *, lsn: str | None = None,
                     timestamp: str | datetime | None = None) -> AsyncIterator[Path]:
    """A throw-away, running copy of `branch` as it was at `lsn`/`timestamp`, for reading (the schema
    endpoint): yields its Unix socket directory (platform role, peer auth); removed afterwards."""
    scratch = plane.layout.branch_dir(project.id, branch.id) / f"tmp-{secrets.token_hex(4)}"
    try:
        async with plane.project_lock(project.id):
            await materialize(plane, project, branch, scratch, lsn=lsn, timestamp=timestamp)
        install = plane.installs[project.pg_version]
        user = _user(project)
        socket_dir = plane.layout.run_dir / f"rd-{secrets.token_hex(4)}"
        log_file = plane.layout.compute_log(project.id, branch.id).with_name("point-in-time.log")
        spec = ComputeSpec(endpoint_id=socket_dir.name, install=install, pgdata=scratch, socket_dir=socket_dir,
                           log_file=log_file, user=user, argon_os_user=plane.os_user,
                           gucs=plane.compute_gucs(project.pg_version, gucs_for_cu(0.25) | {"archive_mode": "off"},
                                                   serving=False))
        await asyncio.to_thread(prepare, spec)
        pm = postmaster.start(install, scratch, log_file, user)
        try:
            try:
                await pm.wait_ready()
            except ComputeStartError as exc:
                raise StorageError(f"could not start the branch as of that point: {exc.user_message}") from None
            yield socket_dir
        finally:
            if pm.alive:
                await pm.stop("immediate")
            await asyncio.to_thread(safefs.rmtree, socket_dir)
    finally:
        await asyncio.to_thread(safefs.rmtree, scratch)

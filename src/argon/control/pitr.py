"""Point in time: how a request for "this branch at LSN x / time t" becomes a cluster.

Semantics (documented in docs/architecture.md, "Point in time"):

- **LSN** `L`: the result holds every WAL record that *starts* before `L`. An LSN read with
  `pg_current_wal_lsn()` right after a commit therefore includes that commit.
- **Timestamp** `T` (RFC 3339, microseconds): the result holds every transaction whose commit
  timestamp is at or before `T` and none after it. The platform maps `T` to an LSN itself (the first
  commit record later than `T`, found with `pg_waldump`), so a `T` after the last commit, on a quiet
  database, still works: it means "everything".
- Targets must lie within the project's `history_retention_seconds` and after the branch got its
  current data; anything else is a clear 400.

Which epoch and snapshot serve a target, and which targets are refused, are pure functions
(`check_time`, `choose`); rebuilding lays the snapshot and the epoch's WAL out
(`argon.storage.history`) and runs one recovery on a scratch postmaster (`argon.compute.scratch`).
What history exists is `argon.control.retention`'s business.
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

import psycopg

from argon import model, safefs
from argon.compute.admin import connect_admin
from argon.compute.scratch import last_error, scratch_postmaster
from argon.control.plane import ControlPlane
from argon.control.retention import branch_history, enabled, project_owner, template_snapshot
from argon.errors import StorageError, UserError
from argon.storage import history as hs
from argon.storage import wal

log = logging.getLogger(__name__)

RECOVERY_TIMEOUT = 3600.0  # replaying a day of busy WAL can take a while


@dataclass(frozen=True)
class PointInTime:
    """What a rebuilt cluster holds: WAL up to `lsn` (exclusive), i.e. the state at `at`."""

    lsn: str
    at: datetime


# --- Decisions (pure) ------------------------------------------------------------------------------------

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
        return wal.parse_lsn(value)
    except ValueError:
        raise UserError(f"{value!r} is not an LSN; use the form 0/16B3748 (pg_current_wal_lsn())") from None


class BeyondLocalHistory(UserError):
    """The target lies before what the local history keeps; with continuous backup, the bucket may
    still reach it (`BackupService.materialize`, ADR 0018)."""


def check_time(when: datetime, *, now: datetime, retention_seconds: int) -> None:
    """A timestamp target must not lie in the future (a second of clock skew allowed) nor before the
    retention window."""
    window = now - timedelta(seconds=retention_seconds)
    if when > now + timedelta(seconds=1):
        raise UserError(f"timestamp {when.isoformat()} is in the future")
    if when < window:
        raise BeyondLocalHistory(f"timestamp {when.isoformat()} is outside the project's history retention window "
                        f"({retention_seconds} s, back to {window.isoformat(timespec='seconds')})")


def choose(manifest: hs.Manifest, branch_name: str, when: datetime | None,
           point: int | None) -> tuple[hs.Epoch, hs.Snapshot]:
    """The epoch that holds the target (a time `when` or an LSN `point`) and its newest snapshot at or
    before it, where recovery starts."""
    if not manifest.epochs:
        raise UserError(f"branch {branch_name!r} has no history yet (it predates history retention, or it "
                        "was never started); branch from its head instead")
    if when is not None:
        epochs = [e for e in manifest.epochs if e.started_at <= when]
        epoch = epochs[-1] if epochs else manifest.epochs[0]
        snaps = [s for s in epoch.snapshots if s.taken_at <= when]
    else:
        assert point is not None
        epochs = [e for e in manifest.epochs if wal.parse_lsn(e.start_lsn) <= point]
        if not epochs:
            raise BeyondLocalHistory(f"LSN {wal.format_lsn(point)} is before the start of the history of branch "
                                     f"{branch_name!r} ({manifest.epochs[0].start_lsn})")
        epoch = epochs[-1]
        snaps = [s for s in epoch.snapshots if wal.parse_lsn(s.consistent_lsn) <= point]
    if not snaps:
        raise BeyondLocalHistory("that point is no longer in the branch's retained history (older history was pruned)")
    if when is not None and when < epoch.started_at:
        raise BeyondLocalHistory(f"branch {branch_name!r} has no data before {epoch.started_at.isoformat()}")
    return epoch, snaps[-1]


def recovery_target(snap: hs.Snapshot, target_lsn: str | None) -> dict[str, str]:
    """The recovery settings for a target LSN (None: the end of the WAL laid out). A target at or
    before the snapshot's consistent point stops as soon as the snapshot is consistent."""
    settings = wal.recovery_settings(target_lsn)
    if target_lsn is not None and wal.parse_lsn(target_lsn) <= wal.parse_lsn(snap.consistent_lsn):
        settings = {k: v for k, v in settings.items() if not k.startswith("recovery_target_lsn")
                    and k != "recovery_target_inclusive"} | {"recovery_target": "immediate"}
    return settings


# --- Rebuilding ----------------------------------------------------------------------------------------------

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
    when = parse_timestamp(timestamp) if timestamp is not None else None
    point = parse_lsn(lsn) if lsn is not None else None
    if when is not None:
        check_time(when, now=now, retention_seconds=project.history_retention_seconds)
    history = branch_history(plane, project.id, branch.id)
    manifest = await asyncio.to_thread(history.load)
    epoch, snap = choose(manifest, branch.name, when, point)
    install = plane.installs[project.pg_version]
    pgdata = plane.layout.pgdata(project.id, branch.id)
    current = epoch is manifest.current
    ep = plane.primary(project.id, branch.id)
    live: Path | None = None
    end_lsn = wal.parse_lsn(epoch.end_lsn) if epoch.end_lsn else None
    if current:
        live = pgdata / "pg_wal"
        if ep is not None and plane.is_running(ep.id):
            end_lsn = None  # open-ended: a record is written now, so every earlier target is inside the WAL
            conn = await connect_admin(plane.layout.socket_dir(ep.id))
            try:
                cur = await conn.execute("SELECT pg_current_wal_insert_lsn()::text")
                row = await cur.fetchone()
                head = wal.parse_lsn(row[0]) if row else 0
                if point is not None and point > head:
                    raise UserError(f"LSN {lsn} is ahead of branch {branch.name!r} (its WAL is at {row[0] if row else '?'})")
                await conn.execute("SELECT pg_logical_emit_message(false, 'argon', 'point in time')")
                await conn.execute("SELECT pg_switch_wal()")
            finally:
                await conn.close()
        else:
            control = await asyncio.to_thread(wal.control_data, install.bindir, pgdata, project_owner(project))
            end_lsn = wal.parse_lsn(control.checkpoint_lsn)
    if point is not None and end_lsn is not None and point > end_lsn + 8192:
        raise UserError(f"LSN {lsn} is ahead of branch {branch.name!r} (its WAL ends at {wal.format_lsn(end_lsn)})")

    snapshot_dir = history.snapshot_dir(epoch.id, snap.name)
    if snap.template is not None:
        snapshot_dir = await asyncio.to_thread(template_snapshot, plane, project, history, epoch, snap)
    started = time.monotonic()
    try:
        await asyncio.to_thread(hs.assemble_epoch, plane.backend, snapshot_dir, epoch, history.wal_dir(epoch.id),
                                live, wal.parse_lsn(snap.redo_lsn), target, project_owner(project))
        target_lsn: str | None
        if when is not None:
            target_lsn = await asyncio.to_thread(wal.first_commit_after, install.bindir, target / "pg_wal",
                                                 snap.consistent_lsn, epoch.timeline, when, project_owner(project))
        else:
            assert point is not None
            target_lsn = lsn if end_lsn is None or point <= end_lsn else None
        control = await recover(plane, project, branch.id, target, recovery_target(snap, target_lsn))
    except BaseException:
        await asyncio.to_thread(safefs.rmtree, target)
        raise
    reached = target_lsn or control.redo_lsn
    log.info("rebuilt branch %s at %s (%s) in %.0f ms", branch.id, lsn or when, reached,
             (time.monotonic() - started) * 1000)
    return PointInTime(lsn=lsn or reached, at=when or now)


async def recover(plane: ControlPlane, project: model.Project, branch_id: str, target: Path,
                   settings: dict[str, str]) -> wal.ControlData:
    """One recovery run of the assembled cluster: start it, wait until it promoted, stop it cleanly."""
    install = plane.installs[project.pg_version]
    user = project_owner(project)  # the assembled tree is the project's uid's already (copied as it)
    log_file = plane.layout.compute_log(project.id, branch_id).with_name("recovery.log")
    async with scratch_postmaster(install, target, run_dir=plane.layout.run_dir, log_file=log_file, user=user,
                                  argon_os_user=plane.os_user, gucs=plane.scratch_gucs(project.pg_version, settings),
                                  ready_timeout=RECOVERY_TIMEOUT,
                                  failure="rebuilding the branch at that point failed",
                                  **plane.scratch_limits()) as scratch:
        # "ready" (not "standby") once it promoted; wait until it says it is out of recovery.
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while True:
            try:
                conn = await connect_admin(scratch.socket_dir)
            except psycopg.OperationalError:
                row = None
                if scratch.postmaster.alive:
                    raise
            else:
                try:
                    cur = await conn.execute("SELECT pg_is_in_recovery()")
                    row = await cur.fetchone()
                finally:
                    await conn.close()
            if row and not row[0]:
                break
            if not scratch.postmaster.alive:
                why = await asyncio.to_thread(last_error, log_file)
                log.warning("recovery of branch %s stopped: %s", branch_id, why)
                raise StorageError(f"rebuilding the branch at that point failed: recovery stopped ({why}); see "
                                   f"{log_file}")
            if time.monotonic() > deadline:
                raise StorageError("rebuilding the branch at that point timed out")
            await asyncio.sleep(0.05)
    control = await asyncio.to_thread(wal.control_data, install.bindir, target, user)
    await asyncio.to_thread(wal.tidy_after_recovery, target, control)
    await asyncio.to_thread(safefs.write_file, target / "postgresql.auto.conf", b"", owner=user)
    return control


@contextlib.asynccontextmanager
async def cluster_at(plane: ControlPlane, project: model.Project, branch: model.Branch, *, lsn: str | None = None,
                     timestamp: str | datetime | None = None) -> AsyncIterator[Path]:
    """A throw-away, running copy of `branch` as it was at `lsn`/`timestamp`, for reading (the schema
    endpoint): yields its Unix socket directory (platform role, peer auth); removed afterwards."""
    scratch_dir = plane.layout.branch_dir(project.id, branch.id) / f"tmp-{secrets.token_hex(4)}"
    try:
        async with plane.project_lock(project.id):
            await materialize(plane, project, branch, scratch_dir, lsn=lsn, timestamp=timestamp)
        user = project_owner(project)
        log_file = plane.layout.compute_log(project.id, branch.id).with_name("point-in-time.log")
        async with scratch_postmaster(plane.installs[project.pg_version], scratch_dir, run_dir=plane.layout.run_dir,
                                      log_file=log_file, user=user, argon_os_user=plane.os_user, stop="immediate",
                                      gucs=plane.scratch_gucs(project.pg_version),
                                      failure="could not start the branch as of that point",
                                      **plane.scratch_limits()) as scratch:
            yield scratch.socket_dir
    finally:
        await asyncio.to_thread(safefs.rmtree, scratch_dir)

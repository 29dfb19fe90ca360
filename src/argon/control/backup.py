"""Continuous backup policy (ADR 0018): which branches ship what, when, and what the user sees.

Three loops inside `argon up`, each doing its I/O in threads:

- **WAL** every `backup_interval` (0.5 s): for every branch of every project with history, each
  epoch's archived segments in order, then the live segment's valid prefix (`storage.backup.wal`).
  The epoch's record (`epoch.json`) goes up whenever it changes (a new snapshot, an end).
- **Bases** every few seconds: each snapshot of each epoch not in the bucket yet
  (`storage.backup.bases`; chunks shared bucket-wide).
- **Metadata** whenever `argon.db` changed, looked at every `METADATA_INTERVAL` (2 s): an online
  SQLite backup (without the monitoring samples) plus `secrets/` and `tls/` in one object
  (`meta/<ms>.tar`).

An unreachable store is an error in the status (API, console, `argon status`, a warning in the log
once per outage), and every loop simply tries again next tick: nothing is skipped, so shipping
catches up by itself and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import sqlite3
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from argon import model, safefs
from argon.control import pitr, retention
from argon.control.periodic import Periodic
from argon.errors import ArgonError, ErrorKind, UserError
from argon.failpoints import failpoint
from argon.storage import history as hs
from argon.storage import wal
from argon.storage.backup import bases as bb
from argon.storage.backup import retention as br
from argon.storage.backup import wal as bw
from argon.storage.backup.objects import Codec
from argon.storage.backup.store import MissingObject, ObjectInfo, ObjectStore, open_store

if TYPE_CHECKING:
    from argon.control.plane import ControlPlane
    from argon.settings import Settings

log = logging.getLogger(__name__)

BUCKET_INFO = "argon-backup.json"
METADATA_INTERVAL = 2.0  # a changed metadata database reaches the bucket this soon
PRUNE_INTERVAL = 3600.0
BASE_INTERVAL = 1.0  # new snapshots (a new branch's base) start shipping within a second


class Unavailable(ArgonError):
    kind = ErrorKind.UNAVAILABLE
    retryable = True


def branch_prefix(project_id: str, branch_id: str) -> str:
    return f"branches/{project_id}/{branch_id}/"


def epoch_prefix(project_id: str, branch_id: str, epoch_id: str) -> str:
    return f"{branch_prefix(project_id, branch_id)}{epoch_id}/"


def snapshot_key(project_id: str, snapshot_id: str) -> str:
    """A snapshot's base manifest (ADR 0028): its chunks are shared with every other base."""
    return f"snapshots/{project_id}/{snapshot_id}.json"


def meta_key(at: datetime) -> str:
    return f"meta/{int(at.timestamp() * 1000):015d}.tar"


def meta_time(key: str) -> datetime | None:
    stem = key.rsplit("/", 1)[-1].removesuffix(".tar")
    return datetime.fromtimestamp(int(stem) / 1000, UTC) if stem.isdigit() else None


def open_bucket(settings: Settings) -> tuple[ObjectStore, Codec]:
    assert settings.backup_url
    return open_store(settings.backup_url, s3_endpoint=settings.backup_s3_endpoint), Codec(settings.backup_key)


def check_bucket(store: ObjectStore, codec: Codec, *, create: bool) -> bool:
    """Refuse a bucket written with another key; write our identity into a new one. True if the
    bucket holds an Argon backup."""
    try:
        raw = store.get(BUCKET_INFO)
    except MissingObject:
        if create:
            store.put(BUCKET_INFO, codec.bucket_info())
        return False
    codec.check_bucket_info(raw, store.url)
    return True


@dataclass(frozen=True)
class Candidate:
    epoch: dict[str, Any]
    base_key: str
    base: dict[str, Any]  # the base's record (Snapshot fields + timeline, segsize)
    manifest: dict[str, Any] = field(default_factory=dict)  # the base's manifest, read once by `choose`


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def choose(store: ObjectStore, codec: Codec, project_id: str, branch_id: str, at: datetime | None,
           lsn: int | None = None) -> Candidate | None:
    """The newest epoch started at or before `at` with a base backup at or before `at`, and that base;
    or, for an `lsn`, the newest epoch starting at or before it with a base consistent by then (as
    the local history decides, `pitr.choose`)."""
    prefix = branch_prefix(project_id, branch_id)
    keys = [o.key for o in store.list(prefix)]
    epochs = []
    for key in keys:
        if key.endswith("/epoch.json"):
            raw = json.loads(codec.open(key, store.get(key)))
            epochs.append((key[:-len("epoch.json")], raw))
    epochs.sort(key=lambda e: _when(e[1]["started_at"]))
    for epoch_prefix, epoch in reversed(epochs):
        if at is not None and _when(epoch["started_at"]) > at:
            continue
        if lsn is not None and wal.parse_lsn(epoch["start_lsn"]) > lsn:
            continue
        base_keys = [k for k in keys if k.startswith(f"{epoch_prefix}bases/") and k.endswith(".json")]
        with ThreadPoolExecutor(max_workers=8) as pool:  # an epoch has a base per snapshot: read them at once
            manifests = dict(zip(base_keys, pool.map(lambda k: bb.read_manifest(store, codec, k), base_keys),
                                 strict=True))
        usable = [(k, m["record"]) for k, m in manifests.items() if (at is None or _when(m["record"]["taken_at"]) <= at)
                  and (lsn is None or wal.parse_lsn(m["record"]["consistent_lsn"]) <= lsn)]
        if not usable:
            continue
        key, record = max(usable, key=lambda kr: (_when(kr[1]["taken_at"]), wal.parse_lsn(kr[1]["consistent_lsn"])))
        return Candidate(epoch=epoch, base_key=key, base=record, manifest=manifests[key])
    return None


def prepare_recovery(store: ObjectStore, codec: Codec, candidate: Candidate, manifest: dict[str, Any],
                     project_id: str, branch_id: str, target: Path, bindir: Path, at: datetime | None,
                     progress: Callable[[int], None] | None = None, lsn: int | None = None,
                     ) -> tuple[dict[str, str], str | None, int]:
    """Lay out, in the new directory `target` (root's), the candidate's base backup and its epoch's
    WAL from the bucket, ready for one recovery run to `at` or to `lsn` (neither: to the end of the
    WAL in the bucket; an `lsn` past that end: the end too). Returns the recovery settings, the
    target LSN (None: the end) and the WAL's end. Nothing is synced here: the caller makes the
    recovered tree durable with one `bb.sync_tree` before its commit point, so the kernel writes
    the download back while the recovery run replays (a crash before that starts the fetch over)."""
    epoch, record = candidate.epoch, candidate.base
    prefix = f"{branch_prefix(project_id, branch_id)}{epoch['id']}/"
    lock = threading.Lock()

    def counted(n: int) -> None:
        if progress is not None:
            with lock:
                progress(n)

    # The base and its WAL at once (each in parallel itself; the WAL beside, then moved over the
    # base's own segments, as the bucket's are newer).
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    fetch_dir = target / "pg_wal.fetch"
    with ThreadPoolExecutor(max_workers=2) as pool:
        base = pool.submit(bb.download_snapshot, store, codec, manifest, target, progress=counted, fsync=False)
        fetched = pool.submit(bw.fetch_epoch_wal, store, codec, prefix, fetch_dir, int(epoch["timeline"]),
                              int(epoch["segsize"]), wal.parse_lsn(record["redo_lsn"]), progress=counted)
        base.result()
        end = fetched.result()
    (target / "pg_wal").mkdir(exist_ok=True)
    for name in os.listdir(fetch_dir):
        os.replace(fetch_dir / name, target / "pg_wal" / name)
    fetch_dir.rmdir()
    (target / "pg_wal" / "archive_status").mkdir(exist_ok=True)
    for name in ("postmaster.pid", "postmaster.opts"):
        (target / name).unlink(missing_ok=True)
    (target / "recovery.signal").write_text("")
    target_lsn: str | None = None
    if at is not None:
        target_lsn = wal.first_commit_after(bindir, target / "pg_wal", record["consistent_lsn"],
                                           int(epoch["timeline"]), at)
    elif lsn is not None and lsn < end:
        target_lsn = wal.format_lsn(lsn)
    settings = wal.recovery_settings(target_lsn)
    if target_lsn is not None and wal.parse_lsn(target_lsn) <= wal.parse_lsn(record["consistent_lsn"]):
        settings = {k: v for k, v in settings.items() if not k.startswith("recovery_target_lsn")
                    and k != "recovery_target_inclusive"} | {"recovery_target": "immediate"}
    return settings, target_lsn, end


def ready_without_replay(bindir: Path, target: Path) -> wal.ControlData | None:
    """A restore's laid-out cluster (`prepare_recovery`, still root's) that needs no recovery run: a
    clean stop's base (no `backup_label`, shut down) whose WAL in the bucket ends at its shutdown
    checkpoint, the usual base of a suspended branch. It is made what a recovery run leaves (the
    replayed segments and `recovery.signal` gone, an empty `postgresql.auto.conf`) and its control
    data returned; None when recovery has something to replay (then `recover` runs as before).
    It stays on its timeline: nothing after the checkpoint is left out, so there is no other
    history to branch off from (the branch's next epoch in the bucket has its own prefix)."""
    if safefs.lexists(target / "backup_label"):
        return None
    control = wal.control_data(bindir, target)
    if not wal.ends_at_checkpoint(bindir, target / "pg_wal", control):
        return None
    wal.tidy_after_recovery(target, control)
    safefs.write_file(target / "postgresql.auto.conf", b"", atomic=True)
    return control


@dataclass
class BranchBackup:
    """The backup state of one branch, as the status shows it."""

    project_id: str
    branch_id: str
    shipped_lsn: int = 0
    head_lsn: int = 0
    last_shipped_at: datetime | None = None
    behind_since: float | None = None  # monotonic time since which head > shipped
    last_base: str = ""
    last_base_at: datetime | None = None
    writes_refused: bool = False

    def lag_bytes(self) -> int:
        return max(0, self.head_lsn - self.shipped_lsn)

    def lag_seconds(self) -> float:
        return 0.0 if self.behind_since is None else max(0.0, time.monotonic() - self.behind_since)

    def view(self) -> dict[str, Any]:
        return {"project_id": self.project_id, "branch_id": self.branch_id,
                "last_wal_shipped_lsn": wal.format_lsn(self.shipped_lsn) if self.shipped_lsn else None,
                "last_wal_shipped_at": _iso(self.last_shipped_at), "lag_bytes": self.lag_bytes(),
                "lag_seconds": round(self.lag_seconds(), 3), "last_base_backup": self.last_base or None,
                "last_base_backup_at": _iso(self.last_base_at), "writes_refused": self.writes_refused}


def _first_lsn(epoch: hs.Epoch) -> int:
    """Where the epoch's WAL in the bucket must begin: its start, or earlier where a base's replay
    starts earlier (a branch's base is its parent's snapshot, ADR 0010)."""
    return min([wal.parse_lsn(epoch.start_lsn), *(wal.parse_lsn(s.redo_lsn) for s in epoch.snapshots)])


def _iso(at: datetime | None) -> str | None:
    return at.isoformat().replace("+00:00", "Z") if at else None


@dataclass
class BackupStatus:
    url: str
    encrypted: bool
    branches: dict[str, BranchBackup] = field(default_factory=dict)
    last_metadata_at: datetime | None = None
    error: str = ""
    error_since: datetime | None = None

    def view(self) -> dict[str, Any]:
        rows = [b.view() for b in self.branches.values()]
        return {"enabled": True, "url": self.url, "encrypted": self.encrypted,
                "state": "error" if self.error else ("lagging" if any(b.lag_seconds() > 5 for b in
                                                                      self.branches.values()) else "ok"),
                "error": self.error or None, "error_since": _iso(self.error_since),
                "last_metadata_backup_at": _iso(self.last_metadata_at),
                "lag_bytes": max((r["lag_bytes"] for r in rows), default=0),
                "lag_seconds": max((r["lag_seconds"] for r in rows), default=0.0),
                "last_wal_shipped_at": max((r["last_wal_shipped_at"] for r in rows if r["last_wal_shipped_at"]),
                                           default=None),
                "last_base_backup_at": max((r["last_base_backup_at"] for r in rows if r["last_base_backup_at"]),
                                           default=None),
                "branches": rows}


class BackupService:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.settings = settings = plane.settings
        self.store, self.codec = open_bucket(settings)
        self.index = bb.ChunkIndex(self.store)
        self.interval = settings.backup_interval
        self.status = BackupStatus(url=settings.backup_url or "", encrypted=self.codec.encrypted)
        self._loops = [self._periodic("wal", self.ship_wal_once, lambda: self.interval),
                       self._periodic("bases", self.ship_bases_once, BASE_INTERVAL),
                       self._periodic("metadata", self.backup_metadata_once, METADATA_INTERVAL),
                       self._periodic("retention", self.prune_once, PRUNE_INTERVAL)]
        self._meta_seen: tuple[float, ...] = ()
        self._epoch_records: dict[str, str] = {}  # epoch prefix -> the epoch.json last uploaded
        self._errors: dict[str, str] = {}  # loop -> its last error
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="argon-wal-ship")
        self._bases_lock = asyncio.Lock()  # base uploads and retention's chunk collection never overlap
        self._refused: set[str] = set()  # branches whose writes are refused (too much WAL unshipped)
        self._refused_on: set[str] = set()  # ... on these compute instances, endpoint:pid (a restart forgets ALTER SYSTEM)
        self._shipping: dict[str, threading.Lock] = {}  # branch -> held while one pass ships it

    async def start(self) -> None:
        await asyncio.to_thread(check_bucket, self.store, self.codec, create=True)
        if not self.codec.encrypted:
            log.warning("backup to %s is not encrypted: whoever can read it can read the data and decrypt the "
                        "stored role passwords (secrets/passwords.key travels with the metadata); set "
                        "ARGON_BACKUP_KEY", self.store.url)
        for loop in self._loops:
            loop.start()

    async def stop(self) -> None:
        await asyncio.gather(*(loop.stop() for loop in self._loops))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def flush(self) -> None:
        """One last pass of everything (at shutdown, after the computes stopped)."""
        for what, step in (("wal", self.ship_wal_once), ("metadata", self.backup_metadata_once)):
            try:
                await step()
            except Exception as exc:
                log.warning("final backup %s pass failed: %s", what, getattr(exc, "user_message", exc))

    def nudge(self) -> None:
        """Ship now rather than at the next tick: a compute stopped (its shutdown checkpoint's WAL,
        maybe a new snapshot) or a branch was created (its base)."""
        for loop in self._loops:
            loop.nudge()

    def _periodic(self, what: str, step: Any, interval: Any) -> Periodic:
        return Periodic(f"backup {what}", step, interval, logger=log,
                        on_error=lambda exc: self._fail(what, exc), on_ok=lambda: self._ok(what))

    def _fail(self, what: str, exc: Exception) -> None:
        message = exc.user_message if isinstance(exc, ArgonError) else f"{type(exc).__name__}: {exc}"
        if what not in self._errors:
            log.warning("backup: %s shipping failed, retrying every tick until it works: %s", what, message)
        self._errors[what] = message
        self.status.error = "; ".join(f"{k}: {v}" for k, v in sorted(self._errors.items()))
        self.status.error_since = self.status.error_since or model.utcnow()

    def _ok(self, what: str) -> None:
        if self._errors.pop(what, None) is not None:
            log.warning("backup: %s shipping works again", what)
        self.status.error = "; ".join(f"{k}: {v}" for k, v in sorted(self._errors.items()))
        if not self.status.error:
            self.status.error_since = None

    # --- WAL -------------------------------------------------------------------------------------------

    def _branches(self) -> list[tuple[model.Project, model.Branch]]:
        return [(p, b) for p in self.plane.projects() if p.history_retention_seconds > 0
                for b in self.plane.branches(p.id)]

    async def ship_wal_once(self) -> None:
        branches = self._branches()
        try:
            await asyncio.to_thread(self._ship_wal, branches)
        finally:  # an unreachable store is exactly when the lag limit matters
            # The branches that exist now: one created during this pass (its base maybe shipped
            # meanwhile) keeps its row.
            keep = {b.id for _p, b in self._branches()}
            for gone in [k for k in self.status.branches if k not in keep]:
                del self.status.branches[gone]
            await self._enforce_max_lag(branches)

    async def _enforce_max_lag(self, branches: list[tuple[model.Project, model.Branch]]) -> None:
        """Past `backup_max_lag` of unshipped WAL, a branch's compute refuses writes (every
        transaction starts read-only) until shipping is back under half of it: the local disk must
        not fill up with WAL the bucket does not have."""
        limit = self.settings.backup_max_lag_bytes
        for project, branch in branches:
            status = self.status.branches.get(branch.id)
            if status is None:
                continue
            lag = status.lag_bytes()
            refuse = lag > limit or (branch.id in self._refused and lag > limit // 2)
            ep = next((e for e in self.plane.endpoints(project.id, branch.id)
                       if e.type is model.EndpointType.READ_WRITE), None)
            if ep is None or not self.plane.is_running(ep.id):
                if not refuse:
                    self._refused.discard(branch.id)
                    if ep is not None and "backup" in self.plane.writes.refused(ep.id):
                        await self.plane.writes.set(ep.id, "backup", False)  # its next start may write
                continue
            pm = self.plane.computes.get(ep.id)
            instance = f"{ep.id}:{pm.pid if pm is not None else '?'}"
            if refuse == (branch.id in self._refused and instance in self._refused_on):
                continue
            why = f"{lag / 1e6:.0f} MB of WAL the object store does not have"
            if not await self.plane.writes.set(ep.id, "backup", refuse, why):
                log.warning("backup: could not %s writes on branch %s", "refuse" if refuse else "allow", branch.id)
                continue
            status.writes_refused = refuse
            if refuse:
                self._refused.add(branch.id)
                self._refused_on.add(instance)
                log.error("backup: branch %s has %.0f MB of WAL the object store does not have (limit "
                          "ARGON_BACKUP_MAX_LAG=%s): its writes are refused until shipping catches up",
                          branch.id, lag / 1e6, self.settings.backup_max_lag)
            else:
                self._refused.discard(branch.id)
                self._refused_on = {i for i in self._refused_on if not i.startswith(f"{ep.id}:")}
                log.warning("backup: branch %s caught up; writes are allowed again", branch.id)

    def _ship_wal(self, branches: list[tuple[model.Project, model.Branch]]) -> None:
        """Branches in parallel (a busy one's upload must not delay the others' RPO), each one's
        segments in order by one worker."""
        def one(item: tuple[model.Project, model.Branch]) -> Exception | None:
            try:
                self._ship_branch(*item)
            except FileNotFoundError:
                return None  # deleted meanwhile
            except Exception as exc:
                return exc
            return None

        errors = [e for e in self._pool.map(one, branches) if e is not None]
        if errors:
            raise errors[0]

    def _ship_branch(self, project: model.Project, branch: model.Branch) -> None:
        with self._shipping.setdefault(branch.id, threading.Lock()):  # the loop and ship_before_discard
            self._ship_branch_locked(project, branch)

    async def ship_before_discard(self, project: model.Project, branch: model.Branch) -> None:
        """Ship all of a stopped branch's WAL the bucket does not have yet, or refuse: a reset that
        discards the branch's current state (no `preserve_under_name`) must not leave its last
        commits only on the local disk. Called with the branch's computes stopped."""
        try:
            await asyncio.to_thread(self._ship_branch, project, branch)
        except Exception as exc:
            message = exc.user_message if isinstance(exc, ArgonError) else f"{type(exc).__name__}: {exc}"
            raise Unavailable(f"branch {branch.name!r} has WAL the backup at {self.store.url} does not have yet, and "
                              f"shipping it failed ({message}); retry when the object store is reachable, or keep the "
                              "current state with preserve_under_name") from None
        status = self.status.branches.get(branch.id)
        if status is not None and status.lag_bytes() > 0:
            raise Unavailable(f"branch {branch.name!r} still has {status.lag_bytes()} bytes of WAL the backup does not "
                              "have; retry in a moment")

    def _ship_branch_locked(self, project: model.Project, branch: model.Branch) -> None:
        history = retention.branch_history(self.plane, project.id, branch.id)
        manifest = history.load()
        if not manifest.epochs:
            return
        status = self.status.branches.setdefault(branch.id, BranchBackup(project.id, branch.id))
        # A compute's uid owns its pgdata and history: every file there is read through safefs, of
        # that uid only (a link it planted to another project's WAL or root's files is refused).
        live = self.plane.layout.pgdata(project.id, branch.id) / "pg_wal"
        owner = retention.project_owner(project)
        for epoch in manifest.epochs:
            prefix = epoch_prefix(project.id, branch.id, epoch.id)
            self._put_epoch_record(prefix, epoch)
            if not safefs.is_dir(history.epoch_dir(epoch.id)):
                continue
            state_path = self._state_path(project.id, branch.id, epoch.id, "wal.json")
            state = bw.ShipState.load(state_path)
            current = epoch is manifest.current
            try:
                result = bw.ship_epoch(self.store, self.codec, prefix, history.wal_dir(epoch.id),
                                       live if current else None, epoch.timeline, epoch.segsize, state,
                                       _first_lsn(epoch), lambda s, p=state_path: s.save(p), owner=owner)
            except Exception:
                if current:  # the store is unreachable: what is written keeps counting as lag
                    status.head_lsn = max(status.head_lsn, bw.live_head(live, epoch.timeline, epoch.segsize, state))
                    status.shipped_lsn = max(status.shipped_lsn, state.shipped_end + (
                        state.partial_len if state.partial_name == wal.segment_name(
                            epoch.timeline, state.shipped_end, epoch.segsize) else 0))
                    if status.head_lsn > status.shipped_lsn:
                        status.behind_since = status.behind_since or time.monotonic()
                raise
            if result.gap:
                log.warning("backup: branch %s is missing WAL segment %s locally (pruned before it was shipped); "
                            "point in time before its next base backup is not possible", branch.id, result.gap)
            if current:
                if result.segments or result.partial:
                    status.last_shipped_at = model.utcnow()
                status.shipped_lsn, status.head_lsn = result.shipped, result.head
                if result.head > result.shipped:
                    status.behind_since = status.behind_since or time.monotonic()
                else:
                    status.behind_since = None

    def _state_path(self, project_id: str, branch_id: str, epoch_id: str, name: str) -> Path:
        """Root's record of what of an epoch is in the bucket (`Layout.branch_backup_state`)."""
        directory = self.plane.layout.branch_backup_state(project_id, branch_id) / epoch_id
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return directory / name

    def shipped_end(self, project_id: str, branch_id: str, epoch_id: str) -> int:
        """The end LSN of the complete WAL segments of an epoch that are in the bucket (0: none)."""
        path = self.plane.layout.branch_backup_state(project_id, branch_id) / epoch_id / "wal.json"
        return bw.ShipState.load(path).shipped_end

    def _put_epoch_record(self, prefix: str, epoch: hs.Epoch) -> None:
        record = json.dumps(epoch.to_json(), sort_keys=True)
        if self._epoch_records.get(prefix) == record:
            return
        key = f"{prefix}epoch.json"
        self.store.put(key, self.codec.seal(key, record.encode()))
        self._epoch_records[prefix] = record

    # --- Bases -----------------------------------------------------------------------------------------

    async def ship_bases_once(self) -> None:
        async with self._bases_lock:
            for project, branch in self._branches():
                await asyncio.to_thread(self._ship_bases, project, branch)
            snaps = await self.plane.db(self.plane.store.list_all_snapshots)
            await asyncio.to_thread(self._ship_snapshots, snaps)

    def _ship_snapshots(self, snaps: list[model.Snapshot]) -> None:
        """Every snapshot's cluster as a base backup, once (root's record: `snapshots.json`)."""
        state_path = self.plane.layout.backup_state_dir / "snapshots.json"
        try:
            done = set(json.loads(state_path.read_text()))
        except (FileNotFoundError, ValueError):
            done = set()
        alive = {s.id for s in snaps}
        for snap in snaps:
            if snap.id in done:
                continue
            project = next((p for p in self.plane.projects() if p.id == snap.project_id), None)
            source = self.plane.layout.snapshot_dir(snap.project_id, snap.id) / "pgdata"
            if project is None or not safefs.is_dir(source):  # deleted meanwhile, or
                continue  # restored from the bucket onto a new disk: the bucket has it
            record = {"snapshot": snap.id, "project": snap.project_id, "lsn": snap.lsn,
                      "taken_at": _iso(snap.timestamp), "template": None}
            stats = bb.upload_snapshot(self.store, self.codec, self.index, source,
                                       snapshot_key(snap.project_id, snap.id), record,
                                       owner=retention.project_owner(project))
            failpoint("backup.snapshot.after_upload")  # shipped, not yet recorded: shipped again
            log.info("backup: snapshot %s shipped: %.1f MB, %d new chunks", snap.id, stats.bytes / 1e6,
                     stats.chunks_uploaded)
            done.add(snap.id)
            self._save_json(state_path, sorted(done & alive))

    @staticmethod
    def _save_json(path: Path, value: Any) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)

    async def fetch_snapshot(self, project: model.Project, snap: model.Snapshot, target: Path) -> None:
        """Lay out a snapshot's cluster from the bucket at `target` (new), for a machine that lost
        it: downloaded into root's scratch directory, handed to the project's uid, moved."""
        key = snapshot_key(project.id, snap.id)
        scratch = self.plane.layout.backup_scratch_dir / f"tmp-{secrets.token_hex(4)}"
        try:
            await asyncio.to_thread(self.plane.layout.backup_scratch_dir.mkdir, mode=0o700, exist_ok=True)
            try:
                manifest = await asyncio.to_thread(bb.read_manifest, self.store, self.codec, key)
            except MissingObject:
                raise UserError(f"snapshot {snap.id!r} is neither on this machine nor in the backup at "
                                f"{self.store.url}") from None
            await asyncio.to_thread(bb.download_snapshot, self.store, self.codec, manifest, scratch)
            user = retention.project_owner(project)
            if user is not None:
                await asyncio.to_thread(safefs.chown_tree, scratch, user)
            await asyncio.to_thread(safefs.rename, scratch, target)
        except BaseException:
            await asyncio.to_thread(safefs.rmtree, scratch)
            raise
        log.info("snapshot %s fetched from the backup (%.1f MB)", snap.id, bb.manifest_bytes(manifest) / 1e6)

    async def forget_snapshot(self, project_id: str, snapshot_id: str) -> None:
        """A deleted snapshot's manifest goes now (its chunks with retention's next collection);
        if the store is unreachable, retention deletes it later."""
        try:
            await asyncio.to_thread(self.store.delete, [snapshot_key(project_id, snapshot_id)])
        except Exception as exc:
            log.warning("backup: snapshot %s stays in the bucket until the next retention run: %s", snapshot_id,
                        getattr(exc, "user_message", exc))

    def _ship_bases(self, project: model.Project, branch: model.Branch) -> None:
        history = retention.branch_history(self.plane, project.id, branch.id)
        owner = retention.project_owner(project)
        for epoch in history.load().epochs:
            state_path = self._state_path(project.id, branch.id, epoch.id, "bases.json")
            try:
                done = set(json.loads(state_path.read_text()))
            except (FileNotFoundError, ValueError):
                done = set()
            for snap in epoch.snapshots:
                if snap.name in done:
                    continue
                source, source_owner = history.snapshot_dir(epoch.id, snap.name), owner
                if snap.template is not None and not safefs.is_dir(source):
                    template = retention.template_of(self.plane, project.pg_version, snap.template)
                    if template is None:
                        continue  # a template since rebuilt and not kept: nothing to ship
                    source, source_owner = template, None  # root's own pristine template
                if not safefs.is_dir(source):
                    continue  # pruned meanwhile
                key = f"{epoch_prefix(project.id, branch.id, epoch.id)}bases/{snap.name}.json"
                record = {**snap.to_json(), "epoch": epoch.id, "timeline": epoch.timeline, "segsize": epoch.segsize,
                          "template": None}
                started = time.monotonic()
                stats = bb.upload_snapshot(self.store, self.codec, self.index, source, key, record,
                                           owner=source_owner)
                log.info("backup: base %s/%s of branch %s shipped: %d files, %.1f MB, %d new chunks (%.1f MB) "
                         "in %.1f s", epoch.id, snap.name, branch.id, stats.files, stats.bytes / 1e6,
                         stats.chunks_uploaded, stats.bytes_uploaded / 1e6, time.monotonic() - started)
                done.add(snap.name)
                tmp = state_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(sorted(done)))
                os.replace(tmp, state_path)
                status = self.status.branches.setdefault(branch.id, BranchBackup(project.id, branch.id))
                status.last_base, status.last_base_at = f"{epoch.id}/{snap.name}", model.utcnow()

    # --- Point in time beyond the local history -------------------------------------------------------

    async def materialize(self, project: model.Project, branch: model.Branch, target: Path,
                          when: datetime | None, lsn: str | None = None) -> pitr.PointInTime:
        """`pitr.materialize` from the bucket, for a time the local history no longer reaches (ADR
        0018): the newest base at or before `when` and its epoch's WAL are laid out in a scratch
        directory of root's, handed to the project's uid, moved to `target`, and recovered there
        to `when` by the same scratch postmaster as a local point in time."""
        window = self.plane.clock() - timedelta(seconds=self.settings.backup_retention_seconds)
        if when is not None and when < window:
            raise UserError(f"timestamp {when.isoformat()} is older than the backup's retention window "
                            f"(ARGON_BACKUP_RETENTION={self.settings.backup_retention}, back to "
                            f"{window.isoformat(timespec='seconds')})")
        point = pitr.parse_lsn(lsn) if lsn is not None else None
        candidate = await asyncio.to_thread(choose, self.store, self.codec, project.id, branch.id, when, point)
        if candidate is None:
            raise UserError(f"neither the local history nor the backup of branch {branch.name!r} reaches back to "
                            f"{when.isoformat() if when is not None else lsn}")
        install = self.plane.installs[project.pg_version]
        scratch = self.plane.layout.backup_scratch_dir / f"tmp-{secrets.token_hex(4)}"
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.plane.layout.backup_scratch_dir.mkdir, mode=0o700, exist_ok=True)
            manifest = candidate.manifest
            settings, target_lsn, end = await asyncio.to_thread(
                prepare_recovery, self.store, self.codec, candidate, manifest, project.id, branch.id, scratch,
                install.bindir, when, None, point)
            if point is not None and point > end + 8192:
                raise UserError(f"LSN {lsn} is ahead of what the backup of branch {branch.name!r} holds "
                                f"(its WAL there ends at {wal.format_lsn(end)})")
            user = retention.project_owner(project)
            if user is not None:
                await asyncio.to_thread(safefs.chown_tree, scratch, user)
            await asyncio.to_thread(safefs.rename, scratch, target)
        except BaseException:
            await asyncio.to_thread(safefs.rmtree, scratch)
            raise
        try:
            control = await pitr.recover(self.plane, project, branch.id, target, settings)
            await asyncio.to_thread(bb.sync_tree, target)  # the download and the recovery's writes, at once
        except BaseException:
            await asyncio.to_thread(safefs.rmtree, target)
            raise
        log.info("rebuilt branch %s at %s from the backup (base %s/%s) in %.1f s", branch.id, when or lsn,
                 candidate.epoch["id"], candidate.base["name"], time.monotonic() - started)
        return pitr.PointInTime(lsn=target_lsn or control.redo_lsn, at=when or self.plane.clock())

    # --- Retention -----------------------------------------------------------------------------------

    async def prune_once(self, now: datetime | None = None) -> int:
        """Delete what fell out of ARGON_BACKUP_RETENTION; returns the number of objects deleted.
        Branches deleted since the last run get their `deleted.json` marker (the window after a
        deletion starts then) and their local ship state goes."""
        now = now or model.utcnow()
        cutoff = now - timedelta(seconds=self.settings.backup_retention_seconds)
        async with self._bases_lock:  # no base upload in flight: its chunks would look unreferenced
            listing = await asyncio.to_thread(self.store.list, "")
            # The branches that exist, after the listing: a branch created meanwhile is in both.
            live = {branch_prefix(p.id, b.id) for p in self.plane.projects() for b in self.plane.branches(p.id)}
            snaps = {snapshot_key(s.project_id, s.id) for s in await self.plane.db(self.plane.store.list_all_snapshots)}
            return await asyncio.to_thread(self._prune, listing, cutoff, now, live, snaps)

    def _prune(self, listing: list[ObjectInfo], cutoff: datetime, now: datetime, live: set[str],
               snapshots: set[str] | None = None) -> int:
        epochs: dict[str, br.EpochObjects] = {}
        metadata: dict[str, datetime] = {}
        chunk_ids: set[str] = set()
        in_bucket: set[str] = set()
        deleted: dict[str, datetime] = {}
        for o in listing:
            parts = o.key.split("/")
            if parts[0] == "branches" and len(parts) >= 4:
                in_bucket.add("/".join(parts[:3]) + "/")
            if parts[0] == "chunks" and len(parts) == 3:
                chunk_ids.add(parts[2])
            elif parts[0] == "meta" and (t := meta_time(o.key)) is not None:
                metadata[o.key] = t
            elif parts[0] == "branches" and len(parts) == 4 and parts[3] == "deleted.json":
                record = json.loads(self.codec.open(o.key, self.store.get(o.key)))
                deleted["/".join(parts[:3]) + "/"] = datetime.fromisoformat(record["deleted_at"])
            elif parts[0] == "branches" and len(parts) >= 5:
                prefix = "/".join(parts[:4]) + "/"
                epoch = epochs.setdefault(prefix, br.EpochObjects(prefix))
                if parts[4] == "epoch.json":
                    epoch.record = json.loads(self.codec.open(o.key, self.store.get(o.key)))
                elif parts[4] == "bases" and o.key.endswith(".json"):
                    epoch.bases[o.key] = bb.read_manifest(self.store, self.codec, o.key)["record"]
                elif parts[4] == "wal":
                    epoch.wal.append(o.key)
        revived = sorted(set(deleted) & live)  # a marker for a branch that exists (restored meanwhile)
        self.store.delete([f"{prefix}deleted.json" for prefix in revived])
        for prefix in revived:
            del deleted[prefix]
        for prefix in sorted(in_bucket - live - set(deleted)):
            key = f"{prefix}deleted.json"
            self.store.put(key, self.codec.seal(key, json.dumps({"deleted_at": now.isoformat()}).encode()))
            deleted[prefix] = now
            log.info("backup: branch %s was deleted; its objects go after the retention window", prefix)
        self._forget_deleted(live)
        doomed = br.plan(list(epochs.values()), metadata, cutoff, deleted)
        self.store.delete(doomed)
        gone = set(doomed)
        # Snapshots are kept until deleted (ADR 0028): their manifests hold their chunks; a snapshot
        # the metadata no longer has (deleted, or its project) goes.
        stored_snaps = [o.key for o in listing if o.key.startswith("snapshots/") and o.key.endswith(".json")]
        orphans = [k for k in stored_snaps if snapshots is not None and k not in snapshots]
        self.store.delete(orphans)
        gone |= set(orphans)
        manifests = [bb.read_manifest(self.store, self.codec, key) for e in epochs.values() for key in e.bases
                     if key not in gone]
        manifests += [bb.read_manifest(self.store, self.codec, key) for key in stored_snaps if key not in gone]
        unused = br.unreferenced_chunks(chunk_ids, manifests)
        self.store.delete([bb.chunk_key(c) for c in sorted(unused)])
        self.index.forget(unused)
        if doomed or unused:
            log.info("backup retention: deleted %d object(s) and %d unused chunk(s) older than %s", len(doomed),
                     len(unused), cutoff.isoformat(timespec="seconds"))
        return len(doomed) + len(orphans) + len(unused)

    def _forget_deleted(self, live: set[str]) -> None:
        """Root's ship state of branches that no longer exist."""
        top = self.plane.layout.backup_state_dir
        for project in _subdirs(top):
            for branch in _subdirs(top / project):
                if branch_prefix(project, branch) not in live:
                    shutil.rmtree(top / project / branch, ignore_errors=True)
            with contextlib.suppress(OSError):
                (top / project).rmdir()  # empty now

    # --- Usage ---------------------------------------------------------------------------------------

    async def usage(self) -> dict[str, Any]:
        """Bytes in the bucket: per project (its WAL and base manifests), the chunks all bases
        share (counted once), the metadata."""
        objects = await asyncio.to_thread(self.store.list, "")
        projects: dict[str, int] = {}
        chunks = meta = other = 0
        for o in objects:
            parts = o.key.split("/")
            if parts[0] == "branches" and len(parts) > 2:
                projects[parts[1]] = projects.get(parts[1], 0) + o.size
            elif parts[0] == "chunks":
                chunks += o.size
            elif parts[0] == "meta":
                meta += o.size
            else:
                other += o.size
        return {"total_bytes": chunks + meta + other + sum(projects.values()), "objects": len(objects),
                "shared_chunks_bytes": chunks, "metadata_bytes": meta,
                "projects": [{"project_id": k, "bytes": v} for k, v in sorted(projects.items())]}

    # --- Metadata --------------------------------------------------------------------------------------

    def _meta_signature(self) -> tuple[float, ...]:
        db = self.plane.layout.metadata_db
        sig = []
        for path in (db, db.with_name(db.name + "-wal")):
            try:
                st = path.stat()
                sig += [st.st_mtime_ns, st.st_size]
            except FileNotFoundError:
                sig += [0, 0]
        return tuple(sig)

    async def backup_metadata_once(self, *, force: bool = False) -> None:
        signature = self._meta_signature()
        if signature == self._meta_seen and not force:
            return
        at = model.utcnow()
        blob = await asyncio.to_thread(metadata_archive, self.plane.layout.metadata_db,
                                       self.plane.layout.secrets_dir, self.plane.layout.tls_dir)
        key = meta_key(at)
        await asyncio.to_thread(self.store.put, key, self.codec.seal(key, blob))
        self._meta_seen = signature
        self.status.last_metadata_at = at


def _subdirs(path: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def metadata_archive(db: Path, secrets_dir: Path, tls_dir: Path) -> bytes:
    """A tar of a consistent copy of the metadata (SQLite's online backup), `secrets/` and `tls/`."""
    with tempfile.TemporaryDirectory(prefix="argon-meta-") as tmp:
        copy = Path(tmp) / "argon.db"
        source = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            target = sqlite3.connect(copy)
            try:
                source.backup(target)
                # Monitoring samples are not needed to recover and grow all the time: left out.
                target.execute("DELETE FROM metric_samples")
                target.commit()
                target.execute("VACUUM")
            except sqlite3.OperationalError:  # an older schema without samples
                pass
            finally:
                target.close()
        finally:
            source.close()
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            tar.add(copy, arcname="argon.db")
            for directory in (secrets_dir, tls_dir):
                if directory.is_dir():
                    for path in sorted(directory.iterdir()):
                        if path.is_file() and not path.is_symlink():
                            tar.add(path, arcname=f"{directory.name}/{path.name}")
        return out.getvalue()

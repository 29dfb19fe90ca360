"""Lazy restore (ADR 0032): branches whose data `argon restore` left in the bucket.

`argon restore` (without `--eager`) brings back only the metadata and writes, per branch to
restore, an intent `fetch-<branch>` (`argon.storage.intents`: the bucket, the target time or LSN).
`argon up` then serves at once; a branch's data comes back

- on its first need: a compute start (a wake: the connection waits as for a cold start), a branch
  or snapshot made from it, a restore onto or from it. Single-flight per branch: every caller
  waits for the same fetch;
- in the background: a sweep restores every pending branch, `ARGON_RESTORE_PARALLEL` at a time, so
  the machine ends up whole without waiting for wakes (a failed one is tried again later).

One fetch: the branch's base backup and WAL are laid out in root's scratch directory, handed to the
project's uid, moved into the branch's directory under a `tmp-` name (start-up reconciliation
removes those), recovered there, renamed to `pgdata`, given a fresh local history epoch, and only
then is the intent removed. A `kill -9` anywhere leaves the intent: the next `argon up` resumes
(from the history step if `pgdata` is already in place: nothing has run on it, since no compute
starts while the intent is there). A half-restored branch is never served.

Each fetch is an operation (`create_timeline`, running then finished or failed) and its progress
(stage, bytes) is in `GET /backup` (`restoring`), the console and the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from argon import model, safefs
from argon.control import pitr, retention
from argon.control.backup import check_bucket, choose, prepare_recovery, ready_without_replay
from argon.errors import ArgonError, ComputeError, NotFound, StorageError
from argon.failpoints import failpoint
from argon.storage import wal
from argon.storage.backup import bases as bb
from argon.storage.backup.objects import Codec
from argon.storage.backup.store import ObjectStore, open_store

if TYPE_CHECKING:
    from argon.control.plane import ControlPlane

log = logging.getLogger(__name__)

KIND = "fetch"
RETRY_INTERVAL = 30.0  # seconds before the sweep tries a failed branch again


def intent_key(branch_id: str) -> str:
    return f"{KIND}-{branch_id}"


def intent(project_id: str, branch_id: str, url: str, s3_endpoint: str | None, at: datetime | None,
           lsn: str | None) -> dict[str, Any]:
    """What `argon restore` records for a branch whose data stays in the bucket for now."""
    return {"project": project_id, "branch": branch_id, "url": url, "s3_endpoint": s3_endpoint,
            "at": at.isoformat() if at else None, "lsn": lsn}


@dataclass
class Fetch:
    """One branch's restore from the bucket, as the status shows it."""

    project_id: str
    branch_id: str
    reason: str = ""
    stage: str = "waiting"  # waiting, downloading, recovering, history, failed
    bytes_done: int = 0  # downloaded so far: the base backup and its WAL
    base_bytes: int = 0  # the base backup's size
    started_at: datetime | None = None
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        return {"project_id": self.project_id, "branch_id": self.branch_id, "stage": self.stage,
                "reason": self.reason or None, "bytes_done": self.bytes_done, "base_bytes": self.base_bytes,
                "started_at": self.started_at.isoformat().replace("+00:00", "Z") if self.started_at else None,
                "error": self.error or None}


class LazyRestore:
    """The branches still in the bucket after a lazy `argon restore`, and their fetches."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.parallel = max(1, plane.settings.restore_parallel)
        self.pending: dict[str, dict[str, Any]] = {}  # branch id -> its intent
        self.fetches: dict[str, Fetch] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._buckets: dict[tuple[str, str | None], tuple[ObjectStore, Codec]] = {}
        self._sweep: asyncio.Task[None] | None = None
        # Downloads begun at start-up (`prefetch`), by branch id; a fetch takes its branch's.
        self._prefetched: dict[str, asyncio.Task[tuple[dict[str, str], Path, wal.ControlData | None]]] = {}
        self.restored = 0

    def load(self) -> None:
        """At start-up (blocking): the pending branches; intents of deleted branches go, and so does
        whatever a `kill -9` left in root's scratch directory (of any fetch from the bucket)."""
        safefs.rmtree(self.plane.layout.backup_scratch_dir)
        intents = self.plane.intents
        for key in intents.keys(KIND):
            data = intents.get(key)
            branch = self.plane.find_branch(data["branch"]) if data else None
            if data is None or branch is None or branch.project_id != data["project"]:
                intents.remove(key)
                continue
            self.pending[data["branch"]] = data
            self.fetches[data["branch"]] = Fetch(data["project"], data["branch"])

    def prefetch(self) -> None:
        """At start-up, as soon as the metadata is loaded (before the templates are checked and the
        data directory reconciled, seconds of `argon up`'s start): the first pending branches'
        base backups and WAL begin downloading into root's scratch directory, which nothing else
        touches (`load` emptied it). Their fetches, once `start` runs, use these downloads instead
        of their own (one that failed is downloaded again); nothing enters a branch's directory
        before then."""
        for branch_id in sorted(self.pending, key=self._order)[:self.parallel]:
            data = self.pending[branch_id]
            try:
                project = self.plane.project(data["project"])
            except NotFound:
                continue
            status = self.fetches.setdefault(branch_id, Fetch(data["project"], branch_id))
            status.stage = "downloading"
            self._prefetched[branch_id] = asyncio.get_running_loop().create_task(
                self._download(project, branch_id, data, status))

    def start(self) -> None:
        if self.pending:
            log.info("lazy restore: %d branch(es) still in the bucket; restoring them in the background, %d at a time "
                     "(a wake restores its branch first)", len(self.pending), self.parallel)
            self._sweep = self.plane.spawn(self._sweep_all(), "restoring branches from the backup")

    async def stop(self) -> None:
        for task in [self._sweep, *self._tasks.values(), *self._prefetched.values()]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def view(self) -> dict[str, Any]:
        return {"pending": len(self.pending), "restored": self.restored,
                "branches": [f.view() for f in self.fetches.values() if f.branch_id in self.pending]}

    def is_pending(self, branch_id: str) -> bool:
        return branch_id in self.pending

    async def ensure(self, branch_id: str, *, reason: str = "wake") -> None:
        """Return once the branch's data is on the disk (at once if it was); single-flight. A failed
        fetch raises a ComputeError saying what failed; the next call tries again."""
        if branch_id not in self.pending:
            return
        task = self._tasks.get(branch_id)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._fetch(branch_id, reason))
            self._tasks[branch_id] = task
        await asyncio.shield(task)

    async def _sweep_all(self) -> None:
        gate = asyncio.Semaphore(self.parallel)

        async def one(branch_id: str) -> None:
            async with gate:
                with contextlib.suppress(ArgonError):  # logged and in the status; tried again below
                    await self.ensure(branch_id, reason="background")

        while self.pending:
            started = time.monotonic()
            await asyncio.gather(*(one(b) for b in sorted(self.pending, key=self._order)))
            if self.pending:
                await asyncio.sleep(max(0.0, RETRY_INTERVAL - (time.monotonic() - started)))
        log.info("lazy restore: every branch is restored (%d)", self.restored)

    def _order(self, branch_id: str) -> tuple[int, int]:
        """Default branches first, then branches with a compute: those the first connections want."""
        branch = self.plane.find_branch(branch_id)
        if branch is None:
            return (3, 0)
        computes = self.plane.endpoints(branch.project_id, branch_id)
        return (0 if branch.default else 1 if computes else 2, -len(computes))

    def _bucket(self, data: dict[str, Any]) -> tuple[ObjectStore, Codec]:
        key = (data["url"], data.get("s3_endpoint"))
        if key not in self._buckets:
            store = open_store(data["url"], s3_endpoint=data.get("s3_endpoint") or self.plane.settings.backup_s3_endpoint)
            codec = Codec(self.plane.settings.backup_key)
            check_bucket(store, codec, create=False)  # a wrong ARGON_BACKUP_KEY is named here
            self._buckets[key] = store, codec
        return self._buckets[key]

    async def _fetch(self, branch_id: str, reason: str) -> None:
        plane = self.plane
        data = self.pending[branch_id]
        status = self.fetches.setdefault(branch_id, Fetch(data["project"], branch_id))
        try:
            project = plane.project(data["project"])
            branch = plane.branch(project.id, branch_id)
        except NotFound:  # deleted since
            await asyncio.to_thread(plane.intents.remove, intent_key(branch_id))
            self.pending.pop(branch_id, None)
            return
        status.reason, status.stage, status.error, status.started_at = reason, "downloading", "", model.utcnow()
        started = time.monotonic()
        op = await plane.record(project.id, model.OperationAction.CREATE_TIMELINE, branch_id=branch_id,
                                status=model.OperationStatus.RUNNING)
        log.info("restoring branch %s (%s) from the backup at %s (%s)", branch.name, branch_id, data["url"], reason)
        try:
            await self._restore(project, branch, data, status)
        except Exception as exc:
            why = getattr(exc, "user_message", None) or str(exc) or type(exc).__name__
            message = f"restoring branch {branch.name!r} from the backup at {data['url']} failed: {why}"
            status.stage, status.error = "failed", message
            log.error("%s (tried again on the next wake, or by the background restore in %.0f s)", message,
                      RETRY_INTERVAL)
            await self._finish(op, started, model.OperationStatus.FAILED, message)
            raise ComputeError(message, retryable=True) from None
        await asyncio.to_thread(plane.intents.remove, intent_key(branch_id))  # the commit point
        self.pending.pop(branch_id, None)
        self.restored += 1
        await self._finish(op, started, model.OperationStatus.FINISHED, None)
        log.info("branch %s restored from the backup in %.1f s (%s)", branch_id, time.monotonic() - started,
                 ", ".join(f"{k} {v:.1f} s" for k, v in status.timings.items()))

    async def _finish(self, op: model.Operation, started: float, state: model.OperationStatus,
                      error: str | None) -> None:
        done = op.replace(status=state, error=error, failures_count=1 if error else 0,
                          total_duration_ms=int((time.monotonic() - started) * 1000))
        try:
            await self.plane.db(self.plane.store.put, done)
        except Exception as exc:  # the restore itself is done; only its record is missing
            log.warning("could not record operation %s: %s", op.id, exc)

    async def _download(self, project: model.Project, branch_id: str, data: dict[str, Any],
                        status: Fetch) -> tuple[dict[str, str], Path, wal.ControlData | None]:
        """The branch's base backup and WAL laid out in a new directory of root's scratch directory,
        ready for recovery: (its recovery settings, the directory, its control data when it needs
        no recovery run: a clean base whose WAL ends at its checkpoint, ADR 0032 amended)."""
        plane = self.plane
        layout = plane.layout
        install = plane.installs.get(project.pg_version)
        if install is None:
            raise StorageError(f"PostgreSQL {project.pg_version} is not installed here")
        at = datetime.fromisoformat(data["at"]) if data.get("at") else None
        lsn = wal.parse_lsn(data["lsn"]) if data.get("lsn") else None
        store, codec = await asyncio.to_thread(self._bucket, data)
        candidate = await asyncio.to_thread(choose, store, codec, project.id, branch_id, at, lsn)
        if candidate is None:
            raise StorageError("the bucket holds no base backup of it" + (f" from before {data['at']}" if at else ""))
        manifest = candidate.manifest
        status.base_bytes = bb.manifest_bytes(manifest)

        def progress(n: int) -> None:
            status.bytes_done += n

        scratch = layout.backup_scratch_dir / f"tmp-{secrets.token_hex(4)}"
        try:
            await asyncio.to_thread(layout.backup_scratch_dir.mkdir, mode=0o700, exist_ok=True)
            settings, _, _ = await asyncio.to_thread(prepare_recovery, store, codec, candidate, manifest,
                                                     project.id, branch_id, scratch, install.bindir, at,
                                                     progress, lsn)
            clean = await asyncio.to_thread(ready_without_replay, install.bindir, scratch)
            owner = retention.project_owner(project)
            if owner is not None:  # handed over while still where only root goes
                await asyncio.to_thread(safefs.chown_tree, scratch, owner)
        except BaseException:
            await asyncio.to_thread(safefs.rmtree, scratch)
            raise
        return settings, scratch, clean

    async def _restore(self, project: model.Project, branch: model.Branch, data: dict[str, Any],
                       status: Fetch) -> None:
        plane = self.plane
        layout = plane.layout
        install = plane.installs.get(project.pg_version)
        if install is None:
            raise StorageError(f"PostgreSQL {project.pg_version} is not installed here")
        pgdata = layout.pgdata(project.id, branch.id)
        history = retention.branch_history(plane, project.id, branch.id)
        t0 = time.monotonic()
        fetched = not await asyncio.to_thread(safefs.lexists, pgdata)
        if fetched:
            got = None
            early = self._prefetched.pop(branch.id, None)
            if early is not None:  # begun at start-up (`prefetch`)
                try:
                    got = await early
                except Exception as exc:
                    log.info("branch %s: its early download failed (%s); downloading it again", branch.id,
                             getattr(exc, "user_message", None) or exc)
            if got is None:
                status.bytes_done = 0
                got = await self._download(project, branch.id, data, status)
            settings, scratch, clean = got
            target = layout.branch_dir(project.id, branch.id) / f"tmp-restore-{secrets.token_hex(3)}"
            try:
                status.timings["download"], t0 = time.monotonic() - t0, time.monotonic()
                status.stage = "recovering"
                await asyncio.to_thread(_make_branch_dir, plane, project, branch.id)
                await asyncio.to_thread(safefs.rename, scratch, target)
                if clean is None:
                    await pitr.recover(plane, project, branch.id, target, settings)
                status.timings["recovery"], t0 = time.monotonic() - t0, time.monotonic()
                status.stage = "history"
                # Durable before the swap (written back meanwhile), while the local history copies
                # the same, now final, tree: the two overlap. A history begun by an interrupted
                # fetch goes first; this one is complete (its manifest saved) before the swap.
                await asyncio.to_thread(safefs.rmtree, history.root)
                results = await asyncio.gather(
                    asyncio.to_thread(bb.sync_tree, target),
                    asyncio.to_thread(retention.begin_epoch, plane, project, branch.id, target,
                                      reason="restored from backup", fresh=True), return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
                failpoint("restore.lazy.before_swap")
                await asyncio.to_thread(safefs.rename, target, pgdata)
            except BaseException:
                await asyncio.to_thread(safefs.rmtree, scratch)
                await asyncio.to_thread(safefs.rmtree, target)
                raise
            status.timings["sync and history"] = time.monotonic() - t0
        failpoint("restore.lazy.after_swap")
        if fetched:
            return
        # Resumed after a kill -9 that left the swapped data in place: its history begun again.
        status.stage = "history"
        await asyncio.to_thread(safefs.rmtree, history.root)  # a history begun by an interrupted fetch
        await asyncio.to_thread(retention.begin_epoch, plane, project, branch.id, pgdata,
                                reason="restored from backup", fresh=True)
        status.timings["history"] = time.monotonic() - t0


def _make_branch_dir(plane: ControlPlane, project: model.Project, branch_id: str) -> None:
    owner = retention.project_owner(project)
    safefs.makedirs(plane.layout.branch_dir(project.id, branch_id), owner=owner)
    safefs.makedirs(plane.layout.compute_log(project.id, branch_id).parent, owner=owner)


def pending_branches(data_dir: Path) -> int:
    """How many branches a lazy restore left in the bucket (for `argon status` before `argon up`)."""
    directory = data_dir / "intents"
    return len(list(directory.glob(f"{KIND}-*.json"))) if directory.is_dir() else 0

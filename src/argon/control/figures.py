"""Storage figures the API reports, measured on disk (never invented) in the background, read from
memory: a read never walks a disk nor runs anything (ADR 0022).

- branch `logical_size`: the bytes of the branch's databases (the files under `pgdata/base`, what
  `pg_database_size` adds up), whether or not its compute runs;
- branch `written_data_bytes`: WAL the branch has written since it got its data, summed over its
  history epochs (LSN progress; the current epoch up to its latest checkpoint, or up to the WAL
  position the metrics sampler last saw on the running compute, whichever is newer);
- branch `allocated_bytes`, summed into the project's `synthetic_storage_size`: the space the
  branch's directory takes on disk (allocated blocks: data, history snapshots and archived WAL;
  a file with n hard links counts 1/n at each, `argon.storage.usage`).

When a branch is measured (`due`, a pure decision): when it is new to the figures, when its record
or one of its endpoints' records changed since its last measurement (a suspend, a start, a restore,
a reset: the view tells its `branch_watchers` as it happens), when its compute started or stopped
(before the records say so), when it was `touch`ed (history pruned; a branch made, deleted or
restored in its project), and every `TTL` seconds while its compute runs (it writes). An idle
branch's files do not change, so it is not measured again, nor even looked at: a tick's work
follows the running computes and the changes, not the number of branches (it compared every
branch's change number each second before), and at most `BUDGET` branches are measured per tick
(every `INTERVAL` seconds, in a thread; no thread when none is due). After a restart, sizes come
from the store's newest storage samples at once and every branch is measured once more within
`branches / BUDGET` ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from argon.compute.osuser import OsUser, project_user
from argon.control.metrics import STORAGE_EVERY, MetricsSampler
from argon.control.periodic import Periodic
from argon.control.plane import ControlPlane
from argon.storage import history as hs
from argon.storage import wal
from argon.storage.usage import disk_usage

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between ticks
TTL = 15.0  # seconds between measurements of a branch whose compute runs (shorter with a faster sampler)
BUDGET = 25  # branches measured per tick at most (changed ones first, then running ones, then the rest)


@dataclass(frozen=True)
class BranchFigures:
    logical_size: int = 0
    written_data_bytes: int = 0
    allocated_bytes: int = 0


NOT_MEASURED = BranchFigures()


@dataclass(frozen=True)
class Target:
    """One branch to measure, with everything the measurement needs (read on the event loop: the
    view is not thread-safe)."""

    project_id: str
    branch_id: str
    branch_dir: Path
    pgdata: Path
    bindir: Path | None
    owner: OsUser | None
    sampled_lsn: int | None


def due(changed: Collection[str], running: Mapping[str, float | None], stale: Iterable[str], *, now: float,
        budget: int = BUDGET, ttl: float = TTL) -> list[str]:
    """Pure: which branches to measure now, most needed first. `changed`: branches new, changed,
    touched or started/stopped since their last measurement; `running`: the branches whose compute
    runs -> when they were last measured (None: never); `stale`: branches with sizes from the store,
    not measured since start-up (they wait for the changed and running ones)."""
    out = list(changed)[:budget]
    if len(out) < budget:
        taken = set(out)
        ripe = sorted((at, bid) for bid, at in running.items()
                      if bid not in taken and at is not None and now - at >= ttl)
        out += [bid for _, bid in ripe[:budget - len(out)]]
        taken.update(out)
        for bid in stale:
            if len(out) >= budget:
                break
            if bid not in taken:
                out.append(bid)
    return out


class Figures:
    def __init__(self, plane: ControlPlane, metrics: MetricsSampler) -> None:
        self.plane = plane
        self.metrics = metrics
        self._figures: dict[str, BranchFigures] = {}
        self._measured_at: dict[str, float] = {}  # branch -> time.monotonic() of its last measurement
        self._pending: dict[str, None] = {}  # changed, touched or new since measured (in the order told)
        self._stale: dict[str, None] = {}  # seeded from the store at start-up, not measured since
        self._running: set[str] = set()  # the branches whose compute ran at the last tick
        self._primed = False
        plane.branch_watchers.append(self.touch)
        self.loop = Periodic("storage figures", self.tick, INTERVAL, prepare=self._seed_from_store, logger=log)
        self._measuring: asyncio.Future[list[tuple[Target, BranchFigures | None, bool]]] | None = None
        self.measured = 0  # branches measured since start (the density benchmark and tests read it)
        # one tick at a time: a settle() waits for the background's tick in flight (which has taken its
        # branches off `_pending`) instead of finding nothing due and returning before they are measured
        self._ticking = asyncio.Lock()
        # a running branch's figures are no older than its storage samples (every STORAGE_EVERY looks)
        self.ttl = min(TTL, plane.settings.metrics_interval * STORAGE_EVERY)

    # What the API reads (memory only) -------------------------------------------------------------------

    def get(self, branch_id: str) -> BranchFigures:
        return self._figures.get(branch_id, NOT_MEASURED)

    def project_bytes(self, project_id: str) -> int:
        return sum(self.get(b).allocated_bytes for b in self.plane.branch_ids(project_id))

    def sizes(self) -> dict[str, tuple[str, int, int]]:
        """Every branch's (project, allocated bytes, logical bytes) as last measured (the metrics
        sampler's storage samples)."""
        out = {}
        for b in self.plane.all_branches():
            f = self._figures.get(b.id)
            if f is not None:
                out[b.id] = (b.project_id, f.allocated_bytes, f.logical_size)
        return out

    # Keeping them -------------------------------------------------------------------------------------

    def touch(self, branch_id: str) -> None:
        """Measure this branch at the next tick (its records changed, or its files did in a way its
        records do not show; a branch that is gone is forgotten then)."""
        self._pending[branch_id] = None

    def forget(self, branch_id: str) -> None:
        self._figures.pop(branch_id, None)
        self._measured_at.pop(branch_id, None)
        self._pending.pop(branch_id, None)
        self._stale.pop(branch_id, None)

    def seed(self, sizes: Mapping[str, tuple[int | None, int | None]]) -> None:
        """Sizes known from the store (branch -> (logical, allocated)), until the branch is measured."""
        for bid, (logical, allocated) in sizes.items():
            if bid not in self._figures:
                self._figures[bid] = BranchFigures(logical_size=logical or 0, allocated_bytes=allocated or 0)

    def start(self) -> None:
        self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()
        if self._measuring is not None:
            with contextlib.suppress(Exception):
                await self._measuring

    async def _seed_from_store(self) -> None:
        samples = await self.plane.db(self.plane.store.latest_storage_samples)
        self.seed({b: (s.logical_bytes, s.storage_bytes) for b, s in samples.items()})

    def _prime(self) -> None:
        """Once, at the first tick: every branch the view holds is to be measured, the ones with sizes
        from the store after the others."""
        self._primed = True
        for branch in self.plane.all_branches():
            if branch.id in self._measured_at or branch.id in self._pending:
                continue
            if branch.id in self._figures:
                self._stale[branch.id] = None
            else:
                self._pending[branch.id] = None

    async def tick(self, budget: int = BUDGET) -> int:
        """Measure the branches that are due (in a thread); returns how many were measured."""
        async with self._ticking:
            return await self._tick(budget)

    async def _tick(self, budget: int) -> int:
        plane = self.plane
        if not self._primed:
            self._prime()
        now = time.monotonic()
        running = {ep.branch_id for ep in plane.running_endpoints()}
        for bid in running ^ self._running:  # started or stopped: measured, whatever the records say yet
            self._pending[bid] = None
        self._running = running
        chosen = due(self._pending, {b: self._measured_at.get(b) for b in running}, self._stale, now=now,
                     budget=budget, ttl=self.ttl)
        targets = []
        for bid in chosen:
            self._pending.pop(bid, None)
            self._stale.pop(bid, None)
            target = self._target(bid)
            if target is None:
                self.forget(bid)  # gone
            else:
                targets.append(target)
        if not targets:
            return 0
        work = asyncio.ensure_future(asyncio.to_thread(lambda: [(t, *self.measure(t)) for t in targets]))
        self._measuring = work
        measured = await asyncio.shield(work)  # a stop waits for it: a thread cannot be cancelled
        for target, figures, whole in measured:
            bid = target.branch_id
            if plane.find_branch(bid) is None or figures is None:
                self.forget(bid)  # deleted meanwhile
                continue
            self._measured_at[bid] = now
            self._figures[bid] = figures
            if not whole:
                self._pending[bid] = None
        self.measured += len(measured)
        return len(measured)

    async def settle(self) -> None:
        """Measure every branch that is due, however many (tests; `argon up` never waits for this)."""
        for _ in range(3):  # a branch being rebuilt stays due: do not wait for it forever
            if not await self.tick(budget=1 << 30):
                return

    def _target(self, branch_id: str) -> Target | None:
        plane = self.plane
        branch = plane.find_branch(branch_id)
        project = plane.find_project(branch.project_id) if branch is not None else None
        if branch is None or project is None:
            return None
        install = plane.installs.get(project.pg_version)
        primary = plane.primary(project.id, branch.id)
        return Target(project_id=project.id, branch_id=branch.id,
                      branch_dir=plane.layout.branch_dir(project.id, branch.id),
                      pgdata=plane.layout.pgdata(project.id, branch.id),
                      bindir=install.bindir if install is not None else None, owner=project_user(project.os_uid),
                      sampled_lsn=self.metrics.current_lsn(primary.id) if primary is not None else None)

    def measure(self, t: Target) -> tuple[BranchFigures | None, bool]:
        """One branch's figures from its files (blocking: run in a thread), and whether they are whole
        (False: its history could not be read, measure it again). None: deleted meanwhile."""
        if not t.branch_dir.exists():
            return None, True
        logical = disk_usage(t.pgdata / "base").size
        allocated = disk_usage(t.branch_dir).allocated
        written, whole = 0, True
        try:
            manifest = hs.BranchHistory(t.branch_dir / "history", t.owner).load()
            for epoch in manifest.epochs:
                if epoch.end_lsn:
                    end = wal.parse_lsn(epoch.end_lsn)
                elif t.bindir is not None:
                    end = wal.parse_lsn(wal.control_data(t.bindir, t.pgdata, t.owner).checkpoint_lsn)
                    end = max(end, t.sampled_lsn or 0)
                else:
                    continue
                written += max(0, end - wal.parse_lsn(epoch.start_lsn))
        except Exception:  # a branch being rebuilt right now: keep the last figure, measure next time
            written, whole = self.get(t.branch_id).written_data_bytes, False
        return BranchFigures(logical, written, allocated), whole

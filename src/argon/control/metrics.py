"""The metrics sampler: what the console's Monitoring tab charts and the API's consumption figures add up.

Every `metrics_interval` seconds (default 15) each running compute gets one look, on the platform's
admin session in its `postgres` database (the compute layer's `AdminSession`, shared with the
proxy's verifier lookups and closed by the compute's stop; never in a user database, and never
waking anything): client connections (`pg_stat_activity`, the platform's own role left out),
commits + rollbacks over all databases (`pg_stat_database`; queries/s is the rate between two looks,
minus the sampler's own statements), and the WAL position. The compute's CPU time and running time
come from `/proc` (the postmaster with its reaped and live children), stored as the amount used
since the previous look. Every `STORAGE_EVERY`th look, every branch, idle ones too, gets a storage
sample: its size on disk as the storage figures last measured it (`argon.control.figures`, which
walk a branch only when it changed or while its compute runs; nothing is walked here) and its
logical size (`pg_database_size` of every database while its compute runs, else the figures').

Samples go to the metadata store through `plane.db` (never on the event loop), and rows older than
`metrics_retention_hours` are deleted. The consumption figures (`Usage`) are sums over that window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from argon import model
from argon.control.periodic import Periodic
from argon.control.plane import ControlPlane
from argon.metadata.store import MetricSample, MetricTotals

log = logging.getLogger(__name__)

STORAGE_EVERY = 5  # looks between storage samples
PRUNE_EVERY = 20  # looks between deletions of samples older than the retention
QUERY_TIMEOUT = 5.0  # seconds for one compute's look; a compute that does not answer is skipped

# One statement, so one transaction of our own per look (subtracted from the rate).
COMPUTE_SQL = """
SELECT (SELECT count(*) FROM pg_stat_activity
        WHERE backend_type = 'client backend' AND coalesce(usename, '') <> %(platform)s)::int,
       (SELECT coalesce(sum(xact_commit + xact_rollback), 0) FROM pg_stat_database)::bigint,
       ((CASE WHEN pg_is_in_recovery() THEN coalesce(pg_last_wal_replay_lsn(), '0/0'::pg_lsn)
              ELSE pg_current_wal_lsn() END) - '0/0'::pg_lsn)::bigint,
       (SELECT coalesce(sum(blks_hit), 0) FROM pg_stat_database)::bigint,
       (SELECT coalesce(sum(blks_read), 0) FROM pg_stat_database)::bigint
"""
LOGICAL_SQL = "SELECT coalesce(sum(pg_database_size(oid)), 0)::bigint FROM pg_database"


# Pure arithmetic ---------------------------------------------------------------------------------------


def counter_delta(previous: float | None, current: float, *, same_run: bool = True) -> float | None:
    """How much a cumulative counter grew since the previous reading. None without a previous reading
    (we cannot know what happened before); a new run or a counter that went down (a restart, a stats
    reset) started from zero, so all of `current` is new."""
    if previous is None:
        return None
    if not same_run or current < previous:
        return current
    return current - previous


def rate(previous: tuple[float, float] | None, current: tuple[float, float], *, own: int = 0) -> float | None:
    """Events per second between two (monotonic time, counter) readings, minus `own` events we caused."""
    if previous is None:
        return None
    elapsed = current[0] - previous[0]
    if elapsed <= 0:
        return None
    grown = counter_delta(previous[1], current[1])
    assert grown is not None
    return max(0.0, grown - own) / elapsed


def byte_hours(storage_sum: int, samples: int, every_seconds: float) -> int:
    """Storage consumption (byte-hours) from storage samples taken every `every_seconds`: each sample
    stands for the bytes held during one storage interval."""
    if samples <= 0:
        return 0
    return int(storage_sum * every_seconds / 3600)


@dataclass(frozen=True)
class ProcTimes:
    """A postmaster's /proc figures: CPU seconds of it and all its children, and seconds since it started."""

    pid: int
    cpu_seconds: float
    uptime_seconds: float


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses


def proc_times(pid: int) -> ProcTimes | None:
    """CPU used by a postmaster (its own, its reaped children's, its live children's) and its uptime."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = _stat_fields(pid)
        # fields[11:15] = utime, stime, cutime, cstime; fields[19] = starttime (ticks after boot)
        ticks = sum(int(v) for v in fields[11:15])
        started = int(fields[19]) / tick
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    for child in children:
        with contextlib.suppress(OSError, ValueError, IndexError):
            ticks += sum(int(v) for v in _stat_fields(int(child))[11:15])
    return ProcTimes(pid=pid, cpu_seconds=ticks / tick, uptime_seconds=max(0.0, uptime - started))


@dataclass(frozen=True)
class Usage:
    """Consumption over the retention window (`period_start` to `period_end`), as far as it is measured."""

    active_seconds: int = 0
    cpu_seconds: int = 0
    storage_byte_hours: int = 0
    period_start: datetime | None = None
    period_end: datetime | None = None


@dataclass
class _Last:
    """The previous look at one compute (in memory only)."""

    at: float  # time.monotonic()
    xacts: int
    proc: ProcTimes | None
    lsn: int
    wall: datetime
    connections: int = 0
    blocks_hit: int = 0
    blocks_read: int = 0


@dataclass
class _Look:
    endpoint: model.Endpoint
    connections: int
    xacts: int
    lsn: int
    blocks_hit: int = 0
    blocks_read: int = 0
    logical: int | None = None
    proc: ProcTimes | None = None
    at: float = field(default_factory=time.monotonic)


class StorageFigures(Protocol):
    """Where storage samples come from: each branch's figures as last measured (`control.figures`)."""

    def sizes(self) -> dict[str, tuple[str, int, int]]:
        """branch -> (project, allocated bytes, logical bytes), from memory."""
        ...


# The sampler ---------------------------------------------------------------------------------------------


class MetricsSampler:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.loop = Periodic("metrics sample", self._sample, lambda: self.interval, prepare=self._prepare, logger=log)
        self._last: dict[str, _Last] = {}
        self._logical: dict[str, int] = {}  # branch -> last logical size
        self._allocated: dict[str, tuple[str, int]] = {}  # branch -> (project, bytes on disk), last measured
        self.storage: StorageFigures | None = None  # set by `Control.build` (the figures read the sampler too)
        self._totals = MetricTotals({}, {}, {})
        self._window: tuple[datetime, datetime] | None = None
        self.ticks = 0

    @property
    def interval(self) -> float:
        return float(self.plane.settings.metrics_interval)

    @property
    def retention(self) -> timedelta:
        return timedelta(hours=self.plane.settings.metrics_retention_hours)

    def start(self) -> None:
        self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()

    async def _prepare(self) -> None:
        self._logical = {b: s.logical_bytes for b, s in
                         (await self.plane.db(self.plane.store.latest_storage_samples)).items()
                         if s.logical_bytes is not None}

    async def _sample(self) -> None:
        log.debug("metrics: %s", await self.tick())

    async def tick(self) -> str:
        """One look at every running compute; every STORAGE_EVERY-th, every branch's storage too."""
        plane = self.plane
        storage = self.ticks % STORAGE_EVERY == 0
        now = model.utcnow()
        looks = [look for look in await asyncio.gather(*(self._look(ep, logical=storage)
                                                         for ep in plane.running_endpoints()))
                 if look is not None]
        procs = await asyncio.to_thread(self._proc_times, [look.endpoint.id for look in looks])
        rows = [self._compute_row(look, procs.get(look.endpoint.id), now, own=2 if storage else 1)
                for look in looks]
        for ep_id in [e for e in self._last if not plane.is_running(e)]:
            del self._last[ep_id]
        if storage:
            for look in looks:
                if look.logical is not None:
                    self._logical[look.endpoint.branch_id] = look.logical
            measured = self._storage_rows(now)
            known = {r.branch_id for r in measured}
            self._logical = {b: v for b, v in self._logical.items() if b in known}
            self._logical.update({r.branch_id: r.logical_bytes for r in measured if r.logical_bytes is not None})
            self._allocated = {r.branch_id: (r.project_id, r.storage_bytes or 0) for r in measured}
            rows += measured
        await plane.db(plane.store.add_metric_samples, rows)
        pruned = 0
        if self.ticks % PRUNE_EVERY == 0:
            pruned = await plane.db(plane.store.delete_metric_samples_before, now - self.retention)
        if storage:
            since = now - self.retention
            self._totals = await plane.db(plane.store.metric_totals, since)
            self._window = (since, now)
        self.ticks += 1
        return (f"{len(looks)} compute(s) sampled" + (", storage measured" if storage else "")
                + (f", {pruned} old sample(s) deleted" if pruned else ""))

    async def _look(self, ep: model.Endpoint, *, logical: bool) -> _Look | None:
        plane = self.plane
        if not plane.is_running(ep.id) or plane.endpoint_lock(ep.id).locked():
            return None  # idle, or a start/stop under way: never wake anything, never get in the way
        session = plane.computes.admin(ep.id)
        if session is None:
            return None
        try:
            row = await session.fetchone(COMPUTE_SQL, {"platform": model.PLATFORM_ROLE}, timeout=QUERY_TIMEOUT)
            assert row is not None
            look = _Look(ep, connections=int(row[0]), xacts=int(row[1]), lsn=int(row[2]), blocks_hit=int(row[3]),
                         blocks_read=int(row[4]))
            if logical and ep.type is model.EndpointType.READ_WRITE:
                size = await session.fetchone(LOGICAL_SQL, timeout=QUERY_TIMEOUT)
                look.logical = int(size[0]) if size else None
            return look
        except Exception as exc:  # stopping, restarting, overloaded: the next look will do
            log.debug("metrics: no sample of %s: %s", ep.id, exc)
            return None

    def _proc_times(self, endpoint_ids: Iterable[str]) -> dict[str, ProcTimes]:
        out: dict[str, ProcTimes] = {}
        for endpoint_id in endpoint_ids:
            pm = self.plane.computes.get(endpoint_id)
            times = proc_times(pm.pid) if pm is not None else None
            if times is not None:
                out[endpoint_id] = times
        return out

    def _compute_row(self, look: _Look, proc: ProcTimes | None, now: datetime, *, own: int) -> MetricSample:
        ep = look.endpoint
        last = self._last.get(ep.id)
        qps = rate((last.at, last.xacts) if last else None, (look.at, look.xacts), own=own)
        cpu = active = None
        if proc is not None:
            before = last.proc if last is not None else None
            same = before is not None and before.pid == proc.pid
            cpu = counter_delta(before.cpu_seconds if before else None, proc.cpu_seconds, same_run=same)
            active = counter_delta(before.uptime_seconds if before else None, proc.uptime_seconds, same_run=same)
            if last is None and proc.uptime_seconds <= self.interval * 2:
                cpu, active = proc.cpu_seconds, proc.uptime_seconds  # started since the previous look
        self._last[ep.id] = _Last(at=look.at, xacts=look.xacts, proc=proc, lsn=look.lsn, wall=now,
                                  connections=look.connections, blocks_hit=look.blocks_hit,
                                  blocks_read=look.blocks_read)
        return MetricSample(at=now, project_id=ep.project_id, branch_id=ep.branch_id, endpoint_id=ep.id,
                            connections=look.connections, xacts=look.xacts, qps=qps, wal_lsn=look.lsn,
                            cpu_seconds=cpu, active_seconds=active)

    def _storage_rows(self, now: datetime) -> list[MetricSample]:
        """Every branch's storage sample, from the figures in memory (a compute's own logical size, from
        `pg_database_size`, wins over its files')."""
        sizes = self.storage.sizes() if self.storage is not None else {}
        return [MetricSample(at=now, project_id=project_id, branch_id=branch_id, storage_bytes=allocated,
                             logical_bytes=self._logical.get(branch_id, logical))
                for branch_id, (project_id, allocated, logical) in sizes.items()]

    # What the API reads ------------------------------------------------------------------------------------

    def current_lsn(self, endpoint_id: str) -> int | None:
        """The WAL position of the compute's newest look, if it has been running since that look."""
        last = self._last.get(endpoint_id)
        pm = self.plane.computes.get(endpoint_id)
        if last is None or pm is None or not pm.alive or last.proc is None or last.proc.pid != pm.pid:
            return None
        return last.lsn

    def logical_size(self, branch_id: str) -> int | None:
        return self._logical.get(branch_id)

    def logical_sizes(self) -> dict[str, int]:
        """Every branch's last logical size (a copy)."""
        return dict(self._logical)

    def latest(self, endpoint_id: str) -> _Last | None:
        """The newest look at a compute that still runs the same postmaster (what /metrics reports)."""
        last = self._last.get(endpoint_id)
        pm = self.plane.computes.get(endpoint_id)
        if last is None or pm is None or not pm.alive or (last.proc is not None and last.proc.pid != pm.pid):
            return None
        return last

    def allocated(self) -> dict[str, tuple[str, int]]:
        """Every branch's bytes on disk at the last storage look: branch -> (project, bytes)."""
        return self._allocated

    def usage(self, endpoint_ids: Iterable[str], branch_ids: Iterable[str], *, since: datetime) -> Usage:
        """Consumption of these endpoints and branches over the retention window, or since `since` (their
        creation) if later; as of the last storage look, and empty before the first one."""
        if self._window is None:
            return Usage()
        totals = self._totals
        ids = list(endpoint_ids)
        storage = [totals.storage_sums.get(b, (0, 0)) for b in branch_ids]
        every = self.interval * STORAGE_EVERY
        return Usage(active_seconds=int(sum(totals.active_seconds.get(e, 0.0) for e in ids)),
                     cpu_seconds=int(sum(totals.cpu_seconds.get(e, 0.0) for e in ids)),
                     storage_byte_hours=sum(byte_hours(s, n, every) for s, n in storage),
                     period_start=max(self._window[0], since), period_end=max(self._window[1], since))

    def project_usage(self, project: model.Project) -> Usage:
        """Takes the project itself, not its id: a project just deleted still gets its (empty) usage."""
        plane = self.plane
        return self.usage([e.id for e in plane.endpoints(project.id)], [b.id for b in plane.branches(project.id)],
                          since=project.created_at)

    def branch_usage(self, project_id: str, branch_id: str) -> Usage:
        plane = self.plane
        return self.usage([e.id for e in plane.endpoints(project_id, branch_id)], [branch_id],
                          since=plane.branch(project_id, branch_id).created_at)

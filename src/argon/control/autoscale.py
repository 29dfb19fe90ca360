"""Compute units and autoscaling: how big each running compute is, between its endpoint's limits.

One compute unit is 1 CPU and `compute_memory_per_cu` GiB (Neon's: 1 vCPU, 4 GB), enforced by the
compute's cgroup (`argon.compute.cgroups`, through `ComputeManager.set_limits`). A compute starts at
its endpoint's `autoscaling_limit_min_cu`. Every `autoscaling_interval` seconds the autoscaler
reads each running compute's cgroup, decides (the pure `goal_cu` and `decide`), acts, and records
an `autoscale` event. The policy:

- CPU demand is the CPU time the compute used per second since the previous look, divided by
  `CPU_TARGET`: a compute using 0.25 CPU wants 0.36 CU. A compute the kernel throttled for more than
  `THROTTLED_SHARE` of the look was held at its quota and may want more than it could use: it wants
  at least the next step up.
- Memory demand is its resident memory (anonymous and shared: backends' work memory, the shared
  buffers it touched; not the page cache, which the kernel reclaims at the limit) over
  `MEMORY_TARGET` of a compute unit's memory.
- The goal is the smallest CU step (`CU_STEPS`, the sizes the API accepts) covering both, kept within
  the endpoint's min and max.
- Up at once (the next look after load starts: within about two intervals). Down only after the
  goal stayed below the current size for `autoscaling_quiet_seconds`, to the highest goal seen
  during that quiet period, so a compute between bursts keeps its size.

A compute whose memory reaches its limit has one process killed by the kernel (its backends'
OOM score is 0, the postmaster's -1000): Postgres restarts its sessions, other computes and the
platform see nothing, and the autoscaler records an `oom_kill` event with the limit in force.

A PATCH of the limits clamps a running compute's size into the new range at once (`apply_bounds`).
Each compute's temporary files are capped too (`temp_file_limit`, per CU of its maximum), after
the user's `pg_settings`, so they cannot lift it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from argon import model
from argon.compute.cgroups import CgroupError, Limits, Usage
from argon.control.periodic import Periodic
from argon.control.plane import ControlPlane

log = logging.getLogger(__name__)

CU_STEPS = (0.25, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16)
CPU_TARGET = 0.7  # a compute is sized so that its CPU use is 70 % of its quota
MEMORY_TARGET = 0.75  # ... and its memory 75 % of its limit
THROTTLED_SHARE = 0.1  # throttled for more than 10 % of a look: it wants more than it got


def limits_for(cu: float, memory_per_cu_gib: float) -> Limits:
    return Limits(cpus=cu, memory_bytes=int(cu * memory_per_cu_gib * 2**30))


def temp_file_limit(max_cu: float, temp_files_per_cu_gib: float) -> str:
    """Postgres's `temp_file_limit` for a compute of at most `max_cu` (-1: none). The tenant cannot
    raise it (superuser only), so one query cannot fill the platform's filesystem with temp files."""
    if temp_files_per_cu_gib <= 0:
        return "-1"
    return f"{max(1024, int(max_cu * temp_files_per_cu_gib * 2**20))}kB"


def cu_of(limits: Limits) -> float:
    """The CU step a cgroup's limits stand for (what an adopted compute had)."""
    return min(CU_STEPS, key=lambda s: abs(s - limits.cpus))


@dataclass(frozen=True)
class Look:
    """What a compute used between two readings of its cgroup."""

    cpus: float  # CPU seconds per second
    throttled: float  # share of the look it was throttled (0..1)
    memory_bytes: int  # resident (anonymous + shared), not the page cache

    @classmethod
    def between(cls, before: Usage, after: Usage, seconds: float) -> Look:
        seconds = max(seconds, 1e-3)
        return cls(cpus=max(0, after.cpu_usec - before.cpu_usec) / 1e6 / seconds,
                   throttled=min(1.0, max(0, after.throttled_usec - before.throttled_usec) / 1e6 / seconds),
                   memory_bytes=after.resident_bytes)


def step_at_least(cu: float) -> float:
    return next((s for s in CU_STEPS if s >= cu - 1e-9), CU_STEPS[-1])


def step_above(cu: float) -> float:
    return next((s for s in CU_STEPS if s > cu + 1e-9), CU_STEPS[-1])


def goal_cu(look: Look, *, current: float, lo: float, hi: float, memory_per_cu_gib: float) -> float:
    """Pure: the size this compute should have after `look`."""
    want = max(look.cpus / CPU_TARGET, look.memory_bytes / (memory_per_cu_gib * 2**30 * MEMORY_TARGET))
    goal = step_at_least(want)
    if look.throttled > THROTTLED_SHARE:
        goal = max(goal, step_above(current))
    return min(hi, max(lo, goal))


@dataclass(frozen=True)
class Trend:
    """Since when the goal has stayed below the current size, and the highest goal meanwhile."""

    below_since: float | None = None
    peak: float = 0.0


def decide(*, current: float, goal: float, trend: Trend, now: float,
           quiet_seconds: float) -> tuple[float, Trend, str]:
    """Pure: the new size, the new trend, and why (an empty reason: no change)."""
    if goal > current:
        return goal, Trend(), f"CPU or memory demand needs {goal:g} CU"
    if goal == current:
        return current, Trend(), ""
    if trend.below_since is None:
        return current, Trend(now, goal), ""
    peak = max(trend.peak, goal)
    if now - trend.below_since < quiet_seconds:
        return current, Trend(trend.below_since, peak), ""
    return peak, Trend(), f"{quiet_seconds:g} s below {current:g} CU"


@dataclass
class _Watched:
    usage: Usage
    at: float
    trend: Trend
    oom_kills: int


class Autoscaler:
    """The loop over running computes, and the resizes other use cases ask for."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self._watched: dict[str, _Watched] = {}
        self.loop = Periodic("autoscaling look", self.look, lambda: plane.settings.autoscaling_interval, logger=log)

    @property
    def enforced(self) -> bool:
        return self.plane.computes.cgroups is not None

    def limits_for(self, cu: float) -> Limits:
        return limits_for(cu, self.plane.settings.compute_memory_per_cu)

    def current_cu(self, endpoint_id: str) -> float | None:
        """The size a running compute's limits stand for now (None: not running or not enforced)."""
        limits = self.plane.computes.limits(endpoint_id)
        return None if limits is None else cu_of(limits)

    def last_usage(self, endpoint_id: str) -> Usage | None:
        """The compute's cgroup figures at the loop's last look (None: not watched; nothing is read here)."""
        seen = self._watched.get(endpoint_id)
        return seen.usage if seen is not None else None

    def start(self) -> None:
        if self.enforced:
            self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()

    async def look(self) -> None:
        """One pass over the running computes: read, decide, act."""
        plane = self.plane
        running = set(plane.computes.running())
        for gone in set(self._watched) - running:
            del self._watched[gone]
        for endpoint_id in sorted(running):
            ep = plane.find_endpoint(endpoint_id)
            current = self.current_cu(endpoint_id)
            usage = plane.computes.usage(endpoint_id)
            if ep is None or current is None or usage is None:
                continue
            now = time.monotonic()
            seen = self._watched.get(endpoint_id)
            if seen is None:
                pm = plane.computes.get(endpoint_id)
                adopted = pm is not None and pm.proc is None  # kills before our time are not news
                self._watched[endpoint_id] = _Watched(usage, now, Trend(), usage.oom_kills if adopted else 0)
                seen = self._watched[endpoint_id]
                if adopted:
                    continue
            if usage.oom_kills > seen.oom_kills:
                limits = plane.computes.limits(endpoint_id)
                plane.spawn(plane.add_event(endpoint_id, model.EventKind.OOM_KILL, detail=(
                    f"out of memory at its limit of {limits.memory_bytes / 2**30:.2f} GiB ({current:g} CU): the "
                    "kernel killed a process of this compute and Postgres restarted its sessions; "
                    "no other compute was affected" if limits else "out of memory")), "recording an OOM kill")
                log.warning("compute %s: out of memory at %g CU (%d kill(s))", endpoint_id, current,
                            usage.oom_kills - seen.oom_kills)
            look = Look.between(seen.usage, usage, now - seen.at)
            goal = goal_cu(look, current=current, lo=ep.autoscaling_limit_min_cu, hi=ep.autoscaling_limit_max_cu,
                           memory_per_cu_gib=plane.settings.compute_memory_per_cu)
            new, trend, why = decide(current=current, goal=goal, trend=seen.trend, now=now,
                                     quiet_seconds=plane.settings.autoscaling_quiet_seconds)
            self._watched[endpoint_id] = _Watched(usage, now, trend, usage.oom_kills)
            if new != current:
                await self.resize(endpoint_id, new, f"{why} (CPU {look.cpus:.2f}, memory "
                                                    f"{look.memory_bytes / 2**20:.0f} MiB)")

    async def resize(self, endpoint_id: str, cu: float, reason: str) -> bool:
        """Give a running compute `cu` compute units now; False when it is not running or not limited."""
        before = self.current_cu(endpoint_id)
        try:
            done = self.plane.computes.set_limits(endpoint_id, self.limits_for(cu))
        except CgroupError as exc:
            log.warning("could not resize compute %s to %g CU: %s", endpoint_id, cu, exc)
            return False
        if done:
            log.info("compute %s: %g -> %g CU (%s)", endpoint_id, before or 0, cu, reason)
            self.plane.spawn(self.plane.add_event(endpoint_id, model.EventKind.AUTOSCALE,
                                                  detail=f"{before or 0:g} -> {cu:g} CU: {reason}"),
                             "recording a resize")
        return done

    async def apply_bounds(self, ep: model.Endpoint) -> bool:
        """After a PATCH of the endpoint's limits: move its running compute into the new range now.
        True when its limits are enforced live (running, with cgroups)."""
        current = self.current_cu(ep.id)
        if current is None:
            return False
        target = min(ep.autoscaling_limit_max_cu, max(ep.autoscaling_limit_min_cu, current))
        if target != current:
            return await self.resize(ep.id, target, "endpoint limits changed")
        return True

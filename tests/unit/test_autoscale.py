"""The autoscaling policy as pure functions: demand -> goal -> decision."""

from __future__ import annotations

from argon.compute.cgroups import Limits, Usage
from argon.control.autoscale import Look, Trend, cu_of, decide, goal_cu, limits_for

GIB = 2**30


def _goal(cpus: float, throttled: float = 0.0, memory: int = 0, current: float = 0.25, lo: float = 0.25,
          hi: float = 4) -> float:
    return goal_cu(Look(cpus, throttled, memory), current=current, lo=lo, hi=hi, memory_per_cu_gib=4)


def test_look_between_two_readings() -> None:
    look = Look.between(Usage(1_000_000, 0, 0, 0), Usage(1_500_000, 200_000, 7 * GIB, 0, resident_bytes=5 * GIB), 2.0)
    assert (look.cpus, look.throttled, look.memory_bytes) == (0.25, 0.1, 5 * GIB)  # the page cache is not demand


def test_goal_from_cpu_memory_and_throttling() -> None:
    assert _goal(0.0) == 0.25  # idle: the minimum
    assert _goal(0.17) == 0.25  # 0.17 / 0.7 = 0.24
    assert _goal(0.25) == 0.5  # using its whole quarter: 0.36 -> the next step
    assert _goal(1.3) == 2 and _goal(30) == 4  # capped at the maximum
    assert _goal(0.1, memory=int(1.6 * GIB)) == 1  # 1.6 GiB / (4 GiB x 0.75) = 0.53 -> 1
    assert _goal(0.1, throttled=0.5, current=1) == 2  # held at its quota: one step up at least
    assert _goal(0.0, lo=1, hi=2) == 1


def test_decide_up_at_once_down_after_quiet() -> None:
    new, trend, why = decide(current=0.25, goal=1, trend=Trend(), now=0, quiet_seconds=30)
    assert (new, why) == (1, "CPU or memory demand needs 1 CU")
    new, trend, why = decide(current=2, goal=0.5, trend=Trend(), now=100, quiet_seconds=30)
    assert (new, trend, why) == (2, Trend(100, 0.5), "")
    new, trend, _ = decide(current=2, goal=1, trend=trend, now=110, quiet_seconds=30)
    assert (new, trend) == (2, Trend(100, 1))  # quiet, but not long enough; remembers the peak
    new, trend, why = decide(current=2, goal=0.25, trend=trend, now=131, quiet_seconds=30)
    assert (new, trend, why) == (1, Trend(), "30 s below 2 CU")  # down to the peak of the quiet period
    _, trend, _ = decide(current=2, goal=2, trend=Trend(100, 1), now=120, quiet_seconds=30)
    assert trend == Trend()  # a busy look restarts the quiet period


def test_limits_of_a_cu() -> None:
    assert limits_for(0.25, 4) == Limits(cpus=0.25, memory_bytes=GIB)
    assert limits_for(2, 0.5) == Limits(cpus=2, memory_bytes=GIB)
    assert cu_of(Limits(cpus=0.25, memory_bytes=GIB)) == 0.25 and cu_of(Limits(cpus=1.0001, memory_bytes=GIB)) == 1

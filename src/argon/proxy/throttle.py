"""Slow down password guessing: a growing, bounded delay after repeated failures.

Failures are counted per client IP and per (endpoint, role), with exponential decay, so a
wrong-password loop gets slower and slower (up to `max_delay` per attempt) while a user who mistyped
once is not delayed at all. The delay is applied before a failure is answered, so it costs the
attacker wall time and the proxy nothing but a sleeping coroutine. Cleartext checks (PBKDF2) are
also bounded in concurrency by `PasswordChecks`, so they can never occupy more than a few threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Throttle:
    def __init__(self, *, free_per_ip: int = 20, free_per_role: int = 5, base_delay: float = 0.05,
                 max_delay: float = 2.0, half_life: float = 60.0, max_keys: int = 100_000) -> None:
        self.free_per_ip = free_per_ip
        self.free_per_role = free_per_role
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._decay = math.log(2) / half_life
        self._max_keys = max_keys
        self._counts: dict[object, tuple[float, float]] = {}  # key -> (count, when)

    def _count(self, key: object, now: float) -> float:
        entry = self._counts.get(key)
        if entry is None:
            return 0.0
        count, when = entry
        return count * math.exp(-self._decay * (now - when))

    def record_failure(self, ip: str, endpoint_id: str, role: str) -> None:
        now = time.monotonic()
        if len(self._counts) >= self._max_keys:
            self._prune(now)
        for key in (("ip", ip), ("role", endpoint_id, role)):
            self._counts[key] = (self._count(key, now) + 1.0, now)

    def delay(self, ip: str, endpoint_id: str, role: str) -> float:
        """Seconds to wait before answering an attempt from `ip` for (endpoint, role)."""
        now = time.monotonic()
        excess = max(self._count(("ip", ip), now) - self.free_per_ip,
                     self._count(("role", endpoint_id, role), now) - self.free_per_role)
        if excess <= 0:
            return 0.0
        return min(self.max_delay, self.base_delay * 2 ** min(excess, 16.0))

    def _prune(self, now: float) -> None:
        for key in [k for k in self._counts if self._count(k, now) < 0.5]:
            del self._counts[key]
        if len(self._counts) >= self._max_keys:  # under attack from very many addresses: forget the oldest half
            oldest = sorted(self._counts, key=lambda k: self._counts[k][1])
            for key in oldest[: len(oldest) // 2]:
                del self._counts[key]


class PasswordChecks:
    """A small thread pool for PBKDF2 (cleartext passwords), never the event loop, bounded in size."""

    def __init__(self, workers: int = 2) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon-pbkdf2")
        self._slots = asyncio.Semaphore(workers * 4)  # queued + running; more wait without holding a thread

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

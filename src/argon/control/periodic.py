"""One mechanism for the control plane's background loops (suspend, metrics, figures, autoscaling,
the disk guard, backup's shipping).

A `Periodic` is a named asyncio task that runs one step every `interval` seconds (a number, or a
callable read before each wait so that a changed setting takes effect), after an optional first
delay and an optional `prepare` step run once. A step that raises never ends the loop: the first
failure of a kind (its exception type) is logged with its traceback, repeats of that kind only at
debug level until a step succeeds again (then one line says so). `nudge()` runs the next step now
rather than at the end of the wait; `stop()` cancels the task and waits for it; `run_once()` is one
step with the same error handling, for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Step = Callable[[], Awaitable[object]]


class Periodic:
    def __init__(self, name: str, step: Step, interval: float | Callable[[], float], *,
                 first_delay: float = 0.0, prepare: Step | None = None,
                 on_error: Callable[[Exception], None] | None = None,
                 on_ok: Callable[[], None] | None = None, logger: logging.Logger | None = None) -> None:
        """`on_error` / `on_ok` replace the default logging of failures and recoveries (a loop that
        reports its errors elsewhere, such as backup's status)."""
        self.name = name
        self.step = step
        self._interval = interval
        self.first_delay = first_delay
        self.prepare = prepare
        self.on_error = on_error
        self.on_ok = on_ok
        self.log = logger or log
        self.failing: set[str] = set()  # kinds of exception seen since the last step that worked
        self.runs = 0  # steps run (tests wait on it)
        self._task: asyncio.Task[None] | None = None
        self._nudged: asyncio.Event | None = None

    @property
    def interval(self) -> float:
        return float(self._interval() if callable(self._interval) else self._interval)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the loop (in the running event loop); a second start while it runs does nothing."""
        if self.running:
            return
        self._nudged = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def nudge(self) -> None:
        """Run the next step now rather than when the wait ends (nothing if the loop is not running)."""
        if self._nudged is not None:
            self._nudged.set()

    async def run_once(self) -> bool:
        """One step with the loop's error handling; True if it worked."""
        self.runs += 1
        try:
            await self.step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            return False
        self._worked()
        return True

    async def _loop(self) -> None:
        assert self._nudged is not None
        if self.prepare is not None:
            try:
                await self.prepare()
            except Exception as exc:  # what the first step would have had: it does without
                self.log.debug("%s: preparing failed: %r", self.name, exc)
        if self.first_delay > 0:
            await self._wait(self.first_delay)
        while True:
            self._nudged.clear()
            await self.run_once()
            await self._wait(self.interval)

    async def _wait(self, seconds: float) -> None:
        assert self._nudged is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._nudged.wait(), seconds)

    def _failed(self, exc: Exception) -> None:
        if self.on_error is not None:
            self.on_error(exc)
            return
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        if kind in self.failing:
            self.log.debug("%s failed again: %r", self.name, exc)
            return
        self.failing.add(kind)
        self.log.error("%s failed (logged once until it works again): %s", self.name, exc, exc_info=exc)

    def _worked(self) -> None:
        if self.on_ok is not None:
            self.on_ok()
            return
        if self.failing:
            self.failing.clear()
            self.log.warning("%s works again", self.name)

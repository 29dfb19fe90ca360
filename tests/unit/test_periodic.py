"""The one mechanism of the control plane's background loops (`argon.control.periodic`)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from argon.control.periodic import Periodic


async def _until(condition: object, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.005)


def test_a_failing_step_never_ends_the_loop_and_is_logged_once_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[BaseException | None] = [ValueError("a"), ValueError("b"), KeyError("c"), None, ValueError("d")]
    done: list[int] = []

    async def step() -> None:
        done.append(1)
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome

    async def run() -> None:
        loop = Periodic("test loop", step, 0.001)
        loop.start()
        name = loop._task.get_name() if loop._task else ""
        await _until(lambda: len(done) >= 6)
        await loop.stop()
        assert name == "test loop" and not loop.running

    with caplog.at_level(logging.DEBUG, logger="argon.control.periodic"):
        asyncio.run(run())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    # ValueError once, KeyError once; after the success, ValueError is a new failure and logged again
    assert [r.exc_info[0] for r in errors if r.exc_info] == [ValueError, KeyError, ValueError]
    assert sum(r.getMessage().endswith("works again") for r in caplog.records) == 2  # after None, after the 6th run
    assert sum("failed again" in r.getMessage() for r in caplog.records) == 1  # "b": debug only


def test_first_delay_nudge_prepare_and_stop() -> None:
    seen: list[str] = []

    async def prepare() -> None:
        seen.append("prepare")
        raise RuntimeError("the store is not there yet")  # the loop goes on without it

    async def step() -> None:
        seen.append("step")

    async def run() -> None:
        loop = Periodic("slow loop", step, 3600, first_delay=3600, prepare=prepare)
        loop.start()
        loop.start()  # a second start while running does nothing
        await asyncio.sleep(0.05)
        assert seen == ["prepare"]  # the first step waits for its delay ...
        loop.nudge()  # ... or a nudge
        await _until(lambda: seen.count("step") == 1)
        loop.nudge()
        await _until(lambda: seen.count("step") == 2)
        await loop.stop()  # cancels the hour-long wait at once
        await loop.stop()  # and twice is fine
        assert await loop.run_once() and seen.count("step") == 3  # a test's tick, loop stopped

    asyncio.run(asyncio.wait_for(run(), 30))


def test_hooks_replace_the_default_logging(caplog: pytest.LogCaptureFixture) -> None:
    reported: list[str] = []

    async def step() -> None:
        raise OSError("bucket unreachable")

    async def run() -> None:
        loop = Periodic("hooked", step, 1, on_error=lambda exc: reported.append(str(exc)),
                        on_ok=lambda: reported.append("ok"))
        assert not await loop.run_once()
        assert not await loop.run_once()

    with caplog.at_level(logging.DEBUG, logger="argon.control.periodic"):
        asyncio.run(run())
    assert reported == ["bucket unreachable", "bucket unreachable"]
    assert not [r for r in caplog.records if r.name == "argon.control.periodic"]

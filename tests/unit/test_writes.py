"""The write gate (ADR 0025): reasons from several loops, one setting on the compute. The compute
manager and its admin session are Argon's own seams, faked here; the SQL is what a compute gets."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from argon.control.writes import WriteGate


@dataclass
class FakeSession:
    sent: list[str] = field(default_factory=list)

    async def fetchall(self, query: str, params: Any = None, *, timeout: float) -> list[tuple[Any, ...]]:
        self.sent.append(query)
        return []

    async def fetchone(self, query: str, params: Any = None, *, timeout: float) -> tuple[Any, ...] | None:
        self.sent.append(query)
        return (True,)


@dataclass
class FakePostmaster:
    pid: int
    proc: object | None = object()  # started by this process (None: adopted)
    alive: bool = True


@dataclass
class FakeComputes:
    pm: FakePostmaster | None
    session: FakeSession = field(default_factory=FakeSession)

    def get(self, endpoint_id: str) -> FakePostmaster | None:
        return self.pm

    def admin(self, endpoint_id: str) -> FakeSession:
        return self.session


def _settings(sent: list[str]) -> list[str]:
    return [q for q in sent if q.startswith("ALTER SYSTEM")]


def test_writes_come_back_only_when_every_reason_is_lifted() -> None:
    computes = FakeComputes(FakePostmaster(100))
    gate = WriteGate(computes)  # type: ignore[arg-type]

    async def run() -> None:
        assert await gate.set("ep", "backup", True, "WAL lag")
        assert await gate.set("ep", "size", True, "at its limit")
        assert gate.refused("ep") == {"backup": "WAL lag", "size": "at its limit"}
        assert await gate.set("ep", "size", False)
        assert await gate.set("ep", "backup", False)
        assert gate.refused("ep") == {}

    asyncio.run(run())
    assert _settings(computes.session.sent) == ["ALTER SYSTEM SET default_transaction_read_only = on",
                                                "ALTER SYSTEM RESET default_transaction_read_only"]


def test_a_restarted_compute_gets_the_setting_again_and_a_fresh_one_needs_nothing() -> None:
    computes = FakeComputes(FakePostmaster(100))
    gate = WriteGate(computes)  # type: ignore[arg-type]

    async def run() -> None:
        assert await gate.sync("ep")  # started here, no reason: nothing to send
        assert computes.session.sent == []
        await gate.set("ep", "disk", True)
        computes.pm = FakePostmaster(200)  # restarted (its auto.conf emptied)
        assert await gate.sync("ep")
        computes.pm = None  # stopped: nothing to do, the reason stays for its next start
        assert not await gate.sync("ep")
        assert gate.refused("ep") == {"disk": "disk"}

    asyncio.run(run())
    assert _settings(computes.session.sent) == ["ALTER SYSTEM SET default_transaction_read_only = on"] * 2


def test_an_adopted_compute_is_reset_once() -> None:
    computes = FakeComputes(FakePostmaster(300, proc=None))
    gate = WriteGate(computes)  # type: ignore[arg-type]

    async def run() -> None:
        assert await gate.sync("ep")
        assert await gate.sync("ep")

    asyncio.run(run())
    assert _settings(computes.session.sent) == ["ALTER SYSTEM RESET default_transaction_read_only"]

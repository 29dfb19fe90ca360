"""Per-endpoint session activity as the proxy sees it: the input of the suspend decision.

Each relayed session owns a `SessionActivity` and updates it from the relay (message framing tells
when a query is in flight and ReadyForQuery's status byte tells idle / in transaction). The suspend
policy reads `snapshot()`; it never looks at sockets. Plain attributes, no locks: everything runs on
the one event loop. A session relayed on the C thread (`native`) keeps its state there; its `probe`
copies it in when `snapshot()` looks. A transaction pool counts as one session of its endpoint
(busy while a server connection is in use), and registers as a *quiescer*: before the suspend
policy stops a compute it asks `quiesce()`, and the pool either stops handing out server
connections and closes its idle ones, or says it is busy (ADR 0017).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class SessionActivity:
    __slots__ = ("clients", "endpoint_id", "in_query", "in_transaction", "last_activity", "probe")

    def __init__(self, endpoint_id: str) -> None:
        self.endpoint_id = endpoint_id
        self.in_query = False  # a query was sent and its ReadyForQuery has not come back yet
        self.in_transaction = False  # the last ReadyForQuery said 'T' or 'E'
        self.last_activity = time.monotonic()
        self.probe: Callable[[SessionActivity], None] | None = None
        self.clients = 1  # client connections it stands for (a transaction pool: its clients, set by its probe)

    def refresh(self) -> None:
        if self.probe is not None:
            self.probe(self)

    @property
    def busy(self) -> bool:
        """Neon's rule: an active query or an open transaction keeps the compute awake."""
        return self.in_query or self.in_transaction


@dataclass(frozen=True)
class EndpointActivity:
    sessions: int
    busy: int
    last_activity: float | None  # time.monotonic() of the newest byte, None if never seen


class Quiescer(Protocol):
    async def quiesce(self, endpoint_id: str, force: bool = False) -> bool:
        """True once nothing of `endpoint_id` is in use and nothing will be until `resume`."""

    def resume(self, endpoint_id: str) -> None: ...

    def pools(self, endpoint_id: str) -> list[Any]: ...


class ActivityRegistry:
    def __init__(self) -> None:
        self._sessions: dict[str, set[SessionActivity]] = defaultdict(set)
        self._last: dict[str, float] = {}
        self._quiescers: list[Quiescer] = []

    def add_quiescer(self, quiescer: Quiescer) -> None:
        self._quiescers.append(quiescer)

    def remove_quiescer(self, quiescer: Quiescer) -> None:
        if quiescer in self._quiescers:
            self._quiescers.remove(quiescer)

    async def quiesce(self, endpoint_id: str, *, force: bool = False) -> bool:
        """Before a compute stops: True if every quiescer let go of it (then call `resume` after the
        stop); False if one is busy (nothing stays quiesced). `force`: the stop happens anyway (what
        is in use ends with the compute); the rest is let go of all the same."""
        done: list[Quiescer] = []
        for quiescer in self._quiescers:
            if not await quiescer.quiesce(endpoint_id, force) and not force:
                for other in done:
                    other.resume(endpoint_id)
                return False
            done.append(quiescer)
        return True

    def resume(self, endpoint_id: str) -> None:
        for quiescer in self._quiescers:
            quiescer.resume(endpoint_id)

    def pools(self, endpoint_id: str) -> list[Any]:
        """The transaction pools of an endpoint (`argon.proxy.pooler.PoolView`), for the API."""
        return [view for quiescer in self._quiescers for view in quiescer.pools(endpoint_id)]

    def endpoints_in_use(self) -> list[str]:
        """Endpoints with a session open: a client's, or a transaction pool's (each pool holds one
        while it exists), so every endpoint with a pool is among them."""
        return list(self._sessions)

    def open(self, endpoint_id: str) -> SessionActivity:
        session = SessionActivity(endpoint_id)
        self._sessions[endpoint_id].add(session)
        self._last[endpoint_id] = session.last_activity
        return session

    def close(self, session: SessionActivity) -> None:
        sessions = self._sessions.get(session.endpoint_id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions[session.endpoint_id]
        self._last[session.endpoint_id] = max(self._last.get(session.endpoint_id, 0.0), time.monotonic())

    def touch(self, endpoint_id: str) -> None:
        """Record activity not tied to a relayed session (e.g. a connection being woken)."""
        self._last[endpoint_id] = time.monotonic()

    def snapshot(self, endpoint_id: str) -> EndpointActivity:
        sessions = self._sessions.get(endpoint_id, ())
        for s in sessions:
            s.refresh()
        last = max((s.last_activity for s in sessions), default=None)
        recorded = self._last.get(endpoint_id)
        if recorded is not None:
            last = recorded if last is None else max(last, recorded)
        return EndpointActivity(sessions=sum(s.clients for s in sessions), busy=sum(1 for s in sessions if s.busy), last_activity=last)

    def counts(self) -> tuple[int, int]:
        """Sessions open (logged in, or logging into their compute) and how many of them are busy."""
        sessions = busy = 0
        for members in self._sessions.values():
            for s in members:
                s.refresh()
                sessions += 1
                busy += s.busy
        return sessions, busy

    def forget(self, endpoint_id: str) -> None:
        self._last.pop(endpoint_id, None)

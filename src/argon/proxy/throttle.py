"""Password guessing and password-check CPU, bounded: who may try, how many at once, how fast.

`Throttle` counts failures per client and per (endpoint, role), with exponential decay, and turns
them into limits that apply *before* any verifier work (`attempt`):

- a client (an IPv4 address, or an IPv6 /64: one host owns a whole /64, so rotating addresses
  inside it gains nothing) runs at most `max_concurrent_per_ip` checks at once; more wait, and past
  `max_waiting` waiting ones the attempt is refused;
- a client past its free failures waits its penalty first, before its password is looked at;
- a role past its free failures is "under attack": checks for it run at most
  `max_concurrent_per_role` at once, so guesses from any number of addresses go no faster than
  that many per penalty;
- after a failure the attempt holds its places for the penalty (up to `max_delay`) before the
  answer, so a guessing loop slows down while a user who mistyped once is not delayed at all;
- a client that logged in as a role before (`record_success`, remembered for `trust_for` seconds)
  is not held back before its checks for that role, neither by the role's attack nor by failures
  from its own address (a shared NAT address): guessing a victim's password does not lock the
  victim's own applications out (OWASP's "device cookie" idea, keyed by client). Its failures
  still count and are still penalised after the fact.

Counters are forgotten only when they have decayed to nothing; under pressure from very many
addresses, the clients with the fewest failures go first, and a role's counter is dropped only
for roles with fewer failures than the others (a victim's high counter stays).

`PasswordChecks` runs PBKDF2 (cleartext passwords: WebSocket, password hack, /sql) on a few
threads, never on the event loop, fairly: one check per endpoint at a time, endpoints served in
turn, so one project's checks can never occupy every thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from argon.errors import UserError

T = TypeVar("T")

# Neon's texts: the per-endpoint connection-attempt limit and the connect-permit saturation.
TOO_MANY_FOR_ENDPOINT = "Too many connections to this endpoint. Please try again later."
TOO_MANY_ATTEMPTS = "Too many connections attempts"
BUSY = ("Failed to acquire permit to connect to the database. "
        "Too many database connection attempts are currently ongoing.")


class Throttled(UserError):
    """An attempt refused by a limit, before any work; `user_message` is Neon's text (HTTP 429)."""

    status = 429


@functools.lru_cache(maxsize=4096)  # every login asks several times; parsing an address is not free
def client_key(ip: str) -> str:
    """What a client is counted by: its IPv4 address, or its IPv6 /64 (IPv4-mapped counts as IPv4)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip  # a Unix socket's empty peer, or something already odd: counted as it is
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class _Gate:
    """At most `limit` holders; FIFO waiters, counted so a queue can be refused when it is long."""

    def __init__(self, limit: int) -> None:
        self.slots = asyncio.Semaphore(limit)
        self.users = 0  # holders + waiters


class Gates:
    """Named gates created on first use and dropped when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._gates: dict[object, _Gate] = {}

    def get(self, key: object, limit: int) -> _Gate:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(limit)
        return gate

    def users(self, key: object) -> int:
        gate = self._gates.get(key)
        return 0 if gate is None else gate.users

    @contextlib.asynccontextmanager
    async def hold(self, key: object, limit: int, max_users: int, message: str) -> AsyncIterator[None]:
        gate = self.get(key, limit)
        if gate.users >= max_users:
            raise Throttled(message)
        gate.users += 1
        try:
            async with gate.slots:
                yield
        finally:
            gate.users -= 1
            if gate.users == 0:
                del self._gates[key]


class Throttle:
    def __init__(self, *, free_per_ip: int = 20, free_per_role: int = 5, base_delay: float = 0.05,
                 max_delay: float = 2.0, half_life: float = 60.0, max_keys: int = 100_000,
                 max_concurrent_per_ip: int = 16, max_concurrent_per_role: int = 4, max_waiting: int = 256,
                 trust_for: float = 86400.0, trusted_per_role: int = 64) -> None:
        self.free_per_ip = free_per_ip
        self.free_per_role = free_per_role
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_concurrent_per_ip = max_concurrent_per_ip
        self.max_concurrent_per_role = max_concurrent_per_role
        self.max_waiting = max_waiting
        self._decay = math.log(2) / half_life
        self._max_keys = max_keys
        self._clients: dict[Any, tuple[float, float]] = {}  # client key -> (count, when)
        self._roles: dict[Any, tuple[float, float]] = {}  # (endpoint, role) -> (count, when)
        self._client_gates = Gates()
        self._role_gates = Gates()
        self.trust_for = trust_for
        self.trusted_per_role = trusted_per_role
        self._trusted: dict[tuple[str, str], dict[str, float]] = {}  # role -> client key -> last success

    def record_success(self, ip: str, endpoint_id: str, role: str) -> None:
        """`ip` proved it knows the role's password: later attacks on the role do not hold it back."""
        role_key = (endpoint_id, role)
        clients = self._trusted.get(role_key)
        if clients is None:
            if len(self._trusted) >= self._max_keys:
                del self._trusted[next(iter(self._trusted))]  # the role trusted longest ago
            clients = self._trusted[role_key] = {}
        clients.pop(client_key(ip), None)
        clients[client_key(ip)] = time.monotonic()
        if len(clients) > self.trusted_per_role:
            del clients[next(iter(clients))]

    def _trusted_client(self, client: str, role_key: tuple[str, str]) -> bool:
        when = self._trusted.get(role_key, {}).get(client)
        return when is not None and time.monotonic() - when < self.trust_for

    def _count(self, table: dict[Any, tuple[float, float]], key: object, now: float) -> float:
        entry = table.get(key)
        if entry is None:
            return 0.0
        count, when = entry
        return float(count * math.exp(-self._decay * (now - when)))

    def _penalty(self, excess: float) -> float:
        return 0.0 if excess <= 0 else min(self.max_delay, self.base_delay * 2 ** min(excess, 16.0))

    @contextlib.asynccontextmanager
    async def attempt(self, ip: str, endpoint_id: str, role: str) -> AsyncIterator[None]:
        """One password check, from `ip` for (endpoint, role): admitted, limited and penalised
        before any work; raises `Throttled` when a queue is already too long."""
        client = client_key(ip)
        role_key = (endpoint_id, role)
        trusted = self._trusted_client(client, role_key)
        under_attack = self._count(self._roles, role_key, time.monotonic()) > self.free_per_role and not trusted
        role_gate = (self._role_gates.hold(role_key, self.max_concurrent_per_role, self.max_waiting,
                                           TOO_MANY_FOR_ENDPOINT) if under_attack else contextlib.nullcontext())
        async with self._client_gates.hold(client, self.max_concurrent_per_ip, self.max_waiting,
                                           TOO_MANY_ATTEMPTS), role_gate:
            wait = 0.0 if trusted else self._penalty(self._count(self._clients, client, time.monotonic())
                                                     - self.free_per_ip)
            if wait:
                await asyncio.sleep(wait)  # the client's own penalty comes before its password is looked at
            yield

    def record_failure(self, ip: str, endpoint_id: str, role: str) -> float:
        """Count a wrong password; returns the seconds to hold the attempt before answering it."""
        now = time.monotonic()
        client = client_key(ip)
        if len(self._clients) >= self._max_keys:
            self._prune_clients(now)
        if len(self._roles) >= self._max_keys:
            self._prune_roles(now)
        self._clients[client] = (self._count(self._clients, client, now) + 1.0, now)
        role_key = (endpoint_id, role)
        self._roles[role_key] = (self._count(self._roles, role_key, now) + 1.0, now)
        return self.delay(ip, endpoint_id, role)

    def delay(self, ip: str, endpoint_id: str, role: str) -> float:
        """Seconds a failed attempt from `ip` for (endpoint, role) is held before its answer."""
        now = time.monotonic()
        client, role_key = client_key(ip), (endpoint_id, role)
        role_excess = (0.0 if self._trusted_client(client, role_key)
                       else self._count(self._roles, role_key, now) - self.free_per_role)
        return self._penalty(max(self._count(self._clients, client, now) - self.free_per_ip, role_excess))

    def failures(self, endpoint_id: str, role: str) -> float:
        """The role's decayed failure count (tests, logs)."""
        return self._count(self._roles, (endpoint_id, role), time.monotonic())

    def _prune_clients(self, now: float) -> None:
        self._prune(self._clients, now)

    def _prune_roles(self, now: float) -> None:
        self._prune(self._roles, now)

    def _prune(self, table: dict[Any, tuple[float, float]], now: float) -> None:
        """Forget what has decayed to nothing; if that is not enough, the half with the fewest
        failures (never the most attacked: a victim's counter outlives any spray of new keys)."""
        for key in [k for k in table if self._count(table, k, now) < 0.5]:
            del table[key]
        if len(table) >= self._max_keys:
            by_count = sorted(table, key=lambda k: self._count(table, k, now))
            for key in by_count[: len(by_count) // 2]:
                del table[key]


class PasswordChecks:
    """PBKDF2 off the event loop, on `workers` threads, fair between endpoints.

    An endpoint runs one check at a time (`per_endpoint`); its next one waits on the endpoint, so
    the queue for a thread holds at most one check per endpoint and endpoints are served in turn.
    A check keeps its thread and its endpoint's place until the computation ends, even when the
    client that asked went away, so cancelling cannot let one endpoint take more threads.
    """

    def __init__(self, workers: int | None = None, *, per_endpoint: int = 1, max_waiting: int = 1024) -> None:
        self.workers = workers or max(2, os.cpu_count() or 2)
        self.per_endpoint = per_endpoint
        self.max_waiting = max_waiting
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="argon-pbkdf2")
        self._threads = asyncio.Semaphore(self.workers)
        self._endpoints: dict[str, _Gate] = {}
        self._waiting = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    async def run(self, endpoint_id: str, fn: Callable[..., T], *args: object) -> T:
        if self._waiting >= self.max_waiting:
            raise Throttled(BUSY)
        gate = self._endpoints.get(endpoint_id)
        if gate is None:
            gate = self._endpoints[endpoint_id] = _Gate(self.per_endpoint)
        gate.users += 1
        self._waiting += 1
        holding: list[asyncio.Semaphore] = []
        try:
            await gate.slots.acquire()
            holding.append(gate.slots)
            await self._threads.acquire()
            holding.append(self._threads)
            self._waiting -= 1
            future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except BaseException:
            if len(holding) < 2:
                self._waiting -= 1
            self._release(endpoint_id, gate, holding)
            raise
        future.add_done_callback(lambda _: self._release(endpoint_id, gate, holding))
        return await asyncio.shield(future)

    def _release(self, endpoint_id: str, gate: _Gate, holding: list[asyncio.Semaphore]) -> None:
        for sem in holding:
            sem.release()
        gate.users -= 1
        if gate.users == 0 and self._endpoints.get(endpoint_id) is gate:
            del self._endpoints[endpoint_id]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

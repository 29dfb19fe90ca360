"""The transaction pooler behind `<endpoint>-pooler` hosts (ADR 0017).

`Pooler` is what a `Session` hands a pooled client to once it has authenticated: it keeps one pool
per (compute, database, role), answers the client's login from the pool's kept greeting (waking
the compute only for a pool's first client), and gives the client to the engine, which owns its
socket from then on. The engine (`engine.PythonEngine`, or the C one in `native`) moves the bytes
and makes the pooling decisions; this module does what happens once per connection: the startup
parameters, the greeting, the cancel key, opening server connections when the engine asks (wake,
then a ClientKey login with the keys of the pool's latest client), the suspend handshake
(`quiesce`), and the per-pool view for the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from argon.errors import ArgonError, ConfigError
from argon.proxy import backend
from argon.proxy.activity import ActivityRegistry, SessionActivity
from argon.proxy.backend import CANNOT_CONNECT, ComputeRejected
from argon.proxy.cancel import CancelTarget, send_cancel
from argon.proxy.handshake import ConnectionClosed, MessageStream
from argon.wire import codec, pool_params, scram
from argon.wire.codec import StartupMessage
from argon.wire.pooling import PoolStats

if TYPE_CHECKING:
    from argon.proxy.auth import Credentials
    from argon.proxy.control_client import ControlClient

log = logging.getLogger(__name__)

MAX_CLIENTS_PER_ENDPOINT = 10_000  # Neon's PgBouncer max_client_conn
MAX_CLIENT_CONN = "no more connections allowed (max_client_conn)"
POOL_SHARE = 0.9  # a pool's size: 90% of the compute's max_connections (Neon's default_pool_size)
DEFAULT_POOL_SIZE = 64  # until a server has said its max_connections (Neon's earlier template value)
OPEN_ATTEMPTS = 5
OPEN_TIMEOUT = 10.0  # per server login (wake not included)
_RETRY_SQLSTATES = frozenset({"57P03"})  # starting up / shutting down
_TOO_MANY = "53300"
POOL_LINGER = 60.0  # a pool with no client and no server is forgotten after this


@dataclass(eq=False)
class PoolEntry:
    """A pool as the proxy knows it: what the engine needs to open its server connections."""

    id: int
    compute_id: str
    database: str
    role: str
    keys: tuple[bytes, bytes]  # (ClientKey, ServerKey) of the latest client that proved the password
    size: int = DEFAULT_POOL_SIZE
    welcome: list[tuple[str, str]] | None = None  # the kept greeting's ParameterStatus values
    welcoming: asyncio.Future[list[tuple[str, str]]] | None = None
    clients: int = 0
    activity: SessionActivity | None = None
    empty_since: float | None = None
    opening: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass(frozen=True)
class PoolView:
    """One pool for the API and the console."""

    database: str
    role: str
    stats: PoolStats


def pooler_engine(relay_mode: str) -> str:
    """The engine for a relay mode (ARGON_PROXY_RELAY): the C one unless Python is asked for, or
    the C one was not built."""
    if relay_mode == "python":
        return "python"
    from argon.proxy.pooler import native

    if native.AVAILABLE:
        return "native"
    if relay_mode == "native":
        raise ConfigError("ARGON_PROXY_RELAY=native, but the native pooler was not built: reinstall Argon where a C "
                          "compiler is present (e.g. apt-get install gcc python3-dev), or use auto or python")
    return "python"


class PooledCancel:
    """The cancel key of a pooled client: the engine names the server it holds (and holds it)."""

    __slots__ = ("client_id", "pooler")

    def __init__(self, pooler: Pooler, client_id: int) -> None:
        self.pooler = pooler
        self.client_id = client_id

    async def cancel(self) -> bool:
        return await self.pooler._cancel(self.client_id)


class Pooler:
    def __init__(self, *, control: ControlClient, activity: ActivityRegistry, cancels: Any, engine: str = "python",
                 max_clients: int = MAX_CLIENTS_PER_ENDPOINT, pool_size: int | None = None) -> None:
        self.control = control
        self.pool_size = pool_size  # a fixed size for every pool (tests, benchmarks); None: from max_connections
        self.activity = activity
        self.cancels = cancels
        self.max_clients = max_clients
        self._ids = itertools.count(1)
        self._pools: dict[tuple[str, str, str], PoolEntry] = {}
        self._by_id: dict[int, PoolEntry] = {}
        self._clients: dict[int, tuple[PoolEntry, tuple[int, int], float]] = {}  # id -> pool, cancel key, start
        self._servers: dict[int, tuple[PoolEntry, CancelTarget]] = {}
        self._per_compute: dict[str, int] = {}
        self.engine = self._make_engine(engine)
        activity.add_quiescer(self)
        self._janitor = asyncio.get_running_loop().create_task(self._forget_empty_pools())

    def _make_engine(self, kind: str) -> Any:
        if kind == "native":
            from argon.proxy.pooler.native import NativeEngine

            return NativeEngine(want=self._want, client_ended=self._client_ended, server_ended=self._server_ended)
        from argon.proxy.pooler.engine import PythonEngine

        return PythonEngine(want=self._want, client_ended=self._client_ended, server_ended=self._server_ended)

    @property
    def engine_name(self) -> str:
        return str(self.engine.name)

    @property
    def clients(self) -> int:
        """Pooled clients connected now (each holds one descriptor)."""
        return len(self._clients)

    @property
    def servers(self) -> int:
        return len(self._servers)

    # A client ------------------------------------------------------------------------------------

    async def serve(self, stream: MessageStream, startup: StartupMessage, creds: Credentials) -> None:
        """Take an authenticated client of a `-pooler` host. Raises ArgonError (its text for the
        client) when it cannot be served; otherwise the engine owns the connection on return."""
        route = creds.route
        compute_id = route.compute_id
        assert compute_id is not None
        try:
            values = pool_params.client_values(startup.params)
        except pool_params.UnsupportedParameter as exc:
            raise ArgonError(exc.user_message) from None
        if self._per_compute.get(compute_id, 0) >= self.max_clients:
            log.warning("pooled client for %s@%s refused: %d clients already", route.user, compute_id, self.max_clients)
            raise ArgonError(MAX_CLIENT_CONN)
        entry = self._entry(compute_id, route.database, route.user, creds)
        entry.clients += 1
        self._per_compute[compute_id] = self._per_compute.get(compute_id, 0) + 1
        client_id = next(self._ids)
        key: tuple[int, int] | None = None
        try:
            welcome = await self._welcome(entry)
            key = self.cancels.register(PooledCancel(self, client_id))
            greeting = pool_params.greeting(welcome, values, creds.pending, key)
            transport = stream.transport
            if transport is None or stream.lost:
                raise ConnectionClosed
            self._clients[client_id] = (entry, key, time.monotonic())
            # the client's tracked values: the pool's defaults, with what it asked for at startup
            tracked = pool_params.tracked_from_server(welcome) | values
            if not await self.engine.add_client_transport(entry.id, client_id, transport, stream.released, greeting,
                                                          stream.detach(), tracked):
                self._clients.pop(client_id, None)
                raise ConnectionClosed
            stream.transport = None  # the engine's now
        except BaseException:
            if key is not None:
                self.cancels.unregister(key)
            self._client_gone(entry)
            raise

    def _entry(self, compute_id: str, database: str, role: str, creds: Credentials) -> PoolEntry:
        keys = (creds.client_key, creds.server_key)
        entry = self._pools.get((compute_id, database, role))
        if entry is None:
            entry = PoolEntry(next(self._ids), compute_id, database, role, keys, size=self.pool_size or DEFAULT_POOL_SIZE)
            self._pools[(compute_id, database, role)] = entry
            self._by_id[entry.id] = entry
            self.engine.add_pool(entry.id, entry.size)
            entry.activity = self.activity.open(compute_id)
            entry.activity.probe = lambda act, pool_id=entry.id: self._probe(act, pool_id)
        entry.keys = keys
        entry.empty_since = None
        return entry

    def _probe(self, activity: SessionActivity, pool_id: int) -> None:
        entry = self._by_id.get(pool_id)
        activity.clients = entry.clients if entry is not None else 0
        in_query, in_transaction, last = self.engine.busy(pool_id)
        activity.in_query, activity.in_transaction = in_query, in_transaction
        if last:
            activity.last_activity = max(activity.last_activity, last)

    def _client_ended(self, client_id: int) -> None:
        record = self._clients.pop(client_id, None)
        if record is None:
            return
        entry, key, started = record
        self.cancels.unregister(key)
        log.debug("pooled session ended: endpoint=%s-pooler user=%s duration=%.1fs", entry.compute_id, entry.role,
                  time.monotonic() - started)
        self._client_gone(entry)

    def _client_gone(self, entry: PoolEntry) -> None:
        entry.clients -= 1
        left = self._per_compute.get(entry.compute_id, 1) - 1
        if left > 0:
            self._per_compute[entry.compute_id] = left
        else:
            self._per_compute.pop(entry.compute_id, None)
        if entry.clients == 0:
            entry.empty_since = time.monotonic()

    # Server connections --------------------------------------------------------------------------

    async def _welcome(self, entry: PoolEntry) -> list[tuple[str, str]]:
        """The pool's kept greeting; its first client opens the first server (waking the compute)."""
        if entry.welcome is not None:
            return entry.welcome
        if entry.welcoming is None:
            entry.welcoming = asyncio.get_running_loop().create_future()
            try:
                entry.welcome = await self._open(entry, requested=False)
            except BaseException as exc:
                fut, entry.welcoming = entry.welcoming, None
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else ArgonError(CANNOT_CONNECT))
                    fut.exception()  # retrieved: no "never retrieved" warning if nobody else waits
                raise
            entry.welcoming.set_result(entry.welcome)
            return entry.welcome
        return await asyncio.shield(entry.welcoming)

    def _want(self, pool_id: int) -> None:
        entry = self._by_id.get(pool_id)
        if entry is None:
            self.engine.failed(pool_id, None)
            return
        task = asyncio.get_running_loop().create_task(self._open_requested(entry))
        entry.opening.add(task)
        task.add_done_callback(entry.opening.discard)

    async def _open_requested(self, entry: PoolEntry) -> None:
        try:
            await self._open(entry, requested=True)
        except ArgonError as exc:
            self.engine.failed(entry.id, codec.error_response(exc.user_message))
        except asyncio.CancelledError:
            self.engine.failed(entry.id, None)
            raise
        except Exception:
            log.exception("opening a server connection for %s@%s failed", entry.role, entry.compute_id)
            self.engine.failed(entry.id, codec.error_response(CANNOT_CONNECT))

    async def _open(self, entry: PoolEntry, *, requested: bool) -> list[tuple[str, str]]:
        """Wake the compute and log one server connection in; it joins the pool idle. Returns its
        ParameterStatus values. Retries while the compute is (re)starting; raises ArgonError."""
        delay = 0.05
        for attempt in range(1, OPEN_ATTEMPTS + 1):
            self.activity.touch(entry.compute_id)
            try:
                address = await self.control.wake(entry.compute_id)
            except ArgonError:
                raise
            except Exception:
                log.exception("waking %s failed", entry.compute_id)
                raise ArgonError("Control plane request failed") from None
            try:
                login = await asyncio.wait_for(self._login(entry, address.socket_path, requested), OPEN_TIMEOUT)
            except (ConnectionRefusedError, FileNotFoundError, ConnectionClosed, ConnectionResetError) as exc:
                log.debug("compute of %s not reachable (attempt %d): %r", entry.compute_id, attempt, exc)
            except TimeoutError:
                raise ArgonError(CANNOT_CONNECT) from None
            except ComputeRejected as exc:
                if exc.sqlstate not in _RETRY_SQLSTATES:
                    log.info("compute %s rejected a pooled login of %s: %s %s", entry.compute_id, entry.role,
                             exc.sqlstate, exc.message)
                    stats = self.engine.pool_stats(entry.id)
                    if exc.sqlstate == _TOO_MANY and requested and stats is not None and stats.sv_idle + stats.sv_active:
                        self.engine.failed(entry.id, None)  # the pool stops growing here; its servers serve
                        return []
                    raise ArgonError(exc.message) from None
            except scram.ScramError:
                log.warning("compute %s failed SCRAM server verification", entry.compute_id)
                raise ArgonError(CANNOT_CONNECT) from None
            else:
                _, params, size = login
                if size != entry.size:
                    entry.size = size
                    self.engine.resize_pool(entry.id, size)
                return params
            if attempt < OPEN_ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 2
        raise ArgonError(CANNOT_CONNECT)

    async def _login(self, entry: PoolEntry, socket_path: str,
                     requested: bool) -> tuple[int, list[tuple[str, str]], int]:
        login = await backend.login(socket_path, {"user": entry.role, "database": entry.database}, *entry.keys)
        transport = login.stream.transport
        try:
            shown = await backend.show(login.stream, "max_connections")
            size = self.pool_size or entry.size
            if shown is not None and shown.isdigit() and self.pool_size is None:
                size = max(1, math.floor(int(shown) * POOL_SHARE))
            assert transport is not None
        except BaseException:
            if transport is not None:
                transport.abort()
            raise
        server_id = next(self._ids)
        self._servers[server_id] = (entry, CancelTarget(socket_path, *login.backend_key))
        tracked = pool_params.tracked_from_server(login.parameters)
        if not self.engine.add_server_transport(entry.id, server_id, transport, login.stream.detach(), tracked,
                                                requested=requested):
            self._servers.pop(server_id, None)
            raise ConnectionClosed
        return server_id, login.parameters, size

    def _server_ended(self, server_id: int) -> None:
        self._servers.pop(server_id, None)

    # Cancels -------------------------------------------------------------------------------------

    async def _cancel(self, client_id: int) -> bool:
        server_id = await self.engine.cancel_client(client_id)
        if server_id is None:
            return False
        try:
            record = self._servers.get(server_id)
            if record is None:
                return False
            await send_cancel(record[1])
            return True
        finally:
            self.engine.release_hold(server_id)

    # The suspend handshake -----------------------------------------------------------------------

    async def quiesce(self, compute_id: str, force: bool = False) -> bool:
        """Before `compute_id` stops: True once its pools hand out no server and hold none; False
        (nothing changed) if one is in use. With `force` (the stop happens anyway: an API suspend,
        a restart) the pools pause and close their idle servers in any case; True."""
        entries = [e for e in self._pools.values() if e.compute_id == compute_id]
        paused: list[PoolEntry] = []
        for entry in entries:
            if force:
                await self.engine.quiesce(entry.id, True)
                continue
            if entry.opening or await self.engine.quiesce(entry.id):
                for done in paused:
                    self.engine.unquiesce(done.id)
                return False
            paused.append(entry)
        return True

    def resume(self, compute_id: str) -> None:
        for entry in [e for e in self._pools.values() if e.compute_id == compute_id]:
            self.engine.unquiesce(entry.id)

    # Views and upkeep ----------------------------------------------------------------------------

    def pools(self, compute_id: str) -> list[PoolView]:
        views = []
        for entry in self._pools.values():
            if entry.compute_id == compute_id:
                stats = self.engine.pool_stats(entry.id)
                if stats is not None:
                    views.append(PoolView(entry.database, entry.role, stats))
        return sorted(views, key=lambda v: (v.database, v.role))

    async def _forget_empty_pools(self) -> None:
        while True:
            await asyncio.sleep(POOL_LINGER / 4)
            now = time.monotonic()
            for key, entry in list(self._pools.items()):
                stats = self.engine.pool_stats(entry.id)
                if (entry.clients == 0 and entry.empty_since is not None and now - entry.empty_since > POOL_LINGER
                        and not entry.opening and entry.welcoming is None
                        and (stats is None or stats.sv_active + stats.sv_used + stats.sv_login == 0)):
                    self._drop(key, entry)

    def _drop(self, key: tuple[str, str, str], entry: PoolEntry, *, engine: bool = True) -> None:
        del self._pools[key]
        self._by_id.pop(entry.id, None)
        if engine:
            self.engine.drop(entry.id)
        if entry.activity is not None:
            entry.activity.probe = None
            self.activity.close(entry.activity)

    async def close(self) -> None:
        self._janitor.cancel()
        self.activity.remove_quiescer(self)
        for entry in list(self._pools.values()):
            for task in list(entry.opening):
                task.cancel()
        await self.engine.close()  # every pooled connection ends with it
        for key, entry in list(self._pools.items()):
            self._drop(key, entry, engine=False)
        for _, key, _ in list(self._clients.values()):
            self.cancels.unregister(key)
        self._clients.clear()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)

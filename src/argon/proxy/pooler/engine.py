"""The asyncio engine of the transaction pooler: `wire.pooling.PoolCore` over asyncio transports.

One Protocol per client and per server connection feeds the core what its transport read; the
core's hooks write to and close transports. It is the reference the C engine (`native`) is tested
against, and the engine where the C one is not built or `ARGON_PROXY_RELAY=python`.

Flow control: a client's transport that cannot take more stops the server it is linked to from
being read (and a server's stops its client), re-evaluated at every link and unlink; a waiting
client is not read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from argon.wire.pooling import Client, Pool, PoolCore, PoolStats, Server

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between timeout checks


class _Endpoint(asyncio.Protocol):
    """A client or server transport's protocol; `obj` is the core's Client or Server."""

    def __init__(self, engine: PythonEngine, obj: Client | Server) -> None:
        self.engine = engine
        self.obj = obj
        self.transport: asyncio.Transport | None = None
        self.blocked = False  # our transport's write buffer is full
        self.paused = False  # we stopped reading our transport

    def pause_writing(self) -> None:
        self.blocked = True
        self.engine._flow(self.obj)

    def resume_writing(self) -> None:
        self.blocked = False
        self.engine._flow(self.obj)

    def eof_received(self) -> bool:
        return False


class _ClientProtocol(_Endpoint):
    obj: Client

    def data_received(self, data: bytes) -> None:
        self.engine.client_data(self.obj, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.engine._client_gone(self.obj)


class _ServerProtocol(_Endpoint):
    obj: Server

    def data_received(self, data: bytes) -> None:
        self.engine.server_data(self.obj, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.engine._server_gone(self.obj)


class PythonEngine(PoolCore):
    name = "python"

    def __init__(self, *, want: Callable[[int], None], client_ended: Callable[[int], None],
                 server_ended: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._want_cb = want
        self._client_ended = client_ended
        self._server_ended = server_ended
        self._clients: dict[int, Client] = {}
        self._servers: dict[int, Server] = {}
        self._io: dict[int, _Endpoint] = {}  # id(Client | Server) -> its protocol
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    # The pooler's interface --------------------------------------------------------------------

    def add_pool(self, pool_id: int, size: int) -> None:
        super().add_pool(pool_id, size)

    def resize_pool(self, pool_id: int, size: int) -> None:
        pool = self.pools.get(pool_id)
        if pool is not None:
            self.resize(pool, size)

    def drop(self, pool_id: int) -> None:
        pool = self.pools.get(pool_id)
        if pool is not None:
            self.drop_pool(pool)

    async def add_client_transport(self, pool_id: int, client_id: int, transport: asyncio.BaseTransport,
                                   released: Callable[[], Awaitable[None]], greeting: bytes, pending: bytes,
                                   params: dict[int, str]) -> bool:
        pool = self.pools.get(pool_id)
        if pool is None or transport.is_closing():
            return False
        client = Client(client_id, pool, params)
        proto = _ClientProtocol(self, client)
        proto.transport = transport  # type: ignore[assignment]
        self._io[id(client)] = proto
        self._clients[client_id] = client
        pool.clients.add(client)
        transport.set_protocol(proto)  # type: ignore[attr-defined]
        transport.write(greeting)  # type: ignore[attr-defined]
        if pending:
            self.client_data(client, pending)
        return True

    def add_server_transport(self, pool_id: int, server_id: int, transport: asyncio.BaseTransport, pending: bytes,
                             params: dict[int, str], *, requested: bool) -> bool:
        pool = self.pools.get(pool_id)
        if pool is None or transport.is_closing():
            if pool is not None:
                self.server_failed(pool, None)
            transport.close()
            return False
        server = Server(server_id, pool, params)
        proto = _ServerProtocol(self, server)
        proto.transport = transport  # type: ignore[assignment]
        self._io[id(server)] = proto
        self._servers[server_id] = server
        transport.set_protocol(proto)  # type: ignore[attr-defined]
        if requested and pool.opening > 0:
            pool.opening -= 1
        pool.servers.add(server)
        self._idle(server)
        if pending:
            self.server_data(server, pending)
        return True

    def failed(self, pool_id: int, error: bytes | None) -> None:
        pool = self.pools.get(pool_id)
        if pool is not None:
            self.server_failed(pool, error)

    async def cancel_client(self, client_id: int) -> int | None:
        client = self._clients.get(client_id)
        server = self.cancel_target(client) if client is not None else None
        return server.id if server is not None else None

    def release_hold(self, server_id: int) -> None:
        server = self._servers.get(server_id)
        if server is not None:
            self.unhold(server)

    async def quiesce(self, pool_id: int, force: bool = False) -> bool:
        pool = self.pools.get(pool_id)
        return pool is not None and self.pause(pool, force=force)

    def unquiesce(self, pool_id: int) -> None:
        pool = self.pools.get(pool_id)
        if pool is not None:
            self.resume(pool)

    def pool_stats(self, pool_id: int) -> PoolStats | None:
        pool = self.pools.get(pool_id)
        return self.stats(pool) if pool is not None else None

    def busy(self, pool_id: int) -> tuple[bool, bool, float]:
        """(a query in flight, a transaction open, the last activity) over the pool's servers."""
        pool = self.pools.get(pool_id)
        if pool is None:
            return False, False, 0.0
        linked = [s for s in pool.servers if s.client is not None]
        in_tx = any(s.status != ord("I") for s in linked)
        return bool(linked) and not in_tx, in_tx, pool.last_activity

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def close(self) -> None:
        self._ticker.cancel()
        for client in list(self._clients.values()):
            proto = self._io.get(id(client))
            if proto is not None and proto.transport is not None:
                proto.transport.abort()
        for server in list(self._servers.values()):
            proto = self._io.get(id(server))
            if proto is not None and proto.transport is not None:
                proto.transport.abort()
        await asyncio.sleep(0)

    # PoolCore hooks ------------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic()

    def send_client(self, client: Client, data: bytes) -> None:
        proto = self._io.get(id(client))
        if proto is not None and proto.transport is not None and not proto.transport.is_closing():
            proto.transport.write(data)

    def send_server(self, server: Server, data: bytes) -> None:
        proto = self._io.get(id(server))
        if proto is not None and proto.transport is not None and not proto.transport.is_closing():
            proto.transport.write(data)

    def close_client(self, client: Client, error: bytes | None) -> None:
        proto = self._io.get(id(client))
        if proto is not None and proto.transport is not None:
            if error:
                self.send_client(client, error)
            proto.transport.close()

    def close_server(self, server: Server) -> None:
        proto = self._io.get(id(server))
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    def want_server(self, pool: Pool) -> None:
        self._want_cb(pool.id)

    def client_reading(self, client: Client, on: bool) -> None:
        self._set_reading(client, on and not self._held_back(client))

    def _link_changed(self, client: Client, server: Server) -> None:
        self._flow(client)
        self._flow(server)

    def _link(self, client: Client, server: Server) -> None:
        super()._link(client, server)
        self._link_changed(client, server)

    def _release(self, server: Server) -> None:
        client = server.client
        super()._release(server)
        if client is not None:
            self._flow(client)
        self._flow(server)

    # Flow control --------------------------------------------------------------------------------

    def _held_back(self, obj: Client | Server) -> bool:
        """Whether `obj` must not be read: a waiting client, or the other side cannot take more."""
        if isinstance(obj, Client):
            if obj.waiting_since is not None or obj.terminating:
                return True
            peer: Client | Server | None = obj.server
        else:
            peer = obj.client
        proto = self._io.get(id(peer)) if peer is not None else None
        return proto is not None and proto.blocked

    def _flow(self, obj: Client | Server) -> None:
        """Re-evaluate reading for `obj` and its peer after a buffer filled or drained, or a link changed."""
        peer: Client | Server | None = obj.server if isinstance(obj, Client) else obj.client
        for side in (obj, peer):
            if side is not None:
                self._set_reading(side, not self._held_back(side))

    def _set_reading(self, obj: Client | Server, on: bool) -> None:
        proto = self._io.get(id(obj))
        if proto is None or proto.transport is None or proto.transport.is_closing() or proto.paused == (not on):
            return
        proto.paused = not on
        if on:
            proto.transport.resume_reading()
        else:
            proto.transport.pause_reading()

    # Ends ----------------------------------------------------------------------------------------

    def _client_gone(self, client: Client) -> None:
        self.client_lost(client)
        self._io.pop(id(client), None)
        if self._clients.pop(client.id, None) is not None:
            self._client_ended(client.id)

    def _server_gone(self, server: Server) -> None:
        self.server_lost(server)
        self._io.pop(id(server), None)
        if self._servers.pop(server.id, None) is not None:
            self._server_ended(server.id)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self.tick()
            except Exception:  # the pooler must survive anything one pool does
                log.exception("pooler timeouts failed")

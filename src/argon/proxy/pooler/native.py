"""The C engine of the transaction pooler (`_pooler`, ADR 0017), behind the interface of
`engine.PythonEngine`.

Sockets are handed over as the relay's are (`native.NativeRelays.take_over`): the transport's fd
is duplicated and the transport aborted; a TLS client's `SSL *` goes to the thread only after the
client stream's `connection_lost` (the SSL protocol reads its outgoing BIO once more after the
abort), and its SSLObject is kept here, untouched, until the thread reports the client's end.
What the thread has to say (a pool wants a server, a connection ended, a cancel's target, a pool
quiesced) arrives on an eventfd the event loop watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from argon.wire.pool_params import TRACKED
from argon.wire.pooling import IDLE_TIMEOUT, MAX_PREPARED, WAIT_TIMEOUT, PoolStats

try:
    from argon.proxy import _pooler
except ImportError:  # built without a C compiler: the asyncio engine pools
    _pooler = None

log = logging.getLogger(__name__)

AVAILABLE = _pooler is not None
RELEASE_TIMEOUT = 5.0


def _load_openssl() -> bool:
    if _pooler is None or sys.version_info >= (3, 15):  # PySSLSocket's layout is checked up to 3.14
        return False
    try:
        import _ssl
    except ImportError:
        return False
    path = getattr(_ssl, "__file__", None)
    return bool(path) and _pooler.load_openssl(path)


TLS_AVAILABLE = _load_openssl()


def _params(values: dict[int, str]) -> tuple[str | None, ...]:
    return tuple(values.get(i) for i in range(len(TRACKED)))


class NativeEngine:
    name = "native"

    def __init__(self, *, want: Callable[[int], None], client_ended: Callable[[int], None],
                 server_ended: Callable[[int], None], wait_timeout: float = WAIT_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT, max_prepared: int = MAX_PREPARED) -> None:
        if _pooler is None:
            raise RuntimeError("the native pooler is not built (no C compiler at install time)")
        self.core = _pooler.Engine()
        self._want = want
        self._client_ended = client_ended
        self._server_ended = server_ended
        self._loop = asyncio.get_running_loop()
        self._tls: dict[int, Any] = {}  # client id -> its SSLObject, alive until the thread reports its end
        self._waiting: dict[int, asyncio.Future[Any]] = {}  # token -> a cancel's or a pause's answer
        self._tokens = itertools.count(1)
        self._clients = 0
        self._servers = 0
        self._wait_timeout, self._idle_timeout, self._max_prepared = wait_timeout, idle_timeout, max_prepared
        self.core.limits(wait_timeout, idle_timeout, max_prepared)
        self._loop.add_reader(self.core.fileno(), self._drain)

    # limits the tests and the benchmark adjust
    @property
    def wait_timeout(self) -> float:
        return self._wait_timeout

    @wait_timeout.setter
    def wait_timeout(self, value: float) -> None:
        self._wait_timeout = value
        self.core.limits(self._wait_timeout, self._idle_timeout, self._max_prepared)

    @property
    def clients(self) -> int:
        return self._clients

    def add_pool(self, pool_id: int, size: int) -> None:
        self.core.add_pool(pool_id, size)

    def resize_pool(self, pool_id: int, size: int) -> None:
        self.core.resize(pool_id, size)

    def drop(self, pool_id: int) -> None:
        self.core.drop_pool(pool_id)

    async def add_client_transport(self, pool_id: int, client_id: int, transport: asyncio.BaseTransport,
                                   released: Callable[[], Awaitable[None]], greeting: bytes, pending: bytes,
                                   params: dict[int, str]) -> bool:
        sslobj = transport.get_extra_info("ssl_object")
        tls = None
        if sslobj is not None:
            tls = getattr(sslobj, "_sslobj", None)
            if not TLS_AVAILABLE or tls is None or not _pooler.tls_usable(tls):  # type: ignore[union-attr]
                log.warning("a pooled TLS client cannot be driven natively on this Python: closed")
                transport.abort()
                return False
        sock = transport.get_extra_info("socket")
        if sock is None or transport.is_closing() or transport.get_write_buffer_size() > 0:  # type: ignore[attr-defined]
            return False
        fd = os.dup(sock.fileno())
        try:
            transport.abort()  # the thread owns the socket from here: no FIN from the loop's copy
            if tls is not None:
                async with asyncio.timeout(RELEASE_TIMEOUT):  # not wait_for: no task per login
                    await released()
            self.core.add_client(pool_id, client_id, fd, greeting, pending, _params(params), tls)
        except BaseException:
            os.close(fd)
            raise
        if sslobj is not None:
            self._tls[client_id] = sslobj
        self._clients += 1
        return True

    def add_server_transport(self, pool_id: int, server_id: int, transport: asyncio.BaseTransport, pending: bytes,
                             params: dict[int, str], *, requested: bool) -> bool:
        sock = transport.get_extra_info("socket")
        if sock is None or transport.is_closing():
            transport.close()
            if requested:
                self.core.failed(pool_id, None)
            return False
        fd = os.dup(sock.fileno())
        transport.abort()
        try:
            self.core.add_server(pool_id, server_id, fd, pending, _params(params), requested)
        except BaseException:
            os.close(fd)
            raise
        self._servers += 1
        return True

    def failed(self, pool_id: int, error: bytes | None) -> None:
        self.core.failed(pool_id, error)

    async def cancel_client(self, client_id: int) -> int | None:
        server_id = await self._ask(self.core.cancel, client_id)
        return int(server_id) or None

    def release_hold(self, server_id: int) -> None:
        self.core.unhold(server_id)

    async def quiesce(self, pool_id: int, force: bool = False) -> bool:
        return bool(await self._ask(self.core.pause_force if force else self.core.pause, pool_id))

    def unquiesce(self, pool_id: int) -> None:
        self.core.resume(pool_id)

    async def _ask(self, command: Callable[[int, int], None], object_id: int) -> int:
        token = next(self._tokens)
        future: asyncio.Future[int] = self._loop.create_future()
        self._waiting[token] = future
        try:
            command(object_id, token)
            return await future
        finally:
            self._waiting.pop(token, None)

    def pool_stats(self, pool_id: int) -> PoolStats | None:
        row = self.core.stats(pool_id)
        if row is None:
            return None
        (cl_active, cl_waiting, cl_idle, sv_active, sv_idle, sv_used, sv_login, maxwait, size, paused, xacts,
         queries, wait_time, waits, last) = row
        return PoolStats(cl_active=cl_active, cl_waiting=cl_waiting, cl_idle=cl_idle, sv_active=sv_active,
                         sv_idle=sv_idle, sv_used=sv_used, sv_login=sv_login, maxwait=maxwait, size=size,
                         paused=bool(paused), xact_count=xacts, query_count=queries, wait_time=wait_time,
                         wait_count=waits, last_activity=last)

    def busy(self, pool_id: int) -> tuple[bool, bool, float]:
        stats = self.pool_stats(pool_id)
        if stats is None:
            return False, False, 0.0
        return stats.sv_active > 0, False, stats.last_activity

    def _drain(self) -> None:
        for kind, a, b, _, _ in self.core.events():
            if kind == _pooler.EV_WANT:  # type: ignore[union-attr]
                self._want(a)
            elif kind == _pooler.EV_CLIENT_END:  # type: ignore[union-attr]
                self._tls.pop(a, None)
                self._clients -= 1
                self._client_ended(a)
            elif kind == _pooler.EV_SERVER_END:  # type: ignore[union-attr]
                self._servers -= 1
                self._server_ended(a)
            elif kind in (_pooler.EV_CANCEL, _pooler.EV_PAUSED):  # type: ignore[union-attr]
                future = self._waiting.get(a)
                if future is not None and not future.done():
                    future.set_result(b)

    async def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.core.fileno())
        self.core.shutdown()
        self._drain()
        for future in self._waiting.values():
            if not future.done():
                future.set_result(0)
        self._tls.clear()

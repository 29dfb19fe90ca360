"""The relay after login on the C thread of `_relay` (ADR 0012), behind the interface of `pipe.Relay`.

`NativeRelays` is one per proxy: it owns the C relay thread and learns on the loop (an eventfd)
when sessions end. `take_over` hands a session's two sockets to the thread: the transports are
detached (their fds duplicated, then closed without a flush, since nothing is buffered in them) and
what they had read but nobody consumed is sent first. The session's `SessionActivity` is then read
from the C side whenever the suspend policy looks (`probe`).

TLS sessions go native too when the C side can drive the `SSL *` of Python's `ssl.SSLObject`
(uvloop's TLS is an SSLObject over memory BIOs): `_relay` takes it from the `_ssl._SSLSocket` object
(type- and back-pointer-checked) and calls the OpenSSL that `_ssl` itself is linked to. The
NativeSession keeps the SSLObject alive, and nothing in Python touches it, until the session ends.
"Nothing" includes the TLS protocol being detached: uvloop's (and asyncio's) `SSLProtocol.
connection_lost` still reads the outgoing BIO, one loop iteration after the abort, so a TLS session
reaches the C thread only once the client stream's `connection_lost` (scheduled after that read)
has run. Two threads on one BIO corrupt the heap: a benchmark crashed the proxy that way.
Where that is not possible (a Python whose `_ssl` has no shared library, a layout the C side does
not recognise) and in the rare case of a side that closed during login, `pipe.Relay` relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from argon.errors import ConfigError
from argon.proxy.activity import SessionActivity

try:
    from argon.proxy import _relay
except ImportError:  # built without a C compiler: everything relays in Python
    _relay = None

log = logging.getLogger(__name__)

AVAILABLE = _relay is not None
RELEASE_TIMEOUT = 5.0  # connection_lost comes one or two loop iterations after the abort


def _load_openssl() -> bool:
    """Whether TLS sessions can be relayed natively: OpenSSL found through Python's own _ssl."""
    if _relay is None or sys.version_info >= (3, 15):  # PySSLSocket's layout is checked up to 3.14
        return False
    try:
        import _ssl
    except ImportError:
        return False
    path = getattr(_ssl, "__file__", None)
    return bool(path) and _relay.load_openssl(path)


TLS_AVAILABLE = _load_openssl()


class NativeSession:
    """One session on the C thread; the same surface as `pipe.Relay` for `Session._serve`."""

    def __init__(self, relays: NativeRelays, sid: int, activity: SessionActivity, tls: Any = None) -> None:
        self._relays = relays
        self._sid = sid
        self._tls = tls  # the client's ssl.SSLObject: the C thread uses its SSL until the session ends
        self.activity = activity
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.bytes_from_client = 0
        self.bytes_from_compute = 0
        activity.probe = self._probe

    def _probe(self, activity: SessionActivity) -> None:
        state = self._relays.core.state(self._sid)
        if state is not None:
            activity.in_query, activity.in_transaction, activity.last_activity = state

    def close(self) -> None:
        if not self.done.done():
            self._relays.core.close(self._sid)

    def _ended(self, from_client: int, from_compute: int) -> None:
        self._probe(self.activity)
        self.activity.probe = None
        self._tls = None
        self.bytes_from_client = from_client
        self.bytes_from_compute = from_compute
        if not self.done.done():
            self.done.set_result(None)


class NativeRelays:
    def __init__(self) -> None:
        if _relay is None:
            raise RuntimeError("the native relay is not built (no C compiler at install time)")
        self.core = _relay.Relay()
        self._loop = asyncio.get_running_loop()
        self._sessions: dict[int, NativeSession] = {}
        self._loop.add_reader(self.core.fileno(), self._reap)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    async def take_over(self, client: asyncio.BaseTransport, compute: asyncio.BaseTransport, *, to_compute: bytes,
                        to_client: bytes, activity: SessionActivity,
                        client_released: Callable[[], Awaitable[None]]) -> NativeSession | None:
        """Move both sockets to the C thread, or None (nothing changed) when a transport cannot be moved.

        `client_released` waits until the client transport's protocols are done with the connection
        (its app protocol's connection_lost): for TLS, the SSL object is handed over only then.
        """
        assert _relay is not None
        sslobj = client.get_extra_info("ssl_object")
        tls = None
        if sslobj is not None:
            tls = getattr(sslobj, "_sslobj", None)
            if not TLS_AVAILABLE or tls is None or not _relay.tls_usable(tls):
                log.debug("TLS session relayed in Python: its SSL object is not usable natively")
                return None
        fds = []
        for transport in (client, compute):
            sock = transport.get_extra_info("socket")
            if sock is None or transport.is_closing() or transport.get_write_buffer_size() > 0:
                break
            fds.append(sock.fileno())
        if len(fds) != 2:
            return None
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))
            # the C thread owns the sockets from here: drop the loop's copies without a FIN (ours stay open)
            for transport in (client, compute):
                transport.abort()
            if tls is not None:
                async with asyncio.timeout(RELEASE_TIMEOUT):  # not wait_for: no task per session
                    await client_released()
            sid = self.core.add(dups[0], dups[1], to_compute, to_client, tls)
        except BaseException:  # cancelled, or the TLS protocol never let go: the session ends here
            for fd in dups:
                os.close(fd)
            raise
        session = NativeSession(self, sid, activity, sslobj)
        self._sessions[sid] = session
        return session

    @property
    def buffered(self) -> int:
        """Bytes the C thread holds for sessions: read from one side, not yet written to the other."""
        return int(self.core.stats()[1])

    def _reap(self) -> None:
        for sid, from_client, from_compute in self.core.reap():
            session = self._sessions.pop(sid, None)
            if session is None:
                # every id the C side reports was returned by add(): an unknown one means a session
                # whose end is lost, and its task, cancel key and activity with it
                log.error("the native relay reported the end of an unknown session (id %#x)", sid)
                continue
            session._ended(from_client, from_compute)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.core.fileno())
        self.core.shutdown()
        for session in list(self._sessions.values()):
            session._ended(session.bytes_from_client, session.bytes_from_compute)
        self._sessions.clear()


def make_relays(mode: str) -> NativeRelays | None:
    """`mode`: auto (native when built), native (required), python (never)."""
    if mode == "python" or (mode == "auto" and not AVAILABLE):
        return None
    if not AVAILABLE:
        raise ConfigError("ARGON_PROXY_RELAY=native, but the native relay was not built: reinstall Argon where a C "
                          "compiler is present (e.g. apt-get install gcc python3-dev), or use auto or python")
    return NativeRelays()


"""The relay after login on the C thread of `_relay` (ADR 0011), behind the interface of `pipe.Relay`.

`NativeRelays` is one per proxy: it owns the C relay thread and learns on the loop (an eventfd)
when sessions end. `take_over` hands a session's two sockets to the thread: the transports are
detached (their fds duplicated, then closed without a flush, since nothing is buffered in them) and
what they had read but nobody consumed is sent first. The session's `SessionActivity` is then read
from the C side whenever the suspend policy looks (`probe`).

Only plaintext client connections can go native: a TLS session's records are Python's `ssl` state.
Those, and the rare case of a side that closed during login, stay on `pipe.Relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from argon.errors import ConfigError
from argon.proxy.activity import SessionActivity

try:
    from argon.proxy import _relay
except ImportError:  # built without a C compiler: everything relays in Python
    _relay = None

log = logging.getLogger(__name__)

AVAILABLE = _relay is not None


class NativeSession:
    """One session on the C thread; the same surface as `pipe.Relay` for `Session._serve`."""

    def __init__(self, relays: NativeRelays, sid: int, activity: SessionActivity) -> None:
        self._relays = relays
        self._sid = sid
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

    def take_over(self, client: asyncio.BaseTransport, compute: asyncio.BaseTransport, *, to_compute: bytes,
                  to_client: bytes, activity: SessionActivity) -> NativeSession | None:
        """Move both sockets to the C thread, or None (nothing changed) when a transport cannot be moved."""
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
            sid = self.core.add(dups[0], dups[1], to_compute, to_client)
        except BaseException:
            for fd in dups:
                os.close(fd)
            raise
        # the C thread owns the sockets now: drop the loop's copies without a FIN (ours stay open)
        for transport in (client, compute):
            transport.abort()
        session = NativeSession(self, sid, activity)
        self._sessions[sid] = session
        return session

    def _reap(self) -> None:
        for sid, from_client, from_compute in self.core.reap():
            session = self._sessions.pop(sid, None)
            if session is not None:
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


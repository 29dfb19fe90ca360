"""The relay after login: two cross-wired asyncio Protocols, write-through, framing kept.

The fallback of the C relay (`native`, ADR 0012): it runs where the extension was not built, when
ARGON_PROXY_RELAY=python, and for a session the C thread cannot take.

Every chunk is written to the other side first, then scanned: whole messages are skipped by their
length header (no copies, no per-message coroutine), so the relay knows where each message starts.
Client -> compute: a query-ish message (Q/P/B/E/F/S/D/C/H/d) marks the session busy, Terminate
('X') is forwarded and the compute's close then ends the session. Compute -> client: ReadyForQuery ('Z') ends the query and
its status byte says whether a transaction is open. That feeds `SessionActivity`, the input of
the suspend decision. Backpressure: a full write buffer on one side pauses reading on the other;
a TLS client is also not read while its own write buffer is full, since reading it makes output for
it (KeyUpdate answers): a client that sends and never reads would otherwise grow that buffer without
bound. (uvloop's SSL transport, paused, stops decrypting and then reading the socket.)

A backend that ends (`pg_terminate_backend`, a shutdown) sends its FATAL and closes. If the
client's next query reaches the relay first, writing it to the closed socket fails and the
transport is closed at once, FATAL unread: what is still readable is then read from a duplicate of
the compute's socket and passed on, so the client sees the error, as it would connected directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import Callable

from argon.proxy.activity import SessionActivity

_length = struct.Struct("!I").unpack_from
_monotonic = time.monotonic
_QUERY_TAGS = frozenset(b"QPBEFSDCHd")
_TERMINATE = ord("X")
_DRAIN_MAX = 1 << 20  # what is read from a compute after a failed write, at most
_READY = ord("Z")
_IDLE = ord("I")


class _Half(asyncio.Protocol):
    """Bytes arriving on `transport`, written through to `peer`; framing state for one direction."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.activity = relay.activity
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.bytes = 0
        self.closed = False
        self._skip = 0  # bytes of the current message still to come
        self._carry = b""  # an incomplete header at the end of the last chunk
        self._z_pending = False  # the last chunk ended right before a ReadyForQuery status byte
        self.terminated = False  # the client sent Terminate

    def pause_writing(self) -> None:  # our transport's buffer is full: stop reading what fills it
        self.relay._write_buffer_full(self, True)

    def resume_writing(self) -> None:
        self.relay._write_buffer_full(self, False)

    def eof_received(self) -> bool:
        return False  # close our transport; connection_lost then closes the peer

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.peer is not None:
            self.peer.close()  # flushes what is queued, then closes: the peer sees EOF at once
        self.relay._half_closed()


class ClientHalf(_Half):
    """Client -> compute."""

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        assert peer is not None
        peer.write(data)
        self.bytes += len(data)
        act = self.activity
        act.last_activity = _monotonic()
        if self._carry:
            data = self._carry + data
            self._carry = b""
        n = len(data)
        pos = self._skip
        terminate = False
        while pos + 5 <= n:
            tag = data[pos]
            if tag in _QUERY_TAGS:
                act.in_query = True
            elif tag == _TERMINATE:
                terminate = True
            pos += 1 + max(_length(data, pos + 1)[0], 4)
        if pos < n:
            self._carry = data[pos:]
            self._skip = 0
        else:
            self._skip = pos - n
        if terminate:
            # Postgres ends the backend as soon as it reads Terminate (Django's DROP DATABASE and
            # CREATE DATABASE ... TEMPLATE need it gone at once), after answering what was pipelined
            # before it; its EOF then closes the client side. Closing here would drop those answers.
            self.terminated = True


class ComputeHalf(_Half):
    """Compute -> client."""

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.closed:  # a failed write closed the transport before it read all
            self.relay._drain_compute()
        self.relay._release_compute_fd()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        assert peer is not None
        peer.write(data)
        self.bytes += len(data)
        act = self.activity
        act.last_activity = _monotonic()
        if self._carry:
            data = self._carry + data
            self._carry = b""
        n = len(data)
        pos = self._skip
        if self._z_pending:  # the status byte of a ReadyForQuery split right after its header
            self._z_pending = False
            act.in_transaction = data[0] != _IDLE
        while pos + 5 <= n:
            if data[pos] == _READY:
                act.in_query = False
                if pos + 5 < n:
                    act.in_transaction = data[pos + 5] != _IDLE
                else:
                    self._z_pending = True
            pos += 1 + max(_length(data, pos + 1)[0], 4)
        if pos < n:
            self._carry = data[pos:]
            self._skip = 0
        else:
            self._skip = pos - n


class Relay:
    """One session's pipe. `done` resolves when both sides are closed."""

    def __init__(self, client: asyncio.BaseTransport, compute: asyncio.BaseTransport,
                 activity: SessionActivity, *, on_close: Callable[[Relay], None] | None = None) -> None:
        self.activity = activity
        self.started = _monotonic()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._on_close = on_close
        self.client = ClientHalf(self)
        self.compute = ComputeHalf(self)
        # typed loosely: uvloop's transports are not subclasses of asyncio.Transport
        self.client.transport = self.compute.peer = client  # type: ignore[assignment]
        self.compute.transport = self.client.peer = compute  # type: ignore[assignment]
        self._client_tls = client.get_extra_info("ssl_object") is not None
        self._full: set[_Half] = set()  # halves whose transport's write buffer is over its high-water mark
        self._compute_fd = -1  # a duplicate of the compute's socket, for `_drain_compute`
        sock = compute.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # out of descriptors: no drain, the rest works
                self._compute_fd = os.dup(sock.fileno())
        self._paused: set[_Half] = set()  # halves whose transport we stopped reading

    def start(self, client_pending: bytes = b"", compute_pending: bytes = b"", *,
              client_lost: bool = False, compute_lost: bool = False) -> None:
        """Take over both transports; replay bytes that arrived before the switch (pipelining)."""
        client, compute = self.client.transport, self.compute.transport
        assert client is not None and compute is not None
        client.set_protocol(self.client)
        compute.set_protocol(self.compute)
        if compute_pending:
            self.compute.data_received(compute_pending)
        if client_pending:
            self.client.data_received(client_pending)
        if client_lost:  # the client went away while we were logging in
            self.client.connection_lost(None)
        if compute_lost:
            self.compute.connection_lost(None)

    @property
    def bytes_from_client(self) -> int:
        return self.client.bytes

    @property
    def bytes_from_compute(self) -> int:
        return self.compute.bytes

    def close(self) -> None:
        for half in (self.client, self.compute):
            if half.transport is not None:
                half.transport.close()

    def _write_buffer_full(self, half: _Half, full: bool) -> None:
        """Flow control: read a transport only while what it feeds can be written. The client
        feeds the compute, and, with TLS, itself too (records its reads make, like KeyUpdate
        answers); the compute feeds the client."""
        if full:
            self._full.add(half)
        else:
            self._full.discard(half)
        client_blocked = self.compute in self._full or (self._client_tls and self.client in self._full)
        for reader, blocked in ((self.client, client_blocked), (self.compute, self.client in self._full)):
            transport = reader.transport
            if transport is None or transport.is_closing() or blocked == (reader in self._paused):
                continue
            if blocked:
                self._paused.add(reader)
                transport.pause_reading()
            else:
                self._paused.discard(reader)
                transport.resume_reading()

    def _drain_compute(self) -> None:
        """Pass on what the compute sent before it closed and the transport did not read (the
        descriptor shares the transport's non-blocking mode: this stops at the first empty read)."""
        left = _DRAIN_MAX
        with contextlib.suppress(OSError):
            while left > 0 and self._compute_fd >= 0:
                chunk = os.read(self._compute_fd, min(left, 1 << 16))
                if not chunk:
                    break
                self.compute.data_received(chunk)
                left -= len(chunk)

    def _release_compute_fd(self) -> None:
        fd, self._compute_fd = self._compute_fd, -1
        if fd >= 0:
            os.close(fd)

    def _half_closed(self) -> None:
        if self.client.closed and self.compute.closed and not self.done.done():
            self.done.set_result(None)
            if self._on_close is not None:
                self._on_close(self)

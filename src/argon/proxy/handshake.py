"""The first bytes of a client connection: TLS negotiation and the startup packet.

The proxy owns the accepted socket until it knows whether TLS comes: it peeks the first byte
(`recv(1, MSG_PEEK)`): 0x16 is a TLS ClientHello (PG17 direct SSL, `sslnegotiation=direct`);
anything else is a startup packet read on the raw socket with exact reads, so no byte of a TLS
handshake is consumed (design-review §1.8). SSLRequest gets 'S' (or 'N' without TLS) and
GSSENCRequest 'N', each at most once; then `connect_accepted_socket(ssl=...)` takes over and the
real startup packet (or a CancelRequest, as libpq >= 17 sends it) is read inside TLS.
`MessageStream` is the buffered protocol used until the relay takes the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass

from argon.proxy.tls import ALPN, ServedCert, TlsConfig
from argon.wire import codec
from argon.wire.codec import CancelRequest, ProtocolViolation, StartupMessage

_BUFFER_LIMIT = 256 * 1024  # a handshake never needs more; pause reading beyond it
_SSL_REQUEST = codec.ssl_request()


class ConnectionClosed(Exception):
    """The peer went away (or sent EOF) in the middle of a handshake."""


class MessageStream(asyncio.Protocol):
    """A transport's bytes, buffered for exact reads by one coroutine at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False  # reading paused: our buffer is over its limit, or the client's writes pile up
        self._write_blocked = False  # the transport's outgoing buffer is over its high-water mark
        self._released = False  # connection_lost ran: the transport's protocols let go of the socket
        self._release_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._wake()
        if len(self._buffer) > _BUFFER_LIMIT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        """Answers pile up for a client that does not read them: under TLS, reading makes answers of
        its own (KeyUpdate replies, alerts), so stop reading until the client takes them."""
        self._write_blocked = True
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._wake()  # a reader waiting on a paused transport resumes it

    def eof_received(self) -> bool:
        self.lost = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._released = True
        self._wake()
        if self._release_waiter is not None and not self._release_waiter.done():
            self._release_waiter.set_result(None)

    async def released(self) -> None:
        """Until connection_lost: for TLS that comes after the SSL protocol's last touch of its BIOs."""
        if not self._released:
            if self._release_waiter is None:
                self._release_waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._release_waiter)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self.lost:
                raise ConnectionClosed
            if self._paused and not self._write_blocked and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def read_message(self, max_length: int) -> tuple[str, bytes]:
        """One backend/frontend message: (type, payload). Oversized lengths are a ProtocolViolation."""
        msg_type, length = codec.message_header(await self.read_exactly(5), max_length=max_length)
        return msg_type, await self.read_exactly(length)

    async def read_startup(self) -> object:
        length = codec.startup_packet_length(await self.read_exactly(4))
        return codec.parse_startup_packet(await self.read_exactly(length - 4))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def detach(self) -> bytes:
        """Everything read from the transport but not consumed (pipelined bytes); the stream is done."""
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data


@dataclass
class Hello:
    """A negotiated client connection, ready for authentication (or a cancel to forward)."""

    stream: MessageStream
    packet: StartupMessage | CancelRequest
    tls: bool
    served: ServedCert | None  # SNI and channel-binding data when TLS is on
    direct_ssl: bool = False


async def negotiate(sock: socket.socket, tls: TlsConfig | None) -> Hello:
    """Run TLS negotiation on an accepted socket; the socket belongs to the returned stream after.

    Raises ConnectionClosed (after answering a ProtocolViolation with its user_message), or
    ssl.SSLError / OSError; the socket or its transport is closed in every failure case.
    """
    state = _Negotiation(asyncio.get_running_loop(), sock, tls)
    try:
        return await state.run()
    except ProtocolViolation as exc:
        await state.fail(exc.user_message)
        raise ConnectionClosed from None
    except BaseException:
        state.close()
        raise


class _Negotiation:
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, tls: TlsConfig | None) -> None:
        self.loop = loop
        self.sock = sock
        self.tls = tls
        self.transport: asyncio.Transport | None = None  # once set, it owns the socket

    async def run(self) -> Hello:
        loop, sock, tls = self.loop, self.sock, self.tls
        try:  # under load the client's first packet is usually there by the time it is accepted
            first = sock.recv(len(_SSL_REQUEST), socket.MSG_PEEK)
        except BlockingIOError:
            await _readable(loop, sock)
            first = sock.recv(len(_SSL_REQUEST), socket.MSG_PEEK)
        if not first:
            raise ConnectionClosed
        if first[0] == 0x16:
            if tls is None:
                raise ConnectionClosed  # a TLS ClientHello but no certificate: nothing sane to answer
            return await self._tls_hello(tls, direct=True)
        if first == _SSL_REQUEST and tls is not None:
            # what nearly every client sends first, whole in one segment: taken and answered at once,
            # without a round of the loop per read (the client sends nothing more before our 'S')
            sock.recv(len(_SSL_REQUEST))
            if sock.send(b"S") == 1:
                return await self._tls_hello(tls, direct=False)
            raise ConnectionClosed  # an empty send buffer did not take one byte: the peer is gone
        ssl_asked = gss_asked = False
        while True:
            packet = await _read_raw_packet(loop, sock)
            if isinstance(packet, codec.SSLRequest) and not ssl_asked:
                ssl_asked = True
                await loop.sock_sendall(sock, b"S" if tls is not None else b"N")
                if tls is not None:
                    return await self._tls_hello(tls, direct=False)
            elif isinstance(packet, codec.GSSENCRequest) and not gss_asked:
                gss_asked = True
                await loop.sock_sendall(sock, b"N")
            elif isinstance(packet, StartupMessage | CancelRequest):
                stream = await _accept(loop, sock, None)
                self.transport = stream.transport
                return Hello(stream, packet, tls=False, served=None)
            else:
                raise ProtocolViolation("unsupported or repeated encryption request")

    async def _tls_hello(self, tls: TlsConfig, *, direct: bool) -> Hello:
        stream = await _accept(self.loop, self.sock, tls)
        self.transport = stream.transport
        assert self.transport is not None
        sslobj = self.transport.get_extra_info("ssl_object")
        if direct and (sslobj is None or sslobj.selected_alpn_protocol() != ALPN):
            raise ConnectionClosed  # PG17 refuses direct SSL without ALPN too: it proves the client meant Postgres
        packet = await stream.read_startup()
        if not isinstance(packet, StartupMessage | CancelRequest):  # SSLRequest/GSSENCRequest inside TLS
            raise ProtocolViolation("unsupported or repeated encryption request")
        return Hello(stream, packet, tls=True, served=tls.served(sslobj), direct_ssl=direct)

    async def fail(self, message: str) -> None:
        data = codec.error_response(message)
        if self.transport is not None:
            self.transport.write(data)
            self.transport.close()
        elif self.sock.fileno() != -1:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), 1)
            self.sock.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        elif self.sock.fileno() != -1:
            self.sock.close()


async def _accept(loop: asyncio.AbstractEventLoop, sock: socket.socket, tls: TlsConfig | None) -> MessageStream:
    """Wrap the accepted socket in a transport (TLS when `tls`) feeding a MessageStream.

    The stream is taken from our factory, not from the return value: uvloop returns its internal
    SSLProtocol there instead of ours."""
    stream = MessageStream()
    if tls is None:
        await loop.connect_accepted_socket(lambda: stream, sock)
    else:
        local = sock.getsockname()
        address = local[0] if local else None
        ctx = tls.cached(address)
        if ctx is None:  # an endpoint address's first connection: its certificate is signed off the loop
            assert address is not None
            ctx = tls.remember(address, await asyncio.to_thread(tls.issue, address))
        await loop.connect_accepted_socket(lambda: stream, sock, ssl=ctx, ssl_handshake_timeout=10)
    return stream


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def _read_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ConnectionClosed
        buf += chunk
    return bytes(buf)


async def _read_raw_packet(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> object:
    length = codec.startup_packet_length(await _read_exactly(loop, sock, 4))
    return codec.parse_startup_packet(await _read_exactly(loop, sock, length - 4))

"""Postgres over WebSocket (the serverless driver's `Pool` and `Client`): a bridge into a proxy `Session`.

Each WebSocket is joined to one end of a `socketpair`; the proxy serves the other end as an
ordinary session in its tunnel flavour (`session.Tunnel`): no TLS inside (SSLRequest gets 'N'),
a cleartext password request (the driver pipelines startup, password and first query in one
burst; the session reads one message at a time and keeps what follows), the WebSocket client's
IP for the plaintext policy, throttling and the proxy's caps on unauthenticated connections (a
refused one reads the proxy's ErrorResponse, then the end), and the endpoint named by `?address=`
or `Host`.
Binary frames carry the byte stream with arbitrary boundaries; a text frame ends the connection
(reference/neon-proxy.md §6.2); each chunk the session writes becomes one binary frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

from starlette.websockets import WebSocket, WebSocketDisconnect

from argon.proxy.routing import endpoint_from_host
from argon.proxy.server import ProxyServer
from argon.proxy.session import Tunnel

log = logging.getLogger(__name__)

_READ = 64 * 1024
TEXT_FRAME = 1003  # close code: unsupported data


def tunnel_endpoint(address: str | None, host: str | None, domain: str | None,
                    addresses: Mapping[str, str] | None = None) -> str | None:
    """The endpoint the outer request names: `?address=<host>:<port>` (set by the driver when
    `wsProxy` is a string) first, then the Host header. With `addresses`: only an endpoint's own
    address counts (ADR 0031; it routes after `options`, as on the Postgres port)."""
    for name in (address, host):
        if name:
            hostname = urlsplit("//" + name).hostname
            endpoint = addresses.get(hostname or "") if addresses is not None else endpoint_from_host(hostname, domain)
            if endpoint is not None:
                return endpoint
    return None


async def serve(ws: WebSocket, proxy: ProxyServer) -> None:
    """Accept the WebSocket and relay it to a proxy session until either side ends."""
    peer_ip = ws.client.host if ws.client else ""
    endpoint = tunnel_endpoint(ws.query_params.get("address"), ws.headers.get("host"), proxy.ctx.domain)
    by_address = None if endpoint is not None else \
        tunnel_endpoint(ws.query_params.get("address"), ws.headers.get("host"), None, proxy.address_routes)
    await ws.accept()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    session = proxy.serve_tunnel(theirs, peer_ip, Tunnel(endpoint, secure=ws.url.scheme == "wss"),
                                 address_endpoint=by_address)
    try:
        reader, writer = await asyncio.open_connection(sock=ours)
    except BaseException:
        ours.close()
        if session is not None:
            session.cancel()
        raise
    up = asyncio.ensure_future(_client_to_session(ws, writer))
    down = asyncio.ensure_future(_session_to_client(reader, ws))
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if up.done() and up.result() == TEXT_FRAME:
            down.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await down  # after the client's EOF the session finishes (and flushes) by itself
    finally:
        for task in (up, down):
            task.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await ws.close()


async def _client_to_session(ws: WebSocket, writer: asyncio.StreamWriter) -> int:
    """Frames -> session bytes. Returns 1000 at the client's close, TEXT_FRAME after a text frame."""
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("bytes")
            if data is None:
                log.debug("WebSocket client sent a text frame; closing")
                writer.close()
                with contextlib.suppress(Exception):
                    await ws.close(TEXT_FRAME)
                return TEXT_FRAME
            writer.write(data)
            await writer.drain()
    except (WebSocketDisconnect, ConnectionError, RuntimeError):
        pass
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()  # the session sees EOF; the relay then closes the compute side
    return 1000


async def _session_to_client(reader: asyncio.StreamReader, ws: WebSocket) -> None:
    try:
        while True:
            data = await reader.read(_READ)
            if not data:
                break
            await ws.send_bytes(data)
    except (WebSocketDisconnect, ConnectionError, RuntimeError):
        pass

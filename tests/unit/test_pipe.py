"""The Python relay (`argon.proxy.pipe`) on real sockets: a backend's last words reach the client
even when the client's next message reaches the relay first."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from argon.proxy.activity import SessionActivity
from argon.proxy.pipe import Relay

_BODY = b"SFATAL\0C57P01\0Mterminating connection due to administrator command\0\0"
FATAL = b"E" + struct.pack("!I", 4 + len(_BODY)) + _BODY
QUERY = b"Q" + struct.pack("!I", 4 + 9) + b"SELECT 1\0"


async def _relay_with_a_closed_backend() -> bytes:
    loop = asyncio.get_running_loop()
    app, proxy_client = socket.socketpair()
    proxy_compute, backend = socket.socketpair()
    client, _ = await loop.create_connection(asyncio.Protocol, sock=proxy_client)
    compute, _ = await loop.create_connection(asyncio.Protocol, sock=proxy_compute)
    relay = Relay(client, compute, SessionActivity("ep-test"))
    relay.start()
    # The order that lost the FATAL: the relay handles the client's query before it reads the
    # compute, whose backend has already answered and gone.
    compute.pause_reading()
    backend.sendall(FATAL)
    backend.close()
    app.sendall(QUERY)
    await asyncio.wait_for(relay.done, 5)
    app.settimeout(5)
    received = b""
    while chunk := app.recv(4096):
        received += chunk
    app.close()
    return received


def test_a_backends_fatal_reaches_the_client_when_its_query_came_first() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pytest.skip("uvloop is not installed")
    assert uvloop.run(_relay_with_a_closed_backend()) == FATAL
    assert asyncio.run(_relay_with_a_closed_backend()) == FATAL

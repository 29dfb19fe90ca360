"""The Postgres listener: owns the socket, accepts, and runs one `Session` task per client.

The listening socket is ours (not `loop.create_server`) because TLS negotiation must look at the
first byte before any transport exists (see `handshake`). `stop()` closes the listener, then every
session (handshakes and relays alike) and waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from typing import Literal

from argon.proxy.activity import ActivityRegistry
from argon.proxy.cancel import CancelMap
from argon.proxy.control_client import ControlClient
from argon.proxy.native import make_relays
from argon.proxy.session import Session, SessionContext, Tunnel
from argon.proxy.throttle import PasswordChecks, Throttle
from argon.proxy.tls import TlsConfig

log = logging.getLogger(__name__)

PlaintextPolicy = Literal["loopback", "always", "never"]
RelayMode = Literal["auto", "native", "python"]


class ProxyServer:
    def __init__(self, *, host: str, port: int, control: ControlClient, activity: ActivityRegistry,
                 tls: TlsConfig | None, server_secret: bytes, plaintext: PlaintextPolicy = "loopback",
                 domain: str | None = None, forward_all_params: bool = False,
                 throttle: Throttle | None = None, relay: RelayMode = "auto") -> None:
        if plaintext not in ("loopback", "always", "never"):
            raise ValueError(f"plaintext must be loopback, always or never, not {plaintext!r}")
        if relay not in ("auto", "native", "python"):
            raise ValueError(f"relay must be auto, native or python, not {relay!r}")
        self.relay_mode = relay
        self.host = host
        self._requested_port = port
        self.cancels = CancelMap()
        self.ctx = SessionContext(control=control, activity=activity, tls=tls, server_secret=server_secret,
                                  plaintext=plaintext, domain=domain.lower().rstrip(".") if domain else None,
                                  forward_all_params=forward_all_params, cancels=self.cancels,
                                  throttle=throttle or Throttle(), password_checks=PasswordChecks())
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._sock is None:
            return self._requested_port
        return int(self._sock.getsockname()[1])

    @property
    def relay_name(self) -> str:
        """What relays plaintext sessions after login: "native" (the C thread) or "python"."""
        return "native" if self.ctx.relays is not None else "python"

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    async def start(self) -> None:
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.host or None, self._requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and address[0] == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack
            sock.bind(address)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.ctx.relays = make_relays(self.relay_mode)
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(), name="proxy-accept")
        tls = "TLS" if self.ctx.tls is not None else "no TLS"
        log.info("Postgres proxy listening on %s:%d (%s, plaintext %s, %s relay)", self.host, self.port, tls,
                 self.ctx.plaintext, self.relay_name)

    async def stop(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._sock is not None:
            self._sock.close()
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.wait(list(self._sessions), timeout=10)
        if self.ctx.relays is not None:
            self.ctx.relays.close()
            self.ctx.relays = None
        self.ctx.password_checks.close()

    def serve_tunnel(self, sock: socket.socket, peer_ip: str, tunnel: Tunnel) -> asyncio.Task[None]:
        """Serve a socket bridged from another transport (a WebSocket) as a session; `stop()` ends it too."""
        task = asyncio.get_running_loop().create_task(Session(self.ctx, sock, peer_ip, tunnel).run())
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)
        return task

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, peer = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE / ENFILE / ENOBUFS: back off instead of spinning
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept failed (%s); retrying in 100 ms", exc.strerror)
                    await asyncio.sleep(0.1)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(Session(self.ctx, conn, str(peer[0])).run())
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)

"""The Postgres listeners: own the sockets, accept, admit, and run one `Session` task per client.

The listening socket is ours (not `loop.create_server`) because TLS negotiation must look at the
first byte before any transport exists (see `handshake`). `stop()` closes the listeners, then every
session (handshakes and relays alike) and waits for them.

Admission (`Limits`), because anyone can reach this port and every connection costs a descriptor
in the one process that also serves the API and the control plane:
- connections that have not authenticated yet are capped per client (an IPv4 address or an IPv6
  /64) and in all, and each has one short deadline for everything before authentication;
- all sessions together stay within a descriptor budget: the soft RLIMIT_NOFILE (raised to the
  hard limit at start, `platform.raise_fd_limit`) minus a reserve for the API, the control plane
  and the computes' files;
- a client over its own cap gets one ErrorResponse and is closed at once, without being read; when
  the global cap or the budget is reached, the stranger that has waited longest is dropped to make
  room (a real client authenticates in milliseconds: under a flood the oldest is the flood's), and
  only when there is none to drop is the new connection refused.
An `accept()` that fails never ends the loop: EMFILE/ENFILE back off, anything else is logged.

Endpoint addresses (ADR 0031): where endpoint names do not resolve, each endpoint has loopback
addresses of its own (`serve_addresses`), each a listener on the proxy's port whose connections are
routed to that endpoint when they name none themselves (no SNI, no `options=endpoint=`). A proxy that
listens on every address already receives them and only routes; no address beyond loopback is ever
bound. Listeners count against the descriptor budget.

The internal listener is a Unix socket in a private 0700 directory, for the platform's own
connections (SQL over HTTP's backends): authenticated by one-time tokens (`auth.InternalTokens`),
never counted as strangers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import resource
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from argon.errors import ConfigError
from argon.proxy.activity import ActivityRegistry
from argon.proxy.auth import Credentials
from argon.proxy.cancel import CancelMap
from argon.proxy.control_client import ControlClient
from argon.proxy.native import TLS_AVAILABLE, make_relays
from argon.proxy.pooler import Pooler, pooler_engine
from argon.proxy.session import PRE_AUTH_TIMEOUT, Session, SessionContext, Tunnel
from argon.proxy.throttle import PasswordChecks, Throttle, client_key
from argon.proxy.tls import TlsConfig
from argon.telemetry import Telemetry
from argon.wire import codec

log = logging.getLogger(__name__)

PlaintextPolicy = Literal["loopback", "always", "never"]
RelayMode = Literal["auto", "native", "python"]

# Postgres' own text when it cannot take another connection (SQLSTATE 53300 there; XX000 here, as
# every proxy-made error): what libpq users recognise.
TOO_MANY_CLIENTS = "sorry, too many clients already"
_RETRY_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN, errno.EPERM})
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_SESSION_FDS = 2  # a client socket and its compute connection
_TUNNEL_FDS = 3  # the bridged end, the bridge's own end and the compute connection
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Limits:
    """What the proxy admits. Defaults fit a small machine; `fd_reserve` is kept for everything else."""

    max_unauthenticated: int | None = None  # None: a quarter of the descriptor budget, at most 4096
    max_unauthenticated_per_client: int = 64  # an IPv4 address or an IPv6 /64
    pre_auth_timeout: float = PRE_AUTH_TIMEOUT
    fd_reserve: int = 256


def fd_budget(reserve: int) -> int:
    """Descriptors the proxy's sessions may use: the soft limit now, less `reserve`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(64, soft - reserve)


class ProxyServer:
    def __init__(self, *, host: str, port: int, control: ControlClient, activity: ActivityRegistry,
                 tls: TlsConfig | None, server_secret: bytes, plaintext: PlaintextPolicy = "loopback",
                 domain: str | None = None, forward_all_params: bool = False,
                 throttle: Throttle | None = None, relay: RelayMode = "auto", limits: Limits | None = None,
                 internal_socket: bool = True, telemetry: Telemetry | None = None,
                 pooler: dict[str, Any] | None = None) -> None:
        if plaintext not in ("loopback", "always", "never"):
            raise ValueError(f"plaintext must be loopback, always or never, not {plaintext!r}")
        if relay not in ("auto", "native", "python"):
            raise ValueError(f"relay must be auto, native or python, not {relay!r}")
        self.relay_mode = relay
        self.host = host
        self._requested_port = port
        self.limits = limits or Limits()
        self.cancels = CancelMap()
        self.ctx = SessionContext(control=control, activity=activity, tls=tls, server_secret=server_secret,
                                  plaintext=plaintext, domain=domain.lower().rstrip(".") if domain else None,
                                  forward_all_params=forward_all_params, cancels=self.cancels,
                                  throttle=throttle or Throttle(), password_checks=PasswordChecks(),
                                  pre_auth_timeout=self.limits.pre_auth_timeout,
                                  telemetry=telemetry or Telemetry())
        self._want_internal = internal_socket
        self._pooler_options = pooler or {}  # Pooler keyword arguments (pool_size, max_clients: tests, benchmarks)
        self._sock: socket.socket | None = None
        self._internal: socket.socket | None = None
        self.internal_dir: str | None = None  # where the internal socket is (libpq's `host`), once started
        self._tasks: list[asyncio.Task[None]] = []
        self._sessions: set[asyncio.Task[None]] = set()
        self._unauthenticated: Counter[str] = Counter()  # client key -> connections not yet authenticated
        self._strangers = 0
        self._fds = 0  # descriptors held by sessions (estimated per kind of session)
        self._relay_fds = 0  # one more per session where the Python relay relays (see `start`)
        self.fd_budget = 0
        self.refused: Counter[str] = Counter()  # why connections were refused (tests, logs)
        self.evicted: Counter[str] = Counter()  # why waiting strangers were dropped to make room
        self._by_age: dict[Session, asyncio.Task[None]] = {}  # unauthenticated sessions, oldest first
        self.max_unauthenticated = 0  # set at start (from the limits and the descriptor budget)
        self._last_refusal_log = 0.0
        self._address_routes: dict[str, str] = {}  # an endpoint's own address -> the endpoint id it names
        self._endpoint_addresses: dict[str, tuple[str, ...]] = {}  # endpoint id -> its addresses
        self._address_socks: dict[str, tuple[socket.socket, asyncio.Task[None]]] = {}

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
    def accepting(self) -> bool:
        """Listening, with the accept loop running (what /readyz asks)."""
        return self._sock is not None and any(t.get_name() == "proxy-accept" and not t.done() for t in self._tasks)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    @property
    def unauthenticated(self) -> int:
        return self._strangers

    @property
    def address_routes(self) -> Mapping[str, str]:
        """Each endpoint address served -> the endpoint id it names (read-only; the HTTP paths route by it)."""
        return self._address_routes

    @property
    def address_listeners(self) -> int:
        """Listening sockets on endpoints' own addresses (ADR 0031)."""
        return len(self._address_socks)

    @property
    def _listens_everywhere(self) -> bool:
        return self.host in ("", "0.0.0.0", "::")

    def serve_addresses(self, endpoint_id: str, routes: Mapping[str, str] | None) -> None:
        """Serve an endpoint's own loopback addresses, `address -> the endpoint id a connection there
        names` (the direct and the `-pooler` one); None or empty: serve them no more. Each is bound on
        the proxy's port once the proxy has started (at once when it has). An address that cannot be
        bound (another program holds it) is logged; the endpoint's other forms still work."""
        routes = routes or {}
        for address in routes:
            if not ipaddress.ip_address(address).is_loopback:
                raise ValueError(f"an endpoint address must be a loopback address, not {address!r}")
        for address in self._endpoint_addresses.pop(endpoint_id, ()):
            if address in routes:
                continue  # still this endpoint's: its listener stays
            self._address_routes.pop(address, None)
            entry = self._address_socks.pop(address, None)
            if entry is not None:
                entry[1].cancel()  # the task closes the socket once its accept is unregistered
        if not routes:
            return
        self._endpoint_addresses[endpoint_id] = tuple(routes)
        for address, label in routes.items():
            self._address_routes[address] = label
            if self._sock is not None:
                self._listen_on_address(address)

    def _listen_on_address(self, address: str) -> None:
        if self._listens_everywhere or address in self._address_socks:
            return
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.warning("cannot listen on %s:%d for endpoint %s (%s): its connection strings with that address "
                        "fail; those naming it by option or SNI still work", address, self.port,
                        self._address_routes.get(address), exc.strerror or exc)
            return

        async def serve() -> None:
            try:
                await self._accept_loop(sock, internal=False)
            finally:
                sock.close()

        task = asyncio.get_running_loop().create_task(serve(), name="proxy-accept-address")
        self._address_socks[address] = (sock, task)

    @property
    def pooled_fds(self) -> int:
        """Descriptors held by the transaction pooler: its clients and its server connections."""
        pooler = self.ctx.pooler
        return 0 if pooler is None else pooler.clients + pooler.servers

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host or None, self._requested_port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
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
        self.fd_budget = fd_budget(self.limits.fd_reserve)
        self.max_unauthenticated = self.limits.max_unauthenticated or max(64, min(4096, self.fd_budget // 4))
        self.ctx.relays = make_relays(self.relay_mode)
        # `pipe.Relay` keeps a duplicate of the compute's socket (to pass on a backend's last message):
        # it relays every session without the C thread, and TLS sessions where the C side cannot drive TLS.
        self._relay_fds = int(self.ctx.relays is None or (self.ctx.tls is not None and not TLS_AVAILABLE))
        self.ctx.pooler = Pooler(control=self.ctx.control, activity=self.ctx.activity, cancels=self.cancels,
                                 engine=pooler_engine(self.relay_mode), **self._pooler_options)
        self._tasks.append(loop.create_task(self._accept_loop(sock, internal=False), name="proxy-accept"))
        for address in list(self._address_routes):
            self._listen_on_address(address)
        if self._want_internal:
            self._start_internal()
        tls = "TLS" if self.ctx.tls is not None else "no TLS"
        log.info("Postgres proxy listening on %s:%d (%s, plaintext %s, %s relay; at most %d unauthenticated "
                 "connections, %d per client, %.0f s to authenticate; descriptors for sessions: %d)",
                 self.host, self.port, tls, self.ctx.plaintext, self.relay_name, self.max_unauthenticated,
                 self.limits.max_unauthenticated_per_client, self.limits.pre_auth_timeout, self.fd_budget)

    def _start_internal(self) -> None:
        base = tempfile.gettempdir()
        if len(base) + 40 > _MAX_SOCKET_PATH:
            base = "/tmp"
        directory = tempfile.mkdtemp(prefix="argon-px-", dir=base)  # 0700, ours alone
        path = os.path.join(directory, f".s.PGSQL.{self.port}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(256)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            shutil.rmtree(directory, ignore_errors=True)
            raise ConfigError(f"cannot create the proxy's internal socket in {directory}: {exc.strerror or exc}. "
                              "Point TMPDIR at a writable directory with a short path") from None
        self._internal = sock
        self.internal_dir = directory
        self._tasks.append(asyncio.get_running_loop().create_task(self._accept_loop(sock, internal=True),
                                                                  name="proxy-accept-internal"))

    def issue_token(self, creds: Credentials) -> str:
        """A one-time password for a connection on the internal socket standing for `creds`."""
        return self.ctx.auth.tokens.issue(creds)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        addresses = [task for _, task in self._address_socks.values()]
        self._address_socks.clear()
        for task in addresses:
            task.cancel()
        for task in addresses:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in (self._sock, self._internal):
            if sock is not None:
                sock.close()
        self._sock = None  # no endpoint address is bound after this
        if self.internal_dir is not None:
            shutil.rmtree(self.internal_dir, ignore_errors=True)
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.wait(list(self._sessions), timeout=10)
        if self.ctx.pooler is not None:
            await self.ctx.pooler.close()
            self.ctx.pooler = None
        if self.ctx.relays is not None:
            self.ctx.relays.close()
            self.ctx.relays = None
        self.ctx.auth.close()
        self.ctx.password_checks.close()

    def serve_tunnel(self, sock: socket.socket, peer_ip: str, tunnel: Tunnel,
                     address_endpoint: str | None = None) -> asyncio.Task[None] | None:
        """Serve a socket bridged from another transport (a WebSocket) as a session; `stop()` ends it too.
        None when the connection was refused (it got an ErrorResponse and was closed).
        `address_endpoint`: the endpoint whose own address the outer request named (ADR 0031)."""
        return self._admit(sock, peer_ip, tunnel, _TUNNEL_FDS, address_endpoint)

    def _admit(self, sock: socket.socket, peer_ip: str, tunnel: Tunnel | None, fds: int,
               address_endpoint: str | None = None) -> asyncio.Task[None] | None:
        internal = tunnel is not None and tunnel.internal
        key = client_key(peer_ip)
        if not internal:
            if self._unauthenticated[key] >= self.limits.max_unauthenticated_per_client:
                return self._refuse(sock, peer_ip, "unauthenticated connections per client")
            if self._strangers >= self.max_unauthenticated:
                self._evict_oldest_stranger("unauthenticated connections")
        fds += self._relay_fds
        held = self._fds + self.pooled_fds + len(self._address_socks)
        if held + fds > self.fd_budget and not self._evict_oldest_stranger("descriptor budget"):
            return self._refuse(sock, peer_ip, "descriptor budget")
        if not internal:
            self._strangers += 1
            self._unauthenticated[key] += 1

        def authenticated() -> None:
            self._by_age.pop(session, None)
            if internal:
                return
            self._strangers -= 1
            self._unauthenticated[key] -= 1
            if not self._unauthenticated[key]:
                del self._unauthenticated[key]

        self._fds += fds
        try:
            session = Session(self.ctx, sock, peer_ip, tunnel, on_authenticated=authenticated,
                              address_endpoint=address_endpoint)
            task = asyncio.get_running_loop().create_task(session.run())
        except BaseException:
            self._fds -= fds
            if not internal:
                self._strangers -= 1
                self._unauthenticated[key] -= 1
            sock.close()
            raise
        self._sessions.add(task)
        if not internal:
            self._by_age[session] = task

        def done(t: asyncio.Task[None]) -> None:
            self._sessions.discard(t)
            self._fds -= fds

        task.add_done_callback(done)
        return task

    def _evict_oldest_stranger(self, why: str) -> bool:
        """Make room by dropping the connection that has waited longest without authenticating: a
        real client authenticates in milliseconds, so under a flood the oldest is the attacker's.
        False when there is no stranger to drop."""
        if not self._by_age:
            return False
        session, task = next(iter(self._by_age.items()))
        session.release_slot()  # counted out now; the task ends at the loop's next turn
        task.cancel()
        self.evicted[why] += 1
        self._log_refusals(session.peer_ip, f"{why} (dropped the oldest)")
        return True

    def _refuse(self, sock: socket.socket, peer_ip: str, why: str) -> None:
        self.refused[why] += 1
        with contextlib.suppress(OSError):
            sock.send(codec.error_response(TOO_MANY_CLIENTS))  # best effort, never waits
        sock.close()
        self._log_refusals(peer_ip, why)
        return None

    def _log_refusals(self, peer_ip: str, why: str) -> None:
        now = time.monotonic()
        if now - self._last_refusal_log > 10:  # at most one line per 10 s, with the totals
            self._last_refusal_log = now
            log.warning("connection limits reached (latest from %s: too many %s); refused so far: %s, "
                        "dropped so far: %s", peer_ip or "?", why, dict(self.refused), dict(self.evicted))

    def _endpoint_at(self, conn: socket.socket) -> str | None:
        """The endpoint whose own address `conn` arrived on, if any."""
        if not self._address_routes:
            return None
        try:
            local = str(conn.getsockname()[0])
        except OSError:
            return None
        return self._address_routes.get(local.removeprefix("::ffff:"))

    async def _accept(self, listener: socket.socket) -> tuple[socket.socket, tuple[str, int] | str]:
        return await asyncio.get_running_loop().sock_accept(listener)  # type: ignore[return-value]

    async def _accept_loop(self, listener: socket.socket, *, internal: bool) -> None:
        backoff = 0.01
        while True:
            try:
                conn, peer = await self._accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if exc.errno in _RETRY_ERRNOS:
                    continue
                if exc.errno in _RESOURCE_ERRNOS:  # out of descriptors or memory: let sessions end first
                    log.warning("accept failed (%s); retrying in %.0f ms", exc.strerror, backoff * 1000)
                else:
                    log.error("accept failed unexpectedly (%r); retrying in %.0f ms", exc, backoff * 1000)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            except Exception:
                log.exception("accept failed unexpectedly; retrying in %.0f ms", backoff * 1000)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.01
            try:
                conn.setblocking(False)
                if internal:
                    self._admit(conn, "internal", Tunnel(None, secure=True, internal=True), _TUNNEL_FDS)
                else:
                    with contextlib.suppress(OSError):
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._admit(conn, str(peer[0]), None, _SESSION_FDS, self._endpoint_at(conn))
            except Exception:
                log.exception("admitting a connection failed")
                conn.close()

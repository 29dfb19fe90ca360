"""One client connection: negotiate -> route -> authenticate -> wake -> log into the compute -> relay.

Every proxy-made error is one ErrorResponse (S=ERROR, C=XX000, Neon's text) and a close; nothing
internal reaches the client. The compute login uses the client's ClientKey (pass-through): the
compute's ParameterStatus and NoticeResponse messages are forwarded, its BackendKeyData is replaced
by the proxy's own cancel key. One log line per session end (endpoint, duration, bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from argon import logs
from argon.errors import ArgonError
from argon.proxy import backend, routing
from argon.proxy.activity import ActivityRegistry, SessionActivity
from argon.proxy.auth import (
    AuthContext,
    AuthFailed,
    Credentials,
    authenticate,
    recheck_password,
)
from argon.proxy.backend import CANNOT_CONNECT, ComputeRejected
from argon.proxy.cancel import CancelMap, CancelTarget
from argon.proxy.control_client import ComputeAddress, ControlClient
from argon.proxy.handshake import ConnectionClosed, MessageStream, negotiate
from argon.proxy.native import NativeRelays, NativeSession
from argon.proxy.pipe import Relay
from argon.proxy.throttle import PasswordChecks, Throttle, Throttled
from argon.proxy.tls import ServedCert, TlsConfig
from argon.telemetry import Telemetry
from argon.wire import codec, scram
from argon.wire.codec import CancelRequest, ProtocolViolation, StartupMessage

if TYPE_CHECKING:
    from argon.proxy.pooler import Pooler

log = logging.getLogger(__name__)

# One deadline for everything before authentication (TLS, startup packet, the whole exchange, the
# throttle's waits): a client that has not proven itself by then is dropped ("Authentication timed
# out" once the exchange began). Neon allows 15 s for the handshake and 15 s more for SCRAM; a
# silent connection costs a descriptor, so ours is one shorter budget.
PRE_AUTH_TIMEOUT = 10.0
# Before authentication a client sends a TLS handshake, a startup packet and SCRAM messages: a few
# KiB. TLS records that carry no data (KeyUpdate requests: 27 bytes, two key derivations each) can
# cost the loop seconds of CPU per MiB, so until the client has proven itself its socket takes
# little per read and a client that has sent more than this in all is dropped.
PRE_AUTH_MAX_BYTES = 256 << 10
PRE_AUTH_RCVBUF = 16 << 10  # the kernel doubles it: at most ~32 KiB of records per read
AUTHENTICATED_RCVBUF = 1 << 20  # back to a size that does not limit a bulk COPY (autotuning is off now)
_BYTES_CHECK_INTERVAL = 0.1
CONNECT_ATTEMPTS = 5
CONNECT_TIMEOUT = 10.0  # per compute login (socket + SCRAM + greeting)
INSECURE = "connection is insecure (try using `sslmode=require`)"
_RETRY_SQLSTATES = frozenset({"57P03"})  # the database system is starting up / shutting down


@dataclass
class SessionContext:
    """What every session shares (built once by `ProxyServer`)."""

    control: ControlClient
    activity: ActivityRegistry
    tls: TlsConfig | None
    server_secret: bytes
    plaintext: Literal["loopback", "always", "never"]
    domain: str | None
    forward_all_params: bool
    cancels: CancelMap
    throttle: Throttle
    password_checks: PasswordChecks
    relays: NativeRelays | None = None  # the C relay thread, when it runs
    pre_auth_timeout: float = PRE_AUTH_TIMEOUT
    telemetry: Telemetry = field(default_factory=Telemetry)
    pooler: Pooler | None = None  # the transaction pooler behind `-pooler` hosts (ADR 0017)

    def __post_init__(self) -> None:
        self.auth = AuthContext(self.control, self.server_secret, self.throttle, self.password_checks)


@dataclass
class ComputeLogin:
    stream: MessageStream
    greeting: bytes  # ParameterStatus/NoticeResponse ... BackendKeyData(proxy key) ... ReadyForQuery
    cancel_key: tuple[int, int]


@dataclass(frozen=True)
class Tunnel:
    """A session whose Postgres bytes arrive inside another transport (a WebSocket, `websocket.py`).

    There is no TLS inside: SSLRequest gets 'N', the password is asked in cleartext, and `secure`
    (the outer transport was TLS) stands in for TLS in the plaintext policy. `endpoint_id` is what
    the outer transport named (Host header, `?address=`): it routes like SNI."""

    endpoint_id: str | None
    secure: bool
    internal: bool = False  # the proxy's internal socket: the password is a token (`auth.InternalTokens`)


@functools.lru_cache(maxsize=4096)  # asked at every plaintext login
def plaintext_allowed(policy: str, peer_ip: str) -> bool:
    if policy == "always":
        return True
    if policy == "never":
        return False
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback
    return False


def login_outcome(exc: BaseException) -> str:
    """The `outcome` label of a login that raised `exc` (argon_proxy_logins_total)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, Throttled):
        return "throttled"
    if isinstance(exc, AuthFailed):
        return "failed"
    if isinstance(exc, ProtocolViolation):
        return "protocol_error"
    if isinstance(exc, (ConnectionClosed, ConnectionError, OSError, asyncio.CancelledError)):
        return "abandoned"
    return "error"


def _frame(msg_type: str, payload: bytes) -> bytes:
    return msg_type.encode() + struct.pack("!I", len(payload) + 4) + payload


def bytes_received(sock: socket.socket) -> int:
    """What the kernel has received on a TCP socket in all (`tcpi_bytes_received`, Linux 4.1+); 0 if unknown."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return 0
    return struct.unpack_from("=Q", info, 128)[0] if len(info) >= 136 else 0


class Session:
    """`on_authenticated` is called once, when the client has proven itself (or at the end, if it
    never does): the server counts unauthenticated connections with it."""

    def __init__(self, ctx: SessionContext, sock: socket.socket, peer_ip: str, tunnel: Tunnel | None = None,
                 on_authenticated: Callable[[], None] | None = None, address_endpoint: str | None = None) -> None:
        self.ctx = ctx
        self.sock = sock
        self.peer_ip = peer_ip
        self.tunnel = tunnel
        self.address_endpoint = address_endpoint  # the endpoint whose own address this arrived on (ADR 0031)
        self.started = time.monotonic()
        self.endpoint_id: str | None = None
        self._on_authenticated = on_authenticated
        # Up to a quarter earlier at random: connections a flood opened together do not all expire
        # (and come back) in the same instant, which would stall the loop for everyone at once.
        self._deadline = asyncio.get_running_loop().time() + ctx.pre_auth_timeout * (1 - random.random() / 4)
        self._byte_guard: asyncio.TimerHandle | None = None

    def _authenticated(self) -> None:
        callback, self._on_authenticated = self._on_authenticated, None
        if callback is not None:
            callback()
        guard, self._byte_guard = self._byte_guard, None
        if guard is not None:
            guard.cancel()
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, AUTHENTICATED_RCVBUF)

    def _guard_bytes(self) -> None:
        """Bound what a TCP client may send before it authenticates (`PRE_AUTH_MAX_BYTES`): a timer
        looks every `_BYTES_CHECK_INTERVAL` (a timer, not a task: a login costs the loop less)."""
        self._byte_guard = None
        if self.tunnel is not None or self.sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PRE_AUTH_RCVBUF)
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def look() -> None:
            received = bytes_received(self.sock)
            if received > PRE_AUTH_MAX_BYTES:
                self._byte_guard = None
                log.warning("dropped %s: it sent %d bytes without authenticating", self.peer_ip, received)
                task.cancel()
                return
            self._byte_guard = loop.call_later(_BYTES_CHECK_INTERVAL, look)

        self._byte_guard = loop.call_later(_BYTES_CHECK_INTERVAL, look)

    def release_slot(self) -> None:
        """Stop counting this connection as unauthenticated (the server is dropping it)."""
        self._authenticated()

    async def run(self) -> None:
        stream: MessageStream | None = None
        logs.bind(client_addr=self.peer_ip)  # this task's own context: every line it writes names the client
        self._guard_bytes()
        try:
            tunnel = self.tunnel
            async with asyncio.timeout_at(self._deadline):
                hello = await negotiate(self.sock, None if tunnel else self.ctx.tls)
            stream = hello.stream
            if isinstance(hello.packet, CancelRequest):
                await self.ctx.cancels.cancel(hello.packet.pid, hello.packet.secret)
                return
            secure = hello.tls or (tunnel is not None and tunnel.secure)
            if self.ctx.tls is not None and not secure and not plaintext_allowed(self.ctx.plaintext, self.peer_ip):
                self.ctx.telemetry.logins.labels("insecure").inc()
                raise AuthFailed(INSECURE)
            await self._serve(stream, hello.packet, hello.served)
        except (TimeoutError, ConnectionClosed, ConnectionError, OSError) as exc:
            log.debug("connection from %s closed during the handshake: %r", self.peer_ip, exc)
        except (ArgonError, ProtocolViolation) as exc:
            log.debug("connection from %s refused: %s", self.peer_ip, exc.user_message)
            if stream is not None:
                self._fail(stream, exc.user_message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("proxy session from %s failed", self.peer_ip)
            if stream is not None:
                self._fail(stream, "Internal error")
        finally:
            self._authenticated()
            if stream is not None and stream.transport is not None:
                stream.transport.close()

    @staticmethod
    def _fail(stream: MessageStream, message: str, pending: bytes = b"") -> None:
        stream.write(pending + codec.error_response(message))
        if stream.transport is not None:
            stream.transport.close()

    async def _serve(self, stream: MessageStream, startup: StartupMessage, served: ServedCert | None) -> None:
        ctx = self.ctx
        if startup.minor > 0 or startup.unsupported_options:
            stream.write(codec.negotiate_protocol_version(0, list(startup.unsupported_options)))
        tunnel = self.tunnel
        route = routing.resolve(startup.params, served.server_name if served else None, ctx.domain,
                                host_endpoint=tunnel.endpoint_id if tunnel else None,
                                address_endpoint=self.address_endpoint)
        logs.bind(endpoint_id=route.endpoint_id)
        try:
            async with asyncio.timeout_at(self._deadline):
                creds = await authenticate(ctx.auth, stream, route, served, self.peer_ip,
                                           cleartext=tunnel is not None, internal=tunnel is not None and tunnel.internal)
        except BaseException as exc:
            ctx.telemetry.logins.labels(login_outcome(exc)).inc()
            if isinstance(exc, TimeoutError):
                raise AuthFailed("Authentication timed out") from None
            raise
        self._authenticated()
        endpoint_id = creds.route.endpoint_id
        assert endpoint_id is not None and creds.route.compute_id is not None
        self.endpoint_id = endpoint_id
        if creds.route.pooler and ctx.pooler is not None and not (tunnel is not None and tunnel.internal):
            try:
                await ctx.pooler.serve(stream, startup, creds)
            except ArgonError as exc:
                ctx.telemetry.logins.labels("compute_error").inc()
                self._fail(stream, exc.user_message, creds.pending)
                log.info("pooled session for %s@%s from %s failed: %s", creds.route.user, endpoint_id, self.peer_ip,
                         exc.user_message)
                return
            ctx.telemetry.logins.labels("success").inc()
            return
        activity = ctx.activity.open(creds.route.compute_id)
        activity.in_query = True  # logging in counts as busy: no suspend under our feet
        login: ComputeLogin | None = None
        try:
            try:
                login = await self._connect(startup, creds)
            except ArgonError as exc:
                ctx.telemetry.logins.labels("compute_error").inc()
                self._fail(stream, exc.user_message, creds.pending)
                log.info("session for %s@%s from %s failed: %s", creds.route.user, endpoint_id, self.peer_ip,
                         exc.user_message)
                return
            ctx.telemetry.logins.labels("success").inc()
            activity.in_query = False
            activity.last_activity = time.monotonic()
            relay = await self._relay(stream, login, creds.pending + login.greeting, activity)
            try:
                await relay.done
            finally:
                relay.close()
                if isinstance(relay, NativeSession):  # the C thread's totals counted its bytes as they passed
                    ctx.telemetry.session_ended(time.monotonic() - self.started)
                else:
                    ctx.telemetry.session_ended(time.monotonic() - self.started, relay.bytes_from_client,
                                                relay.bytes_from_compute)
                log.info("session ended: endpoint=%s user=%s peer=%s duration=%.1fs bytes_in=%d bytes_out=%d",
                         endpoint_id, creds.route.user, self.peer_ip, time.monotonic() - self.started,
                         relay.bytes_from_client, relay.bytes_from_compute)
        finally:
            if login is not None:
                ctx.cancels.unregister(login.cancel_key)
                if login.stream.transport is not None:
                    login.stream.transport.close()
            ctx.activity.close(activity)

    async def _relay(self, stream: MessageStream, login: ComputeLogin, greeting: bytes,
                     activity: SessionActivity) -> Relay | NativeSession:
        """Start relaying: on the C thread when it runs and can take both sockets, else in Python."""
        relays = self.ctx.relays
        client, compute = stream.transport, login.stream.transport
        assert client is not None and compute is not None
        if relays is not None and not stream.lost and not login.stream.lost:
            native = await relays.take_over(client, compute, to_compute=stream.detach(),
                                            to_client=greeting + login.stream.detach(), activity=activity,
                                            client_released=stream.released)
            if native is not None:
                return native
        stream.write(greeting)
        relay = Relay(client, compute, activity)  # type: ignore[arg-type]
        relay.start(stream.detach(), login.stream.detach(), client_lost=stream.lost,
                    compute_lost=login.stream.lost)
        return relay

    async def _connect(self, startup: StartupMessage, creds: Credentials) -> ComputeLogin:
        """Wake, connect and log in, retrying while the compute is (re)starting; ArgonError for the client."""
        ctx = self.ctx
        endpoint_id = creds.route.endpoint_id
        assert endpoint_id is not None
        params = codec.filter_startup_params(startup.params, forward_all=ctx.forward_all_params)
        password_retry = True
        delay = 0.05
        compute_id = creds.route.compute_id
        assert compute_id is not None
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            address = await self._wake(compute_id)
            try:
                return await asyncio.wait_for(self._login(address.socket_path, params, creds), CONNECT_TIMEOUT)
            except (ConnectionRefusedError, FileNotFoundError, ConnectionClosed, ConnectionResetError) as exc:
                log.debug("compute of %s not reachable (attempt %d): %r", endpoint_id, attempt, exc)
            except TimeoutError:
                log.warning("compute login on %s timed out", endpoint_id)
                raise ArgonError(CANNOT_CONNECT) from None
            except ComputeRejected as exc:
                if exc.sqlstate == "28P01" and password_retry:
                    password_retry = False
                    refreshed = await self._refreshed(creds)
                    if refreshed is not None:
                        creds = refreshed
                        continue
                if exc.sqlstate not in _RETRY_SQLSTATES:
                    log.info("compute %s rejected %s: %s %s", endpoint_id, creds.route.user, exc.sqlstate, exc.message)
                    raise ArgonError(exc.message) from None
            except scram.ScramError:
                log.warning("compute %s failed SCRAM server verification", endpoint_id)
                raise ArgonError(CANNOT_CONNECT) from None
            if attempt < CONNECT_ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 2
        raise ArgonError(CANNOT_CONNECT)

    async def _refreshed(self, creds: Credentials) -> Credentials | None:
        """After the compute refused keys the proxy accepted: re-read the verifier and retry once if
        that can help (same verifier now, or a new one the known cleartext password matches)."""
        compute_id = creds.route.compute_id
        assert compute_id is not None
        try:
            text = await self.ctx.control.refresh_role_secret(compute_id, creds.route.user)
        except Exception:
            log.debug("verifier refresh failed", exc_info=True)
            return None
        if text is None:
            return None
        if text == creds.secret:
            return creds
        return await recheck_password(self.ctx.auth, creds, text)

    async def _wake(self, compute_id: str) -> ComputeAddress:
        self.ctx.activity.touch(compute_id)
        try:
            return await self.ctx.control.wake(compute_id)
        except ArgonError:
            raise
        except Exception:
            log.exception("waking %s failed", compute_id)
            raise ArgonError("Control plane request failed") from None

    async def _login(self, socket_path: str, params: dict[str, str], creds: Credentials) -> ComputeLogin:
        login = await backend.login(socket_path, params, creds.client_key, creds.server_key)
        key = self.ctx.cancels.register(CancelTarget(socket_path, *login.backend_key))
        greeting = b"".join(login.messages) + codec.backend_key_data(*key) + _frame("Z", login.status)
        return ComputeLogin(login.stream, greeting, key)

"""Client authentication at the proxy: SCRAM-SHA-256(-PLUS), or a cleartext password for the hack.

The proxy checks the client itself against the role's stored verifier, so a wrong password never
wakes a compute, and an unknown endpoint or role runs the same exchange against a mock secret
(salt derived from the server secret): the three cases are indistinguishable, in their answer and
in their timing (a failure is answered first; the verifier is refreshed afterwards, in the
background). A verifier that asks for more than `scram.MAX_ITERATIONS` is treated like a missing
one (the tenant chose it; checking it would cost the platform minutes of CPU), and the operator's
log says why, once. On success the proxy keeps (ClientKey, ServerKey) to log into the compute
(pass-through, design §4) and *queues* SASLFinal + AuthenticationOk: they go out together with the
compute's greeting, or with the error if the wake fails. Every check passes the `Throttle` first;
PBKDF2 (cleartext path) runs in the fair thread pool, never on the loop.

The platform's own connections (SQL over HTTP's backends) arrive on the proxy's internal socket
with a one-time token for credentials already checked (`InternalTokens`): no second PBKDF2.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field, replace

from argon.errors import UserError
from argon.model import ip_allowed
from argon.proxy.control_client import ControlClient
from argon.proxy.handshake import MessageStream
from argon.proxy.routing import Route, parse_password_hack
from argon.proxy.throttle import PasswordChecks, Throttle
from argon.proxy.tls import ServedCert
from argon.wire import codec, scram
from argon.wire.codec import ProtocolViolation

log = logging.getLogger(__name__)

PASSWORD_MESSAGE = "p"
TOKEN_TTL = 60.0  # seconds an internal token may wait for its connection
_MAX_REMEMBERED = 10_000  # warned-about verifiers, refreshes in flight


class AuthFailed(UserError):
    """The client is told `user_message` (then the connection closes)."""


def password_failed(user: str) -> AuthFailed:
    return AuthFailed(f"password authentication failed for user '{user}'")


def check_access(ctx: AuthContext, route: Route, peer_ip: str) -> None:
    """The project's IP allow-list, once the endpoint is known and before any secret is looked up or
    compute woken (Neon's order); every path passes here: TCP and TLS, the pooled host, the
    password hack, WebSockets and SQL over HTTP. Neon's text, but pointing at Argon's setting."""
    assert route.compute_id is not None
    if not ip_allowed(ctx.control.allowed_ips(route.compute_id), peer_ip):
        log.info("refused %s on %s: not in the project's allowed_ips", peer_ip, route.endpoint_id)
        raise AuthFailed(f"This IP address {peer_ip} is not allowed to connect to this endpoint. Please add it to "
                         "the project's allowed IPs (settings.allowed_ips). Make sure to check for IPv4 or IPv6 "
                         "addresses.")


@dataclass
class Credentials:
    """A client proven to know the role's password, as the compute login needs it."""

    route: Route  # endpoint_id is set
    secret: str  # the verifier it was checked against
    client_key: bytes
    server_key: bytes
    password: str | None  # known only on the cleartext path (lets a refreshed verifier be re-checked)
    pending: bytes  # SASLFinal + AuthenticationOk, flushed with the compute's greeting


class InternalTokens:
    """One-time passwords for the platform's own connections to the proxy's internal socket.

    SQL over HTTP checks a request's password itself, then opens its backend connection with a
    token standing for those credentials: the proxy asks that connection for a cleartext password
    and takes the token, so no PBKDF2 runs twice, and none on the event loop in libpq."""

    def __init__(self, ttl: float = TOKEN_TTL) -> None:
        self.ttl = ttl
        self._tokens: dict[str, tuple[float, Credentials]] = {}

    def issue(self, creds: Credentials) -> str:
        now = time.monotonic()
        for token in [t for t, (expires, _) in self._tokens.items() if expires < now]:
            del self._tokens[token]
        token = "argon-internal-" + secrets.token_urlsafe(32)
        self._tokens[token] = (now + self.ttl, creds)
        return token

    def take(self, token: str, route: Route) -> Credentials | None:
        """The credentials a token stands for, once, if it is fresh and was issued for this route."""
        entry = self._tokens.pop(token, None)
        if entry is None or entry[0] < time.monotonic():
            return None
        creds = entry[1]
        if (creds.route.compute_id, creds.route.user) != (route.compute_id, route.user):
            return None
        return replace(creds, route=route)


@dataclass(frozen=True)
class AuthContext:
    control: ControlClient
    server_secret: bytes
    throttle: Throttle
    password_checks: PasswordChecks
    tokens: InternalTokens = field(default_factory=InternalTokens)
    _warned: set[tuple[str, str, str]] = field(default_factory=set)
    _refreshing: dict[tuple[str, str], asyncio.Task[None]] = field(default_factory=dict)

    def warn_once(self, endpoint_id: str, user: str, why: str) -> None:
        """Log a verifier problem once per (endpoint, role, reason): never the verifier itself."""
        key = (endpoint_id, user, why)
        if key in self._warned:
            return
        if len(self._warned) >= _MAX_REMEMBERED:
            self._warned.clear()
        self._warned.add(key)
        log.warning("the verifier of role %s on %s %s: its logins fail (as with a wrong password) until its "
                    "password is set again", user, endpoint_id, why)

    def refresh_later(self, endpoint_id: str, user: str) -> None:
        """Re-read the verifier in the background (one refresh per role at a time): the next attempt
        sees a password changed through SQL, and this answer does not wait for it."""
        key = (endpoint_id, user)
        if key in self._refreshing or len(self._refreshing) >= _MAX_REMEMBERED:
            return
        task = asyncio.get_running_loop().create_task(self._refresh(endpoint_id, user))
        self._refreshing[key] = task
        task.add_done_callback(lambda _: self._refreshing.pop(key, None))

    async def _refresh(self, endpoint_id: str, user: str) -> None:
        try:
            await self.control.refresh_role_secret(endpoint_id, user)
        except Exception:
            log.debug("refreshing the verifier of %s on %s failed", user, endpoint_id, exc_info=True)

    def close(self) -> None:
        for task in list(self._refreshing.values()):
            task.cancel()


async def authenticate(ctx: AuthContext, stream: MessageStream, route: Route, served: ServedCert | None,
                       peer_ip: str, *, cleartext: bool = False, internal: bool = False) -> Credentials:
    """Run the exchange; raises AuthFailed (or ProtocolViolation, Throttled) with the text for the client.

    `cleartext` asks for the password itself even when the endpoint is known (WebSocket clients:
    one round trip, and the serverless driver pipelines its password behind the startup packet).
    `internal`: the proxy's internal socket, where the password is a token from `InternalTokens`."""
    if internal:
        return await _token(ctx, stream, route)
    if route.endpoint_id is None or cleartext:
        return await _cleartext(ctx, stream, route, peer_ip)
    return await _scram(ctx, stream, route, served, peer_ip)


async def _secret(ctx: AuthContext, route: Route) -> tuple[scram.ScramSecret, str | None]:
    """The role's verifier, or a mock one when the endpoint or role is unknown or the verifier unusable."""
    endpoint_id, user = route.endpoint_id, route.user
    assert endpoint_id is not None and route.compute_id is not None
    text = await ctx.control.get_role_secret(route.compute_id, user)
    if text:
        try:
            secret = scram.ScramSecret.parse(text)
        except ValueError:
            ctx.warn_once(endpoint_id, user, "is not a SCRAM-SHA-256 verifier")
        else:
            if secret.usable:
                return secret, text
            ctx.warn_once(endpoint_id, user, f"asks for {secret.iterations} PBKDF2 iterations, more than the "
                                             f"{scram.MAX_ITERATIONS} the platform computes")
    return scram.mock_secret(ctx.server_secret, endpoint_id, user), None


async def _read_password_message(stream: MessageStream) -> bytes:
    msg_type, payload = await stream.read_message(codec.MAX_AUTH_MESSAGE)
    if msg_type != PASSWORD_MESSAGE:
        raise ProtocolViolation("authentication protocol violation")
    return payload


async def _scram(ctx: AuthContext, stream: MessageStream, route: Route, served: ServedCert | None,
                 peer_ip: str) -> Credentials:
    assert route.endpoint_id is not None and route.compute_id is not None
    check_access(ctx, route, peer_ip)
    secret, text = await _secret(ctx, route)
    binding = served.end_point if served is not None else None
    server = scram.ScramServer(secret, channel_binding=binding, mock=text is None)
    stream.write(codec.auth_sasl(server.mechanisms))
    try:
        mechanism, data = codec.parse_sasl_initial_response(await _read_password_message(stream))
        stream.write(codec.auth_sasl_continue(server.client_first(mechanism, data)))
        final_message = codec.parse_sasl_response(await _read_password_message(stream))
    except scram.ScramError as exc:
        raise AuthFailed(exc.user_message) from None
    async with ctx.throttle.attempt(peer_ip, route.compute_id, route.user):
        try:
            final = server.client_final(final_message)
        except scram.ScramError as exc:
            if not _is_wrong_password(exc):
                raise AuthFailed(exc.user_message) from None
            await _failed(ctx, route, peer_ip)
            raise password_failed(route.user) from None
        if text is not None:
            ctx.throttle.record_success(peer_ip, route.compute_id, route.user)
    client_key = server.client_key
    if text is None or client_key is None:  # cannot happen: a mock exchange never succeeds
        raise password_failed(route.user)
    return Credentials(route, text, client_key, secret.server_key, None,
                       codec.auth_sasl_final(final) + codec.auth_ok())


def _is_wrong_password(exc: scram.ScramError) -> bool:
    return "password authentication failed" in exc.user_message


async def _cleartext(ctx: AuthContext, stream: MessageStream, route: Route, peer_ip: str) -> Credentials:
    stream.write(codec.auth_cleartext_password())
    password = codec.parse_password_message(await _read_password_message(stream))
    if route.endpoint_id is None:
        endpoint_id, password = parse_password_hack(password)
        route = route.with_endpoint(endpoint_id)
    return await check_password(ctx, route, password, peer_ip)


async def _token(ctx: AuthContext, stream: MessageStream, route: Route) -> Credentials:
    stream.write(codec.auth_cleartext_password())
    token = codec.parse_password_message(await _read_password_message(stream))
    creds = ctx.tokens.take(token, route) if route.endpoint_id is not None else None
    if creds is None:
        log.warning("a connection on the internal socket for %s@%s had no valid token", route.user, route.endpoint_id)
        raise password_failed(route.user)
    return creds


async def check_password(ctx: AuthContext, route: Route, password: str, peer_ip: str) -> Credentials:
    """A cleartext password against the role's verifier (SQL over HTTP checks every request this way)."""
    assert route.endpoint_id is not None and route.compute_id is not None
    check_access(ctx, route, peer_ip)
    secret, text = await _secret(ctx, route)
    async with ctx.throttle.attempt(peer_ip, route.compute_id, route.user):
        client_key = await ctx.password_checks.run(route.compute_id, scram.derive_client_key, secret, password)
        if client_key is None or text is None:
            await _failed(ctx, route, peer_ip)
            raise password_failed(route.user)
        ctx.throttle.record_success(peer_ip, route.compute_id, route.user)
    return Credentials(route, text, client_key, secret.server_key, password, codec.auth_ok())


async def recheck_password(ctx: AuthContext, creds: Credentials, text: str) -> Credentials | None:
    """Credentials against a refreshed verifier, when the password is known (cleartext path)."""
    if creds.password is None or creds.route.compute_id is None:
        return None
    try:
        secret = scram.ScramSecret.parse(text)
    except ValueError:
        return None
    if not secret.usable:
        return None
    client_key = await ctx.password_checks.run(creds.route.compute_id, scram.derive_client_key, secret,
                                               creds.password)
    if client_key is None:
        return None
    return Credentials(creds.route, text, client_key, secret.server_key, creds.password, creds.pending)


async def _failed(ctx: AuthContext, route: Route, peer_ip: str) -> None:
    """A wrong password: count it, hold the answer for the throttle's penalty (the attempt keeps its
    places meanwhile), and refresh the verifier afterwards, in the background."""
    assert route.endpoint_id is not None and route.compute_id is not None
    delay = ctx.throttle.record_failure(peer_ip, route.compute_id, route.user)
    # The client cannot tell an unknown endpoint from a wrong password (no enumeration); the operator can.
    why = "" if ctx.control.endpoint_exists(route.compute_id) else " (no such endpoint)"
    log.info("password authentication failed for role %s on %s%s from %s%s", route.user, route.endpoint_id, why,
             peer_ip, f" (throttled {delay:.2f} s)" if delay else "")
    if delay:
        await asyncio.sleep(delay)
    ctx.refresh_later(route.compute_id, route.user)

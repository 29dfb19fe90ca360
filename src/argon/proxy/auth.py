"""Client authentication at the proxy: SCRAM-SHA-256(-PLUS), or a cleartext password for the hack.

The proxy checks the client itself against the role's stored verifier, so a wrong password never
wakes a compute, and an unknown endpoint or role runs the same exchange against a mock secret
(salt derived from the server secret): the three cases are indistinguishable. On success it keeps
(ClientKey, ServerKey) to log into the compute (pass-through, design §4) and *queues*
SASLFinal + AuthenticationOk: they go out together with the compute's greeting, or with the
error if the wake fails. PBKDF2 (cleartext path) runs in a bounded thread pool, never on the loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from argon.errors import UserError
from argon.proxy.control_client import ControlClient
from argon.proxy.handshake import MessageStream
from argon.proxy.routing import Route, parse_password_hack
from argon.proxy.throttle import PasswordChecks, Throttle
from argon.proxy.tls import ServedCert
from argon.wire import codec, scram
from argon.wire.codec import ProtocolViolation

log = logging.getLogger(__name__)

AUTH_TIMEOUT = 15.0
PASSWORD_MESSAGE = "p"


class AuthFailed(UserError):
    """The client is told `user_message` (then the connection closes)."""


def password_failed(user: str) -> AuthFailed:
    return AuthFailed(f"password authentication failed for user '{user}'")


@dataclass
class Credentials:
    """A client proven to know the role's password, as the compute login needs it."""

    route: Route  # endpoint_id is set
    secret: str  # the verifier it was checked against
    client_key: bytes
    server_key: bytes
    password: str | None  # known only on the cleartext path (lets a refreshed verifier be re-checked)
    pending: bytes  # SASLFinal + AuthenticationOk, flushed with the compute's greeting


@dataclass(frozen=True)
class AuthContext:
    control: ControlClient
    server_secret: bytes
    throttle: Throttle
    password_checks: PasswordChecks


async def authenticate(ctx: AuthContext, stream: MessageStream, route: Route, served: ServedCert | None,
                       peer_ip: str, *, cleartext: bool = False) -> Credentials:
    """Run the exchange; raises AuthFailed (or ProtocolViolation) with the text for the client.

    `cleartext` asks for the password itself even when the endpoint is known (WebSocket clients:
    one round trip, and the serverless driver pipelines its password behind the startup packet)."""
    if route.endpoint_id is None or cleartext:
        return await _cleartext(ctx, stream, route, peer_ip)
    return await _scram(ctx, stream, route, served, peer_ip)


async def _secret(ctx: AuthContext, endpoint_id: str, user: str) -> tuple[scram.ScramSecret, str | None]:
    """The role's verifier, or a mock one when the endpoint or role is unknown (or the secret unusable)."""
    text = await ctx.control.get_role_secret(endpoint_id, user)
    if text:
        try:
            return scram.ScramSecret.parse(text), text
        except Exception:
            log.warning("unusable verifier for role %s on %s (not SCRAM-SHA-256?)", user, endpoint_id)
    return scram.mock_secret(ctx.server_secret, endpoint_id, user), None


async def _read_password_message(stream: MessageStream) -> bytes:
    msg_type, payload = await stream.read_message(codec.MAX_AUTH_MESSAGE)
    if msg_type != PASSWORD_MESSAGE:
        raise ProtocolViolation("authentication protocol violation")
    return payload


async def _scram(ctx: AuthContext, stream: MessageStream, route: Route, served: ServedCert | None,
                 peer_ip: str) -> Credentials:
    assert route.endpoint_id is not None
    secret, text = await _secret(ctx, route.endpoint_id, route.user)
    binding = served.end_point if served is not None else None
    server = scram.ScramServer(secret, channel_binding=binding, mock=text is None)
    stream.write(codec.auth_sasl(server.mechanisms))
    try:
        mechanism, data = codec.parse_sasl_initial_response(await _read_password_message(stream))
        stream.write(codec.auth_sasl_continue(server.client_first(mechanism, data)))
        final = server.client_final(codec.parse_sasl_response(await _read_password_message(stream)))
    except scram.ScramError as exc:
        if not _is_wrong_password(exc):
            raise AuthFailed(exc.user_message) from None
        await _failed(ctx, route, peer_ip)
        raise password_failed(route.user) from None
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


async def check_password(ctx: AuthContext, route: Route, password: str, peer_ip: str) -> Credentials:
    """A cleartext password against the role's verifier (SQL over HTTP checks every request this way)."""
    assert route.endpoint_id is not None
    secret, text = await _secret(ctx, route.endpoint_id, route.user)
    client_key = await ctx.password_checks.run(scram.derive_client_key, secret, password)
    if client_key is None or text is None:
        await _failed(ctx, route, peer_ip)
        raise password_failed(route.user)
    return Credentials(route, text, client_key, secret.server_key, password, codec.auth_ok())


async def recheck_password(ctx: AuthContext, creds: Credentials, text: str) -> Credentials | None:
    """Credentials against a refreshed verifier, when the password is known (cleartext path)."""
    if creds.password is None:
        return None
    try:
        secret = scram.ScramSecret.parse(text)
    except Exception:
        return None
    client_key = await ctx.password_checks.run(scram.derive_client_key, secret, creds.password)
    if client_key is None:
        return None
    return Credentials(creds.route, text, client_key, secret.server_key, creds.password, creds.pending)


async def _failed(ctx: AuthContext, route: Route, peer_ip: str) -> None:
    """A wrong password: count it, pick up a verifier changed through SQL, wait, then answer."""
    assert route.endpoint_id is not None and route.compute_id is not None
    ctx.throttle.record_failure(peer_ip, route.compute_id, route.user)
    delay = ctx.throttle.delay(peer_ip, route.compute_id, route.user)
    # The client cannot tell an unknown endpoint from a wrong password (no enumeration); the operator can.
    why = "" if ctx.control.endpoint_exists(route.endpoint_id) else " (no such endpoint)"
    log.info("password authentication failed for role %s on %s%s from %s%s", route.user, route.endpoint_id, why,
             peer_ip, f" (throttled {delay:.2f} s)" if delay else "")
    refresh = asyncio.ensure_future(ctx.control.refresh_role_secret(route.endpoint_id, route.user))
    if delay:
        await asyncio.sleep(delay)
    try:
        await refresh  # the next attempt sees a password changed through SQL; SCRAM cannot retry mid-exchange
    except Exception:
        log.debug("refreshing the verifier of %s on %s failed", route.user, route.endpoint_id, exc_info=True)

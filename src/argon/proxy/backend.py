"""Logging into a compute as a client whose password the proxy never saw (ClientKey pass-through).

Used by direct sessions (`session.Session`) and by the transaction pooler's server connections
(`pooler`): a Unix-socket connection to the compute, a StartupMessage, SCRAM-SHA-256 with the
(ClientKey, ServerKey) pair recovered from a client's proof (`scram.ClientKeyAuth`), then the
compute's greeting up to ReadyForQuery. What the caller makes of the greeting (its own cancel key,
a pool's kept parameters) is its business.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass

from argon.errors import ArgonError
from argon.proxy.handshake import MessageStream
from argon.wire import codec, scram

log = logging.getLogger(__name__)

CANNOT_CONNECT = "Couldn't connect to compute node"
MAX_BACKEND_MESSAGE = 1 << 20


class ComputeRejected(Exception):
    """The compute answered the login with an ErrorResponse."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", ""))
        self.sqlstate = fields.get("C", "")
        self.message = fields.get("M", "") or CANNOT_CONNECT


@dataclass
class BackendLogin:
    stream: MessageStream
    messages: list[bytes]  # ParameterStatus and NoticeResponse frames, in order
    parameters: list[tuple[str, str]]  # the ParameterStatus values among them
    backend_key: tuple[int, int]  # the compute's own BackendKeyData
    status: bytes  # ReadyForQuery's transaction status


def _frame(msg_type: str, payload: bytes) -> bytes:
    return msg_type.encode() + struct.pack("!I", len(payload) + 4) + payload


async def login(socket_path: str, params: dict[str, str], client_key: bytes, server_key: bytes) -> BackendLogin:
    """Connect and log in; the stream is the caller's once this returns. Raises ComputeRejected,
    scram.ScramError, ArgonError (an unsupported method) or a connection error."""
    loop = asyncio.get_running_loop()
    transport, stream = await loop.create_unix_connection(MessageStream, socket_path)
    try:
        return await _exchange(stream, params, client_key, server_key)
    except BaseException:
        transport.abort()
        raise


async def _exchange(stream: MessageStream, params: dict[str, str], client_key: bytes,
                    server_key: bytes) -> BackendLogin:
    stream.write(codec.startup_message(params))
    client = scram.ClientKeyAuth(client_key, server_key)
    messages: list[bytes] = []
    parameters: list[tuple[str, str]] = []
    real_key: tuple[int, int] | None = None
    while True:
        msg_type, payload = await stream.read_message(MAX_BACKEND_MESSAGE)
        if msg_type == "R":
            code, rest = codec.parse_authentication(payload)
            if code == 10:
                stream.write(codec.sasl_initial_response(client.mechanism, client.client_first()))
            elif code == 11:
                stream.write(codec.sasl_response(client.client_final(rest)))
            elif code == 12:
                client.verify_server_final(rest)
            elif code != 0:
                log.warning("compute asked for authentication method %d; only SCRAM is supported", code)
                raise ArgonError(CANNOT_CONNECT)
        elif msg_type == "E":
            raise ComputeRejected(codec.parse_error_fields(payload))
        elif msg_type in ("S", "N"):
            messages.append(_frame(msg_type, payload))
            if msg_type == "S":
                name, _, rest = payload.partition(b"\0")
                parameters.append((name.decode("utf-8", "replace"), rest.split(b"\0", 1)[0].decode("utf-8", "replace")))
        elif msg_type == "K":
            real_key = codec.parse_backend_key_data(payload)
        elif msg_type == "Z":
            if real_key is None:
                raise ArgonError(CANNOT_CONNECT)
            return BackendLogin(stream, messages, parameters, real_key, payload)
        # anything else before ReadyForQuery (NegotiateProtocolVersion...) is not for the client


async def show(stream: MessageStream, setting: str) -> str | None:
    """`SHOW <setting>` on a logged-in, idle connection (a simple query; None if it fails)."""
    stream.write(codec.frame(b"Q", f"SHOW {setting}".encode() + b"\0"))
    value: str | None = None
    while True:
        msg_type, payload = await stream.read_message(MAX_BACKEND_MESSAGE)
        if msg_type == "D" and len(payload) >= 6:
            (length,) = struct.unpack_from("!i", payload, 2)
            if length >= 0:
                value = payload[6:6 + length].decode("utf-8", "replace")
        elif msg_type == "Z":
            return value

"""PostgreSQL protocol 3.0 framing: pure functions over bytes, no I/O.

The proxy speaks just enough of the protocol to stand in front of a compute: it reads a client's
first packet (SSLRequest, GSSENCRequest, CancelRequest or the StartupMessage) and the
authentication messages, writes its own (ErrorResponse, Authentication*, BackendKeyData,
NegotiateProtocolVersion), and plays a client towards the compute. After login it only relays
bytes, so nothing here knows about queries.

The proxy meets arbitrary bytes from the internet: every parser raises `ProtocolViolation` (with
a text fit for the client, Postgres' wording where Postgres has one) on malformed input, never
IndexError, struct.error or UnicodeDecodeError. The encoders trust their (proxy-made) arguments.

Startup parameters also live here: the `options` splitting rules Postgres applies, the
`endpoint=<id>` routing word Neon clients put there, and which parameters may reach a compute.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3_0 = 3 << 16
MAX_STARTUP_PACKET = 10000  # Postgres' MAX_STARTUP_PACKET_LENGTH
MAX_AUTH_MESSAGE = 8192  # a PasswordMessage / SASL response; real ones are a few hundred bytes
MIN_CANCEL_KEY, MAX_CANCEL_KEY = 4, 256  # protocol 3.2 lengthened cancel keys to up to 256 bytes

_i32 = struct.Struct("!i")
_u32 = struct.Struct("!I")
_LAYOUT = "invalid startup packet layout: expected terminator as last byte"


class ProtocolViolation(Exception):
    """Malformed protocol input; `user_message` is what the client is told before the close."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.user_message = message


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    secret: int  # the key's bytes as a big-endian integer (4 bytes in 3.0, up to 256 in 3.2)


@dataclass(frozen=True)
class StartupMessage:
    major: int
    minor: int
    params: dict[str, str]
    unsupported_options: tuple[str, ...] = ()  # `_pq_.*` protocol options: we implement none


# Startup packets ----------------------------------------------------------------------------------


def startup_packet_length(header4: bytes) -> int:
    """The length word of a startup packet (it counts itself), within Postgres' limits."""
    if len(header4) != 4:
        raise ProtocolViolation("invalid length of startup packet")
    (length,) = _i32.unpack(header4)
    if not 8 <= length <= MAX_STARTUP_PACKET:
        raise ProtocolViolation("invalid length of startup packet")
    return length


def parse_startup_packet(body: bytes) -> SSLRequest | GSSENCRequest | CancelRequest | StartupMessage:
    """The first packet of a connection, without its length word."""
    if len(body) < 4:
        raise ProtocolViolation("invalid length of startup packet")
    (code,) = _u32.unpack_from(body)
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if len(body) != 4:
            raise ProtocolViolation("invalid length of startup packet")
        return SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        return _parse_cancel(body[4:])
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolViolation(f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")
    params, unsupported = _parse_startup_params(body[4:])
    return StartupMessage(major, minor, params, unsupported)


def _parse_cancel(data: bytes) -> CancelRequest:
    if not 4 + MIN_CANCEL_KEY <= len(data) <= 4 + MAX_CANCEL_KEY:
        raise ProtocolViolation("invalid length of cancel request packet")
    (pid,) = _u32.unpack_from(data)
    return CancelRequest(pid, int.from_bytes(data[4:], "big"))


def _parse_startup_params(data: bytes) -> tuple[dict[str, str], tuple[str, ...]]:
    """`name\\0value\\0 ... \\0`: the pairs, `_pq_.*` protocol options set apart."""
    if data == b"\0":
        return {}, ()
    fields = data[:-2].split(b"\0")  # the last value's terminator and the list's own go first
    if not data.endswith(b"\0\0") or len(fields) % 2:
        raise ProtocolViolation(_LAYOUT)
    params: dict[str, str] = {}
    unsupported: list[str] = []
    for raw_name, raw_value in zip(fields[::2], fields[1::2], strict=True):
        if not raw_name:  # an empty name ends the list in Postgres: anything after it is garbage
            raise ProtocolViolation(_LAYOUT)
        name, value = _utf8(raw_name, "startup packet"), _utf8(raw_value, "startup packet")
        if name in params or name in unsupported:
            raise ProtocolViolation(f'duplicate startup parameter "{name}"')
        if name.startswith("_pq_."):
            unsupported.append(name)
        else:
            params[name] = value
    return params, tuple(unsupported)


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ProtocolViolation(f'invalid byte sequence for encoding "UTF8" in {where}') from None


# Regular messages ---------------------------------------------------------------------------------


def message_header(header5: bytes, *, max_length: int) -> tuple[str, int]:
    """(type, payload length) of a message header: a type byte and a length that counts itself."""
    if len(header5) != 5:
        raise ProtocolViolation("invalid message length")
    (length,) = _i32.unpack_from(header5, 1)
    if length < 4 or length - 4 > max_length:
        raise ProtocolViolation("invalid message length")
    return chr(header5[0]), length - 4


def frame(msg_type: bytes, payload: bytes = b"") -> bytes:
    """A complete message: type byte, Int32 length (counting itself), payload."""
    return msg_type + _u32.pack(len(payload) + 4) + payload


def _cstr(text: str) -> bytes:
    if "\0" in text:
        raise ValueError("a protocol string cannot contain NUL")
    return text.encode() + b"\0"


def _key_bytes(secret: int) -> bytes:
    """A cancel key as big-endian bytes: 4 of them (protocol 3.0) unless the key is longer (3.2)."""
    return secret.to_bytes(max(MIN_CANCEL_KEY, (secret.bit_length() + 7) // 8), "big")


# Encoders: backend messages -----------------------------------------------------------------------


def error_response(message: str, code: str = "XX000", severity: str = "ERROR") -> bytes:
    """ErrorResponse with S, V (non-localized severity), C and M, as the proxy sends them."""
    message = message.replace("\0", "")
    fields = (b"S", severity), (b"V", severity), (b"C", code), (b"M", message)
    return frame(b"E", b"".join(tag + _cstr(value) for tag, value in fields) + b"\0")


def negotiate_protocol_version(minor: int, options: list[str]) -> bytes:
    """NegotiateProtocolVersion. The first word is the full version (3 << 16 | minor): Postgres
    sends that and libpq 18 checks it, although the documentation says "newest minor version"."""
    payload = _u32.pack(PROTOCOL_3_0 | minor) + _u32.pack(len(options)) + b"".join(_cstr(o) for o in options)
    return frame(b"v", payload)


def _auth(code: int, data: bytes = b"") -> bytes:
    return frame(b"R", _u32.pack(code) + data)


def auth_ok() -> bytes:
    return _auth(0)


def auth_cleartext_password() -> bytes:
    return _auth(3)


def auth_sasl(mechanisms: list[str]) -> bytes:
    return _auth(10, b"".join(_cstr(m) for m in mechanisms) + b"\0")


def auth_sasl_continue(data: bytes) -> bytes:
    return _auth(11, data)


def auth_sasl_final(data: bytes) -> bytes:
    return _auth(12, data)


def backend_key_data(pid: int, secret: int) -> bytes:
    return frame(b"K", _u32.pack(pid) + _key_bytes(secret))


# Encoders: frontend messages ----------------------------------------------------------------------


def ssl_request() -> bytes:
    return _u32.pack(8) + _u32.pack(SSL_REQUEST_CODE)


def startup_message(params: dict[str, str]) -> bytes:
    """A protocol 3.0 StartupMessage (no type byte)."""
    body = _u32.pack(PROTOCOL_3_0) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _u32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: int) -> bytes:
    """A CancelRequest packet (16 bytes for a 3.0 key)."""
    body = _u32.pack(CANCEL_REQUEST_CODE) + _u32.pack(pid) + _key_bytes(secret)
    return _u32.pack(len(body) + 4) + body


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return frame(b"p", _cstr(mechanism) + _i32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return frame(b"p", data)


def password_message(password: str) -> bytes:
    return frame(b"p", _cstr(password))


def terminate() -> bytes:
    return frame(b"X")


# Payload parsers (the payload is what follows the 5-byte header) ----------------------------------


def _take_cstr(payload: bytes, pos: int, what: str) -> tuple[str, int]:
    end = payload.find(b"\0", pos)
    if end < 0:
        raise ProtocolViolation(f"invalid {what} message format")
    return _utf8(payload[pos:end], f"{what} message"), end + 1


def parse_sasl_initial_response(payload: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse: (mechanism, client-first data); a length of -1 means no data."""
    mechanism, pos = _take_cstr(payload, 0, "SASLInitialResponse")
    if len(payload) < pos + 4:
        raise ProtocolViolation("invalid SASLInitialResponse message format")
    (length,) = _i32.unpack_from(payload, pos)
    data = payload[pos + 4:]
    if length != len(data) and not (length == -1 and not data):
        raise ProtocolViolation("invalid SASLInitialResponse message format")
    return mechanism, data


def parse_sasl_response(payload: bytes) -> bytes:
    """SASLResponse: the payload is the mechanism's data, as is."""
    return payload


def parse_password_message(payload: bytes) -> str:
    """PasswordMessage: one NUL-terminated UTF-8 string."""
    if not payload.endswith(b"\0") or payload.count(b"\0") != 1:
        raise ProtocolViolation("invalid password packet size")
    return _utf8(payload[:-1], "password packet")


def parse_authentication(payload: bytes) -> tuple[int, bytes]:
    """An Authentication* message: (code, the rest)."""
    if len(payload) < 4:
        raise ProtocolViolation("invalid authentication request message")
    return _u32.unpack_from(payload)[0], payload[4:]


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields by code (S, C, M, ...); lenient on text encoding."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        end = payload.find(b"\0", pos + 1)
        if end < 0:
            raise ProtocolViolation("invalid error response message format")
        fields[chr(payload[pos])] = payload[pos + 1:end].decode("utf-8", "replace")
        pos = end + 1
    return fields


def parse_backend_key_data(payload: bytes) -> tuple[int, int]:
    """BackendKeyData: (pid, key as a big-endian integer)."""
    if not 4 + MIN_CANCEL_KEY <= len(payload) <= 4 + MAX_CANCEL_KEY:
        raise ProtocolViolation("invalid BackendKeyData message length")
    return _u32.unpack_from(payload)[0], int.from_bytes(payload[4:], "big")


# Startup parameters -------------------------------------------------------------------------------

_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale, which pg_split_opts uses
_ROUTING_WORD = re.compile(r"(endpoint|project)=(.*)", re.S)
_NEON_OPTION = re.compile(r"neon_\w+:.+", re.S)  # Neon's proxy options (`neon_lsn:0/2`): never for Postgres
_GUC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_FALSE = frozenset({"false", "off", "no", "0"})  # `replication=false` is an ordinary connection

# Always forwarded; further names are forwarded when they look like a GUC (Postgres accepts a
# setting of any GUC as a startup parameter).
FORWARDED = frozenset({
    "user", "database", "options", "application_name", "client_encoding", "DateStyle", "TimeZone",
    "extra_float_digits", "IntervalStyle", "search_path", "statement_timeout", "lock_timeout",
    "idle_in_transaction_session_timeout", "standard_conforming_strings", "datestyle", "timezone",
})
# Connection keywords of libpq and drivers that some clients (asyncpg) send as startup parameters:
# they look like GUCs but Postgres refuses them ("unrecognized configuration parameter").
CLIENT_ONLY = frozenset({
    "channel_binding", "sslmode", "sslnegotiation", "sslcompression", "sslcert", "sslkey", "sslkeylogfile",
    "sslpassword", "sslcertmode", "sslrootcert", "sslcrl", "sslcrldir", "sslsni", "ssl", "direct_tls",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "min_protocol_version", "max_protocol_version",
    "require_auth", "requirepeer", "gssencmode", "gsslib", "gssdelegation", "krbsrvname", "host", "hostaddr",
    "port", "dbname", "password", "passfile", "service", "servicefile", "connect_timeout", "keepalives",
    "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout", "target_session_attrs",
    "load_balance_hosts", "fallback_application_name", "scram_client_key", "scram_server_key",
    "server_settings",
})


def split_options(options: str) -> list[str]:
    """Postgres' `pg_split_opts`: ASCII whitespace separates words, a backslash escapes the next
    character. Empty words (a lone trailing backslash) are dropped: they carry nothing."""
    words: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in _SPACE:
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    return words


def join_options(words: list[str]) -> str:
    """The inverse of `split_options`: backslash-escape whitespace and backslashes in each word."""
    return " ".join("".join("\\" + ch if ch in _SPACE or ch == "\\" else ch for ch in word)
                    for word in words if word)


def endpoint_from_options(options: str) -> str | None:
    """The id in an `endpoint=<id>` (or the deprecated `project=<id>`) word of `options`.

    The first `endpoint=` word wins over any `project=` word; None when there is neither.
    """
    found: dict[str, str] = {}
    for word in split_options(options):
        match = _ROUTING_WORD.fullmatch(word)
        if match:
            found.setdefault(match.group(1), match.group(2))
    return found.get("endpoint", found.get("project"))


def is_routing_word(word: str) -> bool:
    """An `options` word meant for the proxy (`endpoint=`, `project=`, `neon_*:`), never for Postgres."""
    return bool(_ROUTING_WORD.fullmatch(word) or _NEON_OPTION.fullmatch(word))


def _strip_routing_words(options: str) -> str:
    """`options` without the words meant for the proxy (`endpoint=`, `project=`, `neon_*:`)."""
    words = split_options(options)
    kept = [w for w in words if not (_ROUTING_WORD.fullmatch(w) or _NEON_OPTION.fullmatch(w))]
    return options if kept == words else join_options(kept)


def _forwardable(name: str) -> bool:
    if name in FORWARDED:
        return True
    return bool(_GUC_NAME.fullmatch(name)) and name.lower() not in CLIENT_ONLY


def filter_startup_params(params: dict[str, str], *, forward_all: bool) -> dict[str, str]:
    """The startup parameters the proxy sends to the compute.

    Always: the routing words leave `options` (dropped when nothing is left) and `_pq_.*` protocol
    options go. Unless `forward_all`: a physical replication connection is refused (a logical one,
    `replication=database`, is what a subscriber opens: Postgres lets in only roles with
    REPLICATION, which the platform gives with logical replication enabled), and only parameters
    Postgres will accept are kept (`FORWARDED`, or a GUC-like name that is no client-side keyword).
    """
    out: dict[str, str] = {}
    for name, value in params.items():
        if name.startswith("_pq_."):
            continue
        if name == "options":
            value = _strip_routing_words(value)
            if not value.strip(_SPACE):
                continue
        elif not forward_all:
            if name == "replication" and value.lower() not in _FALSE and value.lower() != "database":
                raise ProtocolViolation("physical replication connections are not supported; logical replication "
                                        "(replication=database) is")
            if not _forwardable(name):
                continue
        out[name] = value
    return out

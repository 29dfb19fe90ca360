"""What a pooled client may ask for at startup, and the parameters that follow it (ADR 0017).

PgBouncer tracks five parameters per client (`client_encoding`, `DateStyle`, `TimeZone`,
`standard_conforming_strings`, `application_name`): the client's value comes from its startup
packet, then from the `ParameterStatus` messages its own statements cause, and a server connection
is `SET` to it before serving the client when its own value differs. Other startup parameters are
refused with the text Neon's proxy sends for PgBouncer's refusal; `extra_float_digits` is ignored,
as Neon configures PgBouncer (`ignore_startup_parameters`). Pure functions and constants, shared
by both engines (the C one receives the values in this order).
"""

from __future__ import annotations

import struct

from argon.wire import codec

# The tracked parameters, in the order both engines index them, as Postgres reports them.
TRACKED = ("client_encoding", "DateStyle", "TimeZone", "standard_conforming_strings", "application_name")
_INDEX = {name.lower(): i for i, name in enumerate(TRACKED)}
IGNORED = frozenset({"extra_float_digits"})
ROUTING_ONLY = frozenset({"user", "database", "options"})
NEON_HINT = (". Please use unpooled connection or remove this parameter from the startup package. More details: "
             "https://neon.tech/docs/connect/connection-errors#unsupported-startup-parameter")

_u32 = struct.Struct("!I")


class UnsupportedParameter(Exception):
    """A startup parameter the pooled host cannot honour; `user_message` is Neon's text."""

    def __init__(self, name: str, *, in_options: bool = False) -> None:
        where = "unsupported startup parameter in options: " if in_options else "unsupported startup parameter: "
        self.user_message = where + name + NEON_HINT
        super().__init__(self.user_message)


def tracked_index(name: str) -> int | None:
    """The index of a tracked parameter (names are case-insensitive, as GUC names are)."""
    return _INDEX.get(name.lower())


def client_values(params: dict[str, str]) -> dict[int, str]:
    """The tracked values a pooled client asked for, by index; raises `UnsupportedParameter`.

    `options` may hold only the proxy's routing words (already understood by the router) and
    `-c name=value` / `--name=value` settings of tracked parameters."""
    values: dict[int, str] = {}
    for name, value in params.items():
        if name == "options":
            values.update(_from_options(value))
            continue
        if name in ROUTING_ONLY or name in IGNORED or name.startswith("_pq_."):
            continue
        index = tracked_index(name)
        if index is None:
            raise UnsupportedParameter(name)
        values[index] = value
    return values


def _from_options(options: str) -> dict[int, str]:
    words = codec.split_options(options)
    values: dict[int, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if codec.is_routing_word(word):
            continue
        setting: str | None = None
        if word == "-c" and i < len(words):
            setting = words[i]
            i += 1
        elif word.startswith("-c") or word.startswith("--"):
            setting = word[2:]
        if setting is None or "=" not in setting:
            raise UnsupportedParameter(word, in_options=True)
        name, value = setting.split("=", 1)
        index = tracked_index(name.replace("-", "_"))
        if index is None:
            raise UnsupportedParameter(name, in_options=True)
        values[index] = value
    return values


def quote_literal(value: str) -> str:
    """An SQL string literal that means `value` whatever `standard_conforming_strings` says."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def set_query(changes: dict[int, str]) -> bytes:
    """The Query message that sets a server's tracked parameters to a client's values."""
    sql = ";".join(f"SET {TRACKED[i]} TO {quote_literal(v)}" for i, v in sorted(changes.items()))
    return query(sql)


def query(sql: str) -> bytes:
    return codec.frame(b"Q", sql.encode() + b"\0")


def greeting(server_params: list[tuple[str, str]], client: dict[int, str], pending: bytes,
             cancel_key: tuple[int, int]) -> bytes:
    """What a pooled client gets after authenticating: `pending` (SASLFinal, AuthenticationOk),
    the pool's ParameterStatus values with the client's own tracked ones, the proxy's
    BackendKeyData and ReadyForQuery (idle)."""
    parts = [pending]
    seen: set[int] = set()
    for name, value in server_params:
        index = tracked_index(name)
        if index is not None:
            seen.add(index)
            value = client.get(index, value)
        parts.append(parameter_status(name, value))
    for index, value in sorted(client.items()):
        if index not in seen:
            parts.append(parameter_status(TRACKED[index], value))
    parts.append(codec.backend_key_data(*cancel_key))
    parts.append(codec.frame(b"Z", b"I"))
    return b"".join(parts)


def parameter_status(name: str, value: str) -> bytes:
    return codec.frame(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def tracked_from_server(server_params: list[tuple[str, str]]) -> dict[int, str]:
    """The tracked values a server connection reported at login."""
    out: dict[int, str] = {}
    for name, value in server_params:
        index = tracked_index(name)
        if index is not None:
            out[index] = value
    return out

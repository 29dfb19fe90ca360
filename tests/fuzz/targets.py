"""Coverage-guided fuzz targets for the pure codecs that meet untrusted bytes.

`startup`: the first packet of a connection, the authentication messages, the routing of a startup
packet, and the backend messages a (tenant-controlled) compute sends back. `scram`: SCRAM messages
on both sides, verifiers, SASLprep. `sql_json`: `/sql`'s body, connection-string header, batch
headers, and the conversion of result values. Each target may raise only the codec's own errors
(ProtocolViolation, ScramError, HttpSqlError, ArgonError; ValueError where the function documents
it); anything else is a bug.

Run by `tests/unit/test_fuzz.py` (a few seconds each, with the seeds in `tests/fuzz/corpus/<target>`),
or by hand for longer: `python -m tests.fuzz.run startup -max_total_time=600 <new-dir>
tests/fuzz/corpus/startup` (libFuzzer's options; new inputs go to the first directory).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from argon.errors import ArgonError
from argon.proxy import routing
from argon.proxy.serverless import sql_over_http as sql
from argon.wire import codec, scram
from argon.wire.codec import ProtocolViolation

_SECRET = scram.ScramSecret(4096, b"0123456789abcdef", bytes(range(32)), bytes(range(32, 64)))
_BINDING = bytes(32)


def startup(data: bytes) -> None:
    if not data:
        return
    kind, body = data[0] % 5, data[1:]
    try:
        if kind == 0:
            codec.startup_packet_length(body[:4])
            packet = codec.parse_startup_packet(body[4:])
            if isinstance(packet, codec.StartupMessage):
                codec.filter_startup_params(packet.params, forward_all=False)
                codec.filter_startup_params(packet.params, forward_all=True)
                routing.resolve(packet.params, "ep-x.argon.test", "argon.test")
                routing.resolve(packet.params, None, None)
        elif kind == 1:
            codec.message_header(body[:5], max_length=codec.MAX_AUTH_MESSAGE)
        elif kind == 2:
            codec.parse_sasl_initial_response(body)
            codec.parse_sasl_response(body)
        elif kind == 3:
            routing.parse_password_hack(codec.parse_password_message(body))
        else:  # what a compute sends back: tenant-controlled
            codec.parse_authentication(body)
            codec.parse_error_fields(body)
            codec.parse_backend_key_data(body)
    except (ProtocolViolation, ArgonError):
        pass


def scram_messages(data: bytes) -> None:
    if not data:
        return
    flags, body = data[0], data[1:]
    first, _, final = body.partition(b"\0")
    server = scram.ScramServer(_SECRET, channel_binding=_BINDING if flags & 1 else None, mock=bool(flags & 2))
    mechanism = scram.SCRAM_PLUS if flags & 4 else scram.SCRAM
    try:
        server.client_first(mechanism, first)
        server.client_final(final)
    except scram.ScramError:
        pass
    client = scram.ClientKeyAuth(bytes(32), bytes(32))
    client.client_first()
    try:
        client.client_final(first)
        client.verify_server_final(final)
    except scram.ScramError:
        pass
    text = body.decode("utf-8", "replace")
    with contextlib.suppress(ValueError):
        scram.ScramSecret.parse(text)
    scram.saslprep(text)  # every password works: never raises


def sql_json(data: bytes) -> None:
    if not data:
        return
    kind, body = data[0] % 4, data[1:]
    text = body.decode("utf-8", "replace")
    try:
        if kind == 0:
            sql.parse_body(body)
        elif kind == 1:
            sql.parse_connection_string(text, "argon.test")
        elif kind == 2:
            sql.batch_options({sql.BATCH_ISOLATION_LEVEL: text, sql.BATCH_READ_ONLY: text})
        else:
            oid = list(sql.ARRAY_ELEMENT)[body[0] % len(sql.ARRAY_ELEMENT)] if body else sql.JSONB
            for type_oid in (oid, sql.BOOL, sql.INT4, sql.FLOAT8, sql.JSONB, 25):
                sql.convert(text[1:], type_oid, raw=False)
    except sql.HttpSqlError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {"startup": startup, "scram": scram_messages, "sql_json": sql_json}


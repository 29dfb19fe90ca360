"""SQL over HTTP (`POST /sql`), the pure half: Neon's request and response shapes, no I/O.

Facts from reference/neon-proxy.md §5: the `Neon-Connection-String` header names user, password,
database and endpoint; the body is one query or a batch; params become Postgres text (JSON arrays
become array literals); results carry field metadata and rows, converted by type unless
`Neon-Raw-Text-Output: true`; every error is one JSON object with the same 17 keys. The I/O half
(password check, backend pool, execution) is `argon.proxy.serverless.http_sql`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from argon.errors import ArgonError, ErrorKind
from argon.proxy.routing import check_endpoint_id, endpoint_from_host, parse_password_hack
from argon.wire.codec import endpoint_from_options

MAX_REQUEST_BYTES = 10 * 1024 * 1024  # Neon's --sql-over-http-max-request-size-bytes default
MAX_RESPONSE_BYTES = 10 * 1024 * 1024

CONNECTION_STRING = "Neon-Connection-String"
RAW_TEXT_OUTPUT = "Neon-Raw-Text-Output"
ARRAY_MODE = "Neon-Array-Mode"
BATCH_ISOLATION_LEVEL = "Neon-Batch-Isolation-Level"
BATCH_READ_ONLY = "Neon-Batch-Read-Only"
BATCH_DEFERRABLE = "Neon-Batch-Deferrable"

CORS_ORIGIN = {"Access-Control-Allow-Origin": "*"}
PREFLIGHT = {
    "Allow": "OPTIONS, POST",
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "Authorization, Neon-Connection-String, Neon-Raw-Text-Output, "
                                    "Neon-Array-Mode, Neon-Pool-Opt-In, Neon-Batch-Read-Only, "
                                    "Neon-Batch-Isolation-Level",
    "Access-Control-Max-Age": "86400",
}
NOT_SUPPORTED = "query is not supported"
CANCELLED = "Query cancelled, connection was terminated"

_ISOLATION = {
    "Serializable": "SERIALIZABLE",
    "ReadUncommitted": "READ UNCOMMITTED",
    "ReadCommitted": "READ COMMITTED",
    "RepeatableRead": "REPEATABLE READ",
}


class HttpSqlError(ArgonError):
    """An error answered as Neon's error JSON: `status` and (for proxy-made errors) `code` ""."""

    def __init__(self, message: str, status: int = 400, *, code: str = "") -> None:
        super().__init__(message, kind=ErrorKind.USER if status < 500 else ErrorKind.INTERNAL, code=code)
        self.status = status


# Request ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnInfo:
    """What `Neon-Connection-String` says: who logs in where."""

    user: str
    password: str
    database: str
    endpoint_id: str
    host: str


def parse_connection_string(text: str | None, domain: str | None = None,
                            addresses: Mapping[str, str] | None = None) -> ConnInfo:
    """Neon's checks and texts. The endpoint: the host's first label when it is one (`ep-...`, or
    any label under the configured domain), else `options=endpoint=<id>`, else an endpoint's own
    address (`addresses`, ADR 0031; the same order as on the Postgres port), else the password hack."""
    if text is None:
        raise HttpSqlError("invalid header: neon-connection-string")
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise HttpSqlError(f"invalid connection string: {exc}") from None
    del port
    if parts.scheme not in ("postgres", "postgresql"):
        raise HttpSqlError("incorrect scheme")
    database = unquote(parts.path.lstrip("/").split("/", 1)[0])
    if not database:
        raise HttpSqlError("missing database name")
    if not parts.username:
        raise HttpSqlError("missing username")
    user = unquote(parts.username)
    host = parts.hostname
    if not host:
        raise HttpSqlError("missing hostname")
    if parts.password is None:
        raise HttpSqlError("missing authentication credentials: required password")
    password = unquote(parts.password)
    options = parse_qs(parts.query).get("options", [""])[0]
    from_host = endpoint_from_host(host, domain)
    from_options = endpoint_from_options(options)
    if from_host is not None and from_options is not None and from_host != from_options:
        raise HttpSqlError(f"Inconsistent project name inferred from SNI ('{from_host}') "
                           f"and project option ('{from_options}').")
    endpoint_id = from_host or from_options or endpoint_from_host(host, None, addresses)
    try:
        if endpoint_id is None:
            endpoint_id, password = parse_password_hack(password)
        endpoint_id = check_endpoint_id(endpoint_id)
    except ArgonError as exc:
        raise HttpSqlError(exc.user_message) from None
    return ConnInfo(user, password, database, endpoint_id, host)


@dataclass(frozen=True)
class Query:
    text: str
    params: tuple[str | None, ...]
    array_mode: bool | None  # None: the Neon-Array-Mode header decides


@dataclass(frozen=True)
class SqlRequest:
    queries: tuple[Query, ...]
    batch: bool


def parse_body(body: bytes) -> SqlRequest:
    """`{"query", "params", "arrayMode"}` or `{"queries": [...]}`; unknown keys are ignored."""
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        if "query" in data:
            return SqlRequest((_query(data),), batch=False)
        if "queries" in data:
            items = data["queries"]
            if not isinstance(items, list):
                raise ValueError("queries: expected an array")
            return SqlRequest(tuple(_query(item) for item in items), batch=True)
        raise ValueError("expected a `query` or a `queries` field")
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HttpSqlError(f"could not parse the HTTP request body: {exc}") from None
    except RecursionError:  # `[[[[...` nested deeper than Python recurses
        raise HttpSqlError("could not parse the HTTP request body: nested too deeply") from None


def _query(item: object) -> Query:
    if not isinstance(item, dict):
        raise ValueError("a query must be a JSON object")
    text = item.get("query")
    if not isinstance(text, str):
        raise ValueError("query: expected a string")
    params = item.get("params", [])
    if params is None:
        params = []
    if not isinstance(params, list):
        raise ValueError("params: expected an array")
    array_mode = item.get("arrayMode")
    if array_mode is not None and not isinstance(array_mode, bool):
        raise ValueError("arrayMode: expected a boolean")
    return Query(text, tuple(param_text(p) for p in params), array_mode)


def param_text(value: object) -> str | None:
    """A JSON parameter as Postgres text: null is NULL, a string itself, an array an array literal."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _array_literal(value)
    return _json(value)


def _array_literal(items: list[Any]) -> str:
    parts = []
    for item in items:
        if item is None:
            parts.append("NULL")
        elif isinstance(item, list):
            parts.append(_array_literal(item))
        elif isinstance(item, str):
            parts.append(_json(item))
        elif isinstance(item, dict):
            parts.append(_json(_json(item)))
        else:
            parts.append(_json(item))
    return "{" + ",".join(parts) + "}"


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def header_true(headers: Mapping[str, str], name: str) -> bool:
    """Neon's boolean headers are true only when exactly `true`."""
    return headers.get(name) == "true"


@dataclass(frozen=True)
class BatchOptions:
    isolation: str | None  # the header's value (echoed back), e.g. "Serializable"
    read_only: bool
    deferrable: bool

    def begin(self) -> str:
        modes = []
        if self.isolation is not None:
            modes.append("ISOLATION LEVEL " + _ISOLATION[self.isolation])
        if self.read_only:
            modes.append("READ ONLY")
        if self.deferrable:
            modes.append("DEFERRABLE")
        return "START TRANSACTION" + (" " + ", ".join(modes) if modes else "")

    def response_headers(self) -> dict[str, str]:
        headers = {}
        if self.isolation is not None:
            headers[BATCH_ISOLATION_LEVEL] = self.isolation
        if self.read_only:
            headers[BATCH_READ_ONLY] = "true"
        if self.deferrable:
            headers[BATCH_DEFERRABLE] = "true"
        return headers


def batch_options(headers: Mapping[str, str]) -> BatchOptions:
    isolation = headers.get(BATCH_ISOLATION_LEVEL)
    if isolation is not None and isolation not in _ISOLATION:
        raise HttpSqlError("invalid isolation level")
    return BatchOptions(isolation, header_true(headers, BATCH_READ_ONLY), header_true(headers, BATCH_DEFERRABLE))


# Response -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    name: str
    type_oid: int
    table_oid: int
    column: int
    size: int
    modifier: int

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "dataTypeID": self.type_oid, "tableID": self.table_oid, "columnID": self.column,
                "dataTypeSize": self.size, "dataTypeModifier": self.modifier, "format": "text"}


def command_and_count(tag: str) -> tuple[str, int | None]:
    """`INSERT 0 3` -> ("INSERT", 3); `CREATE TABLE` -> ("CREATE", None); empty query -> ("", None)."""
    words = tag.split()
    if not words:
        return "", None
    count = int(words[-1]) if len(words) > 1 and words[-1].isdigit() else None
    return words[0], count


def result_json(fields: Sequence[Field], rows: Sequence[Sequence[Any]], tag: str, *, array_mode: bool) -> dict[str, Any]:
    """One query's result object, keys in Neon's order. `rows` hold already converted values."""
    command, count = command_and_count(tag)
    if array_mode:
        out_rows: list[Any] = [list(row) for row in rows]
    else:
        names = [f.name for f in fields]
        out_rows = [dict(zip(names, row, strict=True)) for row in rows]
    return {"fields": [f.as_json() for f in fields], "rows": out_rows, "command": command, "rowCount": count,
            "rowAsArray": array_mode}


@dataclass(frozen=True)
class Encoded:
    """A response body already encoded (results are encoded as their rows arrive)."""

    data: bytes


def encode(body: object) -> bytes:
    if isinstance(body, Encoded):
        return body.data
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class ResultWriter:
    """One query's result object encoded as rows arrive, byte for byte what `encode(result_json(...))`
    gives, so a result is held as its JSON (a few bytes a value) instead of Python objects (~100 bytes
    a value). `charge(n)` is called with the size of every piece before it is kept: the response
    budget raises there."""

    def __init__(self, charge: Callable[[int], None], *, array_mode: bool) -> None:
        self._charge = charge
        self.array_mode = array_mode
        self._names: list[str] | None = None
        self._parts: list[bytes] = []
        self._rows = 0

    def fields(self, fields: Sequence[Field]) -> None:
        if self._names is not None:
            return
        head = b'{"fields":' + encode([f.as_json() for f in fields]) + b',"rows":['
        self._charge(len(head))
        self._parts.append(head)
        self._names = [f.name for f in fields]

    def rows(self, rows: Sequence[Sequence[Any]]) -> None:
        """Converted rows (as `result_json` takes them), encoded in one go."""
        if not rows:
            return
        assert self._names is not None, "fields() first"
        if self.array_mode:
            data = encode(rows if isinstance(rows, list) else list(rows))
        else:
            names = self._names
            data = encode([dict(zip(names, row, strict=True)) for row in rows])
        piece = data[1:-1] if not self._rows else b"," + data[1:-1]
        self._charge(len(piece))
        self._parts.append(piece)
        self._rows += len(rows)

    def finish(self, tag: str) -> bytes:
        if self._names is None:
            self.fields([])
        command, count = command_and_count(tag)
        tail = (b'],"command":' + encode(command) + b',"rowCount":' + encode(count)
                + b',"rowAsArray":' + encode(self.array_mode) + b"}")
        self._charge(len(tail))
        self._parts.append(tail)
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def batch_body(results: Sequence[bytes]) -> Encoded:
    """`{"results":[...]}` around results encoded by `ResultWriter`."""
    return Encoded(b'{"results":[' + b",".join(results) + b"]}")


# Values (non-raw mode) ------------------------------------------------------------------------------

BOOL, INT2, INT4, FLOAT4, FLOAT8, JSON, JSONB = 16, 21, 23, 700, 701, 114, 3802
_NUMBERS = frozenset({INT2, INT4})
_FLOATS = frozenset({FLOAT4, FLOAT8})
_JSONS = frozenset({JSON, JSONB})

# Built-in array types with a comma delimiter -> element type (pg_type where typcategory = 'A',
# oid < 10000; generated from PostgreSQL 15, unchanged through 18). box[] (';') is left as text.
ARRAY_ELEMENT = {
    22: 21, 30: 26, 143: 142, 199: 114, 210: 71, 270: 75, 271: 5069, 272: 81, 273: 83, 629: 628, 651: 650,
    719: 718, 775: 774, 791: 790, 1000: 16, 1001: 17, 1002: 18, 1003: 19, 1005: 21, 1006: 22, 1007: 23,
    1008: 24, 1009: 25, 1010: 27, 1011: 28, 1012: 29, 1013: 30, 1014: 1042, 1015: 1043, 1016: 20, 1017: 600,
    1018: 601, 1019: 602, 1021: 700, 1022: 701, 1027: 604, 1028: 26, 1034: 1033, 1040: 829, 1041: 869,
    1115: 1114, 1182: 1082, 1183: 1083, 1185: 1184, 1187: 1186, 1231: 1700, 1263: 2275, 1270: 1266,
    1561: 1560, 1563: 1562, 2201: 1790, 2207: 2202, 2208: 2203, 2209: 2204, 2210: 2205, 2211: 2206,
    2949: 2970, 2951: 2950, 3221: 3220, 3643: 3614, 3644: 3642, 3645: 3615, 3735: 3734, 3770: 3769,
    3807: 3802, 3905: 3904, 3907: 3906, 3909: 3908, 3911: 3910, 3913: 3912, 3927: 3926, 4073: 4072,
    4090: 4089, 4097: 4096, 4192: 4191, 5039: 5038, 6150: 4451, 6151: 4532, 6152: 4533, 6153: 4534,
    6155: 4535, 6157: 4536,
}


def convert(text: str | None, type_oid: int, *, raw: bool) -> Any:
    """A Postgres text value as JSON: numbers, booleans, JSON and arrays typed; the rest strings."""
    if text is None or raw:
        return text
    element = ARRAY_ELEMENT.get(type_oid)
    if element is not None:
        try:
            return _convert_array(parse_array(text), element)
        except ValueError:
            raise HttpSqlError("could not parse postgres response", 500) from None
    return _scalar(text, type_oid)


def _scalar(text: str, type_oid: int) -> Any:
    try:
        if type_oid == BOOL:
            return text == "t"
        if type_oid in _NUMBERS:
            return int(text)
        if type_oid in _FLOATS:
            value = float(text)
            return text if math.isnan(value) or math.isinf(value) else value
        if type_oid in _JSONS:
            return json.loads(text)
    except ValueError:
        raise HttpSqlError("could not parse postgres response", 500) from None
    return text


def _convert_array(items: list[Any], element: int) -> list[Any]:
    return [_convert_array(item, element) if isinstance(item, list) else
            None if item is None else _scalar(item, element) for item in items]


def parse_array(text: str) -> list[Any]:
    """Postgres' array text form -> nested lists of element strings (None for NULL).

    Dimension decorations (`[1:2]={...}`) are dropped; the delimiter is `,`."""
    pos = 0
    if text.startswith("["):
        eq = text.find("=")
        if eq < 0:
            raise ValueError("malformed array bounds")
        pos = eq + 1
    items, end = _parse_level(text, pos)
    if text[end:].strip():
        raise ValueError("junk after array")
    return items


MAX_ARRAY_DEPTH = 6  # Postgres' MAXDIM: no array it writes is nested deeper


def _parse_level(text: str, pos: int, depth: int = 1) -> tuple[list[Any], int]:
    if pos >= len(text) or text[pos] != "{":
        raise ValueError("expected '{'")
    if depth > MAX_ARRAY_DEPTH:
        raise ValueError("array nested too deeply")
    pos += 1
    items: list[Any] = []
    if pos < len(text) and text[pos] == "}":
        return items, pos + 1
    while pos < len(text):
        ch = text[pos]
        if ch == "{":
            sub, pos = _parse_level(text, pos, depth + 1)
            items.append(sub)
        elif ch == '"':
            buf = []
            pos += 1
            while pos < len(text) and text[pos] != '"':
                if text[pos] == "\\":
                    pos += 1
                if pos < len(text):
                    buf.append(text[pos])
                pos += 1
            if pos >= len(text):
                raise ValueError("unterminated quoted element")
            pos += 1
            items.append("".join(buf))
        else:
            end = pos
            while end < len(text) and text[end] not in ",}":
                end += 1
            word = text[pos:end].strip()
            items.append(None if word.upper() == "NULL" else word)
            pos = end
        if pos >= len(text):
            break
        if text[pos] == ",":
            pos += 1
        elif text[pos] == "}":
            return items, pos + 1
        else:
            raise ValueError("expected ',' or '}'")
    raise ValueError("unterminated array")


# Errors -------------------------------------------------------------------------------------------

# JSON key -> ErrorResponse field code, in Neon's order.
ERROR_KEYS = (
    ("message", "M"), ("code", "C"), ("detail", "D"), ("hint", "H"), ("position", "P"),
    ("internalPosition", "p"), ("internalQuery", "q"), ("severity", "S"), ("where", "W"), ("table", "t"),
    ("column", "c"), ("schema", "s"), ("dataType", "d"), ("constraint", "n"), ("file", "F"), ("line", "L"),
    ("routine", "R"),
)


def postgres_error_json(fields: Mapping[str, str]) -> dict[str, Any]:
    """An ErrorResponse from Postgres (fields by code) as the error JSON."""
    body: dict[str, Any] = {key: fields.get(code) for key, code in ERROR_KEYS}
    body["message"] = fields.get("M", "")
    body["code"] = fields.get("C", "")
    body["severity"] = fields.get("S", "")
    return body


def proxy_error_json(message: str, code: str = "") -> dict[str, Any]:
    """An error made by Argon itself: `code` and `severity` empty unless given, the rest null."""
    body: dict[str, Any] = dict.fromkeys((key for key, _ in ERROR_KEYS), None)
    body.update(message=message, code=code, severity="")
    return body

"""SQL over HTTP, the I/O half: check the password, take a pooled backend, run, answer Neon's JSON.

Backends are psycopg connections to Argon's *own proxy* on loopback, so wake, compute login,
activity tracking (the suspend decision) and cancel keys are the TCP path's. Each query goes out
with the extended protocol (`PQsendQueryParams`: Parse without parameter types, so Postgres infers
them; every value as text), even without parameters, so a multi-statement string fails as on Neon.
Rows come in chunks and the response budget is charged as they come: a huge result is cut off at
the limit, not held in memory. The password is checked here on every request (a pooled connection
does not prove the caller knows it) with the proxy's verifier, throttle and PBKDF2 pool.

Pool (§5.8): per (endpoint, database, user), reset with Neon's query before reuse, idle 5 min.
An idle pooled connection is an idle proxy session: it never keeps a compute awake. When the
compute suspends, Postgres ends those sessions and the proxy closes them, so a pooled connection
whose socket became readable while idle is dead (or at least not clean) and is dropped unused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import generators, pq

from argon.errors import ArgonError
from argon.proxy import sql_over_http as sql
from argon.proxy.auth import check_password
from argon.proxy.routing import Route
from argon.proxy.server import ProxyServer
from argon.proxy.session import INSECURE, plaintext_allowed

log = logging.getLogger(__name__)

RESET = (b"ROLLBACK; CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; UNLISTEN *; "
         b"SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES;")
IDLE_TIMEOUT = 300.0
MAX_IDLE_PER_KEY = 20
CONNECT_TIMEOUT = 60  # a cold start waits in the proxy's wake
CHUNK_ROWS = 500
# Texts the proxy sends for failures of the service, not of the request (answered with 500).
_SERVER_SIDE = ("Couldn't connect to compute node", "Control plane request failed", "Internal error",
                "Too many connections attempts", "Failed to acquire permit")

_S = pq.ExecStatus
_ROWS = frozenset({_S.TUPLES_OK, _S.SINGLE_TUPLE, _S.TUPLES_CHUNK})
_ERROR_FIELDS = {code: getattr(pq.DiagnosticField, name) for code, name in (
    ("S", "SEVERITY"), ("C", "SQLSTATE"), ("M", "MESSAGE_PRIMARY"), ("D", "MESSAGE_DETAIL"), ("H", "MESSAGE_HINT"),
    ("P", "STATEMENT_POSITION"), ("p", "INTERNAL_POSITION"), ("q", "INTERNAL_QUERY"), ("W", "CONTEXT"),
    ("s", "SCHEMA_NAME"), ("t", "TABLE_NAME"), ("c", "COLUMN_NAME"), ("d", "DATATYPE_NAME"),
    ("n", "CONSTRAINT_NAME"), ("F", "SOURCE_FILE"), ("L", "SOURCE_LINE"), ("R", "SOURCE_FUNCTION"))}

PoolKey = tuple[str, str, str]  # (endpoint, database, user)


class QueryFailed(Exception):
    """Postgres answered a query with an ErrorResponse (the connection itself is fine)."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", ""))
        self.fields = fields


class RolledBack(QueryFailed):
    """A query of a batch failed and the transaction was rolled back."""


@dataclass
class Response:
    status: int
    body: object
    headers: dict[str, str] = field(default_factory=dict)


class Budget:
    """The response size limit, charged while rows arrive (an estimate; the encoded body is checked too)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise sql.HttpSqlError(f"response is too large (max is {self.limit} bytes)", 507)


class BackendPool:
    """Idle backend connections per (endpoint, database, user); everything on the platform's loop."""

    def __init__(self, proxy: ProxyServer, *, host: str, sslmode: str, idle_timeout: float = IDLE_TIMEOUT,
                 max_idle: int = MAX_IDLE_PER_KEY) -> None:
        self.proxy = proxy
        self.host = host
        self.sslmode = sslmode
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._idle: dict[PoolKey, list[tuple[float, psycopg.AsyncConnection[Any]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.hits = 0
        self.misses = 0

    async def get(self, key: PoolKey, info: sql.ConnInfo) -> tuple[psycopg.AsyncConnection[Any], bool]:
        """A clean connection and whether it came from the pool."""
        idle = self._idle.get(key, [])
        while idle:
            since, conn = idle.pop()
            if time.monotonic() - since < self.idle_timeout and _alive(conn):
                self.hits += 1
                return conn, True
            await self.discard(conn)
        self.misses += 1
        return await self._connect(info), False

    async def _connect(self, info: sql.ConnInfo) -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(
                host=self.host, port=self.proxy.port, user=info.user, password=info.password, dbname=info.database,
                options=f"endpoint={info.endpoint_id}", sslmode=self.sslmode, connect_timeout=CONNECT_TIMEOUT,
                autocommit=True)
        except psycopg.OperationalError as exc:
            message = _proxy_message(str(exc))
            status = 500 if message.startswith(_SERVER_SIDE) else 400
            raise sql.HttpSqlError(message, status) from None

    def put(self, key: PoolKey, conn: psycopg.AsyncConnection[Any]) -> None:
        """Reset in the background (the response does not wait), then keep for the next request."""
        task = asyncio.get_running_loop().create_task(self._reset_and_keep(key, conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _reset_and_keep(self, key: PoolKey, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            await simple_query(conn, RESET)
        except Exception as exc:
            log.debug("pooled connection not reusable: %r", exc)
            await self.discard(conn)
            return
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle:
            await self.discard(conn)
            return
        idle.append((time.monotonic(), conn))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.idle_timeout))
            now = time.monotonic()
            for key, idle in list(self._idle.items()):
                keep = [(since, conn) for since, conn in idle if now - since < self.idle_timeout and _alive(conn)]
                for entry in idle:
                    if entry not in keep:
                        await self.discard(entry[1])
                if keep:
                    self._idle[key] = keep
                else:
                    self._idle.pop(key, None)

    @staticmethod
    async def discard(conn: psycopg.AsyncConnection[Any]) -> None:
        with contextlib.suppress(Exception):
            await conn.close()

    @property
    def idle(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for idle in self._idle.values():
            for _, conn in idle:
                await self.discard(conn)
        self._idle.clear()


def _alive(conn: psycopg.AsyncConnection[Any]) -> bool:
    """An idle connection is usable if it is open and nothing arrived since it went idle (a suspend
    sends a FATAL error and closes; either makes the socket readable)."""
    if conn.closed or conn.broken:
        return False
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.OperationalError):
        return False
    return not readable


def _proxy_message(text: str) -> str:
    """The proxy's ErrorResponse text out of libpq's connection failure message."""
    marker = "ERROR:  "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    return text.strip() or "Couldn't connect to compute node"


def _error_fields(res: pq.abc.PGresult, encoding: str) -> dict[str, str]:
    fields = {}
    for code, field_code in _ERROR_FIELDS.items():
        value = res.error_field(field_code)
        if value is not None:
            fields[code] = value.decode(encoding, "replace")
    return fields


async def simple_query(conn: psycopg.AsyncConnection[Any], text: bytes) -> None:
    """A simple-protocol command (BEGIN, COMMIT, the reset); QueryFailed on an ErrorResponse."""
    pgconn = conn.pgconn
    pgconn.send_query(text)
    results = await conn.wait(generators.execute(pgconn))
    for res in results:
        if res.status == _S.FATAL_ERROR:
            raise QueryFailed(_error_fields(res, conn.info.encoding))


async def run_query(conn: psycopg.AsyncConnection[Any], query: sql.Query, *, raw: bool, array_mode: bool,
                    budget: Budget) -> dict[str, Any]:
    """One query, extended protocol, text in and out; its result object, or QueryFailed."""
    pgconn = conn.pgconn
    encoding = conn.info.encoding
    params = [None if p is None else p.encode(encoding) for p in query.params]
    pgconn.send_query_params(query.text.encode(encoding), params, result_format=pq.Format.TEXT)
    if psycopg.capabilities.has_stream_chunked():
        pgconn.set_chunked_rows_mode(CHUNK_ROWS)
    await conn.wait(generators.send(pgconn))
    fields: list[sql.Field] | None = None
    rows: list[list[Any]] = []
    tag = ""
    error: dict[str, str] | None = None
    while True:
        try:
            res = await conn.wait(generators.fetch(pgconn))
        except psycopg.OperationalError:
            if error is not None:  # a FATAL error (e.g. the compute shutting down) came first
                break
            raise
        if res is None:
            break
        status = res.status
        if status in _ROWS:
            if fields is None:
                fields = [sql.Field(_name(res, i, encoding), res.ftype(i), res.ftable(i), res.ftablecol(i),
                                    res.fsize(i), res.fmod(i)) for i in range(res.nfields)]
            _take_rows(res, fields, rows, raw=raw, encoding=encoding, budget=budget)
            if res.command_status:  # chunked mode: on the last chunk, not on the empty TUPLES_OK after it
                tag = res.command_status.decode(encoding, "replace")
        elif status == _S.COMMAND_OK:
            tag = (res.command_status or b"").decode(encoding, "replace")
        elif status == _S.EMPTY_QUERY:
            tag = ""
        elif status == _S.FATAL_ERROR:
            error = _error_fields(res, encoding)
        else:  # COPY: no way to feed or drain it over this API
            raise sql.HttpSqlError("COPY is not supported over HTTP; use a Postgres connection")
    if error is not None:
        raise QueryFailed(error)
    return sql.result_json(fields or [], rows, tag, array_mode=array_mode)


def _name(res: pq.abc.PGresult, i: int, encoding: str) -> str:
    return (res.fname(i) or b"").decode(encoding, "replace")


def _take_rows(res: pq.abc.PGresult, fields: list[sql.Field], rows: list[list[Any]], *, raw: bool,
               encoding: str, budget: Budget) -> None:
    ncols = len(fields)
    for r in range(res.ntuples):
        row = []
        size = 2 + ncols
        for c in range(ncols):
            value = res.get_value(r, c)
            if value is None:
                row.append(None)
                size += 4
                continue
            size += len(value) + 2
            row.append(sql.convert(value.decode(encoding, "replace"), fields[c].type_oid, raw=raw))
        budget.charge(size)
        rows.append(row)


class HttpSql:
    """POST /sql on the platform's HTTP port (wired by `argon.api.routes_serverless`)."""

    def __init__(self, proxy: ProxyServer, *, connect_host: str, max_response: int = sql.MAX_RESPONSE_BYTES,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.proxy = proxy
        self.max_response = max_response
        self.pool = BackendPool(proxy, host=connect_host, sslmode=internal_sslmode(proxy.ctx.plaintext, connect_host),
                                idle_timeout=idle_timeout)

    def secure_enough(self, peer_ip: str, secure: bool) -> bool:
        """The proxy's plaintext policy, applied to a plain-HTTP client."""
        ctx = self.proxy.ctx
        return secure or ctx.tls is None or plaintext_allowed(ctx.plaintext, peer_ip)

    async def handle(self, headers: Mapping[str, str], body: bytes, peer_ip: str, *, secure: bool) -> Response:
        try:
            if not self.secure_enough(peer_ip, secure):
                raise sql.HttpSqlError(INSECURE)
            return await self._handle(headers, body, peer_ip)
        except sql.HttpSqlError as exc:
            return Response(exc.status, sql.proxy_error_json(exc.user_message, exc.code))
        except ArgonError as exc:
            return Response(400 if exc.http_status < 500 else 500, sql.proxy_error_json(exc.user_message))
        except Exception:
            log.exception("SQL over HTTP request failed")
            return Response(500, sql.proxy_error_json("Internal error"))

    async def _handle(self, headers: Mapping[str, str], body: bytes, peer_ip: str) -> Response:
        info = sql.parse_connection_string(headers.get(sql.CONNECTION_STRING), self.proxy.ctx.domain)
        request = sql.parse_body(body)
        batch = sql.batch_options(headers) if request.batch else None
        route = Route(info.user, info.database, info.endpoint_id, "options")
        await check_password(self.proxy.ctx.auth, route, info.password, peer_ip)
        raw = sql.header_true(headers, sql.RAW_TEXT_OUTPUT)
        array_mode = sql.header_true(headers, sql.ARRAY_MODE)
        budget = Budget(self.max_response)
        key = (info.endpoint_id, info.database, info.user)
        conn, _ = await self.pool.get(key, info)
        keep = False
        try:
            if batch is None:
                query = request.queries[0]
                result: object = await run_query(conn, query, raw=raw, budget=budget,
                                                 array_mode=array_mode if query.array_mode is None else query.array_mode)
                keep = True
                response = Response(200, result)
            else:
                results = await self._batch(conn, request.queries, batch, raw=raw, array_mode=array_mode,
                                            budget=budget)
                keep = True
                response = Response(200, {"results": results}, batch.response_headers())
        except RolledBack as exc:
            keep = True
            return Response(400, sql.postgres_error_json(exc.fields))
        except QueryFailed as exc:
            return Response(400, sql.postgres_error_json(exc.fields))
        except psycopg.OperationalError as exc:
            log.info("SQL over HTTP on %s lost its backend: %s", info.endpoint_id, exc)
            return Response(500, sql.proxy_error_json("Couldn't connect to compute node"))
        finally:
            if keep:
                self.pool.put(key, conn)
            else:
                await self.pool.discard(conn)
        return response

    async def _batch(self, conn: psycopg.AsyncConnection[Any], queries: tuple[sql.Query, ...],
                     options: sql.BatchOptions, *, raw: bool, array_mode: bool,
                     budget: Budget) -> list[object]:
        """All queries in one transaction. An SQL error rolls back (RolledBack: the connection is
        still good); a failed BEGIN or COMMIT raises QueryFailed (the connection is dropped)."""
        await simple_query(conn, options.begin().encode())
        results: list[object] = []
        try:
            for query in queries:
                mode = array_mode if query.array_mode is None else query.array_mode
                results.append(await run_query(conn, query, raw=raw, array_mode=mode, budget=budget))
        except QueryFailed as exc:
            await simple_query(conn, b"ROLLBACK")
            raise RolledBack(exc.fields) from None
        await simple_query(conn, b"COMMIT")
        return results

    async def close(self) -> None:
        await self.pool.close()


def internal_sslmode(policy: str, host: str) -> str:
    """How /sql's backends reach the proxy: plaintext where the proxy's policy lets this host in."""
    return "disable" if plaintext_allowed(policy, host) else "require"

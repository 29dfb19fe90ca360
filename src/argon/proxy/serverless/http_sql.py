"""SQL over HTTP, the I/O half: check the password, take a pooled backend, run, answer Neon's JSON.

Backends are psycopg connections to Argon's *own proxy*, on its internal Unix socket, so wake,
compute login, activity tracking (the suspend decision) and cancel keys are the TCP path's. The
password is checked here on every request (a pooled connection does not prove the caller knows
it), with the proxy's verifier, throttle and fair PBKDF2 pool; a new backend then logs in with a
one-time token standing for those credentials, so libpq never runs PBKDF2 on the event loop.
Each query goes out with the extended protocol (`PQsendQueryParams`: Parse without parameter
types, so Postgres infers them; every value as text), even without parameters, so a
multi-statement string fails as on Neon.

Memory: rows come in chunks and are encoded to JSON as they come (`sql.ResultWriter`), so a result
is held as its response bytes, never as Python objects; the response budget is charged with those
bytes, and a value that cannot fit is refused before it is decoded. Requests run at most
`per_endpoint` at a time for an endpoint and `total` in all (`WorkLimits`), and all responses being
built share one byte budget, so the memory /sql can take is bounded whatever tenants ask.

Pool (§5.8): per (endpoint, database, user), reset with Neon's query before reuse, idle 5 min,
`MAX_IDLE_TOTAL` idle in all. An idle pooled connection is an idle proxy session: it never keeps a
compute awake. When the compute suspends, Postgres ends those sessions and the proxy closes them,
so a pooled connection whose socket became readable while idle is dead (or at least not clean) and
is dropped unused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import generators, pq

from argon.errors import ArgonError
from argon.proxy.auth import Credentials, check_password
from argon.proxy.routing import Route
from argon.proxy.server import ProxyServer
from argon.proxy.serverless import sql_over_http as sql
from argon.proxy.session import INSECURE, plaintext_allowed
from argon.proxy.throttle import Gates, Throttled

log = logging.getLogger(__name__)

RESET = (b"ROLLBACK; CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; UNLISTEN *; "
         b"SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES;")
IDLE_TIMEOUT = 300.0
MAX_IDLE_PER_KEY = 20
MAX_IDLE_TOTAL = 256  # each idle backend holds three descriptors and a compute backend
PER_ENDPOINT = 8  # /sql requests running at once for one endpoint (more wait their turn)
TOTAL = 32  # ... and for all endpoints together
MAX_WAITING = 256  # requests waiting for a turn, per endpoint and in all; past that: 429
SHARED_RESPONSE_BYTES = 8 * sql.MAX_RESPONSE_BYTES  # all responses being built at once
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


class SharedBytes:
    """One byte budget for every response being built at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise sql.HttpSqlError("the server is building too many large responses at once; try again", 503)
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


class Budget:
    """The response size limit of one request, charged with the encoded bytes as they are kept, and
    drawn from the shared budget too (`release` when the response is gone)."""

    def __init__(self, limit: int, shared: SharedBytes | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.shared = shared

    def _too_large(self) -> sql.HttpSqlError:
        return sql.HttpSqlError(f"response is too large (max is {self.limit} bytes)", 507)

    def check(self, n: int) -> None:
        """Refuse early what cannot fit: `n` bytes at least are still to come."""
        if self.used + n > self.limit:
            raise self._too_large()

    def charge(self, n: int) -> None:
        if self.used + n > self.limit:
            raise self._too_large()
        if self.shared is not None:
            self.shared.take(n)
        self.used += n

    def release(self) -> None:
        if self.shared is not None:
            self.shared.give(self.used)
            self.shared = None


class WorkLimits:
    """How many /sql requests run at once: per endpoint, and in all. Later ones wait their turn (in
    order); past `max_waiting` waiting ones they are refused with Neon's text, as 429."""

    def __init__(self, *, per_endpoint: int = PER_ENDPOINT, total: int = TOTAL, max_waiting: int = MAX_WAITING) -> None:
        self.per_endpoint = per_endpoint
        self.total = total
        self.max_waiting = max_waiting
        self._gates = Gates()

    @contextlib.asynccontextmanager
    async def turn(self, endpoint_id: str) -> AsyncIterator[None]:
        async with (self._gates.hold(("endpoint", endpoint_id), self.per_endpoint, self.max_waiting,
                                     "Too many connections to this endpoint. Please try again later."),
                    self._gates.hold("all", self.total, self.max_waiting,
                                     "Failed to acquire permit to connect to the database. Too many database "
                                     "connection attempts are currently ongoing.")):
            yield


class BackendPool:
    """Idle backend connections per (endpoint, database, user); everything on the platform's loop."""

    def __init__(self, proxy: ProxyServer, *, idle_timeout: float = IDLE_TIMEOUT, max_idle: int = MAX_IDLE_PER_KEY,
                 max_idle_total: int = MAX_IDLE_TOTAL) -> None:
        if proxy.internal_dir is None:
            raise RuntimeError("SQL over HTTP needs the proxy's internal socket (is it started?)")
        self.proxy = proxy
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.max_idle_total = max_idle_total
        self._idle: dict[PoolKey, list[tuple[float, psycopg.AsyncConnection[Any]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.hits = 0
        self.misses = 0

    async def get(self, key: PoolKey, info: sql.ConnInfo,
                  creds: Credentials) -> tuple[psycopg.AsyncConnection[Any], bool]:
        """A clean connection and whether it came from the pool; a new one logs in as `creds`."""
        idle = self._idle.get(key, [])
        while idle:
            since, conn = idle.pop()
            if time.monotonic() - since < self.idle_timeout and _alive(conn):
                self.hits += 1
                return conn, True
            await self.discard(conn)
        self.misses += 1
        return await self._connect(info, creds), False

    async def _connect(self, info: sql.ConnInfo, creds: Credentials) -> psycopg.AsyncConnection[Any]:
        """Through the proxy's internal socket, with a token for the credentials just checked (the
        proxy asks for it in cleartext: nothing to hash, here or there)."""
        try:
            return await psycopg.AsyncConnection.connect(
                host=self.proxy.internal_dir, port=self.proxy.port, user=info.user,
                password=self.proxy.issue_token(creds), dbname=info.database, options=f"endpoint={info.endpoint_id}",
                sslmode="disable", connect_timeout=CONNECT_TIMEOUT, autocommit=True)
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
        if len(idle) >= self.max_idle or self.idle >= self.max_idle_total:
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
        poller = select.poll()  # not select(): descriptors above 1024 are normal once the limit is raised
        poller.register(conn.pgconn.socket, select.POLLIN | select.POLLERR | select.POLLHUP)
        return not poller.poll(0)
    except (OSError, ValueError, psycopg.OperationalError):
        return False


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
                    budget: Budget) -> bytes:
    """One query, extended protocol, text in and out; its result object encoded, or QueryFailed."""
    pgconn = conn.pgconn
    encoding = conn.info.encoding
    params = [None if p is None else p.encode(encoding) for p in query.params]
    pgconn.send_query_params(query.text.encode(encoding), params, result_format=pq.Format.TEXT)
    if psycopg.capabilities.has_stream_chunked():
        pgconn.set_chunked_rows_mode(CHUNK_ROWS)
    else:  # libpq < 17: one row at a time is still better than the whole result in libpq's memory
        pgconn.set_single_row_mode()
    await conn.wait(generators.send(pgconn))
    fields: list[sql.Field] | None = None
    writer = sql.ResultWriter(budget.charge, array_mode=array_mode)
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
                writer.fields(fields)
            writer.rows(_take_rows(res, fields, raw=raw, encoding=encoding, budget=budget))
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
    return writer.finish(tag)


def _name(res: pq.abc.PGresult, i: int, encoding: str) -> str:
    return (res.fname(i) or b"").decode(encoding, "replace")


def _take_rows(res: pq.abc.PGresult, fields: list[sql.Field], *, raw: bool, encoding: str,
               budget: Budget) -> list[list[Any]]:
    """One chunk's rows, converted. Its JSON is at least half its text (JSON may drop the blanks
    of a json value, never more): a chunk that cannot fit is refused before it is decoded."""
    ncols = len(fields)
    rows = []
    size = 0
    for r in range(res.ntuples):
        row = []
        for c in range(ncols):
            value = res.get_value(r, c)
            if value is None:
                row.append(None)
                continue
            size += len(value)
            budget.check(size // 2)
            row.append(sql.convert(value.decode(encoding, "replace"), fields[c].type_oid, raw=raw))
        rows.append(row)
    return rows


class HttpSql:
    """POST /sql on the platform's HTTP port (wired by `argon.proxy.serverless.routes`)."""

    def __init__(self, proxy: ProxyServer, *, max_response: int = sql.MAX_RESPONSE_BYTES,
                 idle_timeout: float = IDLE_TIMEOUT, limits: WorkLimits | None = None,
                 shared_response_bytes: int = SHARED_RESPONSE_BYTES) -> None:
        self.proxy = proxy
        self.max_response = max_response
        self.limits = limits or WorkLimits()
        self.shared = SharedBytes(shared_response_bytes)
        self.pool = BackendPool(proxy, idle_timeout=idle_timeout)

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
        except Throttled as exc:
            return Response(exc.status, sql.proxy_error_json(exc.user_message))
        except ArgonError as exc:
            return Response(400 if exc.http_status < 500 else 500, sql.proxy_error_json(exc.user_message))
        except Exception:
            log.exception("SQL over HTTP request failed")
            return Response(500, sql.proxy_error_json("Internal error"))

    async def _handle(self, headers: Mapping[str, str], body: bytes, peer_ip: str) -> Response:
        info = sql.parse_connection_string(headers.get(sql.CONNECTION_STRING), self.proxy.ctx.domain,
                                           self.proxy.address_routes)
        request = sql.parse_body(body)
        batch = sql.batch_options(headers) if request.batch else None
        route = Route(info.user, info.database, info.endpoint_id, "options")
        creds = await check_password(self.proxy.ctx.auth, route, info.password, peer_ip)
        raw = sql.header_true(headers, sql.RAW_TEXT_OUTPUT)
        array_mode = sql.header_true(headers, sql.ARRAY_MODE)
        async with self.limits.turn(route.compute_id or info.endpoint_id):  # after the password: strangers wait for nothing
            budget = Budget(self.max_response, self.shared)
            try:
                return await self._run(info, creds, request, batch, raw=raw, array_mode=array_mode, budget=budget)
            finally:
                budget.release()

    async def _run(self, info: sql.ConnInfo, creds: Credentials, request: sql.SqlRequest,
                   batch: sql.BatchOptions | None, *, raw: bool, array_mode: bool, budget: Budget) -> Response:
        key = (info.endpoint_id, info.database, info.user)
        conn, _ = await self.pool.get(key, info, creds)
        keep = False
        try:
            if batch is None:
                query = request.queries[0]
                result = await run_query(conn, query, raw=raw, budget=budget,
                                         array_mode=array_mode if query.array_mode is None else query.array_mode)
                keep = True
                response = Response(200, sql.Encoded(result))
            else:
                results = await self._batch(conn, request.queries, batch, raw=raw, array_mode=array_mode,
                                            budget=budget)
                keep = True
                response = Response(200, sql.batch_body(results), batch.response_headers())
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
                     budget: Budget) -> list[bytes]:
        """All queries in one transaction. An SQL error rolls back (RolledBack: the connection is
        still good); a failed BEGIN or COMMIT raises QueryFailed (the connection is dropped)."""
        await simple_query(conn, options.begin().encode())
        results: list[bytes] = []
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

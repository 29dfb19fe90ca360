"""The SQL editor's runner: one query, as a chosen role, through the proxy like any client.

A run happens on one of a few threads of its own, with a blocking connection: libpq computes the
SCRAM proof there (PBKDF2 over the role's iteration count, which the tenant chooses), never on
the event loop that serves everything else. It opens its own connection and closes it right after: an idle session left open would block
statements that need a database to themselves (Django's `CREATE DATABASE … TEMPLATE`, `DROP
DATABASE`). Values come back as Postgres writes them (every column is read as text), so a boolean
shows `t`/`true` as psql would rather than Python's `True`. At most `MAX_ROWS` rows are kept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.adapt import Loader

from argon.control.connection import ConnectionParameters
from argon.settings import Settings

MAX_ROWS = 1000
MAX_CELL = 200  # characters shown in a cell; the whole value is in its title (up to MAX_TITLE)
MAX_TITLE = 4000
STATEMENT_TIMEOUT = "30s"
CONNECT_TIMEOUT = 60  # seconds: the first connection may wake a suspended compute
RUNNERS = 4  # editor queries running at once; more wait for a thread

_runners = concurrent.futures.ThreadPoolExecutor(max_workers=RUNNERS, thread_name_prefix="argon-console-sql")


@dataclass(frozen=True)
class Cell:
    text: str | None  # None: SQL NULL
    full: str | None = None  # set when `text` is truncated


@dataclass
class QueryResult:
    status: str  # the last statement's command tag, e.g. "SELECT 1"
    columns: list[str] = field(default_factory=list)
    rows: list[list[Cell]] = field(default_factory=list)
    total: int = 0  # rows the statement returned (may exceed len(rows))
    elapsed_ms: int = 0


@dataclass(frozen=True)
class QueryError:
    message: str
    sqlstate: str | None = None
    position: int | None = None  # 1-based character offset in the query, from Postgres
    line: int | None = None
    column: int | None = None
    context_line: str | None = None
    detail: str | None = None
    hint: str | None = None


class _RawText(Loader):
    """Keep a value as the text Postgres sent."""

    def load(self, data: Any) -> str:
        return bytes(data).decode("utf-8", errors="replace")


def local_host(settings: Settings) -> str:
    """The proxy as reached from this machine."""
    return "127.0.0.1" if settings.proxy_host in ("0.0.0.0", "::", "") else settings.proxy_host


def cell(value: str | None) -> Cell:
    if value is None:
        return Cell(None)
    if len(value) <= MAX_CELL:
        return Cell(value)
    return Cell(value[:MAX_CELL] + "…", value[:MAX_TITLE])


def locate(query: str, position: int) -> tuple[int, int, str]:
    """Line and column (1-based) of a 1-based character position, and that line's text."""
    before = query[: max(position - 1, 0)]
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    return line, column, query.splitlines()[line - 1] if query.splitlines() else ""


def _error(exc: psycopg.Error, query: str) -> QueryError:
    diag = exc.diag
    message = diag.message_primary or str(exc).strip() or type(exc).__name__
    pos = int(diag.statement_position) if diag.statement_position and diag.statement_position.isdigit() else None
    line = column = None
    context = None
    if pos is not None:
        line, column, context = locate(query, pos)
    return QueryError(message, diag.sqlstate, pos, line, column, context, diag.message_detail, diag.message_hint)


async def run(settings: Settings, params: ConnectionParameters, query: str) -> QueryResult | QueryError:
    """Run `query` on a console thread (see the module docstring)."""
    return await asyncio.get_running_loop().run_in_executor(_runners, _run, settings, params, query)


def _run(settings: Settings, params: ConnectionParameters, query: str) -> QueryResult | QueryError:
    started = time.monotonic()
    try:
        conn = psycopg.Connection.connect(
            host=local_host(settings), port=params.port, dbname=params.database, user=params.role,
            password=params.password, sslmode="require", options=f"endpoint={params.endpoint_id}",
            connect_timeout=CONNECT_TIMEOUT, autocommit=True, application_name="argon-console")
    except psycopg.Error as exc:
        return QueryError(f"could not connect: {str(exc).strip()}")
    try:
        for info in conn.adapters.types:
            conn.adapters.register_loader(info.oid, _RawText)
            if info.array_oid:
                conn.adapters.register_loader(info.array_oid, _RawText)
        conn.execute("SET statement_timeout = '30s'")  # STATEMENT_TIMEOUT
        cur = conn.cursor()
        cur.execute(query.encode(), prepare=False)
        result = QueryResult(status=cur.statusmessage or "")
        while True:  # several statements: show the last one's result
            if cur.description is not None:
                rows = cur.fetchmany(MAX_ROWS)
                result = QueryResult(cur.statusmessage or "", [c.name for c in cur.description],
                                     [[cell(v) for v in row] for row in rows], max(cur.rowcount, len(rows)))
            else:
                result = QueryResult(cur.statusmessage or "")
            if not cur.nextset():
                break
        result.elapsed_ms = int((time.monotonic() - started) * 1000)
        return result
    except psycopg.Error as exc:
        return _error(exc, query)
    finally:
        conn.close()

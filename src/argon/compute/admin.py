"""The platform's own connection to a compute: role `cloud_admin`, peer-authenticated, Unix socket.

Statements the platform runs carry verifiers and role names: they are kept out of the compute's
log (`log_statement = none`, and errors are not echoed with their statement).

`AdminSession` is the one long-lived session per running compute (database `postgres`), owned by
`ComputeManager`: the proxy's verifier lookups, the metrics sampler's looks, the suspend monitor's
activity check and the sync of roles and databases share it, one statement at a time. The compute's stop closes it for good before the postmaster is asked to stop,
so no platform session is cut off by the shutdown and nothing connects to a compute that is
shutting down (its log would show a FATAL for each).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import psycopg

from argon.model import PLATFORM_ROLE

EXIT_WAIT = 1.0  # seconds a closed session's backend gets to exit before the compute is stopped
_OPTIONS = "-c log_statement=none -c log_min_error_statement=panic -c statement_timeout=0"


def conninfo(socket_dir: Path, dbname: str = "postgres") -> dict[str, str]:
    return {"host": str(socket_dir), "port": "5432", "user": PLATFORM_ROLE, "dbname": dbname,
            "application_name": "argon", "options": _OPTIONS, "connect_timeout": "10", "sslmode": "disable"}


async def connect_admin(socket_dir: Path, dbname: str = "postgres") -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(autocommit=True, **conninfo(socket_dir, dbname))


def connect_admin_sync(socket_dir: Path, dbname: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(autocommit=True, **conninfo(socket_dir, dbname))


class SessionClosed(Exception):
    """The compute is stopping or stopped: its admin session is gone for good."""


class AdminSession:
    """One idle session on a running compute, opened on first use, shared one statement at a time.

    A statement that fails or times out closes the connection (the next one reconnects); `close()`
    closes it for good."""

    def __init__(self, socket_dir: Path) -> None:
        self.socket_dir = socket_dir
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def fetchone(self, query: str, params: Any = None, *, timeout: float) -> tuple[Any, ...] | None:
        """Run one statement (connecting first if needed) and return its first row; each step is
        bounded by `timeout` seconds."""
        rows = await self._run(query, params, timeout, everything=False)
        return rows[0] if rows else None

    async def fetchall(self, query: str, params: Any = None, *, timeout: float) -> list[tuple[Any, ...]]:
        """Run one statement and return all its rows (as `fetchone`)."""
        return await self._run(query, params, timeout, everything=True)

    async def _run(self, query: str, params: Any, timeout: float, *, everything: bool) -> list[tuple[Any, ...]]:
        async with self._lock:
            if self._closed:
                raise SessionClosed("the compute is stopping")
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await asyncio.wait_for(connect_admin(self.socket_dir), timeout)
                cur = await asyncio.wait_for(self._conn.execute(query, params), timeout)
                if everything:
                    return await cur.fetchall()
                row = await cur.fetchone()
                return [row] if row is not None else []
            except BaseException:
                await self._disconnect()
                raise

    async def close(self) -> None:
        """Close for good (the compute is about to stop): waits for a statement in flight, then for
        the session's backend to exit. A backend still exiting when the shutdown signals it would
        try to tell its (gone) client and log `FATAL: terminating connection` and a broken pipe."""
        self._closed = True
        async with self._lock:
            pid = self._conn.info.backend_pid if self._conn is not None and not self._conn.closed else None
            await self._disconnect()
            if pid is not None:
                await _exited(pid, EXIT_WAIT)

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


async def _exited(pid: int, timeout: float) -> None:
    """Wait (at most `timeout` seconds) until the process `pid` is gone or a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        await asyncio.sleep(0.002)

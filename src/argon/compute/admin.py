"""The platform's own connection to a compute: role `cloud_admin`, peer-authenticated, Unix socket.

Statements the platform runs carry verifiers and role names: they are kept out of the compute's
log (`log_statement = none`, and errors are not echoed with their statement).

`AdminSession` is the one long-lived session per running compute (database `postgres`), owned by
`ComputeManager`: the proxy's verifier lookups, the metrics sampler's looks, the suspend monitor's
activity check and the sync of roles and databases share it, one statement at a time. The compute's stop closes it for good before the postmaster is asked to stop,
so no platform session is cut off by the shutdown and nothing connects to a compute that is
shutting down (its log would show a FATAL for each).

The socket lies in a directory the compute's uid owns, so that uid can replace it with a link to
another project's socket, where peer authentication would make Argon (root) that compute's
superuser. Every admin connection therefore checks, once connected, that the server at the other
end (`SO_PEERCRED`: who called `listen`) runs as the owner of the socket directory, which sits in
Argon's own run dir and cannot be handed to another uid; anything else is closed unused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from argon.model import PLATFORM_ROLE

EXIT_WAIT = 1.0  # seconds a closed session's backend gets to exit before the compute is stopped
SESSION_OPTIONS = "-c log_statement=none -c log_min_error_statement=panic -c statement_timeout=0"


def conninfo(socket_dir: Path, dbname: str = "postgres") -> dict[str, str]:
    """Peer authentication needs no password: none is ever looked up (`passfile`), so a server that
    asks for one learns nothing from root's `~/.pgpass`."""
    return {"host": str(socket_dir), "port": "5432", "user": PLATFORM_ROLE, "dbname": dbname,
            "application_name": "argon", "options": SESSION_OPTIONS, "connect_timeout": "10", "sslmode": "disable",
            "passfile": "/nonexistent/.pgpass"}


def _params(socket_dir: Path, dbname: str) -> dict[str, str]:
    params = conninfo(socket_dir, dbname)
    if psycopg.pq.version() >= 160000:
        params["require_auth"] = "none"  # libpq 16+: a server asking for any authentication is refused
    return params


def peer_uid(sock_fd: int) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    with socket.fromfd(sock_fd, socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[1])


def check_server(sock_fd: int, socket_dir: Path) -> None:
    """Refuse a server that does not run as the owner of `socket_dir` (see the module's docstring)."""
    expected = os.stat(socket_dir, follow_symlinks=False).st_uid
    found = peer_uid(sock_fd)
    if found != expected:
        raise psycopg.OperationalError(f"the socket in {socket_dir} leads to a server running as uid {found}, not "
                                       f"the compute's uid {expected}: refusing to use it")


async def connect_admin(socket_dir: Path, dbname: str = "postgres") -> psycopg.AsyncConnection:
    conn = await psycopg.AsyncConnection.connect(autocommit=True, **_params(socket_dir, dbname))
    try:
        check_server(conn.pgconn.socket, socket_dir)
    except BaseException:
        await conn.close()
        raise
    return conn


def connect_admin_sync(socket_dir: Path, dbname: str = "postgres") -> psycopg.Connection:
    conn = psycopg.connect(autocommit=True, **_params(socket_dir, dbname))
    try:
        check_server(conn.pgconn.socket, socket_dir)
    except BaseException:
        conn.close()
        raise
    return conn



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

    async def fetchone(self, query: str, params: Any = None, *, timeout: float,
                       sending: Callable[[], None] | None = None) -> tuple[Any, ...] | None:
        """Run one statement (connecting first if needed) and return its first row; each step is
        bounded by `timeout` seconds. `sending` is called when the statement's turn has come, just
        before it is sent (what it reads is the state from then on)."""
        rows = await self._run(query, params, timeout, everything=False, sending=sending)
        return rows[0] if rows else None

    async def fetchall(self, query: str, params: Any = None, *, timeout: float) -> list[tuple[Any, ...]]:
        """Run one statement and return all its rows (as `fetchone`)."""
        return await self._run(query, params, timeout, everything=True)

    async def _run(self, query: str, params: Any, timeout: float, *, everything: bool,
                   sending: Callable[[], None] | None = None) -> list[tuple[Any, ...]]:
        async with self._lock:
            if self._closed:
                raise SessionClosed("the compute is stopping")
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await asyncio.wait_for(connect_admin(self.socket_dir), timeout)
                if sending is not None:
                    sending()
                async with asyncio.timeout(timeout):  # not wait_for: no task of its own per statement
                    cur = await self._conn.execute(query, params)
                if cur.description is None:  # a command without rows (ALTER SYSTEM)
                    return []
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

"""The platform's own connection to a compute: role `cloud_admin`, peer-authenticated, Unix socket.

Statements the platform runs carry verifiers and role names: they are kept out of the compute's
log (`log_statement = none`, and errors are not echoed with their statement).

The socket lies in a directory the compute's uid owns, so that uid can replace it with a link to
another project's socket, where peer authentication would make Argon (root) that compute's
superuser. Every admin connection therefore checks, once connected, that the server at the other
end (`SO_PEERCRED`: who called `listen`) runs as the owner of the socket directory, which sits in
Argon's own run dir and cannot be handed to another uid; anything else is closed unused.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import psycopg

from argon.model import PLATFORM_ROLE

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

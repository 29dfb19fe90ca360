"""The platform's own connection to a compute: role `cloud_admin`, peer-authenticated, Unix socket.

Statements the platform runs carry verifiers and role names: they are kept out of the compute's
log (`log_statement = none`, and errors are not echoed with their statement).
"""

from __future__ import annotations

from pathlib import Path

import psycopg

from argon.model import PLATFORM_ROLE

_OPTIONS = "-c log_statement=none -c log_min_error_statement=panic -c statement_timeout=0"


def conninfo(socket_dir: Path, dbname: str = "postgres") -> dict[str, str]:
    return {"host": str(socket_dir), "port": "5432", "user": PLATFORM_ROLE, "dbname": dbname,
            "application_name": "argon", "options": _OPTIONS, "connect_timeout": "10", "sslmode": "disable"}


async def connect_admin(socket_dir: Path, dbname: str = "postgres") -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(autocommit=True, **conninfo(socket_dir, dbname))


def connect_admin_sync(socket_dir: Path, dbname: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(autocommit=True, **conninfo(socket_dir, dbname))

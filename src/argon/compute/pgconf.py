"""The configuration files of a compute, rendered by the platform at every start.

`postgresql.conf` is rendered by Argon (users change settings through the API's `pg_settings`) on
top of what `initdb` wrote for the version and locale (the compute spec carries those), so only the
settings below differ from a plain cluster, each on purpose (tests/integration/test_plain_cluster.py),
`postgresql.auto.conf` is emptied (a clone must not inherit its parent's), and authentication is
fixed: the platform's own role `cloud_admin` only by peer authentication from the OS user Argon
runs as, every other role only by SCRAM over the Unix socket. Computes never listen on TCP.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from argon import safefs
from argon.model import PLATFORM_ROLE

BASE_SETTINGS: dict[str, str] = {
    "listen_addresses": "",
    "port": "5432",
    "unix_socket_permissions": "0700",
    "password_encryption": "scram-sha-256",
    "ssl": "off",
    "logging_collector": "off",
    "log_destination": "stderr",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "huge_pages": "off",
    "jit": "off",
    # initdb scales these to the segment size (64 and 5 segments); templates use 1 MB segments to keep
    # copies small, not to checkpoint sixteen times as often: a 16 MB-segment cluster's max_wal_size.
    # min_wal_size stays initdb's 5 MB, and segments a checkpoint no longer needs are removed, not
    # renamed for later: recycled WAL would stay on disk in every suspended project (ADR 0022).
    "max_wal_size": "1GB",
    "wal_recycle": "off",
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "shared_preload_libraries": "",
}


def quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def render_conf(socket_dir: Path, gucs: Mapping[str, str]) -> str:
    settings = dict(BASE_SETTINGS)
    settings.update(gucs)
    settings["unix_socket_directories"] = str(socket_dir)  # never overridable
    settings["listen_addresses"] = ""
    lines = ["# Managed by Argon and rewritten at every start: change settings through the API."]
    lines += [f"{name} = {quote(str(value))}" for name, value in sorted(settings.items())]
    return "\n".join(lines) + "\n"


def render_hba() -> str:
    return ("# Managed by Argon. The platform role by peer identity; every other role by SCRAM.\n"
            f"local all {PLATFORM_ROLE} peer map=argon\n"
            "local all all scram-sha-256\n")


def render_ident(argon_os_user: str) -> str:
    return f"# Managed by Argon.\nargon {argon_os_user} {PLATFORM_ROLE}\n"


def write_config(pgdata: Path, socket_dir: Path, gucs: Mapping[str, str], argon_os_user: str,
                 owner: safefs.Owner | None = None) -> None:
    """Write the four files, given to `owner`, the compute's user (`argon.safefs`: the compute's uid
    owns `pgdata` and may have put links, FIFOs or hard links to root's files there)."""
    with safefs.Dir(pgdata) as d:
        d.write("postgresql.conf", render_conf(socket_dir, gucs), owner=owner)
        d.write("postgresql.auto.conf", "# Managed by Argon (ALTER SYSTEM is for the platform only).\n", owner=owner)
        d.write("pg_hba.conf", render_hba(), owner=owner)
        d.write("pg_ident.conf", render_ident(argon_os_user), owner=owner)

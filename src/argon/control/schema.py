r"""Schemas: the DDL of a branch's database (now or at a point in time), and schema-only branches.

Both go through the project's own `pg_dump` (at least the server's version, design §8), connected
as the platform role over a Unix socket: the branch's compute (woken if idle), or, for a branch
without one, a throw-away running copy of its data. The session ends with the dump, so no platform
session stays in a user database. Database names reach the tools only inside a quoted conninfo
value: a database called `host=... dbname=...` is a name, never connection parameters.

What the tools read is the tenant's (its catalog; a restored dump may carry psql meta-commands such
as `\! cmd`), so `pg_dump`, `pg_dumpall` and `psql` run as the project's uid with a clean
environment (no HOME, no `.psqlrc`, no `.pgpass`), reaching the platform role through
`argon.compute.toolrelay`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from pathlib import Path

from psycopg import sql

from argon import model, safefs
from argon.compute.admin import connect_admin_sync, conninfo
from argon.compute.binaries import PgInstall
from argon.compute.osuser import OsUser, project_user
from argon.compute.scratch import scratch_postmaster
from argon.compute.toolrelay import tool_socket
from argon.control import pitr
from argon.control.endpoints import wake
from argon.control.plane import ControlPlane
from argon.control.services import Control
from argon.errors import NotFound, StorageError, UserError
from argon.storage import branching, wal

log = logging.getLogger(__name__)

# Lines that differ between two dumps of the same schema: version banners, PG18's random \restrict keys.
_NOISE = re.compile(r"^(\\restrict |\\unrestrict |-- Dumped (from database|by pg_dump) version)")
# The platform role's own statements in `pg_dumpall --roles-only`: the template has that role already.
_PLATFORM_ROLE_SQL = re.compile(rf"^(CREATE|ALTER) ROLE {model.PLATFORM_ROLE}[ ;]")
# Restore errors that only say the template had it already (its roles, `postgres`, `neondb`).
_EXPECTED = re.compile(r"already exists")
_TEMPLATE_DBS = ("template0", "template1")


def _env() -> dict[str, str]:
    """Nothing of Argon's environment: no HOME (so no `~/.psqlrc`, `~/.pgpass` or service file), no PG*
    variable but the timeout."""
    return {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PGCONNECT_TIMEOUT": "20", "HOME": "/nonexistent",
            "PGPASSFILE": "/nonexistent/.pgpass", "PGSYSCONFDIR": "/nonexistent"}


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dsn(socket_dir: Path, dbname: str) -> str:
    """A libpq conninfo string for the platform role; every value quoted."""
    return " ".join(f"{k}={_quote(v)}" for k, v in conninfo(socket_dir, dbname).items())


def _run(install: PgInstall, tool: str, *args: str, stdin: str | None = None,
         user: OsUser | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client tool as `user` (the project's uid; ourselves when None or unprivileged)."""
    return subprocess.run([str(install.bin(tool)), *args], input=stdin, capture_output=True, text=True,
                          env=_env(), timeout=600, **safefs.run_as(user))


def _failure(tool: str, out: subprocess.CompletedProcess[str]) -> StorageError:
    lines = out.stderr.strip().splitlines()
    return StorageError(f"{tool} failed: {lines[-1] if lines else 'exit status ' + str(out.returncode)}")


def dump_schema_sync(install: PgInstall, socket_dir: Path, database: str, run_dir: Path,
                     user: OsUser | None = None) -> str:
    """`pg_dump --schema-only` of one database (owners, privileges and comments included, like
    Neon's), without the lines that differ between two dumps of the same schema; run as `user`."""
    with tool_socket(socket_dir, run_dir, user) as tools:
        out = _run(install, "pg_dump", "--schema-only", "-d", _dsn(tools, database), user=user)
    if out.returncode != 0:
        if "does not exist" in out.stderr and "database" in out.stderr:
            raise NotFound(f"database {database!r} does not exist")
        raise _failure("pg_dump", out)
    return "".join(line for line in out.stdout.splitlines(keepends=True) if not _NOISE.match(line))


@asynccontextmanager
async def head_socket(control: Control, project: model.Project, branch: model.Branch, *,
                      take_lock: bool) -> AsyncIterator[Path]:
    """The socket dir of a running `branch` at its head: its compute (started if idle), or, when it
    has no read-write compute, a throw-away running copy of its (stopped) data. `take_lock`: hold the
    project lock while copying (False when the caller holds it, or has registered the branch as
    being read in `plane.creating`)."""
    plane = control.plane
    await control.restored(branch.id, reason="schema")  # a lazy restore's branch: its data first
    ep = plane.primary(project.id, branch.id)
    if ep is not None:
        await wake(control, ep.id, reason="schema")
        yield plane.layout.socket_dir(ep.id)
        return
    scratch = plane.layout.branch_dir(project.id, branch.id) / f"tmp-{secrets.token_hex(4)}"
    source = plane.layout.pgdata(project.id, branch.id)
    user = project_user(project.os_uid)
    try:
        async with AsyncExitStack() as stack:
            if take_lock:
                await stack.enter_async_context(plane.project_lock(project.id))
            if plane.primary(project.id, branch.id) is not None:  # one was added meanwhile: its compute may run
                raise UserError("the branch got a compute meanwhile; retry")
            stopped = await asyncio.to_thread(wal.control_data, plane.installs[project.pg_version].bindir, source,
                                              user)
            await asyncio.to_thread(branching.clone_stopped, plane.backend, source, scratch, stopped, user)
        log_file = plane.layout.compute_log(project.id, branch.id).with_name("schema.log")
        async with _scratch(plane, project, scratch, log_file) as socket_dir:
            yield socket_dir
    finally:
        await asyncio.to_thread(safefs.rmtree, scratch)


async def branch_schema(control: Control, project_id: str, branch_id: str, database: str, *,
                        lsn: str | None = None, timestamp: str | datetime | None = None) -> str:
    """The DDL of `database` on a branch, at its head or at an LSN / a timestamp."""
    plane = control.plane
    project = plane.project(project_id)
    branch = plane.branch(project_id, branch_id)
    install = plane.installs.get(project.pg_version)
    if install is None:
        raise StorageError(f"PostgreSQL {project.pg_version} binaries are not available on this machine")
    if database in _TEMPLATE_DBS:
        raise NotFound(f"database {database!r} not found on branch {branch.name!r}")
    if lsn or timestamp:
        async with pitr.cluster_at(plane, project, branch, lsn=lsn, timestamp=timestamp) as socket_dir:
            return await _dump_known(plane, project, install, socket_dir, branch, database)
    # The cluster, not the metadata, says which databases exist (ones made through SQL count too).
    async with head_socket(control, project, branch, take_lock=True) as socket_dir:
        return await _dump_known(plane, project, install, socket_dir, branch, database)


async def _dump_known(plane: ControlPlane, project: model.Project, install: PgInstall, socket_dir: Path,
                      branch: model.Branch, database: str) -> str:
    try:
        return await asyncio.to_thread(dump_schema_sync, install, socket_dir, database, plane.layout.run_dir,
                                       project_user(project.os_uid))
    except NotFound:
        raise NotFound(f"database {database!r} not found on branch {branch.name!r}") from None


@asynccontextmanager
async def _scratch(plane: ControlPlane, project: model.Project, pgdata: Path, log_file: Path) -> AsyncIterator[Path]:
    """Run `pgdata` briefly (no archiving), yield its socket dir, stop it cleanly."""
    user = project_user(project.os_uid)
    async with scratch_postmaster(plane.installs[project.pg_version], pgdata, run_dir=plane.layout.run_dir,
                                  log_file=log_file, user=user, argon_os_user=plane.os_user,
                                  gucs=plane.scratch_gucs(project.pg_version),
                                  failure="could not start a scratch copy of the cluster",
                                  **plane.scratch_limits()) as scratch:
        yield scratch.socket_dir


# --- Schema-only branches ---------------------------------------------------------------------------------

_ROLES_SQL = "SELECT rolname FROM pg_roles WHERE rolname !~ '^pg_' AND rolname <> %s"
_DBS_SQL = "SELECT datname FROM pg_database WHERE NOT datistemplate AND datallowconn"


def _catalog(socket_dir: Path) -> tuple[set[str], list[str]]:
    """(roles, connectable databases) of a running cluster, platform role and pg_* roles left out."""
    with connect_admin_sync(socket_dir) as conn:
        roles = {r for (r,) in conn.execute(_ROLES_SQL, (model.PLATFORM_ROLE,)).fetchall()}
        dbs = [d for (d,) in conn.execute(_DBS_SQL).fetchall()]
    return roles, dbs


def _read_parent(install: PgInstall, socket_dir: Path, run_dir: Path,
                 user: OsUser | None = None) -> tuple[set[str], str, dict[str, str]]:
    """The parent's roles, its `pg_dumpall --roles-only` (same verifiers; the platform role's own
    statements left out) and a `pg_dump --create --schema-only` per database (so owner, encoding,
    locale and `ALTER DATABASE ... SET` come along); the tools run as `user`."""
    roles, dbs = _catalog(socket_dir)
    with tool_socket(socket_dir, run_dir, user) as tools:
        out = _run(install, "pg_dumpall", "--roles-only", "-d", _dsn(tools, "postgres"), user=user)
        if out.returncode != 0:
            raise _failure("pg_dumpall", out)
        roles_sql = "".join(line for line in out.stdout.splitlines(keepends=True)
                            if not _PLATFORM_ROLE_SQL.match(line))
        dumps = {}
        for db in dbs:
            out = _run(install, "pg_dump", "--schema-only", "--create", "-d", _dsn(tools, db), user=user)
            if out.returncode != 0:
                raise _failure("pg_dump", out)
            dumps[db] = out.stdout
    return roles, roles_sql, dumps


def _restore(install: PgInstall, socket_dir: Path, roles: set[str], roles_sql: str,
             dumps: dict[str, str], run_dir: Path, user: OsUser | None = None) -> list[str]:
    """Replay the parent's roles and schemas into the scratch cluster, then drop what the template
    has and the parent has not (`neondb`, `neondb_owner`). Returns the unexpected error lines.
    psql runs as `user`: a dump is the tenant's text, and psql obeys its meta-commands."""
    problems: list[str] = []

    with tool_socket(socket_dir, run_dir, user) as tools:

        def psql(script: str) -> None:
            # ON_ERROR_STOP=0: CREATE of what the template already has fails, and the rest must go on.
            out = _run(install, "psql", "-X", "-q", "-v", "ON_ERROR_STOP=0", "-d", _dsn(tools, "postgres"),
                       stdin=script, user=user)
            problems.extend(line for line in out.stderr.splitlines()
                            if "ERROR" in line and not _EXPECTED.search(line))

        psql(roles_sql)
        for script in dumps.values():
            psql(script)
    have_roles, have_dbs = _catalog(socket_dir)
    with connect_admin_sync(socket_dir) as conn:
        for db in have_dbs:
            if db not in dumps and db != "postgres":
                conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(db)))
        for role in sorted(have_roles - roles - {model.NEON_SUPERUSER}):  # a parent from before it existed
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    return problems


async def schema_only_copy(control: Control, project: model.Project, parent: model.Branch, target: Path) -> None:
    """A new cluster at `target` (a new directory) with the parent's roles (same verifiers, so the same
    passwords work) and databases with their schema (schemas, tables, views, functions, sequences,
    indexes, constraints, extensions, privileges, comments) and no rows: a pristine template copy
    into which the parent's `pg_dumpall --roles-only` and `pg_dump --schema-only` are restored, on
    a scratch postmaster stopped cleanly afterwards. The caller has registered the parent as being
read (`plane.creating`, ADR 0033): it gets no compute, restore or delete meanwhile."""
    plane = control.plane
    install = plane.installs.get(project.pg_version)
    template = plane.templates.get(project.pg_version)
    if install is None or template is None:
        raise StorageError(f"PostgreSQL {project.pg_version} is not available on this machine")
    user = project_user(project.os_uid)
    run_dir = plane.layout.run_dir
    async with head_socket(control, project, parent, take_lock=False) as source:
        roles, roles_sql, dumps = await asyncio.to_thread(_read_parent, install, source, run_dir, user)

    def make() -> None:
        safefs.makedirs(target.parent, owner=user)
        plane.spares.take(template, target, user)  # given to the project's uid before it is moved in
        with safefs.parent(target) as (d, name):
            d.chmod_dir(name, 0o700)

    await asyncio.to_thread(make)
    log_file = plane.layout.compute_log(project.id, target.parent.name)
    await asyncio.to_thread(safefs.makedirs, log_file.parent, owner=user)
    async with _scratch(plane, project, target, log_file) as socket_dir:
        problems = await asyncio.to_thread(_restore, install, socket_dir, roles, roles_sql, dumps, run_dir, user)
    if problems:
        log.warning("schema-only branch from %s: %d statement(s) failed, e.g. %s", parent.id, len(problems),
                    problems[0])
        if any("could not open extension control file" in p or "is not available" in p for p in problems):
            raise UserError("the parent's schema uses an extension this server's PostgreSQL "
                            f"{project.pg_version} lacks: {problems[0]}")

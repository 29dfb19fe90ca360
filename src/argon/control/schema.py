"""Schemas: the DDL of a branch's database (now or at a point in time), and schema-only branches.

Both go through the project's own `pg_dump` (at least the server's version, design §8), connected
as the platform role over the compute's Unix socket; the session ends with the dump, so no
platform session stays in a user database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from argon import model
from argon.compute import postmaster
from argon.compute.admin import conninfo
from argon.compute.binaries import PgInstall
from argon.compute.manager import ComputeSpec, prepare
from argon.compute.osuser import OsUser, chown_tree
from argon.compute.params import gucs_for_cu
from argon.compute.postmaster import ComputeStartError
from argon.errors import NotFound, Precondition, StorageError, UserError

if TYPE_CHECKING:
    from argon.control.plane import ControlPlane

log = logging.getLogger(__name__)

_NOISE = re.compile(r"^(\\restrict |\\unrestrict |-- Dumped (from database|by pg_dump) version)")
_TEMPLATE_DBS = ("template0", "template1")


def _env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PGCONNECT_TIMEOUT": "20"}


def _conn_args(socket_dir: Path, dbname: str) -> list[str]:
    info = conninfo(socket_dir, dbname)
    return ["-h", info["host"], "-p", info["port"], "-U", info["user"], "-d", dbname]


def dump_schema_sync(install: PgInstall, socket_dir: Path, database: str) -> str:
    """`pg_dump --schema-only` of one database, without the lines that differ between two dumps of
    the same schema (version banners, PG18's random `\\restrict` keys)."""
    out = subprocess.run([str(install.bin("pg_dump")), "--schema-only", "--no-comments",
                          *_conn_args(socket_dir, database)], capture_output=True, text=True, env=_env(), timeout=600)
    if out.returncode != 0:
        raise StorageError(f"pg_dump failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'error'}")
    return "".join(line for line in out.stdout.splitlines(keepends=True) if not _NOISE.match(line))


async def _rw_endpoint_socket(plane: ControlPlane, branch: model.Branch) -> Path:
    ep = next((e for e in plane.endpoints(branch.project_id, branch.id) if e.type is model.EndpointType.READ_WRITE),
              None)
    if ep is None:
        raise Precondition(f"branch {branch.name!r} has no compute; add one (POST /endpoints) to read its schema")
    await plane.ensure_running(ep.id, reason="schema")
    return plane.layout.socket_dir(ep.id)


async def branch_schema(plane: ControlPlane, project_id: str, branch_id: str, database: str, *,
                        lsn: str | None = None, timestamp: str | datetime | None = None) -> str:
    """The DDL of `database` on a branch, at its head or at an LSN / a timestamp."""
    from argon.control import history

    project = plane.project(project_id)
    branch = plane.branch(project_id, branch_id)
    install = plane.installs.get(project.pg_version)
    if install is None:
        raise StorageError(f"PostgreSQL {project.pg_version} binaries are not available on this machine")
    dbs = {d.name for d in await plane.db(plane.store.list_databases, branch_id)}
    if database not in dbs:
        raise NotFound(f"database {database!r} not found on branch {branch.name!r}")
    if lsn or timestamp:
        async with history.cluster_at(plane, project, branch, lsn=lsn, timestamp=timestamp) as socket_dir:
            return await asyncio.to_thread(dump_schema_sync, install, socket_dir, database)
    socket_dir = await _rw_endpoint_socket(plane, branch)
    return await asyncio.to_thread(dump_schema_sync, install, socket_dir, database)


# --- Schema-only branches ---------------------------------------------------------------------------------

@asynccontextmanager
async def scratch_postmaster(plane: ControlPlane, project: model.Project, pgdata: Path,
                             log_file: Path) -> AsyncIterator[Path]:
    """Run `pgdata` briefly (no archiving), yield its socket dir, stop it cleanly."""
    install = plane.installs[project.pg_version]
    user = OsUser(project.os_uid, project.os_uid) if project.os_uid is not None else None
    socket_dir = plane.layout.run_dir / f"sc-{secrets.token_hex(4)}"
    spec = ComputeSpec(endpoint_id=socket_dir.name, install=install, pgdata=pgdata, socket_dir=socket_dir,
                       log_file=log_file, user=user, gucs=gucs_for_cu(0.25) | {"archive_mode": "off"},
                       argon_os_user=plane.os_user)
    await asyncio.to_thread(prepare, spec)
    pm = postmaster.start(install, pgdata, log_file, user)
    try:
        try:
            await pm.wait_ready()
        except ComputeStartError as exc:
            raise StorageError(f"could not start a scratch copy of the cluster: {exc.user_message}") from None
        yield socket_dir
        await pm.stop("fast")
    finally:
        if pm.alive:
            pm.kill_group()
        await asyncio.to_thread(shutil.rmtree, socket_dir, True)


def _psql(install: PgInstall, socket_dir: Path, database: str, script: str) -> list[str]:
    """Run `script`, statement errors included (e.g. CREATE ROLE of a role the template has), and
    return the error lines."""
    out = subprocess.run([str(install.bin("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=0",
                          *_conn_args(socket_dir, database)], input=script, capture_output=True, text=True,
                         env=_env(), timeout=600)
    return [line for line in out.stderr.splitlines() if "ERROR" in line]


def _dump_roles(install: PgInstall, socket_dir: Path) -> str:
    out = subprocess.run([str(install.bin("pg_dumpall")), "--roles-only", "-h", str(socket_dir), "-p", "5432",
                          "-U", model.PLATFORM_ROLE], capture_output=True, text=True, env=_env(), timeout=600)
    if out.returncode != 0:
        raise StorageError(f"pg_dumpall failed: {out.stderr.strip()[-300:]}")
    # The platform's own role is the template's; never let a dump change it.
    return "".join(line for line in out.stdout.splitlines(keepends=True)
                   if model.PLATFORM_ROLE not in line and not _NOISE.match(line))


async def schema_only_copy(plane: ControlPlane, project: model.Project, parent: model.Branch, target: Path) -> None:
    """A new cluster at `target` (a new directory) with the parent's roles (same verifiers) and the
    schema of each of its databases, without rows: a pristine template copy, then the parent's
    `pg_dumpall --roles-only` and `pg_dump --schema-only`, restored into it."""
    install = plane.installs.get(project.pg_version)
    template = plane.templates.get(project.pg_version)
    if install is None or template is None:
        raise StorageError(f"PostgreSQL {project.pg_version} is not available on this machine")
    source = await _rw_endpoint_socket(plane, parent)
    parent_dbs = [d for d in await plane.db(plane.store.list_databases, parent.id)]
    roles_sql = await asyncio.to_thread(_dump_roles, install, source)
    dumps = {d.name: await asyncio.to_thread(dump_schema_sync, install, source, d.name) for d in parent_dbs}

    def make() -> None:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not plane.spares.claim(template, target):
            plane.backend.clone_tree(template, target)
        if project.os_uid is not None:
            chown_tree(target, OsUser(project.os_uid, project.os_uid))
        os.chmod(target, 0o700)

    await asyncio.to_thread(make)
    log_file = plane.layout.compute_log(project.id, target.parent.name)
    await asyncio.to_thread(log_file.parent.mkdir, 0o700, True, True)
    if project.os_uid is not None:
        await asyncio.to_thread(os.chown, log_file.parent, project.os_uid, project.os_uid)
    async with scratch_postmaster(plane, project, target, log_file) as socket_dir:
        problems = await asyncio.to_thread(_psql, install, socket_dir, "postgres", roles_sql)
        problems = [p for p in problems if "already exists" not in p]
        for db in parent_dbs:
            if db.name in _TEMPLATE_DBS:
                continue
            if db.name != "postgres":
                create = f'CREATE DATABASE "{db.name.replace(chr(34), chr(34) * 2)}" OWNER ' \
                         f'"{db.owner_name.replace(chr(34), chr(34) * 2)}"'
                problems += [p for p in await asyncio.to_thread(_psql, install, socket_dir, "postgres", create)
                             if "already exists" not in p]
            problems += await asyncio.to_thread(_psql, install, socket_dir, db.name, dumps[db.name])
    if problems:
        log.warning("schema-only branch from %s: %d statement(s) failed, e.g. %s", parent.id, len(problems),
                    problems[0])
        if any("could not open extension control file" in p or "is not available" in p for p in problems):
            raise UserError("the parent's schema uses an extension this server's PostgreSQL "
                            f"{project.pg_version} lacks: {problems[0]}")

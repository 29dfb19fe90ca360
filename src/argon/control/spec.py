"""Apply the platform's role and database spec to a running compute, and read verifiers back.

The proxy logs into computes with the ClientKey it recovered from the client's SCRAM proof, so the
compute must hold a byte-identical verifier for every role the platform knows (design §8). At the
first start after a change the platform's spec is applied here, before the wake completes.
Identifiers and literals reach SQL only through psycopg's `sql` composition (always quoted).
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg import AsyncConnection, sql

from argon import model
from argon.compute.admin import connect_admin
from argon.compute.manager import ComputeSpec
from argon.control.plane import ControlPlane

log = logging.getLogger(__name__)

VERIFIER_TIMEOUT = 2.0  # seconds for reading one verifier on the admin session
SYNC_TIMEOUT = 10.0  # seconds for reading a compute's roles or databases


NEON_SUPERUSER = model.NEON_SUPERUSER


def neon_superuser_sql(pg_version: int) -> sql.Composable:
    """Neon's `neon_superuser`, idempotently: the group every role made through the API joins (what
    Neon's API roles are). NOLOGIN; reads and writes every table (pg_read_all_data,
    pg_write_all_data: neither bypasses row security nor reaches the catalogs' writes or the host);
    its members create schemas and allow-listed extensions in every database the platform made
    (`database_grant`). The attributes are the API roles' own (`role_attributes`): Postgres does
    not inherit CREATEDB or CREATEROLE through membership."""
    return sql.SQL(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {name}) THEN "
        "CREATE ROLE {ident} WITH NOLOGIN {attrs}; END IF; "
        "GRANT pg_read_all_data, pg_write_all_data TO {ident}; END $$").format(
        name=sql.Literal(NEON_SUPERUSER), ident=sql.Identifier(NEON_SUPERUSER),
        attrs=sql.SQL("CREATEDB CREATEROLE" if pg_version >= 16 else "CREATEDB"))


def database_grant(database: str) -> sql.Composable:
    """CREATE (schemas, trusted extensions), CONNECT and TEMP on a database for neon_superuser."""
    return sql.SQL("GRANT ALL ON DATABASE {} TO {}").format(sql.Identifier(database), sql.Identifier(NEON_SUPERUSER))


def create_api_role(name: str, pg_version: int, verifier: str, *, replication: bool = False) -> sql.Composable:
    return sql.SQL("CREATE ROLE {} WITH {} PASSWORD {} IN ROLE {}").format(
        sql.Identifier(name), role_attributes(pg_version, replication=replication), sql.Literal(verifier),
        sql.Identifier(NEON_SUPERUSER))


def role_attributes(pg_version: int, *, replication: bool = False) -> sql.Composable:
    """What API-made roles may do: create databases always; create roles only where that cannot lead
    to pg_execute_server_program (PG16+ ADMIN OPTION model; on PG15 CREATEROLE can grant it); with
    logical replication enabled, publish (REPLICATION: walsenders for their own cluster only; the
    proxy forwards logical replication connections alone, and pg_hba has no physical line)."""
    attrs = "LOGIN CREATEDB"
    if pg_version >= 16:
        attrs += " CREATEROLE"
    if replication:
        attrs += " REPLICATION"
    return sql.SQL(attrs)


async def grant_replication(conn: AsyncConnection[Any], pg_version: int, roles: list[str]) -> None:
    """Logical replication's privileges for the platform's roles, as Neon gives its roles: REPLICATION
    (publish) and, on 16+, pg_create_subscription (subscribe; on 15 only a superuser can)."""
    cur = await conn.execute("SELECT rolname, rolreplication FROM pg_authid WHERE rolname = ANY(%s)", (roles,))
    for name, replication in await cur.fetchall():
        if not replication:
            await conn.execute(sql.SQL("ALTER ROLE {} WITH REPLICATION").format(sql.Identifier(name)))
        if pg_version >= 16:
            await conn.execute(sql.SQL("GRANT pg_create_subscription TO {}").format(sql.Identifier(name)))


async def apply_spec(plane: ControlPlane, ep: model.Endpoint, spec: ComputeSpec) -> None:
    project = plane.project(ep.project_id)
    roles = await plane.db(plane.store.list_roles, ep.branch_id)
    databases = await plane.db(plane.store.list_databases, ep.branch_id)
    conn = await connect_admin(spec.socket_dir)
    try:
        cur = await conn.execute("SELECT rolname, rolpassword FROM pg_authid")
        existing_roles = {name: pw for name, pw in await cur.fetchall()}
        if NEON_SUPERUSER not in existing_roles and any(r.name not in existing_roles for r in roles):
            # Only where something is written anyway: a read replica's spec writes nothing.
            await conn.execute(neon_superuser_sql(project.pg_version))
        for role in roles:
            if role.name not in existing_roles and not role.login:
                await conn.execute(sql.SQL("CREATE ROLE {} WITH NOLOGIN").format(sql.Identifier(role.name)))
            elif role.name not in existing_roles:
                await conn.execute(create_api_role(role.name, project.pg_version, str(role.verifier)))
                log.info("created role %s on %s", role.name, ep.id)
            elif role.verifier and existing_roles[role.name] != role.verifier:
                await conn.execute(sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                    sql.Identifier(role.name), sql.Literal(role.verifier)))
        if project.settings.enable_logical_replication:
            await grant_replication(conn, project.pg_version, [r.name for r in roles])
        cur = await conn.execute("SELECT datname FROM pg_database")
        existing_dbs = {name for (name,) in await cur.fetchall()}
        for db in databases:
            if db.name not in existing_dbs:
                await conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(db.name), sql.Identifier(db.owner_name)))
                await conn.execute(neon_superuser_sql(project.pg_version))
                await conn.execute(database_grant(db.name))
                log.info("created database %s on %s", db.name, ep.id)
    finally:
        await conn.close()


async def sync_verifier(plane: ControlPlane, ep: model.Endpoint, role_name: str) -> None:
    """Read one role's verifier from a running compute (it may have been changed through SQL), on
    the compute's admin session."""
    session = plane.computes.admin(ep.id)
    if session is None:
        return
    row = await session.fetchone("SELECT rolpassword, rolcanlogin FROM pg_authid WHERE rolname = %s", (role_name,),
                                 timeout=VERIFIER_TIMEOUT)
    role = await plane.db(plane.store.get_role, ep.branch_id, role_name)
    if row is None or not row[0] or not str(row[0]).startswith("SCRAM-SHA-256$"):
        if role is not None and role.verifier:
            await plane.commit(put=[role.replace(verifier=None)])  # no SCRAM login any more
        return
    verifier, can_login = str(row[0]), bool(row[1])
    now = model.utcnow()
    if role is None:
        # A role made through SQL: the proxy can let it in from now on; its password is unknown to us.
        await plane.commit(put=[model.Role(branch_id=ep.branch_id, name=role_name, created_at=now, updated_at=now,
                                           verifier=verifier, login=can_login)])
    elif role.verifier != verifier:
        # Changed through SQL: the stored plaintext (if any) is stale now.
        await plane.commit(put=[role.replace(verifier=verifier, password_enc=None, login=can_login)])


_ROLES_SQL = ("SELECT rolname, rolpassword, rolcanlogin FROM pg_authid "
              f"WHERE rolname !~ '^pg_' AND rolname <> %s AND rolname <> '{NEON_SUPERUSER}' ORDER BY rolname")
_DATABASES_SQL = ("SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                  "WHERE NOT datistemplate AND datname <> 'postgres' ORDER BY datname")


async def sync_from_compute(plane: ControlPlane, ep: model.Endpoint) -> bool:
    """Make the platform's view of a branch's roles and databases match its running compute: what was
    created, changed or dropped through SQL (Django's test databases, ALTER ROLE ... PASSWORD) shows
    up in the API. Platform-internal roles (`cloud_admin`, `pg_*`) and `postgres` stay hidden.
    Returns whether anything changed. The caller keeps API mutations of the project out meanwhile."""
    session = plane.computes.admin(ep.id)
    if session is None:
        return False
    live_roles = {name: (pw, login) for name, pw, login in
                  await session.fetchall(_ROLES_SQL, (model.PLATFORM_ROLE,), timeout=SYNC_TIMEOUT)}
    live_dbs = dict(await session.fetchall(_DATABASES_SQL, timeout=SYNC_TIMEOUT))
    roles = {r.name: r for r in await plane.db(plane.store.list_roles, ep.branch_id)}
    dbs = {d.name: d for d in await plane.db(plane.store.list_databases, ep.branch_id)}
    now = model.utcnow()
    put_roles: list[model.Role] = []
    for name, (pw, login) in live_roles.items():
        verifier = str(pw) if pw and str(pw).startswith("SCRAM-SHA-256$") else None
        known = roles.get(name)
        if known is None:
            put_roles.append(model.Role(branch_id=ep.branch_id, name=name, created_at=now, updated_at=now,
                                        verifier=verifier, login=bool(login)))
        elif known.verifier != verifier or known.login != bool(login):
            # Changed through SQL: the stored password (if any) no longer matches.
            put_roles.append(known.replace(verifier=verifier, login=bool(login),
                                           password_enc=known.password_enc if known.verifier == verifier else None))
    gone_roles = [r for name, r in roles.items() if name not in live_roles]
    gone_dbs = [d for name, d in dbs.items() if name not in live_dbs]
    changed_dbs = [d for name, d in dbs.items() if name in live_dbs and live_dbs[name] != d.owner_name]
    new_dbs = [name for name in live_dbs if name not in dbs]
    if not (put_roles or gone_roles or gone_dbs or changed_dbs or new_dbs):
        return False

    changed = [model.Database(**{**d.__dict__, "owner_name": live_dbs[d.name], "updated_at": now}) for d in changed_dbs]
    created = [model.Database(id=0, branch_id=ep.branch_id, name=name, owner_name=live_dbs[name], created_at=now,
                              updated_at=now) for name in new_dbs]
    await plane.commit(delete=[*gone_roles, *gone_dbs], put=[*put_roles, *changed, *created])
    await plane.record(ep.project_id, model.OperationAction.SYNC_DBS_AND_ROLES_FROM_COMPUTE, branch_id=ep.branch_id,
                       endpoint_id=ep.id)
    log.info("synced %s from its compute: roles +%d/-%d, databases +%d/-%d", ep.branch_id, len(put_roles),
             len(gone_roles), len(new_dbs), len(gone_dbs))
    return True

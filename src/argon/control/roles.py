"""Roles and databases of a branch, changed through the API and applied to the compute at once.

Every change wakes the branch's compute and applies the statement before the API answers, so the
answer is true when it is returned (a change made while the compute is suspended would otherwise
need a persistent queue of drops and renames). Identifiers and passwords reach SQL only through
psycopg's `sql` composition; admin sessions never log statements (a failed ALTER ROLE would log
the verifier otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg
from psycopg import sql

from argon import ids, model
from argon.compute.admin import connect_admin
from argon.control.endpoints import wake
from argon.control.plane import ControlPlane
from argon.control.services import Control
from argon.control.spec import create_api_role, database_grant, neon_superuser_sql, sync_from_compute
from argon.errors import Conflict, NotFound, UserError
from argon.failpoints import failpoint_async
from argon.wire.scram import ScramSecret

log = logging.getLogger(__name__)


# Names Postgres refuses for a role (`public`, `none`, the `current_user` family) or that the
# platform's own roles hold (`cloud_admin`, `neon_superuser`, the `pg_` prefix).
_RESERVED_ROLES = frozenset({model.PLATFORM_ROLE, model.NEON_SUPERUSER, "public", "none", "current_user",
                             "session_user", "current_role"})


def check_role_name(name: object) -> str:
    """A role name the API may create (a project's first role too): a 400 for one that is reserved."""
    value = ids.check_pg_name(name, "role")
    if value in _RESERVED_ROLES or value.startswith("pg_"):
        raise UserError(f"role name {value!r} is reserved")
    return value


def check_db_name(name: object) -> str:
    """A database name the API may create (a project's first database too)."""
    value = ids.check_pg_name(name, "database")
    if value in ("postgres", "template0", "template1"):
        raise UserError(f"database name {value!r} is reserved")
    return value


def _primary_endpoint(plane: ControlPlane, project_id: str, branch_id: str) -> model.Endpoint:
    plane.branch(project_id, branch_id)
    ep = plane.primary(project_id, branch_id)
    if ep is None:
        raise Conflict(f"branch {branch_id!r} has no read-write endpoint to apply the change on; create one first")
    return ep


def roles_key(endpoint_id: str) -> str:
    """The intent of a role change on the endpoint's compute (`argon.storage.intents`): a role create
    carries the role (the reconciler finishes it), a password reset only its name (the reconciler
    puts the stored verifier back)."""
    return f"roles-{endpoint_id}"


def finish_role_intent(plane: ControlPlane, intent: dict[str, object]) -> model.Role | None:
    """The reconciler: the role a cut-short create meant to store, if it is not stored yet (blocking;
    the store's thread)."""
    made = intent.get("create")
    if not isinstance(made, dict) or plane.store.get_role(str(intent["branch"]), str(made["name"])) is not None:
        return None
    now = model.utcnow()
    return model.Role(branch_id=str(intent["branch"]), name=str(made["name"]), created_at=now, updated_at=now,
                      verifier=made["verifier"], password_enc=made["password_enc"], login=bool(made["login"]))


async def _execute(control: Control, ep: model.Endpoint, statements: list[sql.Composable],
                   dbname: str = "postgres") -> None:
    plane = control.plane
    await wake(control, ep.id, reason="apply config")
    plane.activity.touch(ep.id)
    conn = await connect_admin(plane.layout.socket_dir(ep.id), dbname)
    try:
        for stmt in statements:
            await conn.execute(stmt)
    except psycopg.errors.DependentObjectsStillExist as exc:
        raise Conflict(f"cannot apply the change: {exc.diag.message_primary}") from None
    except psycopg.errors.ObjectInUse as exc:
        raise Conflict(f"cannot apply the change while it is in use: {exc.diag.message_primary}") from None
    except (psycopg.errors.DuplicateObject, psycopg.errors.DuplicateDatabase) as exc:
        # made through SQL since the store last synced (the next list takes it in): as the API's own check says
        raise Conflict(f"{exc.diag.message_primary} on branch {ep.branch_id!r}") from None
    finally:
        await conn.close()


async def create_role(control: Control, project_id: str, branch_id: str, name: object,
                      no_login: bool = False) -> tuple[model.Role, str | None, list[model.Operation]]:
    plane = control.plane
    role_name = check_role_name(name)
    async with plane.project_lock(project_id):
        ep = _primary_endpoint(plane, project_id, branch_id)
        if await plane.db(plane.store.get_role, branch_id, role_name) is not None:
            raise Conflict(f"role {role_name!r} already exists on branch {branch_id!r}")
        started = time.monotonic()
        project = plane.project(project_id)
        password = None if no_login else ids.password()
        verifier = ScramSecret.from_password(password).to_string() if password else None
        logical = project.settings.enable_logical_replication
        if verifier:
            stmt = create_api_role(role_name, project.pg_version, verifier, replication=logical)
        else:
            stmt = sql.SQL("CREATE ROLE {} WITH NOLOGIN").format(sql.Identifier(role_name))
        statements = [neon_superuser_sql(project.pg_version), stmt]
        if verifier and logical and project.pg_version >= 16:
            statements.append(sql.SQL("GRANT pg_create_subscription TO {}").format(sql.Identifier(role_name)))
        now = model.utcnow()
        role = model.Role(branch_id=branch_id, name=role_name, created_at=now, updated_at=now, verifier=verifier,
                          password_enc=plane.secrets.encrypt(password) if password else None, login=not no_login)
        # Cut short after this, the reconciler finishes the create: the role into the store, and onto
        # the compute with the pending spec (the password is only in the intent and the store).
        await asyncio.to_thread(plane.intents.put, roles_key(ep.id), {
            "endpoint": ep.id, "branch": branch_id, "create": {
                "name": role_name, "verifier": verifier, "password_enc": role.password_enc, "login": role.login}})
        await failpoint_async("role.create.after_intent")
        try:
            await _execute(control, ep, statements)
        except Conflict:  # the compute refused it (the name is taken there): nothing to finish
            await asyncio.to_thread(plane.intents.remove, roles_key(ep.id))
            raise
        await failpoint_async("role.create.after_sql")
        await plane.commit(put=[role])  # the commit point
        await failpoint_async("role.create.after_metadata")
        await asyncio.to_thread(plane.intents.remove, roles_key(ep.id))
        op = await plane.record(project_id, model.OperationAction.APPLY_CONFIG, branch_id=branch_id,
                                endpoint_id=ep.id, started=started)
        return role, password, [op]


async def get_role(control: Control, project_id: str, branch_id: str, name: str) -> model.Role:
    plane = control.plane
    plane.branch(project_id, branch_id)
    role = await plane.db(plane.store.get_role, branch_id, name)
    if role is None or role.name == model.PLATFORM_ROLE:
        raise NotFound(f"role {name!r} not found on branch {branch_id!r}")
    return role


async def reset_password(control: Control, project_id: str, branch_id: str,
                         name: str) -> tuple[model.Role, str, list[model.Operation]]:
    plane = control.plane
    async with plane.project_lock(project_id):
        role = await get_role(control, project_id, branch_id, name)
        ep = _primary_endpoint(plane, project_id, branch_id)
        started = time.monotonic()
        password = ids.password()
        verifier = ScramSecret.from_password(password).to_string()
        # The compute changes first, the store second: cut short in between, the reconciler puts the
        # stored verifier back on the compute (the old password; the client never saw the new one).
        await asyncio.to_thread(plane.intents.put, roles_key(ep.id), {"endpoint": ep.id, "branch": branch_id,
                                                                      "reset": role.name})
        await failpoint_async("role.reset_password.after_intent")
        await _execute(control, ep, [sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
            sql.Identifier(role.name), sql.Literal(verifier))])
        await failpoint_async("role.reset_password.after_sql")
        role = role.replace(verifier=verifier, password_enc=plane.secrets.encrypt(password), login=True)
        await plane.commit(put=[role])  # the commit point: the proxy checks the new verifier from now on
        await failpoint_async("role.reset_password.after_metadata")
        await asyncio.to_thread(plane.intents.remove, roles_key(ep.id))
        op = await plane.record(project_id, model.OperationAction.APPLY_CONFIG, branch_id=branch_id,
                                endpoint_id=ep.id, started=started)
        return role, password, [op]


async def delete_role(control: Control, project_id: str, branch_id: str,
                      name: str) -> tuple[model.Role, list[model.Operation]]:
    plane = control.plane
    async with plane.project_lock(project_id):
        role = await get_role(control, project_id, branch_id, name)
        owned = [d.name for d in await plane.db(plane.store.list_databases, branch_id) if d.owner_name == role.name]
        if owned:
            raise Conflict(f"role {role.name!r} owns database(s) {', '.join(owned)}; delete them or change "
                           "their owner first")
        ep = _primary_endpoint(plane, project_id, branch_id)
        started = time.monotonic()
        databases = [d.name for d in await plane.db(plane.store.list_databases, branch_id)]
        ident = sql.Identifier(role.name)
        # Objects the role owns inside databases go to each database's owner first, as Neon does.
        await wake(control, ep.id, reason="apply config")
        for db in databases:
            owner = next(d.owner_name for d in await plane.db(plane.store.list_databases, branch_id) if d.name == db)
            await _execute(control, ep, [sql.SQL("REASSIGN OWNED BY {} TO {}").format(ident, sql.Identifier(owner)),
                                       sql.SQL("DROP OWNED BY {}").format(ident)], dbname=db)
        await _execute(control, ep, [sql.SQL("DROP ROLE IF EXISTS {}").format(ident)])
        await failpoint_async("role.delete.after_sql")
        await plane.commit(delete=[role])
        await failpoint_async("role.delete.after_metadata")
        op = await plane.record(project_id, model.OperationAction.APPLY_CONFIG, branch_id=branch_id,
                                endpoint_id=ep.id, started=started)
        return role, [op]


async def create_database(control: Control, project_id: str, branch_id: str, name: object,
                          owner_name: object) -> tuple[model.Database, list[model.Operation]]:
    plane = control.plane
    db_name = check_db_name(name)
    if not isinstance(owner_name, str) or not owner_name:
        raise UserError("owner_name is required: the role that will own the database")
    async with plane.project_lock(project_id):
        ep = _primary_endpoint(plane, project_id, branch_id)
        if await plane.db(plane.store.get_database, branch_id, db_name) is not None:
            raise Conflict(f"database {db_name!r} already exists on branch {branch_id!r}")
        await get_role(control, project_id, branch_id, owner_name)
        started = time.monotonic()
        await _execute(control, ep, [sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(db_name), sql.Identifier(owner_name)),
            neon_superuser_sql(plane.project(project_id).pg_version), database_grant(db_name)])
        await failpoint_async("database.create.after_sql")
        now = model.utcnow()
        [db] = await plane.commit(put=[model.Database(id=0, branch_id=branch_id, name=db_name,
                                                      owner_name=owner_name, created_at=now, updated_at=now)])
        await failpoint_async("database.create.after_metadata")
        op = await plane.record(project_id, model.OperationAction.APPLY_CONFIG, branch_id=branch_id,
                                endpoint_id=ep.id, started=started)
        return db, [op]


async def get_database(control: Control, project_id: str, branch_id: str, name: str) -> model.Database:
    plane = control.plane
    plane.branch(project_id, branch_id)
    db = await plane.db(plane.store.get_database, branch_id, name)
    if db is None:
        raise NotFound(f"database {name!r} not found on branch {branch_id!r}")
    return db


async def update_database(control: Control, project_id: str, branch_id: str, name: str, *,
                          new_name: object = None, owner_name: object = None
                          ) -> tuple[model.Database, list[model.Operation]]:
    plane = control.plane
    async with plane.project_lock(project_id):
        db = await get_database(control, project_id, branch_id, name)
        ep = _primary_endpoint(plane, project_id, branch_id)
        started = time.monotonic()
        statements: list[sql.Composable] = []
        changes: dict[str, str] = {}
        if owner_name is not None and owner_name != db.owner_name:
            if not isinstance(owner_name, str):
                raise UserError("owner_name must be a role name")
            await get_role(control, project_id, branch_id, owner_name)
            statements.append(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(db.name), sql.Identifier(owner_name)))
            changes["owner_name"] = owner_name
        if new_name is not None and new_name != db.name:
            target = check_db_name(new_name)
            if await plane.db(plane.store.get_database, branch_id, target) is not None:
                raise Conflict(f"database {target!r} already exists on branch {branch_id!r}")
            statements.append(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                sql.Identifier(db.name), sql.Identifier(target)))
            changes["name"] = target
        if not statements:
            return db, []
        await _execute(control, ep, statements)
        updated = model.Database(**{**db.__dict__, **changes, "updated_at": model.utcnow()})
        await plane.commit(put=[updated])
        op = await plane.record(project_id, model.OperationAction.APPLY_CONFIG, branch_id=branch_id,
                                endpoint_id=ep.id, started=started)
        return updated, [op]


async def delete_database(control: Control, project_id: str, branch_id: str,
                          name: str) -> tuple[model.Database, list[model.Operation]]:
    plane = control.plane
    async with plane.project_lock(project_id):
        db = await get_database(control, project_id, branch_id, name)
        ep = _primary_endpoint(plane, project_id, branch_id)
        started = time.monotonic()
        # WITH (FORCE) ends sessions still on it (PG13+): deleting through the API means it.
        await _execute(control, ep, [sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db.name))])
        await failpoint_async("database.delete.after_sql")
        await plane.commit(delete=[db])
        await failpoint_async("database.delete.after_metadata")
        op = await plane.record(project_id, model.OperationAction.APPLY_CONFIG, branch_id=branch_id,
                                endpoint_id=ep.id, started=started)
        return db, [op]


async def sync_if_running(control: Control, project_id: str, branch_id: str) -> None:
    """Before answering a list: if the branch's compute runs, take in what changed through SQL."""
    plane = control.plane
    plane.branch(project_id, branch_id)
    # a compute still waiting for the platform's spec says nothing the store should take in
    running = [e for e in plane.endpoints(project_id, branch_id)
               if plane.is_running(e.id) and not control.computes.needs_spec(e.id)]
    if not running:
        return
    async with plane.project_lock(project_id):
        try:
            await sync_from_compute(plane, running[0])
        except Exception as exc:  # the stored view is still a good answer
            log.warning("could not sync roles and databases of %s: %s", branch_id, exc)

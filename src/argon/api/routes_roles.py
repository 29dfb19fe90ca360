"""/projects/{p}/branches/{b}/roles and /databases: Neon's role and database API."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from argon import model
from argon.api import views
from argon.api.deps import Authorized, FastJSON, JsonRoute
from argon.api.fields import Strict
from argon.control import roles
from argon.errors import Precondition

router = APIRouter(tags=["roles and databases"], route_class=JsonRoute)


class RoleCreate(Strict):
    name: str
    no_login: bool = False


class RoleCreateBody(Strict):
    role: RoleCreate


class DatabaseCreate(Strict):
    name: str
    owner_name: str


class DatabaseCreateBody(Strict):
    database: DatabaseCreate


class DatabaseUpdate(Strict):
    name: str | None = None
    owner_name: str | None = None


class DatabaseUpdateBody(Strict):
    database: DatabaseUpdate


def _ops(ops: list[model.Operation]) -> list[dict[str, Any]]:
    return [views.operation_view(o) for o in ops]


@router.get("/projects/{project_id}/branches/{branch_id}/roles")
async def list_roles(control: Authorized, project_id: str, branch_id: str) -> dict[str, Any]:
    plane = control.plane
    await roles.sync_if_running(control, project_id, branch_id)
    items = await plane.db(plane.store.list_roles, branch_id)
    return {"roles": [views.role_view(r) for r in items if r.name != model.PLATFORM_ROLE]}


@router.post("/projects/{project_id}/branches/{branch_id}/roles", status_code=201)
async def create_role(control: Authorized, project_id: str, branch_id: str, body: RoleCreateBody) -> FastJSON:
    role, password, ops = await roles.create_role(control, project_id, branch_id, body.role.name, body.role.no_login)
    return FastJSON({"role": views.role_view(role, password), "operations": _ops(ops)}, status_code=201)


@router.get("/projects/{project_id}/branches/{branch_id}/roles/{role_name}")
async def get_role(control: Authorized, project_id: str, branch_id: str, role_name: str) -> dict[str, Any]:
    return {"role": views.role_view(await roles.get_role(control, project_id, branch_id, role_name))}


@router.delete("/projects/{project_id}/branches/{branch_id}/roles/{role_name}")
async def delete_role(control: Authorized, project_id: str, branch_id: str, role_name: str) -> dict[str, Any]:
    role, ops = await roles.delete_role(control, project_id, branch_id, role_name)
    return {"role": views.role_view(role), "operations": _ops(ops)}


@router.get("/projects/{project_id}/branches/{branch_id}/roles/{role_name}/reveal_password")
@router.post("/projects/{project_id}/branches/{branch_id}/roles/{role_name}/reveal_password",
             include_in_schema=False)  # Neon documents GET; the neon-api package sends POST
async def reveal_password(control: Authorized, project_id: str, branch_id: str, role_name: str) -> dict[str, Any]:
    role = await roles.get_role(control, project_id, branch_id, role_name)
    password = control.plane.secrets.decrypt(role.password_enc) if role.password_enc else None
    if password is None:
        raise Precondition(f"the password of role {role_name!r} is not known to Argon (it was set through SQL); "
                           "reset it with reset_password to get one that can be revealed")
    return {"password": password}


@router.post("/projects/{project_id}/branches/{branch_id}/roles/{role_name}/reset_password")
async def reset_password(control: Authorized, project_id: str, branch_id: str, role_name: str) -> dict[str, Any]:
    role, password, ops = await roles.reset_password(control, project_id, branch_id, role_name)
    return {"role": views.role_view(role, password), "operations": _ops(ops)}


@router.get("/projects/{project_id}/branches/{branch_id}/databases")
async def list_databases(control: Authorized, project_id: str, branch_id: str) -> dict[str, Any]:
    plane = control.plane
    await roles.sync_if_running(control, project_id, branch_id)
    return {"databases": [views.database_view(d) for d in await plane.db(plane.store.list_databases, branch_id)]}


@router.post("/projects/{project_id}/branches/{branch_id}/databases", status_code=201)
async def create_database(control: Authorized, project_id: str, branch_id: str, body: DatabaseCreateBody) -> FastJSON:
    db, ops = await roles.create_database(control, project_id, branch_id, body.database.name, body.database.owner_name)
    return FastJSON({"database": views.database_view(db), "operations": _ops(ops)}, status_code=201)


@router.get("/projects/{project_id}/branches/{branch_id}/databases/{database_name}")
async def get_database(control: Authorized, project_id: str, branch_id: str, database_name: str) -> dict[str, Any]:
    return {"database": views.database_view(await roles.get_database(control, project_id, branch_id, database_name))}


@router.patch("/projects/{project_id}/branches/{branch_id}/databases/{database_name}")
async def update_database(control: Authorized, project_id: str, branch_id: str, database_name: str,
                          body: DatabaseUpdateBody) -> dict[str, Any]:
    db, ops = await roles.update_database(control, project_id, branch_id, database_name,
                                          new_name=body.database.name, owner_name=body.database.owner_name)
    return {"database": views.database_view(db), "operations": _ops(ops)}


@router.delete("/projects/{project_id}/branches/{branch_id}/databases/{database_name}")
async def delete_database(control: Authorized, project_id: str, branch_id: str, database_name: str) -> dict[str, Any]:
    db, ops = await roles.delete_database(control, project_id, branch_id, database_name)
    return {"database": views.database_view(db), "operations": _ops(ops)}

"""The console's Roles & Databases page of a project: per branch, create and delete roles and
databases, and reset a role's password (the new one shown once, carried to the next page in the
session, never in a URL). Destructive actions go through `confirm.html` first.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request, Response

from argon import model
from argon.console import dashboard
from argon.console.web import ConsoleRoute, ControlDep, Posted, SignedIn, act, confirm, redirect, render
from argon.control import roles
from argon.control.services import Control
from argon.errors import ArgonError

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)


def roles_url(project_id: str, branch_id: str) -> str:
    return f"/projects/{project_id}/roles?{urlencode({'branch': branch_id})}"


def _branch_of(control: Control, project_id: str, branch_id: str | None) -> model.Branch:
    plane = control.plane
    plane.project(project_id)
    return plane.branch(project_id, branch_id) if branch_id else dashboard.default_branch(control, project_id)


@router.get("/projects/{project_id}/roles")
async def roles_page(request: Request, session: SignedIn, control: ControlDep, project_id: str,
                     branch: str | None = None) -> Response:
    plane = control.plane
    project = plane.project(project_id)
    current = _branch_of(control, project_id, branch)
    await roles.sync_if_running(control, project_id, current.id)
    role_list = [r for r in await plane.db(plane.store.list_roles, current.id) if r.name != model.PLATFORM_ROLE]
    databases = await plane.db(plane.store.list_databases, current.id)
    secret_role = session.pop_secret(f"role-name:{project_id}")
    password = session.pop_secret(f"role-password:{project_id}")
    return render(request, "roles.html", session=session, project=project, branch=current, tab="roles",
                  branches=plane.branches(project_id), roles=role_list, databases=databases,
                  new_role=secret_role if password else None, new_password=password)


@router.post("/projects/{project_id}/roles")
async def create_role(session: Posted, control: ControlDep, project_id: str, branch: Annotated[str, Form()],
                      name: Annotated[str, Form()] = "") -> Response:
    current = _branch_of(control, project_id, branch)
    try:
        role, password, _ = await roles.create_role(control, project_id, current.id, name.strip())
    except ArgonError as exc:
        session.flash("error", exc.user_message)
    else:
        session.flash("success", f"Role {role.name} was created.")
        if password:
            session.secrets[f"role-name:{project_id}"] = role.name
            session.secrets[f"role-password:{project_id}"] = password
    return redirect(roles_url(project_id, current.id))


def _role_confirm_fields(branch_id: str, name: str) -> dict[str, str]:
    return {"branch": branch_id, "name": name}


@router.get("/projects/{project_id}/roles/reset_password")
async def reset_password_form(request: Request, session: SignedIn, control: ControlDep, project_id: str, branch: str,
                              name: str) -> Response:
    project, current = control.plane.project(project_id), _branch_of(control, project_id, branch)
    role = await roles.get_role(control, project_id, current.id, name)
    return confirm(request, session, project, title=f"Reset the password of {role.name}",
                    message=f"A new password is generated for {role.name} on {current.name}. The old one stops "
                            "working at once: update every application that uses it.",
                    action=f"/projects/{project_id}/roles/reset_password", button="Reset password",
                    back=roles_url(project_id, current.id), hidden=_role_confirm_fields(current.id, role.name))


@router.post("/projects/{project_id}/roles/reset_password")
async def reset_password(session: Posted, control: ControlDep, project_id: str, branch: Annotated[str, Form()],
                         name: Annotated[str, Form()]) -> Response:
    current = _branch_of(control, project_id, branch)
    try:
        role, password, _ = await roles.reset_password(control, project_id, current.id, name)
    except ArgonError as exc:
        session.flash("error", exc.user_message)
    else:
        session.flash("success", f"The password of {role.name} was reset.")
        session.secrets[f"role-name:{project_id}"] = role.name
        session.secrets[f"role-password:{project_id}"] = password
    return redirect(roles_url(project_id, current.id))


@router.get("/projects/{project_id}/roles/delete")
async def delete_role_form(request: Request, session: SignedIn, control: ControlDep, project_id: str, branch: str,
                           name: str) -> Response:
    project, current = control.plane.project(project_id), _branch_of(control, project_id, branch)
    role = await roles.get_role(control, project_id, current.id, name)
    return confirm(request, session, project, title=f"Delete the role {role.name}",
                    message=f"The role {role.name} is dropped on {current.name}; objects it owns in each database "
                            "go to that database's owner. This cannot be undone.",
                    action=f"/projects/{project_id}/roles/delete", button="Delete role",
                    back=roles_url(project_id, current.id), hidden=_role_confirm_fields(current.id, role.name))


@router.post("/projects/{project_id}/roles/delete")
async def delete_role(session: Posted, control: ControlDep, project_id: str, branch: Annotated[str, Form()],
                      name: Annotated[str, Form()]) -> Response:
    current = _branch_of(control, project_id, branch)
    await act(session, roles.delete_role(control, project_id, current.id, name), f"Role {name} was deleted.")
    return redirect(roles_url(project_id, current.id))


@router.post("/projects/{project_id}/databases")
async def create_database(session: Posted, control: ControlDep, project_id: str, branch: Annotated[str, Form()],
                          name: Annotated[str, Form()] = "", owner: Annotated[str, Form()] = "") -> Response:
    current = _branch_of(control, project_id, branch)
    await act(session, roles.create_database(control, project_id, current.id, name.strip(), owner),
              f"Database {name.strip()} was created.")
    return redirect(roles_url(project_id, current.id))


@router.get("/projects/{project_id}/databases/delete")
async def delete_database_form(request: Request, session: SignedIn, control: ControlDep, project_id: str, branch: str,
                               name: str) -> Response:
    project, current = control.plane.project(project_id), _branch_of(control, project_id, branch)
    db = await roles.get_database(control, project_id, current.id, name)
    return confirm(request, session, project, title=f"Delete the database {db.name}",
                    message=f"The database {db.name} and all its data are deleted from {current.name}; sessions "
                            "connected to it are ended. This cannot be undone.",
                    action=f"/projects/{project_id}/databases/delete", button="Delete database",
                    back=roles_url(project_id, current.id), hidden=_role_confirm_fields(current.id, db.name))


@router.post("/projects/{project_id}/databases/delete")
async def delete_database(session: Posted, control: ControlDep, project_id: str, branch: Annotated[str, Form()],
                          name: Annotated[str, Form()]) -> Response:
    current = _branch_of(control, project_id, branch)
    await act(session, roles.delete_database(control, project_id, current.id, name), f"Database {name} was deleted.")
    return redirect(roles_url(project_id, current.id))

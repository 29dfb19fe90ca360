"""The console's Branches page and Roles & Databases page of a project.

Same shape as `routes`: a GET renders what the control plane holds, a POST (with the session's
CSRF token) awaits one `argon.control` use case and redirects back with a flash. Every destructive
action first shows a confirmation page (`confirm.html`), a plain form that works from the keyboard
and without JavaScript. New passwords travel to the next page in the session, never in a URL.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request, Response

from argon import ids, model
from argon.console import dashboard
from argon.console.web import ConsoleRoute, Plane, Posted, SignedIn, act, redirect, render
from argon.control import branches, roles
from argon.control.plane import ControlPlane
from argon.errors import ArgonError

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)


@dataclass(frozen=True)
class Field:
    """A text input on a confirmation page (e.g. the new name of a branch)."""

    name: str
    label: str
    value: str = ""
    help: str = ""
    required: bool = False


@dataclass(frozen=True)
class BranchRow:
    branch: model.Branch
    depth: int
    parent_name: str | None
    compute: dashboard.ComputeView
    children: int


def branch_tree(plane: ControlPlane, project_id: str) -> list[BranchRow]:
    """The branches in tree order (each parent followed by its children, oldest first), with depths."""
    all_branches = sorted(plane.branches(project_id), key=lambda b: (b.created_at, b.id))
    names = {b.id: b.name for b in all_branches}
    children: dict[str | None, list[model.Branch]] = defaultdict(list)
    for b in all_branches:
        children[b.parent_id if b.parent_id in names else None].append(b)
    rows: list[BranchRow] = []

    def walk(parent_id: str | None, depth: int) -> None:
        for b in children.get(parent_id, []):
            ep = dashboard.primary_endpoint(plane, project_id, b.id)
            rows.append(BranchRow(b, depth, names.get(b.parent_id or ""), dashboard.compute_view(plane, ep),
                                  len(children.get(b.id, []))))
            walk(b.id, depth + 1)

    walk(None, 0)
    return rows


def _confirm(request: Request, session: SignedIn, project: model.Project, *, title: str, message: str,
             action: str, button: str, back: str, hidden: dict[str, str] | None = None,
             fields: tuple[Field, ...] = (), danger: bool = True) -> Response:
    return render(request, "confirm.html", session=session, project=project, title=title, message=message,
                  action=action, button=button, back=back, hidden=hidden or {}, fields=fields, danger=danger)


def _branches_url(project_id: str) -> str:
    return f"/projects/{project_id}/branches"


# Branches -----------------------------------------------------------------------------------------------


@router.get("/projects/{project_id}/branches")
async def branches_page(request: Request, session: SignedIn, plane: Plane, project_id: str) -> Response:
    project = plane.project(project_id)
    rows = branch_tree(plane, project_id)
    return render(request, "branches.html", session=session, project=project, rows=rows, tab="branches",
                  default_parent=dashboard.default_branch(plane, project_id).id)


@router.post("/projects/{project_id}/branches")
async def create_branch(session: Posted, plane: Plane, project_id: str, name: Annotated[str, Form()] = "",
                        parent_id: Annotated[str, Form()] = "",
                        with_compute: Annotated[bool, Form()] = False) -> Response:
    project = plane.project(project_id)
    try:
        req = branches.BranchRequest(
            name=ids.check_display_name(name.strip(), "branch") if name.strip() else None,
            parent_id=parent_id or None,
            endpoints=[project.default_endpoint_settings] if with_compute else [])
        created = await branches.create_branch(plane, project_id, req)
    except ArgonError as exc:
        session.flash("error", exc.user_message)
        return redirect(_branches_url(project_id))
    session.flash("success", f"Branch {created.branch.name} is ready.")
    return redirect(_branches_url(project_id))


@router.get("/projects/{project_id}/branches/{branch_id}/rename")
async def rename_form(request: Request, session: SignedIn, plane: Plane, project_id: str, branch_id: str) -> Response:
    project, branch = plane.project(project_id), plane.branch(project_id, branch_id)
    return _confirm(request, session, project, title=f"Rename {branch.name}",
                    message="The branch keeps its id, its compute and its connection strings.",
                    action=f"/projects/{project_id}/branches/{branch_id}/rename", button="Rename",
                    back=_branches_url(project_id), danger=False,
                    fields=(Field("name", "New name", branch.name, required=True),))


@router.post("/projects/{project_id}/branches/{branch_id}/rename")
async def rename(session: Posted, plane: Plane, project_id: str, branch_id: str,
                 name: Annotated[str, Form()] = "") -> Response:
    await act(session, branches.update_branch(plane, project_id, branch_id, name=name.strip()),
              f"Branch renamed to {name.strip()}.")
    return redirect(_branches_url(project_id))


@router.post("/projects/{project_id}/branches/{branch_id}/set_default")
async def set_default(session: Posted, plane: Plane, project_id: str, branch_id: str) -> Response:
    branch = plane.branch(project_id, branch_id)
    await act(session, branches.set_default_branch(plane, project_id, branch_id),
              f"{branch.name} is now the default branch.")
    return redirect(_branches_url(project_id))


@router.get("/projects/{project_id}/branches/{branch_id}/reset")
async def reset_form(request: Request, session: SignedIn, plane: Plane, project_id: str, branch_id: str) -> Response:
    project, branch = plane.project(project_id), plane.branch(project_id, branch_id)
    if branch.parent_id is None:
        session.flash("error", f"{branch.name} has no parent to reset from.")
        return redirect(_branches_url(project_id))
    parent = plane.branch(project_id, branch.parent_id)
    return _confirm(request, session, project, title=f"Reset {branch.name} from {parent.name}",
                    message=f"The data of {branch.name} is replaced by the current data of {parent.name}. Its "
                            "compute restarts: open connections are closed. Its connection strings stay the same.",
                    action=f"/projects/{project_id}/branches/{branch_id}/reset", button="Reset from parent",
                    back=_branches_url(project_id),
                    fields=(Field("preserve_under_name", "Keep the current data as a branch named",
                                  help="Optional. Leave it empty to discard the current data."),))


@router.post("/projects/{project_id}/branches/{branch_id}/reset")
async def reset(session: Posted, plane: Plane, project_id: str, branch_id: str,
                preserve_under_name: Annotated[str, Form()] = "") -> Response:
    branch = plane.branch(project_id, branch_id)
    if branch.parent_id is None:
        session.flash("error", f"{branch.name} has no parent to reset from.")
        return redirect(_branches_url(project_id))
    keep = preserve_under_name.strip() or None
    await act(session, branches.restore_branch(plane, project_id, branch_id, branch.parent_id,
                                               preserve_under_name=keep),
              f"{branch.name} was reset from its parent" + (f"; its old data is the branch {keep}." if keep else "."))
    return redirect(_branches_url(project_id))


@router.get("/projects/{project_id}/branches/{branch_id}/delete")
async def delete_form(request: Request, session: SignedIn, plane: Plane, project_id: str, branch_id: str) -> Response:
    project, branch = plane.project(project_id), plane.branch(project_id, branch_id)
    return _confirm(request, session, project, title=f"Delete {branch.name}",
                    message=f"The branch {branch.name}, its compute and all its data are deleted. This cannot be "
                            "undone.",
                    action=f"/projects/{project_id}/branches/{branch_id}/delete", button="Delete branch",
                    back=_branches_url(project_id))


@router.post("/projects/{project_id}/branches/{branch_id}/delete")
async def delete(session: Posted, plane: Plane, project_id: str, branch_id: str) -> Response:
    branch = plane.branch(project_id, branch_id)
    await act(session, branches.delete_branch(plane, project_id, branch_id), f"Branch {branch.name} was deleted.")
    return redirect(_branches_url(project_id))


# Roles and databases ------------------------------------------------------------------------------------


def roles_url(project_id: str, branch_id: str) -> str:
    return f"/projects/{project_id}/roles?{urlencode({'branch': branch_id})}"


def _branch_of(plane: ControlPlane, project_id: str, branch_id: str | None) -> model.Branch:
    plane.project(project_id)
    return plane.branch(project_id, branch_id) if branch_id else dashboard.default_branch(plane, project_id)


@router.get("/projects/{project_id}/roles")
async def roles_page(request: Request, session: SignedIn, plane: Plane, project_id: str,
                     branch: str | None = None) -> Response:
    project = plane.project(project_id)
    current = _branch_of(plane, project_id, branch)
    await roles.sync_if_running(plane, project_id, current.id)
    role_list = [r for r in await plane.db(plane.store.list_roles, current.id) if r.name != model.PLATFORM_ROLE]
    databases = await plane.db(plane.store.list_databases, current.id)
    secret_role = session.pop_secret(f"role-name:{project_id}")
    password = session.pop_secret(f"role-password:{project_id}")
    return render(request, "roles.html", session=session, project=project, branch=current, tab="roles",
                  branches=plane.branches(project_id), roles=role_list, databases=databases,
                  new_role=secret_role if password else None, new_password=password)


@router.post("/projects/{project_id}/roles")
async def create_role(session: Posted, plane: Plane, project_id: str, branch: Annotated[str, Form()],
                      name: Annotated[str, Form()] = "") -> Response:
    current = _branch_of(plane, project_id, branch)
    try:
        role, password, _ = await roles.create_role(plane, project_id, current.id, name.strip())
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
async def reset_password_form(request: Request, session: SignedIn, plane: Plane, project_id: str, branch: str,
                              name: str) -> Response:
    project, current = plane.project(project_id), _branch_of(plane, project_id, branch)
    role = await roles.get_role(plane, project_id, current.id, name)
    return _confirm(request, session, project, title=f"Reset the password of {role.name}",
                    message=f"A new password is generated for {role.name} on {current.name}. The old one stops "
                            "working at once: update every application that uses it.",
                    action=f"/projects/{project_id}/roles/reset_password", button="Reset password",
                    back=roles_url(project_id, current.id), hidden=_role_confirm_fields(current.id, role.name))


@router.post("/projects/{project_id}/roles/reset_password")
async def reset_password(session: Posted, plane: Plane, project_id: str, branch: Annotated[str, Form()],
                         name: Annotated[str, Form()]) -> Response:
    current = _branch_of(plane, project_id, branch)
    try:
        role, password, _ = await roles.reset_password(plane, project_id, current.id, name)
    except ArgonError as exc:
        session.flash("error", exc.user_message)
    else:
        session.flash("success", f"The password of {role.name} was reset.")
        session.secrets[f"role-name:{project_id}"] = role.name
        session.secrets[f"role-password:{project_id}"] = password
    return redirect(roles_url(project_id, current.id))


@router.get("/projects/{project_id}/roles/delete")
async def delete_role_form(request: Request, session: SignedIn, plane: Plane, project_id: str, branch: str,
                           name: str) -> Response:
    project, current = plane.project(project_id), _branch_of(plane, project_id, branch)
    role = await roles.get_role(plane, project_id, current.id, name)
    return _confirm(request, session, project, title=f"Delete the role {role.name}",
                    message=f"The role {role.name} is dropped on {current.name}; objects it owns in each database "
                            "go to that database's owner. This cannot be undone.",
                    action=f"/projects/{project_id}/roles/delete", button="Delete role",
                    back=roles_url(project_id, current.id), hidden=_role_confirm_fields(current.id, role.name))


@router.post("/projects/{project_id}/roles/delete")
async def delete_role(session: Posted, plane: Plane, project_id: str, branch: Annotated[str, Form()],
                      name: Annotated[str, Form()]) -> Response:
    current = _branch_of(plane, project_id, branch)
    await act(session, roles.delete_role(plane, project_id, current.id, name), f"Role {name} was deleted.")
    return redirect(roles_url(project_id, current.id))


@router.post("/projects/{project_id}/databases")
async def create_database(session: Posted, plane: Plane, project_id: str, branch: Annotated[str, Form()],
                          name: Annotated[str, Form()] = "", owner: Annotated[str, Form()] = "") -> Response:
    current = _branch_of(plane, project_id, branch)
    await act(session, roles.create_database(plane, project_id, current.id, name.strip(), owner),
              f"Database {name.strip()} was created.")
    return redirect(roles_url(project_id, current.id))


@router.get("/projects/{project_id}/databases/delete")
async def delete_database_form(request: Request, session: SignedIn, plane: Plane, project_id: str, branch: str,
                               name: str) -> Response:
    project, current = plane.project(project_id), _branch_of(plane, project_id, branch)
    db = await roles.get_database(plane, project_id, current.id, name)
    return _confirm(request, session, project, title=f"Delete the database {db.name}",
                    message=f"The database {db.name} and all its data are deleted from {current.name}; sessions "
                            "connected to it are ended. This cannot be undone.",
                    action=f"/projects/{project_id}/databases/delete", button="Delete database",
                    back=roles_url(project_id, current.id), hidden=_role_confirm_fields(current.id, db.name))


@router.post("/projects/{project_id}/databases/delete")
async def delete_database(session: Posted, plane: Plane, project_id: str, branch: Annotated[str, Form()],
                          name: Annotated[str, Form()]) -> Response:
    current = _branch_of(plane, project_id, branch)
    await act(session, roles.delete_database(plane, project_id, current.id, name), f"Database {name} was deleted.")
    return redirect(roles_url(project_id, current.id))

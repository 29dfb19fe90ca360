"""The console's Branches page of a project: the branch tree (50 rows to a page, with a search by
name or id: `console.paging`); create a branch from head, a
timestamp or an LSN; rename, set default, reset from parent, restore (from the parent's head or to
the branch's own past), delete.

Same shape as `routes`: a GET renders what the control control holds, a POST (with the session's
CSRF token) awaits one `argon.control` use case and redirects back with a flash. Every destructive
action first shows a confirmation page, a plain form that works from the keyboard and without
JavaScript. A form the control control refuses (a bad LSN, a time outside the history window) comes
back filled in, with the refusal as a human message.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Form, Request, Response

from argon import ids, model
from argon.console import dashboard, display, paging
from argon.console.auth import Session
from argon.console.web import (
    ConsoleRoute,
    ControlDep,
    Field,
    Posted,
    SignedIn,
    act,
    confirm,
    redirect,
    render,
)
from argon.control import branches, schedules
from argon.control.services import Control
from argon.errors import ArgonError, UserError

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)


@dataclass(frozen=True)
class BranchRow:
    branch: model.Branch
    depth: int
    parent_name: str | None
    compute: dashboard.ComputeView
    children: int


def branch_tree(control: Control, project_id: str) -> list[BranchRow]:
    """The branches in tree order (each parent followed by its children, oldest first), with depths."""
    all_branches = sorted(control.plane.branches(project_id), key=lambda b: (b.created_at, b.id))
    names = {b.id: b.name for b in all_branches}
    children: dict[str | None, list[model.Branch]] = defaultdict(list)
    for b in all_branches:
        children[b.parent_id if b.parent_id in names else None].append(b)
    rows: list[BranchRow] = []

    def walk(parent_id: str | None, depth: int) -> None:
        for b in children.get(parent_id, []):
            ep = dashboard.primary_endpoint(control, project_id, b.id)
            rows.append(BranchRow(b, depth, names.get(b.parent_id or ""), dashboard.compute_view(control, ep),
                                  len(children.get(b.id, []))))
            walk(b.id, depth + 1)

    walk(None, 0)
    return rows


def _branches_url(project_id: str) -> str:
    return f"/projects/{project_id}/branches"


# Branches -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """Where a form says to take data from: head (or the parent), a timestamp, or an LSN."""

    source: str  # head | parent | time | lsn
    timestamp: str | None = None  # RFC 3339, UTC
    lsn: str | None = None


def form_point(source: str, timestamp: str, lsn: str) -> Point:
    """Read the From choice of a branch or restore form; a missing or malformed value is a UserError."""
    if source == "time":
        return Point(source, timestamp=utc_timestamp(timestamp))
    if source == "lsn":
        if not lsn.strip():
            raise UserError("Type an LSN, such as 0/16B3748 (what pg_current_wal_lsn() returns).")
        return Point(source, lsn=lsn.strip())
    return Point(source)


def utc_timestamp(value: str) -> str:
    """A datetime-local value (`2026-05-01T14:05` or with seconds), read as UTC, as RFC 3339."""
    if not value.strip():
        raise UserError("Choose a date and a time (UTC).")
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise UserError(f"{value.strip()!r} is not a date and time; use the picker, e.g. 2026-05-01 14:05:00.") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def history_note(project: model.Project) -> str:
    """What the point-in-time choices can reach, in a sentence."""
    if project.history_retention_seconds <= 0:
        return "This project keeps no history, so only the current data can be used; set a history retention in Settings."
    return (f"Any moment in the last {display.duration(project.history_retention_seconds)} (the project's history "
            "retention).")


def _page_values(values: dict[str, str] | None) -> dict[str, str]:
    return {"source": "head", "name": "", "timestamp": "", "lsn": "", "with_compute": "true", **(values or {})}


def _branches_page(request: Request, session: Session, control: Control, project: model.Project, *,
                   values: dict[str, str] | None = None, error: str | None = None, status: int = 200,
                   search: str = "", after: str | None = None) -> Response:
    rows = branch_tree(control, project.id)
    restoring = {f["branch_id"]: f for f in control.restorer.view()["branches"]} if control.restorer else {}
    page = paging.in_order(rows, ident=lambda r: r.branch.id, name=lambda r: r.branch.name, search=search,
                           after=after, what="branches", size=paging.PAGE_SIZE)
    chosen = (values or {}).get("parent_id") or dashboard.default_branch(control, project.id).id
    return render(request, "branches.html", session=session, project=project, rows=rows, page=page, tab="branches",
                  status=status, error=error, values=_page_values(values), restoring=restoring,
                  schedule=lambda b: "; ".join(schedules.describe(i) for i in b.backup_schedule or []),
                  default_parent=chosen, parents=parent_choices(control, project.id, page, chosen),
                  history=history_note(project), now=model.utcnow())


def parent_choices(control: Control, project_id: str, page: paging.Page[BranchRow], chosen: str) -> list[model.Branch]:
    """The New branch form's Parent choices: the branches of the page shown (the list's search and
    pages pick among many: a thousand branches are not a thousand options), the chosen one first
    when the page does not show it."""
    shown = [row.branch for row in page.rows]
    if all(b.id != chosen for b in shown) and (branch := control.plane.find_branch(chosen)) is not None \
            and branch.project_id == project_id:
        shown.insert(0, branch)
    return shown


@router.get("/projects/{project_id}/branches")
async def branches_page(request: Request, session: SignedIn, control: ControlDep, project_id: str,
                        search: str = "", after: str | None = None) -> Response:
    """The tree, 50 rows at a time (`console.paging`), or the branches whose name or id matches."""
    return _branches_page(request, session, control, control.plane.project(project_id), search=search, after=after)


@router.post("/projects/{project_id}/branches")
async def create_branch(request: Request, session: Posted, control: ControlDep, project_id: str,
                        name: Annotated[str, Form()] = "", parent_id: Annotated[str, Form()] = "",
                        with_compute: Annotated[bool, Form()] = False, source: Annotated[str, Form()] = "head",
                        timestamp: Annotated[str, Form()] = "", lsn: Annotated[str, Form()] = "") -> Response:
    project = control.plane.project(project_id)
    values = {"name": name, "parent_id": parent_id, "source": source, "timestamp": timestamp, "lsn": lsn,
              "with_compute": "true" if with_compute else ""}
    try:
        point = form_point(source, timestamp, lsn)
        req = branches.BranchRequest(
            name=ids.check_display_name(name.strip(), "branch") if name.strip() else None,
            parent_id=parent_id or None, parent_timestamp=point.timestamp, parent_lsn=point.lsn,
            endpoints=[project.default_endpoint_settings] if with_compute else [])
        created = await branches.create_branch(control, project_id, req)
    except ArgonError as exc:
        return _branches_page(request, session, control, project, values=values, error=exc.user_message, status=400)
    at = {"time": f" as of {timestamp.replace('T', ' ')} UTC", "lsn": f" at LSN {point.lsn}"}.get(point.source, "")
    session.flash("success", f"Branch {created.branch.name} is ready{at}.")
    return redirect(_branches_url(project_id))


@router.get("/projects/{project_id}/branches/{branch_id}/rename")
async def rename_form(request: Request, session: SignedIn, control: ControlDep, project_id: str, branch_id: str) -> Response:
    plane = control.plane
    project, branch = plane.project(project_id), plane.branch(project_id, branch_id)
    return confirm(request, session, project, title=f"Rename {branch.name}",
                    message="The branch keeps its id, its compute and its connection strings.",
                    action=f"/projects/{project_id}/branches/{branch_id}/rename", button="Rename",
                    back=_branches_url(project_id), danger=False,
                    fields=(Field("name", "New name", branch.name, required=True),))


@router.post("/projects/{project_id}/branches/{branch_id}/rename")
async def rename(session: Posted, control: ControlDep, project_id: str, branch_id: str,
                 name: Annotated[str, Form()] = "") -> Response:
    await act(session, branches.update_branch(control, project_id, branch_id, name=name.strip()),
              f"Branch renamed to {name.strip()}.")
    return redirect(_branches_url(project_id))


@router.post("/projects/{project_id}/branches/{branch_id}/set_default")
async def set_default(session: Posted, control: ControlDep, project_id: str, branch_id: str) -> Response:
    branch = control.plane.branch(project_id, branch_id)
    await act(session, branches.set_default_branch(control, project_id, branch_id),
              f"{branch.name} is now the default branch.")
    return redirect(_branches_url(project_id))


@router.get("/projects/{project_id}/branches/{branch_id}/reset")
async def reset_form(request: Request, session: SignedIn, control: ControlDep, project_id: str, branch_id: str) -> Response:
    plane = control.plane
    project, branch = plane.project(project_id), plane.branch(project_id, branch_id)
    if branch.parent_id is None:
        session.flash("error", f"{branch.name} has no parent to reset from.")
        return redirect(_branches_url(project_id))
    parent = plane.branch(project_id, branch.parent_id)
    return confirm(request, session, project, title=f"Reset {branch.name} from {parent.name}",
                    message=f"The data of {branch.name} is replaced by the current data of {parent.name}. Its "
                            "compute restarts: open connections are closed. Its connection strings stay the same.",
                    action=f"/projects/{project_id}/branches/{branch_id}/reset", button="Reset from parent",
                    back=_branches_url(project_id),
                    fields=(Field("preserve_under_name", "Keep the current data as a branch named",
                                  help="Optional. Leave it empty to discard the current data."),))


@router.post("/projects/{project_id}/branches/{branch_id}/reset")
async def reset(session: Posted, control: ControlDep, project_id: str, branch_id: str,
                preserve_under_name: Annotated[str, Form()] = "") -> Response:
    branch = control.plane.branch(project_id, branch_id)
    if branch.parent_id is None:
        session.flash("error", f"{branch.name} has no parent to reset from.")
        return redirect(_branches_url(project_id))
    keep = preserve_under_name.strip() or None
    await act(session, branches.restore_branch(control, project_id, branch_id, branch.parent_id,
                                               preserve_under_name=keep),
              f"{branch.name} was reset from its parent" + (f"; its old data is the branch {keep}." if keep else "."))
    return redirect(_branches_url(project_id))


def _restore_page(request: Request, session: Session, control: Control, project: model.Project,
                  branch: model.Branch, *, values: dict[str, str] | None = None, error: str | None = None,
                  status: int = 200) -> Response:
    parent = control.plane.branch(project.id, branch.parent_id) if branch.parent_id else None
    first = "parent" if parent else "time"
    return render(request, "restore.html", session=session, project=project, branch=branch, parent=parent,
                  status=status, error=error, history=history_note(project), now=model.utcnow(),
                  values={"source": first, "timestamp": "", "lsn": "", "preserve_under_name": "", **(values or {})})


@router.get("/projects/{project_id}/branches/{branch_id}/restore")
async def restore_form(request: Request, session: SignedIn, control: ControlDep, project_id: str,
                       branch_id: str) -> Response:
    plane = control.plane
    project, branch = plane.project(project_id), plane.branch(project_id, branch_id)
    return _restore_page(request, session, control, project, branch)


@router.post("/projects/{project_id}/branches/{branch_id}/restore")
async def restore(request: Request, session: Posted, control: ControlDep, project_id: str, branch_id: str,
                  source: Annotated[str, Form()] = "", timestamp: Annotated[str, Form()] = "",
                  lsn: Annotated[str, Form()] = "", preserve_under_name: Annotated[str, Form()] = "") -> Response:
    plane = control.plane
    project, branch = plane.project(project_id), plane.branch(project_id, branch_id)
    values = {"source": source, "timestamp": timestamp, "lsn": lsn, "preserve_under_name": preserve_under_name}
    keep = preserve_under_name.strip() or None
    try:
        point = form_point(source, timestamp, lsn)
        if point.source == "parent":
            if branch.parent_id is None:
                raise UserError(f"{branch.name} has no parent to restore from; choose a point in its own past.")
            source_id = branch.parent_id
        elif point.source in ("time", "lsn"):
            source_id = branch.id
        else:
            raise UserError("Choose where to restore the branch from.")
        await branches.restore_branch(control, project_id, branch_id, source_id, source_timestamp=point.timestamp,
                                      source_lsn=point.lsn, preserve_under_name=keep)
    except ArgonError as exc:
        return _restore_page(request, session, control, project, branch, values=values, error=exc.user_message,
                             status=400)
    what = {"parent": "from its parent's current data", "time": f"to {timestamp.replace('T', ' ')} UTC",
            "lsn": f"to LSN {point.lsn}"}[point.source]
    session.flash("success", f"{branch.name} was restored {what}" +
                  (f"; its previous data is the branch {keep}." if keep else "."))
    return redirect(_branches_url(project_id))


@router.get("/projects/{project_id}/branches/{branch_id}/delete")
async def delete_form(request: Request, session: SignedIn, control: ControlDep, project_id: str, branch_id: str) -> Response:
    plane = control.plane
    project, branch = plane.project(project_id), plane.branch(project_id, branch_id)
    return confirm(request, session, project, title=f"Delete {branch.name}",
                    message=f"The branch {branch.name}, its compute and all its data are deleted. This cannot be "
                            "undone.",
                    action=f"/projects/{project_id}/branches/{branch_id}/delete", button="Delete branch",
                    back=_branches_url(project_id))


@router.post("/projects/{project_id}/branches/{branch_id}/delete")
async def delete(session: Posted, control: ControlDep, project_id: str, branch_id: str) -> Response:
    branch = control.plane.branch(project_id, branch_id)
    await act(session, branches.delete_branch(control, project_id, branch_id), f"Branch {branch.name} was deleted.")
    return redirect(_branches_url(project_id))

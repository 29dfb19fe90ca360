"""The console's Settings tab of a project: its name, the defaults of its new computes, its history
retention, its branch size limit, the extensions its roles can create, and deleting it (confirmed by
typing its name).

Each form posts to its own route, which calls the control layer the API uses
(`argon.control.projects.update_project` and `delete_project`) and redirects back with a flash; a
refused value comes back as an error notice, never as a traceback.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Form, Request, Response

from argon import model
from argon.console import dashboard, display
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
from argon.control.endpoints import CU_STEPS, check_cu, check_suspend_timeout
from argon.control.projects import delete_project, update_project
from argon.errors import UserError

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)

RETENTION_UNITS = {"hours": 3600, "days": 86400}


def settings_url(project_id: str, anchor: str = "") -> str:
    return f"/projects/{project_id}/settings" + (f"#{anchor}" if anchor else "")


def retention_form_value(seconds: int) -> tuple[int | str, str]:
    """How the retention input shows a number of seconds: whole days when it is, else hours."""
    if seconds and seconds % 86400 == 0:
        return seconds // 86400, "days"
    if seconds % 3600 == 0:
        return seconds // 3600, "hours"
    return f"{seconds / 3600:g}", "hours"


def retention_seconds(amount: str, unit: str) -> int:
    """The seconds a retention form asks for, checked against the model's bounds with a human message."""
    most = model.MAX_HISTORY_RETENTION // 86400
    try:
        value = float(amount.strip())
    except ValueError:
        raise UserError(f"History retention must be a number of hours or days, from 0 to {most} days.") from None
    if unit not in RETENTION_UNITS or value != value:  # NaN
        raise UserError("Choose hours or days for the history retention.")
    seconds = round(value * RETENTION_UNITS[unit])
    if not 0 <= seconds <= model.MAX_HISTORY_RETENTION:
        raise UserError(f"History retention must be between 0 and {most} days.")
    return seconds


def size_limit_bytes(megabytes: str) -> int:
    """The branch size limit a form asks for, in MB (0: none)."""
    try:
        mb = int(megabytes.strip())
    except ValueError:
        raise UserError("the size limit is a whole number of MB (0: no limit)") from None
    if not 0 <= mb <= 2**42:
        raise UserError("the size limit is a whole number of MB from 0 (no limit) up")
    return mb * 2**20


def compute_defaults(min_cu: str, max_cu: str, suspend_timeout: str) -> model.EndpointSettings:
    """The defaults for new computes a form asks for, validated like the API validates them."""
    try:
        lo, hi, timeout = float(min_cu), float(max_cu), int(suspend_timeout)
    except ValueError:
        raise UserError("Choose a compute size and a suspend timeout from the lists.") from None
    lo, hi = check_cu(lo, "The minimum compute size"), check_cu(hi, "The maximum compute size")
    if lo > hi:
        raise UserError("The minimum compute size must not be greater than the maximum.")
    return model.EndpointSettings(lo, hi, check_suspend_timeout(timeout))


@router.get("/projects/{project_id}/settings")
async def settings_page(request: Request, session: SignedIn, control: ControlDep, project_id: str) -> Response:
    plane = control.plane
    project = plane.project(project_id)
    defaults = project.default_endpoint_settings
    amount, unit = retention_form_value(project.history_retention_seconds)
    support = plane.extensions.get(project.pg_version)
    offered = support.offered if support is not None else ()
    return render(request, "settings.html", session=session, project=project, tab="settings", defaults=defaults,
                  offered=offered, preloaded=[o.name for o in offered if o.preloaded],
                  missing=[(name, sorted(v for v, s in plane.extensions.items() if name in s.names()))
                           for name in (support.missing if support is not None else ())],
                  timeouts=dashboard.suspend_choices(plane.settings.suspend_timeout, defaults.suspend_timeout_seconds),
                  cu_steps=CU_STEPS, retention_amount=amount, retention_unit=unit,
                  retention_text=display.duration(project.history_retention_seconds),
                  retention_max_days=model.MAX_HISTORY_RETENTION // 86400,
                  endpoints=len(plane.endpoints(project_id)),
                  size_limit_mb=project.settings.logical_size_limit_bytes // 2**20,
                  size_limit_text=(f"{project.settings.logical_size_limit_bytes // 2**20} MB per branch"
                                   if project.settings.logical_size_limit_bytes else "none"))


@router.post("/projects/{project_id}/settings/name")
async def rename(session: Posted, control: ControlDep, project_id: str, name: Annotated[str, Form()] = "") -> Response:
    control.plane.project(project_id)
    await act(session, update_project(control, project_id, name=name.strip()), f"Project renamed to {name.strip()}.")
    return redirect(settings_url(project_id, "general"))


@router.post("/projects/{project_id}/settings/compute")
async def compute(session: Posted, control: ControlDep, project_id: str, min_cu: Annotated[str, Form()] = "",
                  max_cu: Annotated[str, Form()] = "", suspend_timeout_seconds: Annotated[str, Form()] = "") -> Response:
    control.plane.project(project_id)
    try:
        defaults = compute_defaults(min_cu, max_cu, suspend_timeout_seconds)
    except UserError as exc:
        session.flash("error", exc.user_message)
    else:
        await act(session, update_project(control, project_id, endpoint_settings=defaults),
                  "Defaults for new computes saved. Existing computes keep their settings.")
    return redirect(settings_url(project_id, "compute"))


@router.post("/projects/{project_id}/settings/history")
async def history(session: Posted, control: ControlDep, project_id: str, amount: Annotated[str, Form()] = "",
                  unit: Annotated[str, Form()] = "hours") -> Response:
    control.plane.project(project_id)
    try:
        seconds = retention_seconds(amount, unit)
    except UserError as exc:
        session.flash("error", exc.user_message)
    else:
        note = ("No history is kept now: branches and restores at a point in time are off." if seconds == 0
                else f"History is kept for {display.duration(seconds)}.")
        await act(session, update_project(control, project_id, history_retention_seconds=seconds), note)
    return redirect(settings_url(project_id, "history"))


def _delete_form(request: Request, session: SignedIn, project: model.Project, *, error: str | None = None,
                 typed: str = "") -> Response:
    return confirm(request, session, project, title=f"Delete the project {project.name}",
                   message=f"The project {project.name}, all its branches, computes, roles and databases, and all "
                           "their data and history are deleted. Connected clients are cut off. This cannot be "
                           "undone.",
                   action=f"/projects/{project.id}/delete", button="Delete project",
                   back=settings_url(project.id, "danger"), error=error, status=400 if error else 200,
                   fields=(Field("confirm_name", f"Type {project.name} to confirm", typed, required=True),))


@router.get("/projects/{project_id}/delete")
async def delete_form(request: Request, session: SignedIn, control: ControlDep, project_id: str) -> Response:
    return _delete_form(request, session, control.plane.project(project_id))


@router.post("/projects/{project_id}/delete")
async def delete(request: Request, session: Posted, control: ControlDep, project_id: str,
                 confirm_name: Annotated[str, Form()] = "") -> Response:
    project = control.plane.project(project_id)
    if confirm_name.strip() != project.name:
        return _delete_form(request, session, project, typed=confirm_name,
                            error=f"The name you typed is not {project.name}; nothing was deleted.")
    if await act(session, delete_project(control, project_id), f"Project {project.name} was deleted."):
        return redirect("/")
    return redirect(settings_url(project_id, "danger"))


@router.post("/projects/{project_id}/settings/size")
async def size(session: Posted, control: ControlDep, project_id: str,
               megabytes: Annotated[str, Form()] = "") -> Response:
    control.plane.project(project_id)
    try:
        limit = size_limit_bytes(megabytes)
    except UserError as exc:
        session.flash("error", exc.user_message)
    else:
        note = (f"Each branch may hold {limit // 2**20} MB; at the limit its writes are refused." if limit
                else "Branches have no size limit now.")
        await act(session, update_project(control, project_id, settings=lambda s: dataclasses.replace(
            s, logical_size_limit_bytes=limit)), note)
    return redirect(settings_url(project_id, "size"))

"""The console's Operations log and SQL Editor of a project.

The operations log pages back through the store with its before-cursor (newest first). The SQL
editor runs a query as a role the user picks (never the platform role), through the proxy like
any client (`console.sql`); the result is rendered on the POST's own page, and the query text is
kept in the session's history (the last 20 per project, in memory).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Form, Request, Response

from argon import model
from argon.console import dashboard, sql
from argon.console.auth import Session
from argon.console.web import ConsoleRoute, ControlDep, Posted, SignedIn, render
from argon.control import connection
from argon.control.services import Control
from argon.errors import UserError

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)

PAGE_SIZE = 25


# Operations ---------------------------------------------------------------------------------------------


def _cursor(op: model.Operation) -> str:
    raw = json.dumps([op.created_at.isoformat(), op.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _uncursor(value: str) -> tuple[datetime, str]:
    try:
        when, key = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        return datetime.fromisoformat(when), str(key)
    except Exception:
        raise UserError("that page of the operations log does not exist; start again from the newest") from None


def duration_ms(ms: int) -> str:
    if ms < 1000:
        return f"{ms} ms"
    return f"{ms / 1000:.1f} s" if ms < 60_000 else f"{ms // 60_000} min {ms % 60_000 // 1000} s"


@router.get("/projects/{project_id}/operations")
async def operations_page(request: Request, session: SignedIn, control: ControlDep, project_id: str,
                          before: str | None = None) -> Response:
    plane = control.plane
    project = plane.project(project_id)
    ops = await plane.db(plane.store.list_operations, project_id, limit=PAGE_SIZE + 1,
                         before=_uncursor(before) if before else None)
    older = _cursor(ops[PAGE_SIZE - 1]) if len(ops) > PAGE_SIZE else None
    names = {b.id: b.name for b in plane.branches(project_id)}
    return render(request, "operations.html", session=session, project=project, tab="operations",
                  ops=ops[:PAGE_SIZE], names=names, older=older, paged=before is not None, duration_ms=duration_ms)


# SQL editor ---------------------------------------------------------------------------------------------


@dataclass
class EditorChoices:
    """What the editor's selects offer and hold, and whether a run is possible."""

    branches: list[model.Branch]
    branch: model.Branch
    databases: list[str]
    database: str | None
    roles: list[str]
    role: str | None
    endpoint: model.Endpoint | None
    password: str | None = None
    problem: str | None = None


def _pick(options: list[str], wanted: str | None) -> str | None:
    return wanted if wanted in options else (options[0] if options else None)


async def editor_choices(control: Control, project_id: str, branch_id: str | None, database: str | None,
                         role: str | None) -> EditorChoices:
    plane = control.plane
    all_branches = plane.branches(project_id)
    branch = next((b for b in all_branches if b.id == branch_id), None) or dashboard.default_branch(control, project_id)
    dbs = [d.name for d in await plane.db(plane.store.list_databases, branch.id)]
    roles = {r.name: r for r in await plane.db(plane.store.list_roles, branch.id)
             if r.login and r.name != model.PLATFORM_ROLE}
    choices = EditorChoices(all_branches, branch, dbs, _pick(dbs, database), list(roles), _pick(list(roles), role),
                            dashboard.primary_endpoint(control, project_id, branch.id))
    if choices.endpoint is None:
        choices.problem = "This branch has no compute, so there is nothing to run queries on."
    elif choices.database is None or choices.role is None:
        choices.problem = "This branch has no database or no role that can log in."
    else:
        secret = roles[choices.role].password_enc
        choices.password = plane.secrets.decrypt(secret) if secret else None
        if choices.password is None:
            choices.problem = (f"Argon does not know the password of {choices.role} (it was set with SQL), so it "
                               "cannot connect as that role. Reset its password on the Roles & Databases page, "
                               "or pick another role.")
    return choices


def _editor(request: Request, session: Session, control: Control, project: model.Project,
            choices: EditorChoices, query: str, outcome: sql.QueryResult | sql.QueryError | None = None,
            status: int = 200) -> Response:
    return render(request, "sql.html", session=session, project=project, tab="sql", choices=choices, query=query,
                  result=outcome if isinstance(outcome, sql.QueryResult) else None,
                  error=outcome if isinstance(outcome, sql.QueryError) else None, max_rows=sql.MAX_ROWS,
                  history=session.history.get(project.id, []), status=status)


@router.get("/projects/{project_id}/sql")
async def sql_page(request: Request, session: SignedIn, control: ControlDep, project_id: str, branch: str | None = None,
                   database: str | None = None, role: str | None = None, history: int | None = None) -> Response:
    project = control.plane.project(project_id)
    choices = await editor_choices(control, project_id, branch, database, role)
    past = session.history.get(project_id, [])
    query = past[history] if history is not None and 0 <= history < len(past) else ""
    return _editor(request, session, control, project, choices, query)


@router.post("/projects/{project_id}/sql")
async def run_sql(request: Request, session: Posted, control: ControlDep, project_id: str,
                  branch: Annotated[str, Form()] = "", database: Annotated[str, Form()] = "",
                  role: Annotated[str, Form()] = "", query: Annotated[str, Form()] = "") -> Response:
    plane = control.plane
    project = plane.project(project_id)
    choices = await editor_choices(control, project_id, branch, database, role)
    if not query.strip():
        return _editor(request, session, control, project, choices, query,
                       sql.QueryError("Write a query to run."), status=400)
    if choices.problem or choices.password is None or choices.endpoint is None:
        return _editor(request, session, control, project, choices, query, status=409)
    session.remember_query(project_id, query)
    params = connection.parameters(plane.settings, endpoint=choices.endpoint, role=choices.role or "",
                                   password=choices.password, database=choices.database or "")
    outcome = await sql.run(plane.settings, params, query)
    return _editor(request, session, control, project, choices, query, outcome)

"""The web console's routes: sign-in, the projects list, New Project, a project's dashboard.

A thin layer like the API: each route reads the control control's in-memory view or awaits an
`argon.control` use case, then renders a template or redirects (POST, then 303 to a page). There
is no HTTP call to our own API. `mount_console` adds these routes to the app, plus the one API
route the CLI needs (`POST /api/v2/console/sign_in_links`, Bearer-authenticated like the rest).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Form, Query, Request, Response
from fastapi.responses import JSONResponse

from argon import ids, model
from argon.console import (
    dashboard,
    pages_account,
    pages_branches,
    pages_monitoring,
    pages_roles,
    pages_settings,
    pages_sql,
    paging,
)
from argon.console.auth import COOKIE_NAME, ConsoleAuth, Session, cookie_attributes
from argon.console.web import (
    Authorized,
    ConsoleRoute,
    ControlDep,
    CsrfRejected,
    Posted,
    SignedIn,
    act,
    console_auth,
    error_page,
    redirect,
    render,
)
from argon.control.endpoints import EndpointPatch, start_endpoint, suspend_endpoint, update_endpoint
from argon.control.projects import ProjectRequest, available_regions, create_project
from argon.control.services import Control
from argon.errors import ArgonError, NotFound

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)
api_router = APIRouter(include_in_schema=False)

LOGIN_CSRF_COOKIE = "argon_login_csrf"  # double-submit token of the sign-in form (no session exists yet)
STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}


def mount_console(app: FastAPI, control: Control) -> None:
    """Serve the console at / on the app (the platform mounts it next to the API). Call last: its
    catch-all answers unknown pages."""
    app.state.control = control
    auth = app.state.console_auth = ConsoleAuth()
    control.api_keys.on_revoke.append(auth.close_sessions_of_key)  # a revoked key signs its browsers out
    app.include_router(api_router, prefix="/api/v2")
    app.include_router(pages_account.router)
    app.include_router(pages_branches.router)
    app.include_router(pages_roles.router)
    app.include_router(pages_settings.router)
    app.include_router(pages_sql.router)
    app.include_router(pages_monitoring.router)
    app.include_router(router)  # last: its catch-all answers unknown pages


def sign_in_link(app: FastAPI, base_url: str) -> str:
    """A fresh one-time sign-in link (what `argon up` prints)."""
    auth: ConsoleAuth = app.state.console_auth
    return auth.issue_link(base_url)


@api_router.post("/console/sign_in_links", status_code=201)
async def create_sign_in_link(control: Authorized, request: Request) -> dict[str, str]:
    return {"url": console_auth(request).issue_link(str(request.base_url))}


# Sign-in and sign-out --------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Only same-site paths: a sign-in must never bounce the browser to another site."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _signed_in(request: Request, target: str, api_key_id: int | None = None) -> Response:
    session = console_auth(request).open_session(api_key_id)  # always a new id: no session fixation
    response = redirect(_safe_next(target))
    response.set_cookie(value=session.id, **cookie_attributes(request.url.scheme == "https"))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


def _login_page(request: Request, *, error: str | None = None, status: int = 200, target: str = "/") -> Response:
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
    response = render(request, "login.html", status=status, error=error, login_csrf=token, next=_safe_next(target))
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="lax", path="/",
                        secure=request.url.scheme == "https")
    return response


@router.get("/login")
async def login(request: Request, token: str | None = None,
                target: Annotated[str, Query(alias="next")] = "/") -> Response:
    auth = console_auth(request)
    if token is not None:
        if auth.redeem(token):
            return _signed_in(request, target)
        return _login_page(request, status=401, error="This sign-in link has already been used or has expired. "
                           "Run “argon console” for a new one, or sign in with an API key.")
    if auth.session(request.cookies.get(COOKIE_NAME)) is not None:
        return redirect(_safe_next(target))
    return _login_page(request, target=target)


@router.post("/login")
async def login_with_key(request: Request, control: ControlDep, api_key: Annotated[str, Form()] = "",
                         csrf_token: Annotated[str, Form()] = "",
                         target: Annotated[str, Form(alias="next")] = "/") -> Response:
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not secrets.compare_digest(cookie.encode(), csrf_token.encode()):
        raise CsrfRejected
    key = control.api_keys.find(api_key.strip())
    if key is None:
        return _login_page(request, status=401, target=target,
                           error="That API key is not valid. Keys start with argon_: “argon up” prints the "
                                 "first one and “argon api-keys create” makes more.")
    return _signed_in(request, target, key.id)


@router.post("/logout")
async def logout(request: Request, session: Posted) -> Response:
    console_auth(request).close_session(session.id)
    response = redirect("/login")
    response.delete_cookie(COOKIE_NAME, path="/")
    return response


# Projects ---------------------------------------------------------------------------------------------


@router.get("/")
async def projects(request: Request, session: SignedIn, control: ControlDep, search: str = "",
                   before: str | None = None) -> Response:
    """Newest first, a page at a time (`console.paging`), with a search by name or id."""
    page = paging.newest_first(control.plane.projects(), key=lambda p: (p.created_at, p.id), name=lambda p: p.name,
                               search=search, before=before, what="projects", size=paging.PAGE_SIZE)
    rows = [(p, dashboard.project_compute(control, p.id)) for p in page.rows]
    backup = control.backup.status.view() if control.backup is not None else None
    return render(request, "projects.html", session=session, rows=rows, page=page,
                  any_project=control.plane.project_count() > 0, backup=backup)


@router.get("/projects")
async def projects_alias(session: SignedIn) -> Response:
    return redirect("/")


def _new_project_page(request: Request, session: Session, control: ControlDep, *, values: dict[str, str],
                      error: str | None = None, status: int = 200) -> Response:
    plane = control.plane
    versions = sorted(plane.installs, reverse=True)
    return render(request, "new_project.html", session=session, status=status, error=error, values=values,
                  versions=[(v, plane.installs[v].version) for v in versions], regions=available_regions(),
                  default_version=plane.settings.default_pg_version or (versions[0] if versions else None))


@router.get("/projects/new")
async def new_project(request: Request, session: SignedIn, control: ControlDep) -> Response:
    return _new_project_page(request, session, control, values={})


@router.post("/projects/new")
async def submit_new_project(request: Request, session: Posted, control: ControlDep, name: Annotated[str, Form()] = "",
                 pg_version: Annotated[str, Form()] = "", region: Annotated[str, Form()] = "") -> Response:
    values = {"name": name, "pg_version": pg_version, "region": region}
    try:
        req = ProjectRequest(name=ids.check_display_name(name.strip(), "project") if name.strip() else None,
                             pg_version=int(pg_version) if pg_version.isdigit() else None,
                             region_id=region or None)
        created = await create_project(control, req)
    except ArgonError as exc:
        return _new_project_page(request, session, control, values=values, error=exc.user_message, status=400)
    session.secrets[f"password:{created.project.id}"] = created.password
    session.flash("success", f"Project {created.project.name} is ready.")
    return redirect(f"/projects/{created.project.id}")


# A project's dashboard --------------------------------------------------------------------------------


@router.get("/projects/{project_id}")
async def project_dashboard(request: Request, session: SignedIn, control: ControlDep, project_id: str,
                            branch: str | None = None, database: str | None = None, role: str | None = None,
                            pooled: bool = False, snippet: str = "uri") -> Response:
    plane = control.plane
    project = plane.project(project_id)
    widget = await dashboard.connection_widget(control, project_id, branch_id=branch, database=database, role=role,
                                               pooled=pooled)
    compute = dashboard.compute_view(control, widget.endpoint)
    timeouts = dashboard.suspend_choices(plane.settings.suspend_timeout,
                                         widget.endpoint.suspend_timeout_seconds if widget.endpoint else 0)
    selected = snippet if any(s.key == snippet for s in widget.snippets) else "uri"
    return render(request, "project.html", session=session, project=project, tab="dashboard", widget=widget,
                  compute=compute,
                  timeouts=timeouts, snippet=selected, new_password=session.pop_secret(f"password:{project_id}"))


@router.get("/projects/{project_id}/compute.json")
async def compute_state(session: SignedIn, control: ControlDep, project_id: str, branch: str | None = None) -> Response:
    control.plane.project(project_id)
    branch_id = branch or dashboard.default_branch(control, project_id).id
    view = dashboard.compute_view(control, dashboard.primary_endpoint(control, project_id, branch_id))
    return JSONResponse(view.as_json())


def _dashboard_url(project_id: str, branch_id: str) -> str:
    return f"/projects/{project_id}?branch={branch_id}#compute"


def _endpoint_of(control: ControlDep, project_id: str, endpoint_id: str) -> model.Endpoint:
    plane = control.plane
    plane.project(project_id)
    return plane.endpoint(project_id, endpoint_id)


@router.post("/projects/{project_id}/endpoints/{endpoint_id}/start")
async def start(session: Posted, control: ControlDep, project_id: str, endpoint_id: str) -> Response:
    ep = _endpoint_of(control, project_id, endpoint_id)
    await act(session, start_endpoint(control, project_id, endpoint_id), "The compute is running.")
    return redirect(_dashboard_url(project_id, ep.branch_id))


@router.post("/projects/{project_id}/endpoints/{endpoint_id}/suspend")
async def suspend(session: Posted, control: ControlDep, project_id: str, endpoint_id: str) -> Response:
    ep = _endpoint_of(control, project_id, endpoint_id)
    await act(session, suspend_endpoint(control, project_id, endpoint_id),
               "The compute is suspended; the next connection wakes it.")
    return redirect(_dashboard_url(project_id, ep.branch_id))


@router.post("/projects/{project_id}/endpoints/{endpoint_id}/settings")
async def update_settings(session: Posted, control: ControlDep, project_id: str, endpoint_id: str,
                          suspend_timeout_seconds: Annotated[int, Form()]) -> Response:
    ep = _endpoint_of(control, project_id, endpoint_id)
    patch = EndpointPatch(suspend_timeout_seconds=suspend_timeout_seconds)
    await act(session, update_endpoint(control, project_id, endpoint_id, patch), "Suspend timeout saved.")
    return redirect(_dashboard_url(project_id, ep.branch_id))


# Assets and unknown pages -------------------------------------------------------------------------------


@router.get("/static/console/{name}")
async def static(name: str) -> Response:
    if name not in STATIC_TYPES:
        raise NotFound(f"the console has no file {name!r}")
    return Response((STATIC_DIR / name).read_bytes(), media_type=STATIC_TYPES[name],
                    headers={"Cache-Control": "public, max-age=3600"})


@router.get("/{path:path}")
async def not_found(request: Request, session: SignedIn) -> Response:
    return error_page(request, 404, "Page not found",
                      "There is nothing at this address. It may have been a project that was deleted.")

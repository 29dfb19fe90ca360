"""/projects, reads of their branches, operations and connection URIs (Neon API v2)."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from pydantic import Field, field_validator

from argon import ids, model
from argon.api import fields, views
from argon.api.deps import Authorized, FastJSON, JsonRoute
from argon.api.fields import Strict
from argon.control import connection
from argon.control.endpoints import check_cu, check_suspend_timeout
from argon.control.projects import ProjectRequest, create_project, delete_project
from argon.control.projects import update_project as change_project
from argon.control.roles import get_role
from argon.control.services import Control
from argon.errors import NotFound, Precondition, UserError

router = APIRouter(tags=["projects"], route_class=JsonRoute)


class BranchSpec(Strict):
    name: str | None = None
    role_name: str | None = None
    database_name: str | None = None
    annotations: dict[str, str] | None = None

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v:
            raise ValueError("Argon keeps no branch annotations")
        return v


class DefaultEndpointSettings(Strict):
    autoscaling_limit_min_cu: float | None = None
    autoscaling_limit_max_cu: float | None = None
    suspend_timeout_seconds: int | None = None
    pg_settings: dict[str, Any] | None = None
    pgbouncer_settings: dict[str, Any] | None = None

    _pg = field_validator("pg_settings")(fields.check_pg_settings)
    _bouncer = field_validator("pgbouncer_settings")(fields.check_pgbouncer_settings)


class ProjectCreate(Strict):
    name: str | None = Field(None, max_length=256)
    region_id: str | None = None
    pg_version: int | None = None
    branch: BranchSpec | None = None
    default_endpoint_settings: DefaultEndpointSettings | None = None
    history_retention_seconds: int | None = Field(None, ge=0, le=model.MAX_HISTORY_RETENTION)
    autoscaling_limit_min_cu: float | None = None  # deprecated top-level forms Neon still accepts
    autoscaling_limit_max_cu: float | None = None
    settings: fields.ProjectSettingsData | None = None
    provisioner: str | None = None
    store_passwords: bool | None = None
    org_id: str | None = None

    _provisioner = field_validator("provisioner")(fields.check_provisioner)

    @field_validator("store_passwords")
    @classmethod
    def _store(cls, v: bool | None) -> bool | None:
        return fields.only(v, True, "Argon stores role passwords (encrypted) so that connection strings can be "
                                    "shown again; store_passwords: false is not supported")

    @field_validator("org_id")
    @classmethod
    def _org(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("Argon has no organizations (GET /users/me/organizations is empty); omit org_id")
        return v


class ProjectCreateBody(Strict):
    project: ProjectCreate = Field(default_factory=ProjectCreate)


class ProjectUpdate(Strict):
    name: str | None = Field(None, max_length=256)
    default_endpoint_settings: DefaultEndpointSettings | None = None
    history_retention_seconds: int | None = Field(None, ge=0, le=model.MAX_HISTORY_RETENTION)
    settings: fields.ProjectSettingsData | None = None


class ProjectUpdateBody(Strict):
    project: ProjectUpdate


def _endpoint_settings(spec: DefaultEndpointSettings | None, base: model.EndpointSettings,
                       lo: float | None = None, hi: float | None = None) -> model.EndpointSettings:
    spec = spec or DefaultEndpointSettings()
    lo = spec.autoscaling_limit_min_cu if spec.autoscaling_limit_min_cu is not None else lo
    hi = spec.autoscaling_limit_max_cu if spec.autoscaling_limit_max_cu is not None else hi
    lo_v = check_cu(lo, "autoscaling_limit_min_cu") if lo is not None else base.autoscaling_limit_min_cu
    hi_v = check_cu(hi, "autoscaling_limit_max_cu") if hi is not None else max(base.autoscaling_limit_max_cu, lo_v)
    if lo_v > hi_v:
        raise UserError("autoscaling_limit_min_cu must not be greater than autoscaling_limit_max_cu")
    timeout = base.suspend_timeout_seconds
    if spec.suspend_timeout_seconds is not None:
        timeout = check_suspend_timeout(spec.suspend_timeout_seconds)
    return model.EndpointSettings(lo_v, hi_v, timeout)


def _cursor_encode(created_at: datetime, key: str) -> str:
    raw = json.dumps([created_at.isoformat(), key]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor_decode(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when, key = json.loads(raw)
        return datetime.fromisoformat(when), str(key)
    except Exception:
        raise UserError("invalid cursor: pass back the pagination.cursor of the previous page") from None


def project_view(control: Control, p: model.Project, *, full: bool = True) -> dict[str, Any]:
    """From memory: the project's own branches and endpoints, each looked at once (a list of 400
    projects builds 400 of these; ADR 0022)."""
    plane, figures = control.plane, control.figures
    branch_ids = plane.branch_ids(p.id)
    endpoints = plane.endpoints_unordered(p.id)
    active = [e.last_active for e in endpoints if e.last_active is not None]
    return views.project_view(plane.settings, p, full=full, compute_last_active_at=max(active) if active else None,
                              storage_bytes=sum(figures.get(b).allocated_bytes for b in branch_ids),
                              written_bytes=sum(figures.get(b).written_data_bytes for b in branch_ids) if full else 0,
                              usage=control.metrics.usage([e.id for e in endpoints], branch_ids, since=p.created_at))


@router.get("/projects")
async def list_projects(control: Authorized, limit: Annotated[int, Query(ge=1, le=400)] = 10,
                        cursor: str | None = None, search: str | None = None,
                        org_id: str | None = None, recoverable: bool = False) -> FastJSON:
    after = _cursor_decode(cursor) if cursor else None
    # Argon deletes a project's data at once: no deleted project is recoverable (neonctl's
    # `projects list --recoverable-only` asks with recoverable=true).
    projects = [] if recoverable else control.plane.projects()
    if after is not None:
        projects = [p for p in projects if (p.created_at, p.id) > after]
    if search:
        projects = [p for p in projects if search.lower() in p.name.lower() or search in p.id]
    page = projects[:limit]
    # figures from memory, kept by the background (argon.control.figures): a read measures nothing
    out: dict[str, Any] = {"projects": [project_view(control, p, full=False) for p in page],
                           "applications": {}, "integrations": {}}
    last = page[-1] if page else None
    # A cursor is always present; the page after the last one comes back empty (neon-api.md §3.9).
    out["pagination"] = {"cursor": _cursor_encode(last.created_at, last.id) if last else (cursor or "")}
    # JSON as built (strings, numbers), by orjson: FastAPI's encoder walking 400 projects' dicts again
    # took longer than building them, and `json` most of what was left (ADR 0022)
    return FastJSON(out)


@router.get("/projects/shared")
async def list_shared_projects(control: Authorized) -> dict[str, Any]:
    return {"projects": []}


@router.post("/projects", status_code=201)
async def create(control: Authorized, body: Annotated[ProjectCreateBody | None, Body()] = None) -> FastJSON:
    plane = control.plane
    spec = (body or ProjectCreateBody()).project
    branch = spec.branch or BranchSpec()
    req = ProjectRequest(
        name=ids.check_display_name(spec.name, "project") if spec.name is not None else None,
        region_id=spec.region_id,
        pg_version=spec.pg_version,
        branch_name=ids.check_display_name(branch.name, "branch") if branch.name else model.DEFAULT_BRANCH_NAME,
        database_name=branch.database_name or model.DEFAULT_DATABASE_NAME,
        role_name=branch.role_name,
        settings=_endpoint_settings(spec.default_endpoint_settings, model.EndpointSettings(),
                                    spec.autoscaling_limit_min_cu, spec.autoscaling_limit_max_cu),
        history_retention_seconds=(spec.history_retention_seconds if spec.history_retention_seconds is not None
                                   else model.DEFAULT_HISTORY_RETENTION),
        project_settings=spec.settings.apply(model.ProjectSettings()) if spec.settings else model.ProjectSettings(),
    )
    created = await create_project(control, req)
    params = connection.parameters(plane.settings, endpoint=created.endpoint, role=created.role.name,
                                   password=created.password, database=created.database.name)
    pooled = connection.parameters(plane.settings, endpoint=created.endpoint, role=created.role.name,
                                   password=created.password, database=created.database.name, pooled=True)
    body_out = {
        "project": project_view(control, created.project),
        "connection_uris": [views.connection_details(params, pooled)],
        "roles": [views.role_view(created.role, created.password)],
        "databases": [views.database_view(created.database)],
        "operations": [views.operation_view(o) for o in created.operations],
        "branch": views.branch_view(created.branch),
        "endpoints": [views.endpoint_view(plane.settings, plane.endpoint(None, created.endpoint.id))],
    }
    return FastJSON(body_out, status_code=201)


@router.get("/projects/{project_id}")
async def get_project(control: Authorized, project_id: str) -> dict[str, Any]:
    project = control.plane.project(project_id)
    return {"project": project_view(control, project)}


@router.patch("/projects/{project_id}")
async def update_project(control: Authorized, project_id: str, body: ProjectUpdateBody) -> dict[str, Any]:
    spec = body.project
    current = control.plane.project(project_id)
    settings = (_endpoint_settings(spec.default_endpoint_settings, current.default_endpoint_settings)
                if spec.default_endpoint_settings is not None else None)
    p, ops = await change_project(control, project_id, name=spec.name, endpoint_settings=settings,
                                  history_retention_seconds=spec.history_retention_seconds,
                                  settings=spec.settings.apply if spec.settings else None)
    return {"project": project_view(control, p), "operations": [views.operation_view(o) for o in ops]}


@router.delete("/projects/{project_id}")
async def delete(control: Authorized, project_id: str) -> dict[str, Any]:
    project = await delete_project(control, project_id)
    return {"project": project_view(control, project)}


@router.post("/projects/{project_id}/recover")
async def recover(control: Authorized, project_id: str) -> dict[str, Any]:
    if control.plane.has_project(project_id):
        raise UserError(f"project {project_id!r} is not deleted; there is nothing to recover")
    raise NotFound(f"project {project_id!r} not found; Argon deletes a project's data at once, so a deleted "
                   "project cannot be recovered")


@router.get("/projects/{project_id}/available_preload_libraries")
async def available_preload_libraries(control: Authorized, project_id: str) -> dict[str, Any]:
    """The libraries a project's computes preload: those its allow-listed extensions need, all of them
    always (so `use_defaults: true` is the only setting; ADR 0015)."""
    plane = control.plane
    project = plane.project(project_id)
    support = plane.extensions.get(project.pg_version)
    offered = support.offered if support is not None else ()
    return {"libraries": [{"library_name": o.name, "description": o.comment, "is_default": True,
                           "is_experimental": False, "version": o.default_version} for o in offered if o.preloaded]}


@router.get("/projects/{project_id}/available_extensions")
async def available_extensions(control: Authorized, project_id: str) -> dict[str, Any]:
    """Argon's addition: the extensions the project's roles can create with `CREATE EXTENSION`, on the
    project's Postgres version, and the allow-listed ones this server's installation lacks."""
    plane = control.plane
    project = plane.project(project_id)
    return views.extensions_view(project.pg_version, plane.extensions.get(project.pg_version), plane.extensions)


# Operations and connection URIs ----------------------------------------------------------------------


@router.get("/projects/{project_id}/operations")
async def list_operations(control: Authorized, project_id: str, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                          cursor: str | None = None) -> dict[str, Any]:
    plane = control.plane
    plane.project(project_id)
    before = _cursor_decode(cursor) if cursor else None
    ops = await plane.db(plane.store.list_operations, project_id, limit=limit, before=before)
    last = ops[-1] if ops else None
    return {"operations": [views.operation_view(o) for o in ops],
            "pagination": {"cursor": _cursor_encode(last.created_at, last.id) if last else (cursor or "")}}


@router.get("/projects/{project_id}/operations/{operation_id}")
async def get_operation(control: Authorized, project_id: str, operation_id: str) -> dict[str, Any]:
    plane = control.plane
    plane.project(project_id)
    op = await plane.db(plane.store.get_operation, operation_id)
    if op is None or op.project_id != project_id:
        raise NotFound(f"operation {operation_id!r} not found")
    return {"operation": views.operation_view(op)}


@router.get("/projects/{project_id}/connection_uri")
async def connection_uri(control: Authorized, project_id: str, database_name: str, role_name: str,
                         branch_id: str | None = None, endpoint_id: str | None = None,
                         pooled: bool = False) -> dict[str, Any]:
    plane = control.plane
    plane.project(project_id)
    if branch_id is None:
        branch_id = next(b.id for b in plane.branches(project_id) if b.default)
    branch = plane.branch(project_id, branch_id)
    if endpoint_id is None:
        eps = [e for e in plane.endpoints(project_id, branch.id) if e.type is model.EndpointType.READ_WRITE]
        if not eps:
            raise NotFound(f"branch {branch.id!r} has no read-write endpoint")
        endpoint_id = eps[0].id
    ep = plane.endpoint(project_id, endpoint_id)
    role = await get_role(control, project_id, ep.branch_id, role_name)
    if await plane.db(plane.store.get_database, ep.branch_id, database_name) is None:
        raise NotFound(f"database {database_name!r} not found on branch {ep.branch_id!r}")
    password = plane.secrets.decrypt(role.password_enc) if role.password_enc else None
    if password is None:
        raise Precondition(f"the password of role {role_name!r} is not known to Argon; reset it first")
    params = connection.parameters(plane.settings, endpoint=ep, role=role.name, password=password,
                                   database=database_name, pooled=pooled)
    return {"uri": params.uri}

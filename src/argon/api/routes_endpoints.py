"""/projects/{p}/endpoints: list, get, update, start, suspend, restart, and their logs and events."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse
from pydantic import field_validator

from argon import model
from argon.api import fields, views
from argon.api.deps import Authorized, FastJSON, JsonRoute
from argon.api.fields import Strict
from argon.control.endpoints import (
    EndpointPatch,
    check_cu,
    check_suspend_timeout,
    create_endpoint,
    delete_endpoint,
    read_log,
    restart_endpoint,
    start_endpoint,
    suspend_endpoint,
    update_endpoint,
)
from argon.errors import UserError

router = APIRouter(tags=["endpoints"], route_class=JsonRoute)


class _EndpointFields(Strict):
    """What both create and update take."""

    autoscaling_limit_min_cu: float | None = None
    autoscaling_limit_max_cu: float | None = None
    suspend_timeout_seconds: int | None = None
    disabled: bool | None = None
    name: str | None = None
    provisioner: str | None = None
    settings: fields.EndpointSettingsData | None = None
    pooler_enabled: bool | None = None
    pooler_mode: Literal["transaction"] | None = None
    passwordless_access: bool | None = None

    _provisioner = field_validator("provisioner")(fields.check_provisioner)

    @field_validator("pooler_enabled")
    @classmethod
    def _pooler(cls, v: bool | None) -> bool | None:
        return fields.only(v, True, "the pooled host (<endpoint>-pooler) is always available; it cannot be turned off")

    @field_validator("passwordless_access")
    @classmethod
    def _passwordless(cls, v: bool | None) -> bool | None:
        return fields.only(v, False, "every Argon login checks a password")


class EndpointUpdate(_EndpointFields):
    branch_id: str | None = None

    @field_validator("branch_id")
    @classmethod
    def _move(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("moving an endpoint to another branch is not supported (Neon deprecates it too); "
                             "create an endpoint on that branch")
        return v


class EndpointUpdateBody(Strict):
    endpoint: EndpointUpdate


@router.get("/projects/{project_id}/endpoints")
async def list_endpoints(control: Authorized, project_id: str) -> dict[str, Any]:
    plane = control.plane
    plane.project(project_id)
    return {"endpoints": [views.endpoint_view(plane.settings, e) for e in plane.endpoints(project_id)]}


@router.get("/projects/{project_id}/endpoints/{endpoint_id}")
async def get_endpoint(control: Authorized, project_id: str, endpoint_id: str) -> dict[str, Any]:
    plane = control.plane
    return {"endpoint": views.endpoint_view(plane.settings, plane.endpoint(project_id, endpoint_id))}


@router.patch("/projects/{project_id}/endpoints/{endpoint_id}")
async def patch_endpoint(control: Authorized, project_id: str, endpoint_id: str, body: EndpointUpdateBody) -> dict[str, Any]:
    spec = body.endpoint
    if spec.name is not None and not 1 <= len(spec.name) <= 64:
        raise UserError("endpoint name must be 1 to 64 characters")
    patch = EndpointPatch(
        autoscaling_limit_min_cu=(check_cu(spec.autoscaling_limit_min_cu, "autoscaling_limit_min_cu")
                                  if spec.autoscaling_limit_min_cu is not None else None),
        autoscaling_limit_max_cu=(check_cu(spec.autoscaling_limit_max_cu, "autoscaling_limit_max_cu")
                                  if spec.autoscaling_limit_max_cu is not None else None),
        suspend_timeout_seconds=(check_suspend_timeout(spec.suspend_timeout_seconds)
                                 if spec.suspend_timeout_seconds is not None else None),
        disabled=spec.disabled, name=spec.name,
        pg_settings=spec.settings.pg_settings if spec.settings else None)
    ep, ops, applied = await update_endpoint(control, project_id, endpoint_id, patch)
    return {"endpoint": views.endpoint_view(control.plane.settings, ep), "operations": [views.operation_view(o) for o in ops],
            "applied": {"now": list(applied.now), "next_start": list(applied.next_start)}}


@router.post("/projects/{project_id}/endpoints/{endpoint_id}/start")
async def start(control: Authorized, project_id: str, endpoint_id: str) -> dict[str, Any]:
    plane = control.plane
    ops = await start_endpoint(control, project_id, endpoint_id)
    return {"endpoint": views.endpoint_view(plane.settings, plane.endpoint(project_id, endpoint_id)),
            "operations": [views.operation_view(o) for o in ops]}


@router.post("/projects/{project_id}/endpoints/{endpoint_id}/suspend")
async def suspend(control: Authorized, project_id: str, endpoint_id: str) -> dict[str, Any]:
    plane = control.plane
    ops = await suspend_endpoint(control, project_id, endpoint_id)
    return {"endpoint": views.endpoint_view(plane.settings, plane.endpoint(project_id, endpoint_id)),
            "operations": [views.operation_view(o) for o in ops]}


@router.post("/projects/{project_id}/endpoints/{endpoint_id}/restart")
async def restart(control: Authorized, project_id: str, endpoint_id: str) -> dict[str, Any]:
    plane = control.plane
    ops = await restart_endpoint(control, project_id, endpoint_id)
    return {"endpoint": views.endpoint_view(plane.settings, plane.endpoint(project_id, endpoint_id)),
            "operations": [views.operation_view(o) for o in ops]}


@router.get("/projects/{project_id}/endpoints/{endpoint_id}/logs", response_class=PlainTextResponse,
            summary="The compute's PostgreSQL log (Argon extension)")
async def logs(control: Authorized, project_id: str, endpoint_id: str,
               tail: Annotated[int, Query(ge=1, le=100000)] = 200) -> PlainTextResponse:
    return PlainTextResponse(await read_log(control, project_id, endpoint_id, tail))


@router.get("/projects/{project_id}/endpoints/{endpoint_id}/pooler",
            summary="The endpoint's transaction pools, as PgBouncer's SHOW POOLS (Argon extension)")
async def pooler(control: Authorized, project_id: str, endpoint_id: str) -> dict[str, Any]:
    plane = control.plane
    plane.endpoint(project_id, endpoint_id)
    return {"pools": [views.pool_view(p.database, p.role, p.stats) for p in plane.activity.pools(endpoint_id)]}


@router.get("/projects/{project_id}/endpoints/{endpoint_id}/events",
            summary="Wakes, suspends and cold-start durations (Argon extension)")
async def events(control: Authorized, project_id: str, endpoint_id: str,
                 limit: Annotated[int, Query(ge=1, le=10000)] = 200) -> dict[str, Any]:
    plane = control.plane
    plane.endpoint(project_id, endpoint_id)
    evs = await plane.db(plane.store.list_events, endpoint_id, limit)
    return {"events": [views.event_view(e) for e in evs]}


class EndpointCreate(_EndpointFields):
    branch_id: str
    type: str = "read_write"
    region_id: str | None = None

    @field_validator("region_id")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        return fields.only(v, model.REGION_ID, f"only the project's region, {model.REGION_ID!r}, is permitted")


class EndpointCreateBody(Strict):
    endpoint: EndpointCreate


@router.post("/projects/{project_id}/endpoints", status_code=201)
async def create(control: Authorized, project_id: str, body: EndpointCreateBody) -> FastJSON:
    plane = control.plane
    spec = body.endpoint
    base = plane.project(project_id).default_endpoint_settings
    lo = (check_cu(spec.autoscaling_limit_min_cu, "autoscaling_limit_min_cu")
          if spec.autoscaling_limit_min_cu is not None else base.autoscaling_limit_min_cu)
    hi = (check_cu(spec.autoscaling_limit_max_cu, "autoscaling_limit_max_cu")
          if spec.autoscaling_limit_max_cu is not None else max(base.autoscaling_limit_max_cu, lo))
    if lo > hi:
        raise UserError("autoscaling_limit_min_cu must not be greater than autoscaling_limit_max_cu")
    timeout = (check_suspend_timeout(spec.suspend_timeout_seconds) if spec.suspend_timeout_seconds is not None
               else base.suspend_timeout_seconds)
    name = spec.name if spec.name and 1 <= len(spec.name) <= 64 else None
    ep, ops = await create_endpoint(control, project_id, spec.branch_id, type_=spec.type,
                                    settings=model.EndpointSettings(lo, hi, timeout), name=name,
                                    disabled=bool(spec.disabled),
                                    pg_settings=spec.settings.pg_settings if spec.settings else None)
    return FastJSON({"endpoint": views.endpoint_view(plane.settings, ep),
                         "operations": [views.operation_view(o) for o in ops]}, status_code=201)


@router.delete("/projects/{project_id}/endpoints/{endpoint_id}")
async def delete(control: Authorized, project_id: str, endpoint_id: str) -> dict[str, Any]:
    ep, ops = await delete_endpoint(control, project_id, endpoint_id)
    return {"endpoint": views.endpoint_view(control.plane.settings, ep), "operations": [views.operation_view(o) for o in ops]}

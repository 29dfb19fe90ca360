"""Account-level calls Neon's clients make: users/me, organizations, auth, regions, API keys."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from argon.api import views
from argon.api.deps import Authorized, FastJSON, JsonRoute
from argon.api.fields import Strict
from argon.control.projects import available_regions
from argon.errors import NotFound

router = APIRouter(tags=["account"], route_class=JsonRoute)


@router.get("/users/me")
async def me(control: Authorized) -> dict[str, Any]:
    return {"id": "local", "email": "admin@localhost", "login": "admin", "name": "Argon admin", "last_name": "",
            "image": "", "projects_limit": 10000, "branches_limit": 10000, "max_autoscaling_limit": 16,
            "active_seconds_limit": 0, "auth_accounts": [], "plan": "self-hosted"}


@router.get("/users/me/organizations")
async def organizations(control: Authorized) -> dict[str, Any]:
    return {"organizations": []}


@router.get("/auth")
async def auth(control: Authorized) -> dict[str, Any]:
    return {"account_id": "local", "auth_method": "api_key_user"}


@router.get("/regions")
async def regions(control: Authorized) -> dict[str, Any]:
    return {"regions": [{"region_id": r, "name": "This server", "default": True, "geo_lat": "0", "geo_long": "0"}
                        for r in available_regions()]}


@router.get("/versions", summary="PostgreSQL versions and the clone backend of this server (Argon extension)")
async def versions(control: Authorized) -> dict[str, Any]:
    plane = control.plane
    return {"versions": [{"pg_version": i.major, "version": i.version, "source": i.source}
                         for i in sorted(plane.installs.values(), key=lambda i: i.major)],
            "clone_backend": plane.backend.name, "compute_limits": plane.computes.limits_note,
            "disk_limits": control.disk.describe()}


class ApiKeyCreate(Strict):
    key_name: str = Field(min_length=1, max_length=256)
    project_id: str | None = None  # Argon takes Neon's org-key field here: a key for one project


@router.get("/api_keys")
async def list_keys(control: Authorized) -> list[dict[str, Any]]:
    return [{"id": k.id, "name": k.name, "created_at": views.ts(k.created_at),
             "created_by": {"id": "local", "name": "admin"}, "last_used_from_addr": "",
             "last_used_at": views.ts(k.last_used_at), "project_id": k.project_id} for k in control.api_keys.list()]


@router.post("/api_keys")
async def create_key(control: Authorized, body: ApiKeyCreate) -> FastJSON:
    key, token = await control.api_keys.create(body.key_name, body.project_id)
    return FastJSON({"id": key.id, "key": token, "name": key.name, "created_at": views.ts(key.created_at),
                         "created_by": {"id": "local", "name": "admin"}, "project_id": key.project_id})


@router.delete("/api_keys/{key_id}")
async def revoke_key(control: Authorized, key_id: int) -> dict[str, Any]:
    key = await control.api_keys.revoke(key_id)
    if key is None:
        raise NotFound(f"API key {key_id} not found")
    return {"id": key.id, "name": key.name, "revoked": True, "last_used_from_addr": "",
            "last_used_at": views.ts(key.last_used_at)}

"""Neon resources Argon does not have: lists answer empty, creation is a clear 4xx.

neonctl 5's project workflow (`link`, `checkout`, `env pull`, `status`) lists a branch's object
storage buckets, functions, their triggers and its credentials before anything else; with these
answering Neon's shapes, empty, those commands work. Creating one is refused, naming what is missing.
Branch credentials (tokens for the AI Gateway and object storage) answer 404 "... not available"
even to a list: that is how neonctl learns a region has no AI Gateway (an empty list makes it mint
a gateway token).
Project permissions (sharing a project with another Neon account by e-mail) list empty too: an
Argon server has one account, and its API keys are how access is shared (`/api_keys`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from argon.api.deps import Authorized, JsonRoute
from argon.errors import NotFound, UserError

router = APIRouter(tags=["not on Argon"], route_class=JsonRoute)

_BRANCH = "/projects/{project_id}/branches/{branch_id}"
_ABSENT = {"buckets": "object storage (buckets)", "functions": "functions", "triggers": "function triggers"}


def _branch(control: Authorized, project_id: str, branch_id: str) -> None:
    control.plane.branch(project_id, branch_id)  # 404 for an unknown project or branch, as Neon


def _make_routes(kind: str, what: str) -> None:
    @router.get(f"{_BRANCH}/{kind}", name=f"list_{kind}", summary=f"Lists the branch's {what}: none on Argon")
    async def listing(control: Authorized, project_id: str, branch_id: str) -> dict[str, Any]:
        _branch(control, project_id, branch_id)
        return {kind: []}

    @router.post(f"{_BRANCH}/{kind}", name=f"create_{kind}", summary=f"Refused: Argon has no {what}")
    async def create(control: Authorized, project_id: str, branch_id: str) -> dict[str, Any]:
        _branch(control, project_id, branch_id)
        raise UserError(f"Argon has no {what}; only Postgres branches, computes, roles and databases")

    @router.get(f"{_BRANCH}/{kind}/{{name}}", name=f"get_{kind}", include_in_schema=False)
    async def get_one(control: Authorized, project_id: str, branch_id: str, name: str) -> dict[str, Any]:
        _branch(control, project_id, branch_id)
        raise NotFound(f"Argon has no {what}: {name!r} not found")


for _kind, _what in _ABSENT.items():
    _make_routes(_kind, _what)


@router.get(f"{_BRANCH}/credentials")
@router.post(f"{_BRANCH}/credentials")
async def credentials(control: Authorized, project_id: str, branch_id: str) -> dict[str, Any]:
    _branch(control, project_id, branch_id)
    # neonctl treats a 404 whose message says "not available" as a region without these features.
    raise NotFound("branch credentials (AI Gateway and object storage tokens) are not available on Argon")


@router.get("/projects/{project_id}/permissions")
async def list_permissions(control: Authorized, project_id: str) -> dict[str, Any]:
    control.plane.project(project_id)
    return {"project_permissions": []}


@router.post("/projects/{project_id}/permissions")
async def grant_permission(control: Authorized, project_id: str) -> dict[str, Any]:
    control.plane.project(project_id)
    raise UserError("an Argon server has one account: share access with an API key (POST /api_keys; one limited "
                    "to this project with project_id), not by e-mail")


@router.delete("/projects/{project_id}/permissions/{permission_id}")
async def revoke_permission(control: Authorized, project_id: str, permission_id: str) -> dict[str, Any]:
    control.plane.project(project_id)
    raise NotFound(f"permission {permission_id!r} not found")

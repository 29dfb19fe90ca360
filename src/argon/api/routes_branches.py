"""/projects/{p}/branches: list, get, create (from head), rename/protect, delete, set_as_default."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body
from pydantic import field_validator

from argon import ids, model
from argon.api import fields, views
from argon.api.deps import Authorized, FastJSON, JsonRoute
from argon.api.fields import Strict
from argon.control import branches, connection
from argon.control.endpoints import check_cu, check_suspend_timeout
from argon.errors import NotFound, UserError

router = APIRouter(tags=["Branch"], route_class=JsonRoute)


class BranchCreate(Strict):
    name: str | None = None
    parent_id: str | None = None
    parent_lsn: str | None = None
    parent_timestamp: str | None = None
    protected: bool = False
    init_source: str = "parent-data"
    expires_at: datetime | None = None
    archived: bool | None = None

    @field_validator("archived")
    @classmethod
    def _archived(cls, v: bool | None) -> bool | None:
        return fields.only(v, False, "Argon does not archive branches (an idle branch costs only its disk)")


class EndpointSpec(Strict):
    type: Literal["read_write", "read_only"] = "read_write"
    autoscaling_limit_min_cu: float | None = None
    autoscaling_limit_max_cu: float | None = None
    suspend_timeout_seconds: int | None = None
    provisioner: str | None = None
    settings: fields.EndpointSettingsData | None = None

    _provisioner = field_validator("provisioner")(fields.check_provisioner)


class BranchCreateBody(Strict):
    branch: BranchCreate | None = None
    endpoints: list[EndpointSpec] | None = None
    annotation_value: dict[str, str] | None = None  # neonctl sends {} with every create

    @field_validator("annotation_value")
    @classmethod
    def _annotations(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v:
            raise ValueError("Argon keeps no branch annotations")
        return v


class BranchUpdate(Strict):
    name: str | None = None
    protected: bool | None = None
    expires_at: datetime | None = None  # explicit null clears it (Neon)


class BranchUpdateBody(Strict):
    branch: BranchUpdate


def _settings(control: Authorized, project_id: str, spec: EndpointSpec) -> model.EndpointSettings:
    base = control.plane.project(project_id).default_endpoint_settings
    lo = check_cu(spec.autoscaling_limit_min_cu, "autoscaling_limit_min_cu") \
        if spec.autoscaling_limit_min_cu is not None else base.autoscaling_limit_min_cu
    hi = check_cu(spec.autoscaling_limit_max_cu, "autoscaling_limit_max_cu") \
        if spec.autoscaling_limit_max_cu is not None else max(base.autoscaling_limit_max_cu, lo)
    if lo > hi:
        raise UserError("autoscaling_limit_min_cu must not be greater than autoscaling_limit_max_cu")
    timeout = check_suspend_timeout(spec.suspend_timeout_seconds) if spec.suspend_timeout_seconds is not None \
        else base.suspend_timeout_seconds
    return model.EndpointSettings(lo, hi, timeout)


@router.get("/projects/{project_id}/branches")
async def list_branches(control: Authorized, project_id: str) -> dict[str, Any]:
    plane = control.plane
    plane.project(project_id)
    # neonctl dereferences annotations[branch.id]: the object must be there, even empty.
    return {"branches": [views.branch_view(b, control.figures.get(b.id), control.metrics.branch_usage(project_id, b.id))
                         for b in plane.branches(project_id)],
            "annotations": {}}


@router.get("/projects/{project_id}/branches/count")
async def count_branches(control: Authorized, project_id: str, search: str | None = None) -> dict[str, Any]:
    control.plane.project(project_id)
    branches_ = control.plane.branches(project_id)
    if search:
        branches_ = [b for b in branches_ if search.lower() in b.name.lower() or search in b.id]
    return {"count": len(branches_)}


@router.post("/projects/{project_id}/branches", status_code=201)
async def create_branch(control: Authorized, project_id: str,
                        body: Annotated[BranchCreateBody | None, Body()] = None) -> FastJSON:
    plane = control.plane
    body = body or BranchCreateBody()
    spec = body.branch or BranchCreate()
    req = branches.BranchRequest(
        name=ids.check_display_name(spec.name, "branch") if spec.name else None,
        parent_id=spec.parent_id, parent_lsn=spec.parent_lsn, parent_timestamp=spec.parent_timestamp,
        protected=spec.protected, init_source=spec.init_source, expires_at=spec.expires_at,
        endpoints=[_settings(control, project_id, e) for e in (body.endpoints or [])],
        endpoint_type=model.EndpointType(body.endpoints[0].type) if body.endpoints else model.EndpointType.READ_WRITE,
        endpoint_pg_settings=dict(body.endpoints[0].settings.pg_settings or {})
        if body.endpoints and body.endpoints[0].settings else {})
    created = await branches.create_branch(control, project_id, req)
    uris = []
    if created.endpoints and created.roles and created.databases:
        ep = created.endpoints[0]
        for role in created.roles:
            password = plane.secrets.decrypt(role.password_enc) if role.password_enc else None
            if password is None:
                continue
            for db in created.databases:
                if db.owner_name != role.name:
                    continue
                params = connection.parameters(plane.settings, endpoint=ep, role=role.name, password=password,
                                               database=db.name)
                pooled = connection.parameters(plane.settings, endpoint=ep, role=role.name,
                                               password=password, database=db.name, pooled=True)
                uris.append(views.connection_details(params, pooled))
    out = {
        "branch": views.branch_view(created.branch),
        "endpoints": [views.endpoint_view(plane.settings, plane.endpoint(None, e.id)) for e in created.endpoints],
        "operations": [views.operation_view(o) for o in created.operations],
        "roles": [views.role_view(r) for r in created.roles],
        "databases": [views.database_view(d) for d in created.databases],
        "connection_uris": uris,
    }
    return FastJSON(out, status_code=201)


@router.get("/projects/{project_id}/branches/{branch_id}")
async def get_branch(control: Authorized, project_id: str, branch_id: str) -> dict[str, Any]:
    branch = control.plane.branch(project_id, branch_id)
    return {"branch": views.branch_view(branch, control.figures.get(branch_id),
                                       control.metrics.branch_usage(project_id, branch_id))}


@router.patch("/projects/{project_id}/branches/{branch_id}")
async def update_branch(control: Authorized, project_id: str, branch_id: str, body: BranchUpdateBody) -> dict[str, Any]:
    expiry: dict[str, Any] = {"expires_at": body.branch.expires_at} if "expires_at" in body.branch.model_fields_set \
        else {}
    branch = await branches.update_branch(control, project_id, branch_id, name=body.branch.name,
                                          protected=body.branch.protected, **expiry)
    return {"branch": views.branch_view(branch), "operations": []}


@router.delete("/projects/{project_id}/branches/{branch_id}")
async def delete_branch(control: Authorized, project_id: str, branch_id: str) -> dict[str, Any]:
    branch, ops = await branches.delete_branch(control, project_id, branch_id)
    return {"branch": views.branch_view(branch), "operations": [views.operation_view(o) for o in ops]}


@router.post("/projects/{project_id}/branches/{branch_id}/set_as_default")
@router.post("/projects/{project_id}/branches/{branch_id}/set_as_primary")  # the neon-api package's old path
async def set_as_default(control: Authorized, project_id: str, branch_id: str) -> dict[str, Any]:
    target = await branches.set_default_branch(control, project_id, branch_id)
    return {"branch": views.branch_view(target), "operations": []}


class RestoreBody(Strict):
    source_branch_id: str
    source_lsn: str | None = None
    source_timestamp: str | None = None
    preserve_under_name: str | None = None


@router.post("/projects/{project_id}/branches/{branch_id}/recover")
async def recover_branch(control: Authorized, project_id: str, branch_id: str) -> dict[str, Any]:
    plane = control.plane
    plane.project(project_id)
    if any(b.id == branch_id for b in plane.branches(project_id)):
        raise UserError(f"branch {branch_id!r} is not deleted; there is nothing to recover")
    raise NotFound(f"branch {branch_id!r} not found; Argon deletes a branch's data at once, so a deleted branch "
                   "cannot be recovered")


@router.post("/projects/{project_id}/branches/{branch_id}/restore")
async def restore_branch(control: Authorized, project_id: str, branch_id: str, body: RestoreBody) -> dict[str, Any]:
    branch, ops = await branches.restore_branch(
        control, project_id, branch_id, body.source_branch_id, source_lsn=body.source_lsn,
        source_timestamp=body.source_timestamp, preserve_under_name=body.preserve_under_name)
    return {"branch": views.branch_view(branch), "operations": [views.operation_view(o) for o in ops]}


@router.get("/projects/{project_id}/branches/{branch_id}/endpoints")
async def branch_endpoints(control: Authorized, project_id: str, branch_id: str) -> dict[str, Any]:
    plane = control.plane
    plane.branch(project_id, branch_id)
    return {"endpoints": [views.endpoint_view(plane.settings, e) for e in plane.endpoints(project_id, branch_id)]}

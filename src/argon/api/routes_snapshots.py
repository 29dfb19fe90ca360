"""Neon's snapshots API (ADR 0028): take, list, rename or re-date, delete and restore snapshots of
a branch; finalize a previewed restore."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from argon import model
from argon.api import views
from argon.api.deps import Authorized, JsonRoute
from argon.api.fields import Strict
from argon.control import schedules, snapshots

router = APIRouter(tags=["Snapshots"], route_class=JsonRoute)


def snapshot_view(s: model.Snapshot) -> dict[str, Any]:
    out: dict[str, Any] = {"id": s.id, "name": s.name, "lsn": s.lsn, "timestamp": views.ts(s.timestamp),
                           "source_branch_id": s.source_branch_id, "created_at": views.ts(s.created_at),
                           "expires_at": views.ts(s.expires_at), "manual": s.manual, "full_size": s.full_size}
    return {k: v for k, v in out.items() if v is not None}


@router.post("/projects/{project_id}/branches/{branch_id}/snapshot")
async def create_snapshot(control: Authorized, project_id: str, branch_id: str, lsn: str | None = None,
                          timestamp: str | None = None, name: str | None = None,
                          expires_at: str | None = None) -> dict[str, Any]:
    snap, ops = await snapshots.create_snapshot(control, project_id, branch_id, name=name, lsn=lsn,
                                                timestamp=timestamp,
                                                expires_at=snapshots.parse_time(expires_at, "expires_at"))
    return {"snapshot": snapshot_view(snap), "operations": [views.operation_view(o) for o in ops]}


@router.get("/projects/{project_id}/snapshots")
async def list_snapshots(control: Authorized, project_id: str) -> dict[str, Any]:
    return {"snapshots": [snapshot_view(s) for s in await snapshots.list_snapshots(control, project_id)]}


@router.get("/projects/{project_id}/snapshots/{snapshot_id}", summary="One snapshot (Argon: Neon lists only)")
async def get_snapshot(control: Authorized, project_id: str, snapshot_id: str) -> dict[str, Any]:
    return {"snapshot": snapshot_view(await snapshots.get(control, project_id, snapshot_id))}


class SnapshotFields(Strict):
    name: str | None = None
    expires_at: str | None = None


class SnapshotUpdateBody(Strict):
    snapshot: SnapshotFields


@router.patch("/projects/{project_id}/snapshots/{snapshot_id}")
async def update_snapshot(control: Authorized, project_id: str, snapshot_id: str,
                          body: SnapshotUpdateBody) -> dict[str, Any]:
    fields = body.snapshot
    expiry: dict[str, Any] = {}
    if "expires_at" in fields.model_fields_set:  # null clears it, absent keeps it
        expiry["expires_at"] = snapshots.parse_time(fields.expires_at, "expires_at")
    snap = await snapshots.update_snapshot(control, project_id, snapshot_id, name=fields.name, **expiry)
    return {"snapshot": snapshot_view(snap)}


@router.delete("/projects/{project_id}/snapshots/{snapshot_id}", status_code=202)
async def delete_snapshot(control: Authorized, project_id: str, snapshot_id: str) -> dict[str, Any]:
    ops = await snapshots.delete_snapshot(control, project_id, snapshot_id)
    return {"operations": [views.operation_view(o) for o in ops]}


class RestoreSnapshotBody(Strict):
    name: str | None = None
    target_branch_id: str | None = None
    finalize_restore: bool = False


@router.post("/projects/{project_id}/snapshots/{snapshot_id}/restore")
async def restore_snapshot(control: Authorized, project_id: str, snapshot_id: str,
                           body: RestoreSnapshotBody | None = None, name: str | None = None) -> dict[str, Any]:
    body = body or RestoreSnapshotBody()
    branch, ops = await snapshots.restore_snapshot(control, project_id, snapshot_id, name=body.name or name,
                                                   target_branch_id=body.target_branch_id,
                                                   finalize=body.finalize_restore)
    return {"branch": views.branch_view(branch), "endpoints": [
        views.endpoint_view(control.plane.settings, e) for e in control.plane.endpoints(project_id, branch.id)],
        "operations": [views.operation_view(o) for o in ops]}


class FinalizeBody(Strict):
    name: str | None = None


@router.post("/projects/{project_id}/branches/{branch_id}/finalize_restore")
async def finalize_restore(control: Authorized, project_id: str, branch_id: str,
                           body: FinalizeBody | None = None) -> dict[str, Any]:
    ops = await snapshots.finalize_restore(control, project_id, branch_id, name=(body or FinalizeBody()).name)
    return {"operations": [views.operation_view(o) for o in ops]}


class BackupScheduleItem(Strict):
    frequency: str
    hour: int | None = None
    day: int | None = None
    month: int | None = None
    retention_seconds: int | None = None


class BackupScheduleBody(Strict):
    schedule: list[BackupScheduleItem]


@router.get("/projects/{project_id}/branches/{branch_id}/backup_schedule",
            summary="The branch's backup schedule: how often snapshots are taken, and kept (Neon's getSnapshotSchedule)")
async def get_backup_schedule(control: Authorized, project_id: str, branch_id: str) -> dict[str, Any]:
    return schedules.get(control, project_id, branch_id)


@router.put("/projects/{project_id}/branches/{branch_id}/backup_schedule",
            summary="Replace the branch's backup schedule (Neon's setSnapshotSchedule; an empty list: none)")
async def set_backup_schedule(control: Authorized, project_id: str, branch_id: str,
                              body: BackupScheduleBody) -> dict[str, Any]:
    await schedules.put(control, project_id, branch_id, body.model_dump(exclude_none=True))
    return {}

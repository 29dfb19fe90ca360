"""The backup state (Argon extension): where backups go, how far behind shipping is, errors."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from argon.api.deps import Authorized, JsonRoute
from argon.errors import Precondition

router = APIRouter(tags=["Backup"], route_class=JsonRoute)


@router.get("/backup", summary="Continuous backup to object storage: last WAL shipped, lag, last base backup, "
            "errors; the branches a lazy restore is still bringing back (Argon extension)")
async def backup_status(control: Authorized) -> dict[str, Any]:
    restoring = control.restorer.view() if control.restorer is not None else None
    if control.backup is None:
        return {"backup": {"enabled": False, "hint": "set ARGON_BACKUP_URL (s3://bucket/prefix or file:///path)",
                           "restoring": restoring}}
    return {"backup": control.backup.status.view() | {"restoring": restoring}}


@router.get("/backup/usage", summary="Bytes in the backup bucket per project, shared chunks and metadata "
            "(Argon extension; lists the bucket)")
async def backup_usage(control: Authorized) -> dict[str, Any]:
    if control.backup is None:
        raise Precondition("backup is off: set ARGON_BACKUP_URL (s3://bucket/prefix or file:///path)")
    return {"usage": await control.backup.usage()}

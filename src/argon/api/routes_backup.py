"""The backup state (Argon extension): where backups go, how far behind shipping is, errors."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from argon.api.deps import Plane
from argon.errors import Precondition

router = APIRouter(tags=["Backup"])


@router.get("/backup", summary="Continuous backup to object storage: last WAL shipped, lag, last base backup, "
            "errors (Argon extension)")
async def backup_status(plane: Plane) -> dict[str, Any]:
    if plane.backup is None:
        return {"backup": {"enabled": False, "hint": "set ARGON_BACKUP_URL (s3://bucket/prefix or file:///path)"}}
    return {"backup": plane.backup.status.view()}


@router.get("/backup/usage", summary="Bytes in the backup bucket per project, shared chunks and metadata "
            "(Argon extension; lists the bucket)")
async def backup_usage(plane: Plane) -> dict[str, Any]:
    if plane.backup is None:
        raise Precondition("backup is off: set ARGON_BACKUP_URL (s3://bucket/prefix or file:///path)")
    return {"usage": await plane.backup.usage()}

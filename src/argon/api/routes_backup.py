"""The backup state (Argon extension): where backups go, how far behind shipping is, errors."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from argon.api.deps import Plane

router = APIRouter(tags=["Backup"])


@router.get("/backup", summary="Continuous backup to object storage: last WAL shipped, lag, last base backup, "
            "errors (Argon extension)")
async def backup_status(plane: Plane) -> dict[str, Any]:
    if plane.backup is None:
        return {"backup": {"enabled": False, "hint": "set ARGON_BACKUP_URL (s3://bucket/prefix or file:///path)"}}
    return {"backup": plane.backup.status.view()}

"""GET /projects/{p}/branches/{b}/schema: the DDL of a database on a branch (neonctl's schema-diff)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from argon.api.deps import Authorized
from argon.control import schema
from argon.errors import UserError

router = APIRouter(tags=["Branch"])


@router.get("/projects/{project_id}/branches/{branch_id}/schema")
async def get_branch_schema(control: Authorized, project_id: str, branch_id: str, db_name: str | None = None,
                            lsn: str | None = None, timestamp: str | None = None,
                            format: str = "sql") -> dict[str, Any]:
    """The database's schema as SQL (`pg_dump --schema-only`), at the branch's head or at an LSN or
    timestamp inside the project's history retention window."""
    if not db_name:
        raise UserError("db_name is required: the database whose schema to show")
    if format != "sql":
        raise UserError("only format=sql is supported")
    if lsn and timestamp:
        raise UserError("give lsn or timestamp, not both")
    return {"sql": await schema.branch_schema(control, project_id, branch_id, db_name, lsn=lsn, timestamp=timestamp)}

"""A database's DDL on a branch (`/schema`, neonctl's schema-diff) and two branches' DDL compared
(`/compare_schema`, Neon's API and GitHub Action: a unified diff, base first)."""

from __future__ import annotations

import difflib
from typing import Any

from fastapi import APIRouter

from argon.api.deps import Authorized, JsonRoute
from argon.control import schema
from argon.errors import UserError

router = APIRouter(tags=["Branch"], route_class=JsonRoute)


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


@router.get("/projects/{project_id}/branches/{branch_id}/compare_schema")
async def compare_schema(control: Authorized, project_id: str, branch_id: str, db_name: str | None = None,
                         base_branch_id: str | None = None, lsn: str | None = None, timestamp: str | None = None,
                         base_lsn: str | None = None, base_timestamp: str | None = None) -> dict[str, Any]:
    """`diff`: the base's schema (default: the branch's parent) against the branch's, as a unified diff
    (empty when they are the same). Each side at its head or at a point in the history window."""
    if not db_name:
        raise UserError("db_name is required: the database whose schemas to compare")
    if (lsn and timestamp) or (base_lsn and base_timestamp):
        raise UserError("give lsn or timestamp (base_lsn or base_timestamp), not both")
    branch = control.plane.branch(project_id, branch_id)
    base_id = base_branch_id or branch.parent_id
    if base_id is None:
        raise UserError(f"branch {branch_id!r} has no parent: give base_branch_id")
    base_name = control.plane.branch(project_id, base_id).name
    old = await schema.branch_schema(control, project_id, base_id, db_name, lsn=base_lsn, timestamp=base_timestamp)
    new = await schema.branch_schema(control, project_id, branch_id, db_name, lsn=lsn, timestamp=timestamp)
    diff = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                fromfile=f"{base_name}/{db_name}", tofile=f"{branch.name}/{db_name}")
    return {"diff": "".join(diff)}

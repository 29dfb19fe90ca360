"""`argon branches ...` (`schema-diff` is `argon.cli.schema_diff`): thin over the HTTP API."""

from __future__ import annotations

import re
from typing import Any

import click

from argon.cli.client import CliError
from argon.cli.context import (
    Context,
    default_project,
    pass_ctx,
    project_option,
    resolve_branch,
)
from argon.cli.output import emit

BRANCH_COLUMNS = [("id", "Id"), ("name", "Name"), ("default", "Default"), ("parent_id", "Parent"),
                   ("protected", "Protected"), ("created_at", "Created")]


@click.group()
def branches() -> None:
    """Create, list and delete branches: instant copies of a branch's data, with their own compute."""


@branches.command("list")
@project_option
@pass_ctx
def branches_list(ctx: Context, project_id: str | None) -> None:
    """List the project's branches."""
    items = ctx.api.get(f"/projects/{default_project(ctx, project_id)}/branches")["branches"]
    emit({"branches": items}, ctx.output, columns=BRANCH_COLUMNS, rows=items)


_LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\d[T ]")


def _point(text: str) -> dict[str, str]:
    """`0/1A2B3C` -> parent_lsn, an RFC 3339 time -> parent_timestamp, else {}."""
    if _LSN_RE.match(text):
        return {"lsn": text}
    if _TIME_RE.match(text):
        return {"timestamp": text}
    return {}


def branch_at(ctx: Context, pid: str, text: str, *, self_id: str | None = None) -> tuple[str | None, dict[str, str]]:
    """Resolve `branch`, `branch@<lsn|timestamp>`, a bare LSN or timestamp (of the default branch),
    `^self` and `^parent` (relative to `self_id`) into (branch id, point)."""
    name, _, at = text.partition("@")
    point = _point(at) if at else _point(name)
    if at and not point:
        raise CliError(f"{at!r} is neither an LSN (0/1A2B3C) nor a timestamp (2026-11-24T13:00:00Z)")
    if not at and point:
        return None, point
    if name in ("^self", "^parent"):
        if self_id is None:
            raise CliError(f"{name} only makes sense when restoring a branch")
        me = resolve_branch(ctx, pid, self_id)
        if name == "^self":
            return me["id"], point
        if not me.get("parent_id"):
            raise CliError(f"branch {me['name']} has no parent")
        return me["parent_id"], point
    return resolve_branch(ctx, pid, name)["id"], point


def compute_units(text: str | None) -> dict[str, float]:
    """neonctl's `--cu`: `2` (fixed) or `0.5-3` (autoscaling limits)."""
    if not text:
        return {}
    low, _, high = text.partition("-")
    try:
        lo, hi = float(low), float(high or low)
    except ValueError:
        raise CliError(f"--cu {text!r}: give compute units as 2 or as a range 0.5-3") from None
    return {"autoscaling_limit_min_cu": lo, "autoscaling_limit_max_cu": hi}


cu_option = click.option("--cu", help="Compute size in compute units: 2, or autoscaling limits 0.5-3")


@branches.command("create")
@project_option
@click.option("--name", help="Branch name (default: its id)")
@click.option("--parent", metavar="BRANCH[@POINT]",
              help="Parent branch name or id (default: the default branch), optionally at a point in time: "
                   "dev@0/1A2B3C, main@2026-11-24T13:00:00Z, or just a point (on the default branch)")
@click.option("--no-compute", is_flag=True, help="Create the branch without an endpoint")
@click.option("--protected", is_flag=True, help="Protect the branch from deletion")
@click.option("--schema-only", is_flag=True, help="Copy the parent's roles and schema, not its rows")
@click.option("--type", "endpoint_type", type=click.Choice(["read_write", "read_only"]), default="read_write",
              show_default=True, help="The compute's type (read_only: a read replica of the branch)")
@cu_option
@click.option("--suspend-timeout", type=int, help="Seconds idle before the compute suspends (-1: never)")
@click.option("--expires-at", help="Delete the branch at this time (RFC 3339, e.g. 2026-12-31T23:59:59Z)")
@pass_ctx
def branches_create(ctx: Context, project_id: str | None, name: str | None, parent: str | None,
                    no_compute: bool, protected: bool, schema_only: bool, endpoint_type: str, cu: str | None,
                    suspend_timeout: int | None, expires_at: str | None) -> None:
    """Branch the parent's data (copy-on-write where the filesystem can) and give it a compute.

    \b
    From the default branch's head:   argon branches create --name dev
    From another branch:              argon branches create --name fix --parent dev
    From a point in time:             argon branches create --name before --parent main@2026-11-24T13:00:00Z
    From an LSN:                      argon branches create --parent main@0/1A2B3C
    Schema only, no rows:             argon branches create --name empty --schema-only
    """
    pid = default_project(ctx, project_id)
    spec: dict[str, Any] = {"protected": protected,
                            "init_source": "schema-only" if schema_only else "parent-data"}
    if name:
        spec["name"] = name
    if parent:
        parent_id, point = branch_at(ctx, pid, parent)
        if parent_id:
            spec["parent_id"] = parent_id
        spec.update({f"parent_{k}": v for k, v in point.items()})
    if expires_at:
        spec["expires_at"] = expires_at
    endpoint: dict[str, Any] = {"type": endpoint_type, **compute_units(cu)}
    if suspend_timeout is not None:
        endpoint["suspend_timeout_seconds"] = suspend_timeout
    out = ctx.api.post(f"/projects/{pid}/branches", {"branch": spec, "endpoints": [] if no_compute else [endpoint]})
    if ctx.output != "table":
        emit(out, ctx.output)
        return
    b = out["branch"]
    click.echo(f"Created branch {click.style(b['name'], bold=True)} ({b['id']}) from {b['parent_id']}.")
    for uri in out.get("connection_uris", []):
        click.echo("  " + uri["connection_uri"])


@branches.command("delete")
@click.argument("branch")
@project_option
@pass_ctx
def branches_delete(ctx: Context, branch: str, project_id: str | None) -> None:
    """Delete a branch, its computes and its data."""
    pid = default_project(ctx, project_id)
    b = ctx.api.delete(f"/projects/{pid}/branches/{resolve_branch(ctx, pid, branch)['id']}")["branch"]
    if ctx.output != "table":
        emit({"branch": b}, ctx.output)
    else:
        click.echo(f"Deleted branch {b['name']} ({b['id']}).")


@branches.command("reset")
@click.argument("branch")
@project_option
@click.option("--parent", "from_parent", is_flag=True, required=True,
              help="Reset to the parent branch's current data (required: the only source for now)")
@click.option("--preserve-under-name", help="Keep the branch's current data as a new branch with this name")
@pass_ctx
def branches_reset(ctx: Context, branch: str, project_id: str | None, from_parent: bool,
                   preserve_under_name: str | None) -> None:
    """Replace a branch's data with its parent's current data. Its id, endpoint and connection string
    stay; connected clients are disconnected and reconnect to the new state."""
    pid = default_project(ctx, project_id)
    target = resolve_branch(ctx, pid, branch)
    if not target.get("parent_id"):
        raise CliError(f"branch {target['name']} has no parent to reset from")
    body: dict[str, Any] = {"source_branch_id": target["parent_id"]}
    if preserve_under_name:
        body["preserve_under_name"] = preserve_under_name
    b = ctx.api.post(f"/projects/{pid}/branches/{target['id']}/restore", body)["branch"]
    if ctx.output != "table":
        emit({"branch": b}, ctx.output)
        return
    click.echo(f"Reset branch {b['name']} ({b['id']}) to its parent's data.")
    if preserve_under_name:
        click.echo(f"Its previous data is kept as branch {preserve_under_name} ({b['parent_id']}).")


@branches.command("restore")
@click.argument("branch")
@click.argument("source", metavar="SOURCE[@POINT]")
@project_option
@click.option("--preserve-under-name", help="Keep the branch's current data as a new branch with this name")
@pass_ctx
def branches_restore(ctx: Context, branch: str, source: str, project_id: str | None,
                     preserve_under_name: str | None) -> None:
    """Replace a branch's data with another branch's, or its own, at a point in time or head.
    Its id, endpoint and connection string stay; connected clients reconnect to the restored state.

    \b
    Undo the last hour:          argon branches restore main ^self@2026-11-24T12:00:00Z
    Back to an LSN, keep now:    argon branches restore main ^self@0/1A2B3C --preserve-under-name main-old
    Copy of the parent's head:   argon branches restore dev ^parent
    """
    pid = default_project(ctx, project_id)
    target = resolve_branch(ctx, pid, branch)
    source_id, point = branch_at(ctx, pid, source, self_id=target["id"])
    body: dict[str, Any] = {"source_branch_id": source_id or target["id"]}
    body.update({f"source_{k}": v for k, v in point.items()})
    if preserve_under_name:
        body["preserve_under_name"] = preserve_under_name
    b = ctx.api.post(f"/projects/{pid}/branches/{target['id']}/restore", body)["branch"]
    if ctx.output != "table":
        emit({"branch": b}, ctx.output)
        return
    where = f" at {next(iter(point.values()))}" if point else ""
    click.echo(f"Restored branch {b['name']} ({b['id']}) from {source_id or target['id']}{where}.")
    if preserve_under_name:
        click.echo(f"Its previous data is kept as branch {preserve_under_name}.")


@branches.command("set-default")
@click.argument("branch")
@project_option
@pass_ctx
def branches_set_default(ctx: Context, branch: str, project_id: str | None) -> None:
    """Make a branch the project's default (what connection-string and psql use)."""
    pid = default_project(ctx, project_id)
    b = ctx.api.post(f"/projects/{pid}/branches/{resolve_branch(ctx, pid, branch)['id']}/set_as_default",
                     {})["branch"]
    emit({"branch": b}, ctx.output, columns=BRANCH_COLUMNS, rows=[b])


@branches.command("get")
@click.argument("branch")
@project_option
@pass_ctx
def branches_get(ctx: Context, branch: str, project_id: str | None) -> None:
    """Show a branch (by name or id)."""
    pid = default_project(ctx, project_id)
    b = ctx.api.get(f"/projects/{pid}/branches/{resolve_branch(ctx, pid, branch)['id']}")["branch"]
    emit({"branch": b} if ctx.output != "table" else b, ctx.output, columns=BRANCH_COLUMNS, rows=[b])


@branches.command("rename")
@click.argument("branch")
@click.argument("new_name")
@project_option
@pass_ctx
def branches_rename(ctx: Context, branch: str, new_name: str, project_id: str | None) -> None:
    """Rename a branch (its id and connection strings stay)."""
    pid = default_project(ctx, project_id)
    b = ctx.api.patch(f"/projects/{pid}/branches/{resolve_branch(ctx, pid, branch)['id']}",
                      {"branch": {"name": new_name}})["branch"]
    emit({"branch": b}, ctx.output, columns=BRANCH_COLUMNS, rows=[b])


@branches.command("set-expiration")
@click.argument("branch")
@click.option("--expires-at", help="When to delete the branch (RFC 3339); without it the expiration is removed")
@project_option
@pass_ctx
def branches_set_expiration(ctx: Context, branch: str, expires_at: str | None, project_id: str | None) -> None:
    """Set or remove the time a branch is deleted at."""
    pid = default_project(ctx, project_id)
    b = ctx.api.patch(f"/projects/{pid}/branches/{resolve_branch(ctx, pid, branch)['id']}",
                      {"branch": {"expires_at": expires_at}})["branch"]
    emit({"branch": b}, ctx.output, columns=[*BRANCH_COLUMNS, ("expires_at", "Expires")], rows=[b])


@branches.command("add-compute")
@click.argument("branch")
@click.option("--type", "endpoint_type", type=click.Choice(["read_write", "read_only"]), default="read_only",
              show_default=True, help="The compute's type")
@cu_option
@project_option
@pass_ctx
def branches_add_compute(ctx: Context, branch: str, endpoint_type: str, cu: str | None,
                         project_id: str | None) -> None:
    """Add a compute to a branch (by default a read replica), as neonctl does."""
    pid = default_project(ctx, project_id)
    b = resolve_branch(ctx, pid, branch)
    out = ctx.api.post(f"/projects/{pid}/endpoints",
                       {"endpoint": {"branch_id": b["id"], "type": endpoint_type, **compute_units(cu)}})
    ep = out["endpoint"]
    emit(out if ctx.output != "table" else ep, ctx.output, columns=[("id", "Id"), ("type", "Type"), ("host", "Host")],
         rows=[ep])

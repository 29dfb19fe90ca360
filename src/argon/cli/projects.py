"""`argon projects ...` and `argon operations`: thin over the HTTP API."""

from __future__ import annotations

from typing import Any

import click

from argon.cli.branches import compute_units, cu_option
from argon.cli.client import CliError
from argon.cli.context import (
    Context,
    all_projects,
    default_project,
    pass_ctx,
    project_option,
)
from argon.cli.output import emit

PROJECT_COLUMNS = [("id", "Id"), ("name", "Name"), ("region_id", "Region"), ("pg_version", "PG"),
                   ("created_at", "Created")]


@click.group()
def projects() -> None:
    """Create, list, inspect and delete projects."""


@projects.command("list")
@pass_ctx
def projects_list(ctx: Context) -> None:
    """List projects."""
    items = all_projects(ctx)
    emit({"projects": items}, ctx.output, columns=PROJECT_COLUMNS, rows=items)


@projects.command("create")
@click.option("--name", help="Project name (default: its id)")
@click.option("--pg-version", type=int, help="PostgreSQL major version (default: the newest installed)")
@click.option("--region-id", help="Region (this server has one: local)")
@click.option("--database", "database_name", help="Name of the first database (default neondb)")
@click.option("--role", "role_name", help="Name of the owner role (default <database>_owner)")
@click.option("--suspend-timeout", type=int, help="Seconds idle before suspending (0 = default 300, -1 = never)")
@cu_option
@pass_ctx
def projects_create(ctx: Context, name: str | None, pg_version: int | None, region_id: str | None,
                    database_name: str | None, role_name: str | None, suspend_timeout: int | None,
                    cu: str | None) -> None:
    """Create a project: branch main, database neondb, role neondb_owner, a read-write endpoint."""
    project: dict[str, Any] = {"branch": {}}
    for key, value in (("name", name), ("pg_version", pg_version), ("region_id", region_id)):
        if value is not None:
            project[key] = value
    if database_name:
        project["branch"]["database_name"] = database_name
    if role_name:
        project["branch"]["role_name"] = role_name
    settings: dict[str, Any] = compute_units(cu)
    if suspend_timeout is not None:
        settings["suspend_timeout_seconds"] = suspend_timeout
    if settings:
        project["default_endpoint_settings"] = settings
    out = ctx.api.post("/projects", {"project": project})
    if ctx.output != "table":
        emit(out, ctx.output)
        return
    p = out["project"]
    click.echo(f"Created project {click.style(p['id'], bold=True)} ({p['name']}, PostgreSQL {p['pg_version']}).")
    click.echo(f"Endpoint: {out['endpoints'][0]['id']}")
    click.echo("Connection string (it holds the password; `argon connection-string` prints it again):")
    click.echo("  " + out["connection_uris"][0]["connection_uri"])


@projects.command("get")
@click.argument("project_id")
@pass_ctx
def projects_get(ctx: Context, project_id: str) -> None:
    """Show one project."""
    p = ctx.api.get(f"/projects/{project_id}")["project"]
    emit({"project": p}, ctx.output, columns=PROJECT_COLUMNS, rows=[p])


@projects.command("update")
@click.argument("project_id")
@click.option("--name", help="New name")
@click.option("--history-retention", "retention", type=int,
              help="Seconds of history kept for point-in-time branches and restores (0 = none, max 2592000)")
@click.option("--suspend-timeout", type=int, help="Default for new computes: seconds idle before suspending")
@pass_ctx
def projects_update(ctx: Context, project_id: str, name: str | None, retention: int | None,
                    suspend_timeout: int | None) -> None:
    """Rename a project or change its defaults."""
    body: dict[str, Any] = {}
    if name:
        body["name"] = name
    if retention is not None:
        body["history_retention_seconds"] = retention
    if suspend_timeout is not None:
        body["default_endpoint_settings"] = {"suspend_timeout_seconds": suspend_timeout}
    if not body:
        raise CliError("nothing to change: give --name, --history-retention or --suspend-timeout")
    p = ctx.api.patch(f"/projects/{project_id}", {"project": body})["project"]
    emit({"project": p}, ctx.output, columns=PROJECT_COLUMNS, rows=[p])


@projects.command("delete")
@click.argument("project_id")
@pass_ctx
def projects_delete(ctx: Context, project_id: str) -> None:
    """Delete a project, its computes and all its data."""
    p = ctx.api.delete(f"/projects/{project_id}")["project"]
    if ctx.output != "table":
        emit({"project": p}, ctx.output)
    else:
        click.echo(f"Deleted project {p['id']} ({p['name']}).")


OPERATION_COLUMNS = [("id", "Id"), ("action", "Action"), ("status", "Status"), ("branch_id", "Branch"),
                     ("endpoint_id", "Endpoint"), ("total_duration_ms", "ms"), ("created_at", "Created")]


@click.command("operations")
@project_option
@click.option("--limit", type=int, default=20, show_default=True, help="How many, newest first")
@pass_ctx
def operations(ctx: Context, project_id: str | None, limit: int) -> None:
    """What the platform did in a project (creates, starts, suspends, syncs), newest first."""
    pid = default_project(ctx, project_id)
    items = ctx.api.get(f"/projects/{pid}/operations", params={"limit": limit})["operations"]
    emit({"operations": items}, ctx.output, columns=OPERATION_COLUMNS, rows=items)

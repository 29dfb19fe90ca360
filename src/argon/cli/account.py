"""`argon status` and `argon api-keys ...`: the server itself."""

from __future__ import annotations

from typing import Any

import click

from argon.cli.client import CliError
from argon.cli.context import (
    Context,
    pass_ctx,
)
from argon.cli.output import emit


@click.command("status")
@pass_ctx
def status(ctx: Context) -> None:
    """Is the server up? What runs?"""
    info = ctx.api.get("/versions")
    versions = info["versions"]
    projects = ctx.api.get("/projects", params={"limit": 400})["projects"]
    active = 0
    for p in projects:
        active += sum(1 for e in ctx.api.get(f"/projects/{p['id']}/endpoints")["endpoints"]
                      if e["current_state"] == "active")
    try:
        backup: dict[str, Any] | None = ctx.api.get("/backup")["backup"]
    except CliError:  # a project-scoped key does not see the server's backup state
        backup = None
    data = {"api_url": ctx.api.api_url, "versions": versions, "projects": len(projects), "active_computes": active,
            "clone_backend": info.get("clone_backend"), "compute_limits": info.get("compute_limits"),
            "disk_limits": info.get("disk_limits"), "backup": backup}
    if ctx.output != "table":
        emit(data, ctx.output)
        return
    click.echo(f"Argon at {ctx.api.api_url}: {len(projects)} project(s), {active} active compute(s); PostgreSQL "
               + ", ".join(v["version"] for v in versions) + f"; clone backend {info.get('clone_backend')}")
    if info.get("compute_limits"):
        click.echo(f"Compute limits: {info['compute_limits']}")
    if info.get("disk_limits"):
        click.echo(f"Disk limits: {info['disk_limits']}")
    if backup is None:
        pass
    elif not backup.get("enabled"):
        click.echo("Backup: off (set ARGON_BACKUP_URL)")
    else:
        line = (f"Backup: {backup['state']} to {backup['url']}; last WAL shipped {backup['last_wal_shipped_at'] or '-'}, "
                f"lag {backup['lag_bytes']} bytes / {backup['lag_seconds']} s; last base backup "
                f"{backup['last_base_backup_at'] or '-'}")
        click.secho(line, fg="red" if backup["error"] else None)
        if backup["error"]:
            click.secho(f"  {backup['error']}", fg="red")
    restoring = (backup or {}).get("restoring") or {}
    if restoring.get("pending"):
        failed = [b for b in restoring["branches"] if b.get("error")]
        click.secho(f"Restoring from backup: {restoring['pending']} branch(es) still in the bucket (each comes back on "
                    f"its first connection, all in the background); {restoring['restored']} done"
                    + (f"; failing: {failed[0]['error']}" if failed else ""), fg="red" if failed else "yellow")


API_KEY_COLUMNS = [("id", "Id"), ("name", "Name"), ("project_id", "Project"), ("created_at", "Created"),
                   ("last_used_at", "Last used")]


@click.group("api-keys")
def api_keys() -> None:
    """API keys of this server: list, create (the key is shown once), revoke.

    \b
    Examples:
      argon api-keys create --name ci     # prints argon_..., use it as ARGON_API_KEY or NEON_API_KEY
      argon api-keys create --name gha --project-id <id>   # a key that reaches only that project
      argon api-keys list
      argon api-keys revoke 3             # by id; requests with that key fail at once
    """


@api_keys.command("list")
@pass_ctx
def api_keys_list(ctx: Context) -> None:
    """List the keys that work (revoked ones are gone); Argon keeps only a hash of each."""
    items = ctx.api.get("/api_keys")
    emit(items, ctx.output, columns=API_KEY_COLUMNS, rows=items)


@api_keys.command("create")
@click.option("--name", required=True, help="What or who uses it, e.g. ci or laptop")
@click.option("--project-id", help="Limit the key to this project (its branches, computes, roles, databases)")
@pass_ctx
def api_keys_create(ctx: Context, name: str, project_id: str | None) -> None:
    """Create a key and print it once: it cannot be shown again."""
    out = ctx.api.post("/api_keys", {"key_name": name, **({"project_id": project_id} if project_id else {})})
    if ctx.output != "table":
        emit(out, ctx.output)
        return
    click.echo(f"Created API key {out['name']} (id {out['id']}). Save it now, it is not shown again:")
    click.echo("  " + str(out["key"]))


@api_keys.command("revoke")
@click.argument("key_id", type=int)
@pass_ctx
def api_keys_revoke(ctx: Context, key_id: int) -> None:
    """Revoke a key by id (see `argon api-keys list`); it stops working at once."""
    out = ctx.api.delete(f"/api_keys/{key_id}")
    if ctx.output != "table":
        emit(out, ctx.output)
    else:
        click.echo(f"Revoked API key {out['name']} (id {out['id']}).")

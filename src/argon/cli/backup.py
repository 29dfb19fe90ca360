"""`argon backup status` (the running server's backup state and the bucket's size per project)
and `argon backup verify` (restore a sample of the bucket into a scratch directory and read it)."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import click

from argon.cli.context import Context, pass_ctx
from argon.cli.output import emit, table


def _mb(value: int | None) -> str:
    return f"{(value or 0) / 1e6:.1f} MB"


@click.group()
def backup() -> None:
    """Continuous backup to object storage (ARGON_BACKUP_URL): its state, and checking it restores."""


@backup.command("status")
@pass_ctx
def backup_status(ctx: Context) -> None:
    """Where backups go, how far behind shipping is, the last base backup, errors; bucket size per project."""
    state = ctx.api.get("/backup")["backup"]
    if not state.get("enabled"):
        if ctx.output == "json":
            emit({"backup": state}, "json")
            return
        click.echo(f"Backup is off: {state.get('hint', '')}")
        return
    usage = ctx.api.get("/backup/usage")["usage"]
    if ctx.output == "json":
        emit({"backup": state, "usage": usage}, "json")
        return
    click.echo(f"Backup to {state['url']} ({'encrypted' if state['encrypted'] else 'NOT encrypted'}): {state['state']}")
    if state["error"]:
        click.secho(f"  error since {state['error_since']}: {state['error']}", fg="red")
    click.echo(f"  last WAL shipped {state['last_wal_shipped_at'] or '-'}; lag {state['lag_bytes']} bytes, "
               f"{state['lag_seconds']} s; last base backup {state['last_base_backup_at'] or '-'}; "
               f"metadata {state['last_metadata_backup_at'] or '-'}")
    restoring = state.get("restoring") or {}
    for b in restoring.get("branches", []):
        done = f", {_mb(b['bytes_done'])} downloaded (base {_mb(b['base_bytes'])})" if b.get("base_bytes") else ""
        click.secho(f"  restoring {b['project_id']}/{b['branch_id']} from the backup: {b['stage']}{done}"
                    + (f" ({b['error']})" if b.get("error") else ""), fg="red" if b.get("error") else "yellow")
    refused = [b["branch_id"] for b in state["branches"] if b.get("writes_refused")]
    if refused:
        click.secho(f"  writes refused (too much WAL unshipped): {', '.join(refused)}", fg="red")
    click.echo(f"  bucket: {_mb(usage['total_bytes'])} in {usage['objects']} objects; base chunks shared by all "
               f"branches {_mb(usage['shared_chunks_bytes'])}; metadata {_mb(usage['metadata_bytes'])}")
    rows: list[dict[str, Any]] = [{"project_id": p["project_id"], "size": _mb(p["bytes"])} for p in usage["projects"]]
    table(rows, [("project_id", "Project"), ("size", "WAL + manifests")])


@backup.command("verify")
@click.option("--from", "source", metavar="URL", help="The backup to check (default: ARGON_BACKUP_URL)")
@click.option("--sample", type=int, default=1, show_default=True, help="How many random branches to restore (0: all)")
def backup_verify(source: str | None, sample: int) -> None:
    """Restore the metadata and a sample of branches into a scratch directory, start each restored
    branch and read every database; then remove the scratch directory. Exit status 1 on any problem.

    Reads the same settings as `argon up` (ARGON_BACKUP_KEY, ARGON_BACKUP_S3_ENDPOINT, ...)."""
    from argon.control.restore import verify
    from argon.errors import ConfigError
    from argon.settings import load

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    settings = load()
    url = source or settings.backup_url
    if not url:
        raise ConfigError("give the backup to check: argon backup verify --from s3://bucket/prefix (or set "
                          "ARGON_BACKUP_URL)")
    report = asyncio.run(verify(settings, url, sample=sample, say=lambda m: click.secho(m, err=True)))
    checked = [b for b in report.branches if not b.skipped]
    missing = [b for b in report.branches if b.skipped and b.skipped != "not in the sample"]
    for b in missing:
        click.secho(f"  not restorable: {b.project_id}/{b.name} ({b.skipped})", fg="yellow")
    click.echo(f"Backup at {url} is good: metadata of {report.metadata_at.isoformat() if report.metadata_at else '?'}, "
               f"{report.projects} project(s); {len(checked)} branch(es) restored, recovered and read in "
               f"{report.seconds:.1f} s")

"""`argon endpoints ...`, `argon logs` and `argon events`: thin over the HTTP API."""

from __future__ import annotations

from typing import Any

import click

from argon.cli.client import CliError
from argon.cli.context import (
    Context,
    branch_path,
    default_project,
    endpoint_project,
    endpoint_project_option,
    pass_ctx,
    project_option,
)
from argon.cli.output import emit

ENDPOINT_COLUMNS = [("id", "Id"), ("branch_id", "Branch"), ("type", "Type"), ("current_state", "State"),
                    ("autoscaling_limit_max_cu", "CU"), ("suspend_timeout_seconds", "Suspend after (s)"),
                    ("last_active", "Last active")]


@click.group()
def endpoints() -> None:
    """List endpoints (computes), change their settings, start and suspend them."""


@endpoints.command("list")
@project_option
@pass_ctx
def endpoints_list(ctx: Context, project_id: str | None) -> None:
    """List a project's endpoints."""
    pid = default_project(ctx, project_id)
    eps = ctx.api.get(f"/projects/{pid}/endpoints")["endpoints"]
    emit({"endpoints": eps}, ctx.output, columns=ENDPOINT_COLUMNS, rows=eps)


def _endpoint_action(ctx: Context, project_id: str | None, endpoint_id: str, action: str) -> None:
    pid = endpoint_project(ctx, project_id, endpoint_id)
    out = ctx.api.post(f"/projects/{pid}/endpoints/{endpoint_id}/{action}")
    ep = out["endpoint"]
    emit(out, ctx.output, columns=ENDPOINT_COLUMNS, rows=[ep])


@endpoints.command("create")
@project_option
@click.option("--branch", help="Branch name or id (default: the default branch)")
@click.option("--type", "kind", type=click.Choice(["read_write", "read_only"]), default="read_write",
              show_default=True,
              help="read_write: the branch's primary compute (one per branch); read_only: a read replica that "
                   "follows it")
@click.option("--suspend-timeout", type=int, help="Seconds idle before suspending (0 = default, -1 = never)")
@pass_ctx
def endpoints_create(ctx: Context, project_id: str | None, branch: str | None, kind: str,
                     suspend_timeout: int | None) -> None:
    """Give a branch a compute: its read-write one (when it has none) or a read replica
    (like neonctl's `branches add-compute`).

    \b
    Examples:
      argon endpoints create --branch dev                    # dev gets a read-write compute
      argon endpoints create --branch main --type read_only  # a read replica of main
    """
    path = branch_path(ctx, project_id, branch)
    pid, bid = path.split("/")[2], path.split("/")[4]
    body: dict[str, Any] = {"branch_id": bid, "type": kind}
    if suspend_timeout is not None:
        body["suspend_timeout_seconds"] = suspend_timeout
    out = ctx.api.post(f"/projects/{pid}/endpoints", {"endpoint": body})
    emit(out, ctx.output, columns=ENDPOINT_COLUMNS, rows=[out["endpoint"]])


@endpoints.command("delete")
@click.argument("endpoint_id")
@endpoint_project_option
@pass_ctx
def endpoints_delete(ctx: Context, endpoint_id: str, project_id: str | None) -> None:
    """Delete an endpoint (its compute stops; the branch and its data stay)."""
    pid = endpoint_project(ctx, project_id, endpoint_id)
    out = ctx.api.delete(f"/projects/{pid}/endpoints/{endpoint_id}")
    if ctx.output != "table":
        emit(out, ctx.output)
    else:
        click.echo(f"Deleted endpoint {out['endpoint']['id']}; branch {out['endpoint']['branch_id']} keeps its data.")


@endpoints.command("restart")
@click.argument("endpoint_id")
@endpoint_project_option
@pass_ctx
def endpoints_restart(ctx: Context, endpoint_id: str, project_id: str | None) -> None:
    """Restart a compute (connected clients are disconnected)."""
    _endpoint_action(ctx, project_id, endpoint_id, "restart")


@endpoints.command("start")
@click.argument("endpoint_id")
@endpoint_project_option
@pass_ctx
def endpoints_start(ctx: Context, endpoint_id: str, project_id: str | None) -> None:
    """Start a compute now (connections also start it)."""
    _endpoint_action(ctx, project_id, endpoint_id, "start")


@endpoints.command("suspend")
@click.argument("endpoint_id")
@endpoint_project_option
@pass_ctx
def endpoints_suspend(ctx: Context, endpoint_id: str, project_id: str | None) -> None:
    """Suspend a compute now (its data stays; the next connection wakes it)."""
    _endpoint_action(ctx, project_id, endpoint_id, "suspend")


POOL_COLUMNS = [("database", "Database"), ("user", "Role"), ("pool_mode", "Mode"), ("cl_active", "Clients active"),
                ("cl_waiting", "Waiting"), ("cl_idle", "Idle"), ("sv_active", "Servers active"), ("sv_idle", "Idle"),
                ("pool_size", "Pool size"), ("maxwait", "Max wait (s)"), ("total_xact_count", "Transactions")]


@endpoints.command("pooler")
@click.argument("endpoint_id")
@endpoint_project_option
@pass_ctx
def endpoints_pooler(ctx: Context, endpoint_id: str, project_id: str | None) -> None:
    """The transaction pools of an endpoint's pooled host (<endpoint>-pooler), as PgBouncer's SHOW
    POOLS: per database and role, the client connections active, waiting and idle, the server
    connections active and idle. A pool exists while it has clients (and a minute after)."""
    pid = endpoint_project(ctx, project_id, endpoint_id)
    out = ctx.api.get(f"/projects/{pid}/endpoints/{endpoint_id}/pooler")
    emit(out, ctx.output, columns=POOL_COLUMNS, rows=out["pools"])


@endpoints.command("update")
@click.argument("endpoint_id")
@endpoint_project_option
@click.option("--suspend-timeout", type=int, help="Seconds idle before suspending (0 = default, -1 = never)")
@click.option("--cu", help="Compute size, e.g. 0.25, 1 or a range 0.5-2")
@click.option("--disabled/--enabled", default=None, help="A disabled endpoint refuses connections")
@pass_ctx
def endpoints_update(ctx: Context, endpoint_id: str, project_id: str | None, suspend_timeout: int | None,
                     cu: str | None, disabled: bool | None) -> None:
    """Change an endpoint's settings."""
    pid = endpoint_project(ctx, project_id, endpoint_id)
    body: dict[str, Any] = {}
    if suspend_timeout is not None:
        body["suspend_timeout_seconds"] = suspend_timeout
    if cu:
        lo, _, hi = cu.partition("-")
        try:
            body["autoscaling_limit_min_cu"] = float(lo)
            body["autoscaling_limit_max_cu"] = float(hi or lo)
        except ValueError:
            raise CliError(f"--cu takes a number or a range like 0.5-2, not {cu!r}") from None
    if disabled is not None:
        body["disabled"] = disabled
    if not body:
        raise CliError("nothing to change: give --suspend-timeout, --cu or --disabled/--enabled")
    out = ctx.api.patch(f"/projects/{pid}/endpoints/{endpoint_id}", {"endpoint": body})
    emit(out, ctx.output, columns=ENDPOINT_COLUMNS, rows=[out["endpoint"]])


@click.command("logs")
@click.argument("endpoint_id")
@endpoint_project_option
@click.option("--tail", type=int, default=200, show_default=True, help="How many lines")
@pass_ctx
def logs(ctx: Context, endpoint_id: str, project_id: str | None, tail: int) -> None:
    """Show a compute's PostgreSQL log."""
    pid = endpoint_project(ctx, project_id, endpoint_id)
    click.echo(ctx.api.get(f"/projects/{pid}/endpoints/{endpoint_id}/logs", params={"tail": tail}, text=True), nl=False)


@click.command("events")
@click.argument("endpoint_id")
@endpoint_project_option
@pass_ctx
def events(ctx: Context, endpoint_id: str, project_id: str | None) -> None:
    """Show a compute's wakes and suspends with cold-start durations."""
    pid = endpoint_project(ctx, project_id, endpoint_id)
    evs = ctx.api.get(f"/projects/{pid}/endpoints/{endpoint_id}/events")["events"]
    emit({"events": evs}, ctx.output, columns=[("at", "At"), ("kind", "Event"), ("duration_ms", "ms"),
                                               ("detail", "Detail")], rows=evs)

"""Resource commands: projects, endpoints, connection strings, psql, logs. Thin over the HTTP API."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import click

from argon.cli.client import ApiClient, CliError
from argon.cli.output import emit
from argon.control.connection import django_databases


@dataclass
class Context:
    api_url: str | None
    api_key: str | None
    output: str
    _client: ApiClient | None = None

    @property
    def api(self) -> ApiClient:
        if self._client is None:
            self._client = ApiClient(self.api_url, self.api_key)
        return self._client


pass_ctx = click.make_pass_decorator(Context)

PROJECT_COLUMNS = [("id", "Id"), ("name", "Name"), ("region_id", "Region"), ("pg_version", "PG"),
                   ("created_at", "Created")]
ENDPOINT_COLUMNS = [("id", "Id"), ("branch_id", "Branch"), ("type", "Type"), ("current_state", "State"),
                    ("autoscaling_limit_max_cu", "CU"), ("suspend_timeout_seconds", "Suspend after (s)"),
                    ("last_active", "Last active")]


def _default_project(ctx: Context, project_id: str | None) -> str:
    if project_id:
        return project_id
    projects = ctx.api.get("/projects", params={"limit": 2})["projects"]
    if len(projects) == 1:
        return str(projects[0]["id"])
    raise CliError("which project? pass --project-id (there is " + ("no project yet: create one with "
                   "`argon projects create`)" if not projects else "more than one)"))


def _all_projects(ctx: Context) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if cursor:
            params["cursor"] = cursor
        page = ctx.api.get("/projects", params=params)
        items += page["projects"]
        cursor = page.get("pagination", {}).get("cursor")
        if len(page["projects"]) < 100 or not cursor:
            return items


def _endpoint_project(ctx: Context, project_id: str | None, endpoint_id: str) -> str:
    """The project of an endpoint: --project-id, else the only project, else the one that has it
    (endpoint ids are unique across projects, so the id alone is enough)."""
    if project_id:
        return project_id
    projects = _all_projects(ctx)
    if len(projects) == 1:
        return str(projects[0]["id"])
    for project in projects:
        if any(ep["id"] == endpoint_id for ep in ctx.api.get(f"/projects/{project['id']}/endpoints")["endpoints"]):
            return str(project["id"])
    raise CliError(f"no endpoint {endpoint_id} in any project" if projects else
                   "there is no project yet: create one with `argon projects create`")


project_option = click.option("--project-id", help="Project id (optional when there is exactly one project)")
endpoint_project_option = click.option("--project-id", help="Project id (optional: found from the endpoint id)")


@click.group()
def projects() -> None:
    """Create, list, inspect and delete projects."""


@projects.command("list")
@pass_ctx
def projects_list(ctx: Context) -> None:
    """List projects."""
    items = _all_projects(ctx)
    emit({"projects": items}, ctx.output, columns=PROJECT_COLUMNS, rows=items)


@projects.command("create")
@click.option("--name", help="Project name (default: its id)")
@click.option("--pg-version", type=int, help="PostgreSQL major version (default: the newest installed)")
@click.option("--region-id", help="Region (this server has one: local)")
@click.option("--database", "database_name", help="Name of the first database (default neondb)")
@click.option("--role", "role_name", help="Name of the owner role (default <database>_owner)")
@click.option("--suspend-timeout", type=int, help="Seconds idle before suspending (0 = default 300, -1 = never)")
@pass_ctx
def projects_create(ctx: Context, name: str | None, pg_version: int | None, region_id: str | None,
                    database_name: str | None, role_name: str | None, suspend_timeout: int | None) -> None:
    """Create a project: branch main, database neondb, role neondb_owner, a read-write endpoint."""
    project: dict[str, Any] = {"branch": {}}
    for key, value in (("name", name), ("pg_version", pg_version), ("region_id", region_id)):
        if value is not None:
            project[key] = value
    if database_name:
        project["branch"]["database_name"] = database_name
    if role_name:
        project["branch"]["role_name"] = role_name
    if suspend_timeout is not None:
        project["default_endpoint_settings"] = {"suspend_timeout_seconds": suspend_timeout}
    out = ctx.api.post("/projects", {"project": project})
    if ctx.output == "json":
        emit(out, "json")
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
    if ctx.output == "json":
        emit({"project": p}, "json")
    else:
        click.echo(f"Deleted project {p['id']} ({p['name']}).")


@click.group()
def endpoints() -> None:
    """List endpoints (computes), change their settings, start and suspend them."""


@endpoints.command("list")
@project_option
@pass_ctx
def endpoints_list(ctx: Context, project_id: str | None) -> None:
    """List a project's endpoints."""
    pid = _default_project(ctx, project_id)
    eps = ctx.api.get(f"/projects/{pid}/endpoints")["endpoints"]
    emit({"endpoints": eps}, ctx.output, columns=ENDPOINT_COLUMNS, rows=eps)


def _endpoint_action(ctx: Context, project_id: str | None, endpoint_id: str, action: str) -> None:
    pid = _endpoint_project(ctx, project_id, endpoint_id)
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
    path = _branch_path(ctx, project_id, branch)
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
    pid = _endpoint_project(ctx, project_id, endpoint_id)
    out = ctx.api.delete(f"/projects/{pid}/endpoints/{endpoint_id}")
    if ctx.output == "json":
        emit(out, "json")
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
    pid = _endpoint_project(ctx, project_id, endpoint_id)
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


def _connection(ctx: Context, project_id: str | None, branch: str | None, role: str | None,
                database: str | None, pooled: bool) -> dict[str, Any]:
    pid = _default_project(ctx, project_id)
    branches = ctx.api.get(f"/projects/{pid}/branches")["branches"]
    if branch:
        matches = [b for b in branches if b["id"] == branch or b["name"] == branch]
        if not matches:
            raise CliError(f"branch {branch!r} not found in project {pid}")
        br = matches[0]
    else:
        br = next(b for b in branches if b["default"])
    eps = ctx.api.get(f"/projects/{pid}/branches/{br['id']}/endpoints")["endpoints"]
    if not eps:
        raise CliError(f"branch {br['name']} has no endpoint")
    ep = next((e for e in eps if e["type"] == "read_write"), eps[0])
    if role is None:
        roles = ctx.api.get(f"/projects/{pid}/branches/{br['id']}/roles")["roles"]
        if len(roles) != 1:
            raise CliError("the branch has several roles; choose one with --role: "
                           + ", ".join(r["name"] for r in roles))
        role = roles[0]["name"]
    if database is None:
        dbs = ctx.api.get(f"/projects/{pid}/branches/{br['id']}/databases")["databases"]
        if len(dbs) != 1:
            raise CliError("the branch has several databases; choose one with --database: "
                           + ", ".join(d["name"] for d in dbs))
        database = dbs[0]["name"]
    uri = ctx.api.get(f"/projects/{pid}/connection_uri", params={
        "database_name": database, "role_name": role, "branch_id": br["id"], "endpoint_id": ep["id"],
        "pooled": str(pooled).lower()})["uri"]
    password = ctx.api.get(f"/projects/{pid}/branches/{br['id']}/roles/{quote(role, safe='')}/reveal_password")["password"]
    return {"uri": uri, "project_id": pid, "branch_id": br["id"], "endpoint_id": ep["id"], "role": role,
            "password": password, "database": database}


def _split_uri(uri: str) -> dict[str, str]:
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(uri)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    return {"host": parts.hostname or "", "port": str(parts.port or 5432), "user": unquote(parts.username or ""),
            "password": unquote(parts.password or ""), "dbname": unquote(parts.path.lstrip("/")),
            "sslmode": query.get("sslmode", "require"), "options": query.get("options", "")}


def render_connection(info: dict[str, Any], fmt: str) -> str:
    uri = info["uri"]
    p = _split_uri(uri)
    if fmt == "uri":
        return uri
    if fmt == "env":
        return f"DATABASE_URL={uri}"
    if fmt == "django":
        options = {"sslmode": p["sslmode"]}
        if p["options"]:
            options["options"] = p["options"]
        return django_databases(database=p["dbname"], role=p["user"], password=p["password"], host=p["host"],
                                port=p["port"], options=options)
    return json.dumps(info | {"parameters": p}, indent=2)


@click.command("connection-string")
@project_option
@click.option("--branch", help="Branch name or id (default: the default branch)")
@click.option("--role", help="Role name (default: the branch's only role)")
@click.option("--database", help="Database name (default: the branch's only database)")
@click.option("--pooled", is_flag=True, help="Use the pooler host")
@click.option("--format", "--output", "-o", "fmt", type=click.Choice(["uri", "json", "django", "env"]),
              default=None, help="A URI (default), JSON, a Django DATABASES snippet, or a .env line")
@pass_ctx
def connection_string(ctx: Context, project_id: str | None, branch: str | None, role: str | None,
                      database: str | None, pooled: bool, fmt: str) -> None:
    """Print how to connect to a branch's database.

    \b
    argon connection-string                          the default branch, its only role and database
    argon connection-string --branch dev --pooled    dev, through the pooled host name
    argon connection-string -o django                a DATABASES snippet for settings.py
    argon connection-string -o env >> .env           DATABASE_URL=...
    """
    info = _connection(ctx, project_id, branch, role, database, pooled)
    click.echo(render_connection(info, fmt or ("json" if ctx.output == "json" else "uri")))


@click.command("psql", context_settings={"ignore_unknown_options": True})
@project_option
@click.option("--branch", help="Branch name or id")
@click.option("--role", help="Role name")
@click.option("--database", help="Database name")
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def psql(ctx: Context, project_id: str | None, branch: str | None, role: str | None, database: str | None,
         psql_args: tuple[str, ...]) -> None:
    """Open psql on a branch (extra arguments go to psql, e.g. -- -c 'select 1')."""
    exe = shutil.which("psql")
    if exe is None:
        raise CliError("psql is not installed: install your system's PostgreSQL client (e.g. apt-get install "
                       "postgresql-client) — the embedded wheel's psql has no line editing")
    info = _connection(ctx, project_id, branch, role, database, False)
    sys.stdout.flush()
    os.execv(exe, [exe, info["uri"], *psql_args])


@click.command("logs")
@click.argument("endpoint_id")
@endpoint_project_option
@click.option("--tail", type=int, default=200, show_default=True, help="How many lines")
@pass_ctx
def logs(ctx: Context, endpoint_id: str, project_id: str | None, tail: int) -> None:
    """Show a compute's PostgreSQL log."""
    pid = _endpoint_project(ctx, project_id, endpoint_id)
    click.echo(ctx.api.get(f"/projects/{pid}/endpoints/{endpoint_id}/logs", params={"tail": tail}, text=True), nl=False)


@click.command("events")
@click.argument("endpoint_id")
@endpoint_project_option
@pass_ctx
def events(ctx: Context, endpoint_id: str, project_id: str | None) -> None:
    """Show a compute's wakes and suspends with cold-start durations."""
    pid = _endpoint_project(ctx, project_id, endpoint_id)
    evs = ctx.api.get(f"/projects/{pid}/endpoints/{endpoint_id}/events")["events"]
    emit({"events": evs}, ctx.output, columns=[("at", "At"), ("kind", "Event"), ("duration_ms", "ms"),
                                               ("detail", "Detail")], rows=evs)


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
    backup = ctx.api.get("/backup")["backup"]
    data = {"api_url": ctx.api.api_url, "versions": versions, "projects": len(projects), "active_computes": active,
            "clone_backend": info.get("clone_backend"), "backup": backup}
    if ctx.output == "json":
        emit(data, "json")
        return
    click.echo(f"Argon at {ctx.api.api_url}: {len(projects)} project(s), {active} active compute(s); PostgreSQL "
               + ", ".join(v["version"] for v in versions) + f"; clone backend {info.get('clone_backend')}")
    if not backup.get("enabled"):
        click.echo("Backup: off (set ARGON_BACKUP_URL)")
    else:
        line = (f"Backup: {backup['state']} to {backup['url']}; last WAL shipped {backup['last_wal_shipped_at'] or '-'}, "
                f"lag {backup['lag_bytes']} bytes / {backup['lag_seconds']} s; last base backup "
                f"{backup['last_base_backup_at'] or '-'}")
        click.secho(line, fg="red" if backup["error"] else None)
        if backup["error"]:
            click.secho(f"  {backup['error']}", fg="red")


BRANCH_COLUMNS = [("id", "Id"), ("name", "Name"), ("default", "Default"), ("parent_id", "Parent"),
                   ("protected", "Protected"), ("created_at", "Created")]


def _resolve_branch(ctx: Context, pid: str, branch: str) -> dict[str, Any]:
    branches_ = ctx.api.get(f"/projects/{pid}/branches")["branches"]
    matches = [b for b in branches_ if branch in (b["id"], b["name"])]
    if not matches:
        names = ", ".join(b["name"] for b in branches_)
        raise CliError(f"branch {branch!r} not found in project {pid} (its branches: {names})")
    return matches[0]


@click.group()
def branches() -> None:
    """Create, list and delete branches: instant copies of a branch's data, with their own compute."""


@branches.command("list")
@project_option
@pass_ctx
def branches_list(ctx: Context, project_id: str | None) -> None:
    """List the project's branches."""
    items = ctx.api.get(f"/projects/{_default_project(ctx, project_id)}/branches")["branches"]
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


def _branch_at(ctx: Context, pid: str, text: str, *, self_id: str | None = None) -> tuple[str | None, dict[str, str]]:
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
        me = _resolve_branch(ctx, pid, self_id)
        if name == "^self":
            return me["id"], point
        if not me.get("parent_id"):
            raise CliError(f"branch {me['name']} has no parent")
        return me["parent_id"], point
    return _resolve_branch(ctx, pid, name)["id"], point


@branches.command("create")
@project_option
@click.option("--name", help="Branch name (default: its id)")
@click.option("--parent", metavar="BRANCH[@POINT]",
              help="Parent branch name or id (default: the default branch), optionally at a point in time: "
                   "dev@0/1A2B3C, main@2026-11-24T13:00:00Z, or just a point (on the default branch)")
@click.option("--no-compute", is_flag=True, help="Create the branch without an endpoint")
@click.option("--protected", is_flag=True, help="Protect the branch from deletion")
@click.option("--schema-only", is_flag=True, help="Copy the parent's roles and schema, not its rows")
@pass_ctx
def branches_create(ctx: Context, project_id: str | None, name: str | None, parent: str | None,
                    no_compute: bool, protected: bool, schema_only: bool) -> None:
    """Branch the parent's data (copy-on-write where the filesystem can) and give it a compute.

    \b
    From the default branch's head:   argon branches create --name dev
    From another branch:              argon branches create --name fix --parent dev
    From a point in time:             argon branches create --name before --parent main@2026-11-24T13:00:00Z
    From an LSN:                      argon branches create --parent main@0/1A2B3C
    Schema only, no rows:             argon branches create --name empty --schema-only
    """
    pid = _default_project(ctx, project_id)
    spec: dict[str, Any] = {"protected": protected,
                            "init_source": "schema-only" if schema_only else "parent-data"}
    if name:
        spec["name"] = name
    if parent:
        parent_id, point = _branch_at(ctx, pid, parent)
        if parent_id:
            spec["parent_id"] = parent_id
        spec.update({f"parent_{k}": v for k, v in point.items()})
    out = ctx.api.post(f"/projects/{pid}/branches",
                       {"branch": spec, "endpoints": [] if no_compute else [{"type": "read_write"}]})
    if ctx.output == "json":
        emit(out, "json")
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
    pid = _default_project(ctx, project_id)
    b = ctx.api.delete(f"/projects/{pid}/branches/{_resolve_branch(ctx, pid, branch)['id']}")["branch"]
    if ctx.output == "json":
        emit({"branch": b}, "json")
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
    pid = _default_project(ctx, project_id)
    target = _resolve_branch(ctx, pid, branch)
    if not target.get("parent_id"):
        raise CliError(f"branch {target['name']} has no parent to reset from")
    body: dict[str, Any] = {"source_branch_id": target["parent_id"]}
    if preserve_under_name:
        body["preserve_under_name"] = preserve_under_name
    b = ctx.api.post(f"/projects/{pid}/branches/{target['id']}/restore", body)["branch"]
    if ctx.output == "json":
        emit({"branch": b}, "json")
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
    pid = _default_project(ctx, project_id)
    target = _resolve_branch(ctx, pid, branch)
    source_id, point = _branch_at(ctx, pid, source, self_id=target["id"])
    body: dict[str, Any] = {"source_branch_id": source_id or target["id"]}
    body.update({f"source_{k}": v for k, v in point.items()})
    if preserve_under_name:
        body["preserve_under_name"] = preserve_under_name
    b = ctx.api.post(f"/projects/{pid}/branches/{target['id']}/restore", body)["branch"]
    if ctx.output == "json":
        emit({"branch": b}, "json")
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
    pid = _default_project(ctx, project_id)
    b = ctx.api.post(f"/projects/{pid}/branches/{_resolve_branch(ctx, pid, branch)['id']}/set_as_default",
                     {})["branch"]
    emit({"branch": b}, ctx.output, columns=BRANCH_COLUMNS, rows=[b])


ROLE_COLUMNS = [("name", "Name"), ("protected", "Protected"), ("created_at", "Created")]
DATABASE_COLUMNS = [("name", "Name"), ("owner_name", "Owner"), ("created_at", "Created")]
OPERATION_COLUMNS = [("id", "Id"), ("action", "Action"), ("status", "Status"), ("branch_id", "Branch"),
                     ("endpoint_id", "Endpoint"), ("total_duration_ms", "ms"), ("created_at", "Created")]
branch_option = click.option("--branch", help="Branch name or id (default: the default branch)")


def _branch_path(ctx: Context, project_id: str | None, branch: str | None) -> str:
    pid = _default_project(ctx, project_id)
    if branch:
        bid = _resolve_branch(ctx, pid, branch)["id"]
    else:
        bid = next(b["id"] for b in ctx.api.get(f"/projects/{pid}/branches")["branches"] if b["default"])
    return f"/projects/{pid}/branches/{bid}"


@click.group()
def roles() -> None:
    """Postgres roles of a branch: list, create (prints the password once), reset a password, delete."""


@roles.command("list")
@project_option
@branch_option
@pass_ctx
def roles_list(ctx: Context, project_id: str | None, branch: str | None) -> None:
    """List the branch's roles."""
    items = ctx.api.get(_branch_path(ctx, project_id, branch) + "/roles")["roles"]
    emit({"roles": items}, ctx.output, columns=ROLE_COLUMNS, rows=items)


@roles.command("create")
@click.argument("name")
@project_option
@branch_option
@pass_ctx
def roles_create(ctx: Context, name: str, project_id: str | None, branch: str | None) -> None:
    """Create a role that can log in and create databases (not a superuser)."""
    out = ctx.api.post(_branch_path(ctx, project_id, branch) + "/roles", {"role": {"name": name}})
    if ctx.output == "json":
        emit(out, "json")
        return
    click.echo(f"Created role {out['role']['name']}; its password "
               f"(`argon connection-string --role {name}` prints it again):")
    click.echo("  " + str(out["role"].get("password")))


@roles.command("reset-password")
@click.argument("name")
@project_option
@branch_option
@pass_ctx
def roles_reset_password(ctx: Context, name: str, project_id: str | None, branch: str | None) -> None:
    """Give a role a new generated password; the old one stops working at once."""
    out = ctx.api.post(_branch_path(ctx, project_id, branch) + f"/roles/{quote(name, safe='')}/reset_password")
    if ctx.output == "json":
        emit(out, "json")
        return
    click.echo(f"New password of {name}: {out['role'].get('password')}")


@roles.command("delete")
@click.argument("name")
@project_option
@branch_option
@pass_ctx
def roles_delete(ctx: Context, name: str, project_id: str | None, branch: str | None) -> None:
    """Drop a role."""
    out = ctx.api.delete(_branch_path(ctx, project_id, branch) + f"/roles/{quote(name, safe='')}")
    if ctx.output == "json":
        emit(out, "json")
    else:
        click.echo(f"Deleted role {name}.")


@click.group()
def databases() -> None:
    """Databases of a branch: list, create, delete."""


@databases.command("list")
@project_option
@branch_option
@pass_ctx
def databases_list(ctx: Context, project_id: str | None, branch: str | None) -> None:
    """List the branch's databases."""
    items = ctx.api.get(_branch_path(ctx, project_id, branch) + "/databases")["databases"]
    emit({"databases": items}, ctx.output, columns=DATABASE_COLUMNS, rows=items)


@databases.command("create")
@click.argument("name")
@click.option("--owner", required=True, help="Role that owns the database")
@project_option
@branch_option
@pass_ctx
def databases_create(ctx: Context, name: str, owner: str, project_id: str | None, branch: str | None) -> None:
    """Create a database owned by a role."""
    out = ctx.api.post(_branch_path(ctx, project_id, branch) + "/databases",
                       {"database": {"name": name, "owner_name": owner}})
    if ctx.output == "json":
        emit(out, "json")
    else:
        click.echo(f"Created database {name} (owner {owner}).")


@databases.command("delete")
@click.argument("name")
@project_option
@branch_option
@pass_ctx
def databases_delete(ctx: Context, name: str, project_id: str | None, branch: str | None) -> None:
    """Drop a database (its sessions are ended first)."""
    out = ctx.api.delete(_branch_path(ctx, project_id, branch) + f"/databases/{quote(name, safe='')}")
    if ctx.output == "json":
        emit(out, "json")
    else:
        click.echo(f"Deleted database {name}.")


@click.command("operations")
@project_option
@click.option("--limit", type=int, default=20, show_default=True, help="How many, newest first")
@pass_ctx
def operations(ctx: Context, project_id: str | None, limit: int) -> None:
    """What the platform did in a project (creates, starts, suspends, syncs), newest first."""
    pid = _default_project(ctx, project_id)
    items = ctx.api.get(f"/projects/{pid}/operations", params={"limit": limit})["operations"]
    emit({"operations": items}, ctx.output, columns=OPERATION_COLUMNS, rows=items)


API_KEY_COLUMNS = [("id", "Id"), ("name", "Name"), ("created_at", "Created"), ("last_used_at", "Last used")]


@click.group("api-keys")
def api_keys() -> None:
    """API keys of this server: list, create (the key is shown once), revoke.

    \b
    Examples:
      argon api-keys create --name ci     # prints argon_..., use it as ARGON_API_KEY or NEON_API_KEY
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
@pass_ctx
def api_keys_create(ctx: Context, name: str) -> None:
    """Create a key and print it once: it cannot be shown again."""
    out = ctx.api.post("/api_keys", {"key_name": name})
    if ctx.output == "json":
        emit(out, "json")
        return
    click.echo(f"Created API key {out['name']} (id {out['id']}). Save it now, it is not shown again:")
    click.echo("  " + str(out["key"]))


@api_keys.command("revoke")
@click.argument("key_id", type=int)
@pass_ctx
def api_keys_revoke(ctx: Context, key_id: int) -> None:
    """Revoke a key by id (see `argon api-keys list`); it stops working at once."""
    out = ctx.api.delete(f"/api_keys/{key_id}")
    if ctx.output == "json":
        emit(out, "json")
    else:
        click.echo(f"Revoked API key {out['name']} (id {out['id']}).")


def register(cli: click.Group) -> None:
    for command in (projects, branches, endpoints, roles, databases, operations, connection_string, psql, logs,
                    events, status, api_keys):
        cli.add_command(command)

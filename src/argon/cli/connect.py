"""`argon connection-string` and `argon psql`: how to connect to a branch's database."""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any
from urllib.parse import quote

import click
import yaml

from argon.cli.client import CliError
from argon.cli.context import (
    Context,
    default_project,
    pass_ctx,
    project_option,
)
from argon.control.connection import django_databases


def _connection(ctx: Context, project_id: str | None, branch: str | None, role: str | None,
                database: str | None, pooled: bool) -> dict[str, Any]:
    pid = default_project(ctx, project_id)
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
    if fmt == "yaml":
        return yaml.safe_dump(info | {"parameters": p}, sort_keys=False).rstrip("\n")
    return json.dumps(info | {"parameters": p}, indent=2)


@click.command("connection-string")
@click.argument("branch_arg", metavar="[BRANCH]", required=False)
@project_option
@click.option("--branch", help="Branch name or id (default: the default branch)")
@click.option("--role", "--role-name", "role", help="Role name (default: the branch's only role)")
@click.option("--database", "--database-name", "database",
              help="Database name (default: the branch's only database)")
@click.option("--pooled", is_flag=True, help="Use the pooler host")
@click.option("--format", "--output", "-o", "fmt", type=click.Choice(["uri", "json", "yaml", "django", "env"]),
              default=None, help="A URI (default), JSON, YAML, a Django DATABASES snippet, or a .env line")
@pass_ctx
def connection_string(ctx: Context, branch_arg: str | None, project_id: str | None, branch: str | None,
                      role: str | None, database: str | None, pooled: bool, fmt: str) -> None:
    """Print how to connect to a branch's database.

    \b
    argon connection-string                          the default branch, its only role and database
    argon connection-string --branch dev --pooled    dev, through the pooled host name
    argon connection-string -o django                a DATABASES snippet for settings.py
    argon connection-string -o env >> .env           DATABASE_URL=...
    argon cs dev --role-name app --database-name appdb   neonctl's spelling works too
    """
    info = _connection(ctx, project_id, branch or branch_arg, role, database, pooled)
    click.echo(render_connection(info, fmt or (ctx.output if ctx.output != "table" else "uri")))


@click.command("psql", context_settings={"ignore_unknown_options": True})
@project_option
@click.option("--branch", help="Branch name or id")
@click.option("--role", "--role-name", "role", help="Role name")
@click.option("--database", "--database-name", "database", help="Database name")
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

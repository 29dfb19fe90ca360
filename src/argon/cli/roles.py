"""`argon roles ...` and `argon databases ...`: a branch's Postgres roles and databases."""

from __future__ import annotations

import shlex
from urllib.parse import quote

import click

from argon.cli.client import CliError
from argon.cli.context import (
    Context,
    branch_option,
    branch_path,
    pass_ctx,
    project_option,
)
from argon.cli.output import emit

ROLE_COLUMNS = [("name", "Name"), ("protected", "Protected"), ("created_at", "Created")]


DATABASE_COLUMNS = [("name", "Name"), ("owner_name", "Owner"), ("created_at", "Created")]


@click.group()
def roles() -> None:
    """Postgres roles of a branch: list, create (prints the password once), reset a password, delete."""


@roles.command("list")
@project_option
@branch_option
@pass_ctx
def roles_list(ctx: Context, project_id: str | None, branch: str | None) -> None:
    """List the branch's roles."""
    items = ctx.api.get(branch_path(ctx, project_id, branch) + "/roles")["roles"]
    emit({"roles": items}, ctx.output, columns=ROLE_COLUMNS, rows=items)


def _name(positional: str | None, option: str | None) -> str:
    """NAME as an argument (Argon) or `--name` (neonctl)."""
    if positional and option and positional != option:
        raise CliError(f"two names given: {positional!r} and --name {option!r}")
    name = positional or option
    if not name:
        raise CliError("give the name (as an argument or with --name)")
    return name


@roles.command("create")
@click.argument("name", required=False)
@click.option("--name", "name_option", help="The role's name (neonctl's spelling of the argument)")
@project_option
@branch_option
@pass_ctx
def roles_create(ctx: Context, name: str | None, name_option: str | None, project_id: str | None,
                 branch: str | None) -> None:
    """Create a role that can log in and create databases (not a superuser)."""
    name = _name(name, name_option)
    out = ctx.api.post(branch_path(ctx, project_id, branch) + "/roles", {"role": {"name": name}})
    if ctx.output != "table":
        emit(out, ctx.output)
        return
    again = ["argon", "connection-string"] + (["--project-id", project_id] if project_id else []) + \
        (["--branch", branch] if branch else []) + ["--role", name]
    click.echo(f"Created role {out['role']['name']}; its password (`{shlex.join(again)}` prints it again):")
    click.echo("  " + str(out["role"].get("password")))


@roles.command("reset-password")
@click.argument("name")
@project_option
@branch_option
@pass_ctx
def roles_reset_password(ctx: Context, name: str, project_id: str | None, branch: str | None) -> None:
    """Give a role a new generated password; the old one stops working at once."""
    out = ctx.api.post(branch_path(ctx, project_id, branch) + f"/roles/{quote(name, safe='')}/reset_password")
    if ctx.output != "table":
        emit(out, ctx.output)
        return
    click.echo(f"New password of {name}: {out['role'].get('password')}")


@roles.command("delete")
@click.argument("name")
@project_option
@branch_option
@pass_ctx
def roles_delete(ctx: Context, name: str, project_id: str | None, branch: str | None) -> None:
    """Drop a role."""
    out = ctx.api.delete(branch_path(ctx, project_id, branch) + f"/roles/{quote(name, safe='')}")
    if ctx.output != "table":
        emit(out, ctx.output)
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
    items = ctx.api.get(branch_path(ctx, project_id, branch) + "/databases")["databases"]
    emit({"databases": items}, ctx.output, columns=DATABASE_COLUMNS, rows=items)


@databases.command("create")
@click.argument("name", required=False)
@click.option("--name", "name_option", help="The database's name (neonctl's spelling of the argument)")
@click.option("--owner", "--owner-name", "owner", required=True, help="Role that owns the database")
@project_option
@branch_option
@pass_ctx
def databases_create(ctx: Context, name: str | None, name_option: str | None, owner: str, project_id: str | None,
                     branch: str | None) -> None:
    """Create a database owned by a role."""
    name = _name(name, name_option)
    out = ctx.api.post(branch_path(ctx, project_id, branch) + "/databases",
                       {"database": {"name": name, "owner_name": owner}})
    if ctx.output != "table":
        emit(out, ctx.output)
    else:
        click.echo(f"Created database {name} (owner {owner}).")


@databases.command("delete")
@click.argument("name")
@project_option
@branch_option
@pass_ctx
def databases_delete(ctx: Context, name: str, project_id: str | None, branch: str | None) -> None:
    """Drop a database (its sessions are ended first)."""
    out = ctx.api.delete(branch_path(ctx, project_id, branch) + f"/databases/{quote(name, safe='')}")
    if ctx.output != "table":
        emit(out, ctx.output)
    else:
        click.echo(f"Deleted database {name}.")

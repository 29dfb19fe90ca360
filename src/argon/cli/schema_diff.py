"""`argon branches schema-diff`: a unified diff of two branches' schemas, as neonctl shows it.

The arguments mean what they mean to `neonctl branches schema-diff [base-branch] [compare-source]`:
one argument is the compare source (the base is the default branch); none compares the default
branch with its parent. The diff goes from the base to the compare source, except against
`^parent`, which is the old side. Without `--database`, every database of the base branch.
"""

from __future__ import annotations

import difflib
from typing import Any

import click

from argon.cli.branches import branch_at
from argon.cli.client import CliError
from argon.cli.context import Context, default_project, pass_ctx, project_option, resolve_branch
from argon.cli.output import emit

_COLORS = {"-": "red", "+": "green", "@": "magenta"}


def _header(name: str, point: dict[str, str]) -> str:
    at = next(iter(point.values()), None)
    return f"(Branch: {name}" + (f" at {at})" if at else ")")


def _schema(ctx: Context, pid: str, branch_id: str, database: str, point: dict[str, str]) -> str:
    return str(ctx.api.get(f"/projects/{pid}/branches/{branch_id}/schema",
                           params={"db_name": database, **point})["sql"])


def unified(database: str, old: str, new: str, old_header: str, new_header: str) -> list[str]:
    """The diff lines (no newlines), headed like neonctl's: `--- Database: neondb\t(Branch: main)`."""
    lines = difflib.unified_diff(old.splitlines(), new.splitlines(), f"Database: {database}", f"Database: {database}",
                                 old_header, new_header, lineterm="")
    out = list(lines)
    return out or [f"--- Database: {database}\t{old_header}", f"+++ Database: {database}\t{new_header}"]


@click.command("schema-diff")
@click.argument("base", metavar="[BASE]", required=False)
@click.argument("compare", metavar="[COMPARE[@LSN|@TIMESTAMP]]", required=False)
@project_option
@click.option("--database", "--db", help="Compare only this database (default: every database of the base branch)")
@pass_ctx
def schema_diff(ctx: Context, base: str | None, compare: str | None, project_id: str | None,
                database: str | None) -> None:
    """Show how two branches' schemas differ, as a unified diff (pg_dump --schema-only of each).

    \b
    argon branches schema-diff                       the default branch against its parent
    argon branches schema-diff dev                   the default branch (old) against dev (new)
    argon branches schema-diff main dev              main (old) against dev (new)
    argon branches schema-diff dev ^parent           dev's parent (old) against dev (new)
    argon branches schema-diff main ^self@0/1A2B3C   main now (old) against main at that LSN
    argon branches schema-diff main dev@2026-11-24T12:00:00Z --database neondb
    """
    pid = default_project(ctx, project_id)
    all_branches: list[dict[str, Any]] = ctx.api.get(f"/projects/{pid}/branches")["branches"]
    default = next(b for b in all_branches if b.get("default"))
    if compare is None:
        compare, base = (base, None) if base else ("^parent", None)
        if compare == "^parent" and not default.get("parent_id"):
            raise CliError(f"no branch given, and the default branch {default['name']} has no parent to compare "
                           "with: name a base branch and a branch to compare it with")
    mine = resolve_branch(ctx, pid, base) if base else default
    other_id, point = branch_at(ctx, pid, compare, self_id=mine["id"])
    other_id = other_id or mine["id"]
    other_name = next((b["name"] for b in all_branches if b["id"] == other_id), other_id)
    old: tuple[str, dict[str, str], str] = (mine["id"], {}, mine["name"])
    new: tuple[str, dict[str, str], str] = (other_id, point, other_name)
    if compare.startswith("^parent"):
        old, new = new, old
    dbs = [d["name"] for d in ctx.api.get(f"/projects/{pid}/branches/{mine['id']}/databases")["databases"]]
    if database is not None:
        if database not in dbs:
            raise CliError(f"database {database} does not exist in base branch {mine['name']}")
        dbs = [database]
    results = []
    for db in dbs:
        lines = unified(db, _schema(ctx, pid, old[0], db, old[1]), _schema(ctx, pid, new[0], db, new[1]),
                        _header(old[2], old[1]), _header(new[2], new[1]))
        results.append({"database": db, "diff": "\n".join(lines) + "\n", "changed": len(lines) > 2})
        if ctx.output == "json":
            continue
        for line in lines:
            click.echo(click.style(line, fg=_COLORS.get(line[:1])))
        if len(lines) <= 2:
            click.echo(f"No differences in {db}.", err=True)
    if ctx.output != "table":
        emit({"schema_diffs": results}, ctx.output)

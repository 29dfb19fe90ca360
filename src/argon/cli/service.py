"""`argon service install|uninstall`: run the platform as a systemd service, and tell systemd how it goes.

`install` writes a unit (`/etc/systemd/system/argon.service`) and an environment file
(`/etc/argon/argon.env`, 0600) with the settings in effect where it runs (ARGON_* variables, the
config file; those left at their default are left out), so the service starts as `argon up` would
here. It also holds an API key (generated when ARGON_API_KEY is not set: a first start would
otherwise print the one it generates into the journal) and a metrics token for Prometheus. What
the unit says, and why:

- `Type=notify`: `argon up` tells systemd `READY=1` once everything listens and reconciliation is
  done (`notify()`), and `STOPPING=1` when it begins a graceful stop, so `systemctl start`
  returns when the platform serves and dependants start after it.
- `KillMode=mixed`, `TimeoutStopSec=120`: SIGTERM goes to `argon up` alone, which stops the proxy,
  then every compute with a fast shutdown, as on Ctrl-C; whatever is left after that gets SIGKILL.
- `Restart=on-failure`: a crash restarts the platform; it reconciles what it finds (computes
  killed with the unit recover as after any crash).
- `LimitNOFILE`: the descriptor limit the proxy raises itself to (`platform.raise_fd_limit`): one
  process holds every client session.
- As root (the default: each project's computes run under their own uid), the capability bounding
  set is what root does for Argon and no more: start computes as other uids (SETUID, SETGID), own
  and reach their files (CHOWN, FOWNER, FSETID, DAC_OVERRIDE, DAC_READ_SEARCH), signal them (KILL),
  and bind a port below 1024 if configured (NET_BIND_SERVICE). `--user` runs it unprivileged
  instead (no per-project uids; the data directory must be that user's).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from argon.cli.client import CliError
from argon.settings import Settings, load

UNIT_NAME = "argon.service"
UNIT_DIR = Path("/etc/systemd/system")
ENV_FILE = Path("/etc/argon/argon.env")
NOFILE = 1 << 20  # platform._FD_CEILING: the proxy raises its soft limit to this
CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                "CAP_SETGID", "CAP_SETUID", "CAP_NET_BIND_SERVICE")


# sd_notify ----------------------------------------------------------------------------------------------


def notify(state: str) -> bool:
    """Tell the service manager `state` (`READY=1`, `STOPPING=1`, `STATUS=...`) when it asked to be told
    ($NOTIFY_SOCKET: a datagram socket, `@` for the abstract namespace). False when nobody listens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), target)
        except OSError:
            return False
    return True


# Rendering ----------------------------------------------------------------------------------------------


def render_unit(*, exec_start: list[str], env_file: Path, user: str | None) -> str:
    """The unit's text. `user`: None runs as root (per-project uids), a name runs unprivileged."""
    lines = [
        "# Written by `argon service install`; `argon service uninstall` removes it.",
        "[Unit]",
        "Description=Argon: serverless PostgreSQL (API, console, proxy, computes)",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={' '.join(_quote(a) for a in exec_start)}",
        f"EnvironmentFile={env_file}",
        "Restart=on-failure",
        "RestartSec=2",
        "KillMode=mixed",
        "TimeoutStartSec=300",
        "TimeoutStopSec=120",
        f"LimitNOFILE={NOFILE}",
        "NoNewPrivileges=yes",
        "ProtectSystem=full",
    ]
    if user is None:
        lines += ["User=root", f"CapabilityBoundingSet={' '.join(CAPABILITIES)}"]
    else:
        lines += [f"User={user}", "CapabilityBoundingSet="]
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def render_env(settings: Settings) -> str:
    """ARGON_* lines for every setting that is not at its default (systemd EnvironmentFile syntax)."""
    defaults = Settings.model_construct()
    lines = ["# Argon's settings for the service (`argon up --help` lists them all). Mode 0600."]
    for name in Settings.model_fields:
        if name == "config_file":
            continue
        value = getattr(settings, name)
        if value is None or (name != "data_dir" and value == getattr(defaults, name, None)):
            continue
        lines.append(f"ARGON_{name.upper()}={_env_value(value)}")
    return "\n".join(lines) + "\n"


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    else:
        text = str(value)
    if any(c in text for c in " \t\"'\\$#") or not text:
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _quote(arg: str) -> str:
    return arg if arg and not any(c in arg for c in " \t\"'\\;$%") else '"' + arg.replace("\\", "\\\\").replace(
        '"', '\\"').replace("%", "%%") + '"'


def exec_start() -> list[str]:
    """This Python, this Argon: the venv need not be activated for the service."""
    return [sys.executable, "-m", "argon", "up"]


# Commands -----------------------------------------------------------------------------------------------


def _systemctl(*args: str) -> None:
    if shutil.which("systemctl") is None or not Path("/run/systemd/system").is_dir():
        click.secho(f"(systemd is not running here: run `systemctl {' '.join(args)}` where it is)", dim=True)
        return
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise CliError(f"systemctl {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")


@click.group()
def service() -> None:
    """Run Argon as a systemd service (install, uninstall)."""


@service.command("install")
@click.option("--user", "user", metavar="NAME", help="Run unprivileged as this user (default: root, which gives "
              "each project's computes their own uid)")
@click.option("--unit-dir", type=click.Path(path_type=Path), default=UNIT_DIR, show_default=True)
@click.option("--env-file", type=click.Path(path_type=Path), default=ENV_FILE, show_default=True)
@click.option("--metrics-token/--no-metrics-token", default=True, show_default=True,
              help="Generate ARGON_METRICS_TOKEN (Prometheus' scrape credential) when none is set")
@click.option("--now", is_flag=True, help="Enable and start the service at once")
@click.option("--print", "dry_run", is_flag=True, help="Print the unit and the environment file; write nothing")
def install(user: str | None, unit_dir: Path, env_file: Path, metrics_token: bool, now: bool, dry_run: bool) -> None:
    """Write a systemd unit and an environment file for the settings in effect here.

    \b
    sudo argon service install --now        # then: systemctl status argon; journalctl -u argon
    argon service install --print           # what it would write
    """
    settings = load()
    if user is not None:
        try:
            home = Path(pwd.getpwnam(user).pw_dir)
        except KeyError:
            raise CliError(f"no such user: {user}") from None
        if "ARGON_DATA_DIR" not in os.environ and settings.data_dir == Path("/var/lib/argon"):
            settings = settings.model_copy(update={"data_dir": home / ".local" / "share" / "argon"})
    if metrics_token and not settings.metrics_token:
        settings = settings.model_copy(update={"metrics_token": secrets.token_urlsafe(32)})
    if not settings.api_key:  # else the first start prints the key it generates, into the journal
        from argon.control.apikeys import new_key  # (the control plane's imports: only for this command)

        settings = settings.model_copy(update={"api_key": new_key()})
    unit = render_unit(exec_start=exec_start(), env_file=env_file, user=user)
    env = render_env(settings)
    if dry_run:  # no secret on a terminal
        shown = env
        for name in ("metrics_token", "api_key"):
            value = getattr(settings, name)
            shown = shown.replace(f"ARGON_{name.upper()}={_env_value(value)}\n", f"ARGON_{name.upper()}=<secret>\n")
        click.echo(f"# {unit_dir / UNIT_NAME}\n{unit}\n# {env_file}\n{shown}", nl=False)
        return
    try:
        env_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(env)
        unit_dir.mkdir(parents=True, exist_ok=True)
        (unit_dir / UNIT_NAME).write_text(unit)
    except PermissionError as exc:
        raise CliError(f"cannot write {exc.filename}: permission denied (run it with sudo)") from None
    click.echo(f"Wrote {unit_dir / UNIT_NAME} and {env_file} (0600).")
    click.echo(f"The API key (ARGON_API_KEY) is in {env_file}"
               + (", and the metrics token (ARGON_METRICS_TOKEN) Prometheus sends as a bearer token"
                  if settings.metrics_token else "") + ".")
    _systemctl("daemon-reload")
    if now:
        _systemctl("enable", "--now", UNIT_NAME)
        click.echo("Started: systemctl status argon; journalctl -u argon -f")
    else:
        click.echo("Start it with: systemctl enable --now argon")


@service.command("uninstall")
@click.option("--unit-dir", type=click.Path(path_type=Path), default=UNIT_DIR, show_default=True)
@click.option("--env-file", type=click.Path(path_type=Path), default=ENV_FILE, show_default=True)
def uninstall(unit_dir: Path, env_file: Path) -> None:
    """Stop and disable the service and remove its unit and environment file. The data stays."""
    unit = unit_dir / UNIT_NAME
    if not unit.exists():
        raise CliError(f"{unit} does not exist: nothing to uninstall")
    _systemctl("disable", "--now", UNIT_NAME)
    try:
        unit.unlink()
        env_file.unlink(missing_ok=True)
    except PermissionError as exc:
        raise CliError(f"cannot remove {exc.filename}: permission denied (run it with sudo)") from None
    _systemctl("daemon-reload")
    click.echo(f"Removed {unit} and {env_file}; the data directory is untouched.")

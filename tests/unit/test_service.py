"""`argon service install|uninstall`: the unit systemd would run (checked by systemd-analyze where it is
installed), the environment file, and sd_notify."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from argon.cli import service
from argon.cli.main import cli
from argon.platform import _FD_CEILING
from argon.settings import Settings


def _keys(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_the_unit_as_root() -> None:
    unit = service.render_unit(exec_start=service.exec_start(), env_file=Path("/etc/argon/argon.env"), user=None)
    keys = _keys(unit)
    assert keys["ExecStart"] == [f"{sys.executable} -m argon up"]
    assert keys["Type"] == ["notify"] and keys["Restart"] == ["on-failure"] and keys["KillMode"] == ["mixed"]
    assert keys["LimitNOFILE"] == [str(_FD_CEILING)]  # what the proxy raises its soft limit to
    assert keys["User"] == ["root"]
    caps = set(keys["CapabilityBoundingSet"][0].split())
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL", "CAP_DAC_OVERRIDE"} <= caps
    assert "CAP_SYS_ADMIN" not in caps and "CAP_SYS_PTRACE" not in caps


def test_the_unit_for_an_unprivileged_user() -> None:
    keys = _keys(service.render_unit(exec_start=["/opt/argon/bin/argon", "up"], env_file=Path("/e"), user="argon"))
    assert keys["User"] == ["argon"] and keys["CapabilityBoundingSet"] == [""]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    env = tmp_path / "argon.env"
    env.write_text(service.render_env(Settings(data_dir=tmp_path / "data")))
    unit = tmp_path / service.UNIT_NAME
    unit.write_text(service.render_unit(exec_start=service.exec_start(), env_file=env, user=None))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=gentle"))  # and it does look
    bad = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert "kill mode" in bad.stderr


def test_the_environment_file_holds_what_is_not_default(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "my data", proxy_port=6432, pg_bindirs={15: "/usr/lib/postgresql/15/bin"},
                        forward_all_params=True, metrics_token="t0k")
    lines = service.render_env(settings).splitlines()
    assert f'ARGON_DATA_DIR="{tmp_path / "my data"}"' in lines
    assert "ARGON_PROXY_PORT=6432" in lines and "ARGON_METRICS_TOKEN=t0k" in lines
    assert "ARGON_PG_BINDIRS=15=/usr/lib/postgresql/15/bin" in lines and "ARGON_FORWARD_ALL_PARAMS=true" in lines
    assert not any(line.startswith(("ARGON_HTTP_PORT", "ARGON_CONFIG_FILE")) for line in lines)


def test_install_and_uninstall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARGON_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ARGON_API_KEY", "argon_preset_key_abcdefghijklmnopqrstuv")
    monkeypatch.delenv("ARGON_METRICS_TOKEN", raising=False)
    args = ["--unit-dir", str(tmp_path / "units"), "--env-file", str(tmp_path / "etc" / "argon.env")]
    printed = CliRunner().invoke(cli, ["service", "install", "--print", *args])
    assert printed.exit_code == 0, printed.output
    assert "Type=notify" in printed.output and "argon_preset_key" not in printed.output
    assert "ARGON_API_KEY=<secret>" in printed.output and "ARGON_METRICS_TOKEN=<secret>" in printed.output
    assert not (tmp_path / "units").exists()  # --print writes nothing
    done = CliRunner().invoke(cli, ["service", "install", *args])
    assert done.exit_code == 0, done.output
    env = tmp_path / "etc" / "argon.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600  # it holds the API key
    text = env.read_text()
    assert "ARGON_API_KEY=argon_preset_key_abcdefghijklmnopqrstuv" in text
    token = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARGON_METRICS_TOKEN="))
    assert len(token) >= 32 and token not in done.output
    assert (tmp_path / "units" / service.UNIT_NAME).read_text().count("EnvironmentFile=" + str(env)) == 1
    gone = CliRunner().invoke(cli, ["service", "uninstall", *args])
    assert gone.exit_code == 0, gone.output
    assert not (tmp_path / "units" / service.UNIT_NAME).exists() and not env.exists()
    monkeypatch.delenv("ARGON_API_KEY")  # none set: the service gets one of its own, not printed by a start
    CliRunner().invoke(cli, ["service", "install", *args])
    assert re.search(r"^ARGON_API_KEY=argon_\w{40,}$", env.read_text(), re.M)
    CliRunner().invoke(cli, ["service", "uninstall", *args])
    again = CliRunner().invoke(cli, ["service", "uninstall", *args])
    assert again.exit_code == 1 and "nothing to uninstall" in again.output and "Traceback" not in again.output


def test_notify_reaches_the_service_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert service.notify("READY=1")
        assert listener.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not service.notify("READY=1")  # not under systemd: nothing to tell
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not service.notify("READY=1")
    assert os.environ["NOTIFY_SOCKET"]  # untouched

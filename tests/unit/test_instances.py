"""Two Argon instances on one machine keep their runtime state apart (issue 12, defect 6): the CLI
config has an entry per data directory, and the default run dir is one per data directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from argon.cli import client
from argon.storage.layout import Layout


def test_cli_config_is_kept_per_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("ARGON_DATA_DIR", raising=False)
    client.write_cli_config("http://127.0.0.1:1111", "key-a", tmp_path / "a")
    client.write_cli_config("http://127.0.0.1:2222", "key-b", tmp_path / "b")
    assert client.read_cli_config() == {"api_url": "http://127.0.0.1:2222", "api_key": "key-b"}  # the last one
    monkeypatch.setenv("ARGON_DATA_DIR", str(tmp_path / "a"))
    assert client.read_cli_config() == {"api_url": "http://127.0.0.1:1111", "api_key": "key-a"}
    monkeypatch.delenv("ARGON_DATA_DIR")
    client.forget_instance(tmp_path / "b")  # b stops: the default goes back to a, which still runs
    assert client.read_cli_config() == {"api_url": "http://127.0.0.1:1111", "api_key": "key-a"}
    stored = json.loads(client.cli_config_path().read_text())
    assert [d for d, e in stored["instances"].items() if e["running"]] == [str(tmp_path / "a")]
    client.write_cli_config("http://127.0.0.1:3333", None, tmp_path / "b")  # b again, on another port,
    monkeypatch.setenv("ARGON_DATA_DIR", str(tmp_path / "b"))  # with no key of its own this time
    assert client.read_cli_config() == {"api_url": "http://127.0.0.1:3333", "api_key": "key-b"}
    assert client.cli_config_path().stat().st_mode & 0o777 == 0o600


def test_default_run_dir_is_one_per_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a, b = Layout(tmp_path / "a"), Layout(tmp_path / "b")
    assert a.run_dir != b.run_dir and a.run_dir.parent == b.run_dir.parent
    assert a.socket_dir("ep-x") != b.socket_dir("ep-x")
    assert Layout(tmp_path / "a", run_dir=tmp_path / "run").run_dir == tmp_path / "run"  # an explicit one stays

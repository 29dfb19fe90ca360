from pathlib import Path

import pytest

from argon.errors import ConfigError
from argon.settings import load


def test_env_names_are_the_public_contract(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ARGON_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("ARGON_HTTP_PORT", "4555")
    monkeypatch.setenv("ARGON_PROXY_PORT", "6543")
    monkeypatch.setenv("ARGON_DOMAIN", "db.example.com")
    monkeypatch.setenv("ARGON_API_KEY", "k")
    monkeypatch.setenv("ARGON_CONFIG_FILE", str(tmp_path / "none.toml"))
    s = load()
    assert (s.data_dir, s.http_port, s.proxy_port, s.domain, s.api_key) == (tmp_path / "d", 4555, 6543, "db.example.com", "k")


def test_precedence_flags_over_env_over_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('http_port = 1111\nproxy_port = 2222\nsuspend_timeout = 60\n')
    monkeypatch.setenv("ARGON_CONFIG_FILE", str(cfg))
    monkeypatch.setenv("ARGON_PROXY_PORT", "3333")
    s = load(http_port=None, suspend_timeout=5)
    assert s.http_port == 1111  # file
    assert s.proxy_port == 3333  # env beats file
    assert s.suspend_timeout == 5  # flag beats all


def test_invalid_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ARGON_CONFIG_FILE", str(tmp_path / "none.toml"))
    monkeypatch.setenv("ARGON_HTTP_PORT", "70000")
    with pytest.raises(ConfigError) as err:
        load()
    assert "ARGON_HTTP_PORT" in err.value.user_message


@pytest.mark.parametrize("domain", ["localhost", "bad_domain.com", "a..b"])
def test_domain_needs_two_clean_labels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, domain: str) -> None:
    monkeypatch.setenv("ARGON_CONFIG_FILE", str(tmp_path / "none.toml"))
    with pytest.raises(ConfigError):
        load(domain=domain)


def test_pg_bindirs_parsing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ARGON_CONFIG_FILE", str(tmp_path / "none.toml"))
    monkeypatch.setenv("ARGON_PG_BINDIRS", "15=/usr/lib/postgresql/15/bin, 18=/opt/pg18/bin")
    assert load().pg_bindirs == {15: Path("/usr/lib/postgresql/15/bin"), 18: Path("/opt/pg18/bin")}
    monkeypatch.setenv("ARGON_PG_BINDIRS", "fifteen")
    with pytest.raises(ConfigError):
        load()

"""argon.django without a server: connection strings to DATABASES entries, where the endpoint sits
in them, where the API key comes from, and the branch names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import dj_database_url
import pytest

from argon.django import ConnectionStringError, database
from argon.django.api import NEON_DEFAULT_URL, cli_config_path, find_credentials
from argon.django.connstr import find_endpoint, parse_url, retarget
from argon.django.keys import BranchNames, names_for

LOCAL = "postgresql://neondb_owner:p%40ss@127.0.0.1:5433/neondb?sslmode=require&options=endpoint%3Dep-cool-leaf-a1b2c3d4"
NEON = ("postgresql://alex:secret@ep-cool-leaf-a1b2c3d4.us-east-2.aws.neon.tech/neondb"
        "?sslmode=require&channel_binding=require")
NEON_POOLED = NEON.replace("a1b2c3d4.", "a1b2c3d4-pooler.")
BRANCH_ID = re.compile(r"^br-[a-z0-9]+-[a-z0-9]+-[a-z0-9]+$")  # neonctl's test for "this is an id"


def test_argon_local_form() -> None:
    entry = database(LOCAL)
    assert entry == {
        "ENGINE": "django.db.backends.postgresql", "NAME": "neondb", "USER": "neondb_owner", "PASSWORD": "p@ss",
        "HOST": "127.0.0.1", "PORT": "5433",
        "OPTIONS": {"sslmode": "require", "options": "endpoint=ep-cool-leaf-a1b2c3d4"},
        "CONN_MAX_AGE": 600, "CONN_HEALTH_CHECKS": True,
    }


def test_neon_pooled_host_gets_transaction_pooling_settings() -> None:
    entry = database(NEON_POOLED)
    assert entry["HOST"] == "ep-cool-leaf-a1b2c3d4-pooler.us-east-2.aws.neon.tech"
    assert entry["OPTIONS"] == {"sslmode": "require", "channel_binding": "require", "prepare_threshold": None}
    assert entry["DISABLE_SERVER_SIDE_CURSORS"] is True
    direct = database(NEON)
    assert "prepare_threshold" not in direct["OPTIONS"] and "DISABLE_SERVER_SIDE_CURSORS" not in direct


def test_pooled_switch_in_every_form() -> None:
    assert database(NEON, pooled=True)["HOST"] == "ep-cool-leaf-a1b2c3d4-pooler.us-east-2.aws.neon.tech"
    assert database(NEON_POOLED, pooled=False)["HOST"] == "ep-cool-leaf-a1b2c3d4.us-east-2.aws.neon.tech"
    pooled = database(LOCAL, pooled=True)
    assert pooled["OPTIONS"]["options"] == "endpoint=ep-cool-leaf-a1b2c3d4-pooler"
    assert pooled["OPTIONS"]["prepare_threshold"] is None and pooled["DISABLE_SERVER_SIDE_CURSORS"]
    with pytest.raises(ConnectionStringError, match="needs an Argon or Neon connection string"):
        database("postgresql://u:p@db.example.com/app", pooled=True)


def test_plain_postgres_gets_no_tls_forced_and_caller_options_win() -> None:
    entry = database("postgres://u:p@db.example.com:6000/app", conn_max_age=0, conn_health_checks=False,
                     options={"application_name": "web"}, test_options={"NAME": "app_tests"})
    assert entry["OPTIONS"] == {"application_name": "web"}
    assert (entry["CONN_MAX_AGE"], entry["CONN_HEALTH_CHECKS"], entry["TEST"]) == (0, False, {"NAME": "app_tests"})
    assert database("postgresql://u:p@db.example.com/app", ssl_require=True)["OPTIONS"]["sslmode"] == "require"
    assert "sslmode" not in database(NEON.replace("sslmode=require&", ""), ssl_require=False)["OPTIONS"]
    assert database(NEON.replace("sslmode=require&", ""))["OPTIONS"]["sslmode"] == "require"
    assert database("postgis://u:p@h/gis")["ENGINE"] == "django.contrib.gis.db.backends.postgis"


def test_interoperates_with_dj_database_url() -> None:
    """Same keys as dj-database-url for the same URL, and its dicts are accepted as input."""
    for url in (LOCAL, NEON, NEON_POOLED, "postgres://u:p@db.example.com/app"):
        ours, theirs = parse_url(url), dj_database_url.parse(url)
        for key in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST"):
            assert ours[key] == theirs[key], (url, key)
        assert ours["OPTIONS"] == theirs.get("OPTIONS", {}) and str(ours["PORT"]) == str(theirs["PORT"])
        from_dict, from_url = database(dj_database_url.parse(url)), database(url)
        assert str(from_dict.pop("PORT")) == str(from_url.pop("PORT"))
        assert from_dict.pop("DISABLE_SERVER_SIDE_CURSORS") == from_url.pop("DISABLE_SERVER_SIDE_CURSORS", False)
        assert from_dict == from_url


def test_environment_and_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", LOCAL)
    assert database()["NAME"] == "neondb"
    monkeypatch.delenv("DATABASE_URL")
    with pytest.raises(ConnectionStringError, match="DATABASE_URL is not set"):
        database()
    with pytest.raises(ConnectionStringError, match="unsupported scheme 'mysql://'"):
        database("mysql://u:p@h/db")
    with pytest.raises(ConnectionStringError, match="not a valid connection string"):
        database("postgresql://u:p@h/db?nonsense_parameter=1")
    with pytest.raises(ConnectionStringError, match="takes a URL or a dict"):
        database(42)  # type: ignore[arg-type]


def test_endpoint_found_in_host_options_or_password() -> None:
    local = database(LOCAL)
    assert find_endpoint(local) is not None and find_endpoint(local).where == "options"  # type: ignore[union-attr]
    ref = find_endpoint(database(NEON_POOLED))
    assert ref is not None and (ref.endpoint_id, ref.pooled, ref.where) == ("ep-cool-leaf-a1b2c3d4", True, "host")
    hack = {"HOST": "10.0.0.5", "PASSWORD": "endpoint=ep-cool-leaf-a1b2c3d4;s3;cret", "OPTIONS": {}}
    ref = find_endpoint(hack)
    assert ref is not None and (ref.endpoint_id, ref.where) == ("ep-cool-leaf-a1b2c3d4", "password")
    assert find_endpoint({"HOST": "db.example.com", "PASSWORD": "x", "OPTIONS": {}}) is None
    assert find_endpoint({"HOST": "127.0.0.1", "OPTIONS": {"options": "-c search_path=app"}}) is None


def test_retarget_changes_only_the_endpoint() -> None:
    entry = database(LOCAL, options={"options": "-c statement_timeout=5s endpoint=ep-cool-leaf-a1b2c3d4-pooler"})
    moved = retarget(entry, "ep-new-moon-z9y8x7w6", pooled=False)
    assert moved["OPTIONS"]["options"] == "-c statement_timeout=5s endpoint=ep-new-moon-z9y8x7w6"
    assert entry["OPTIONS"]["options"].endswith("-pooler"), "the original is left as it was"
    assert retarget(database(NEON_POOLED), "ep-new-moon-z9y8x7w6")["HOST"] == \
        "ep-new-moon-z9y8x7w6-pooler.us-east-2.aws.neon.tech"
    hack = {"HOST": "10.0.0.5", "PASSWORD": "endpoint=ep-cool-leaf-a1b2c3d4$s3cret", "OPTIONS": {}}
    assert retarget(hack, "ep-new-moon-z9y8x7w6")["PASSWORD"] == "endpoint=ep-new-moon-z9y8x7w6$s3cret"
    assert retarget(hack, "ep-new-moon-z9y8x7w6", password="fresh")["PASSWORD"] == "endpoint=ep-new-moon-z9y8x7w6$fresh"
    assert retarget(database(NEON), "ep-new-moon-z9y8x7w6", password="fresh")["PASSWORD"] == "fresh"


def test_credentials_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert find_credentials(env) is None
    stored = cli_config_path(env)
    stored.parent.mkdir(parents=True)
    stored.write_text(json.dumps({"api_url": "http://server:4444", "api_key": "stored-key"}))
    creds = find_credentials(env)
    assert creds is not None and (creds.api_url, creds.api_key) == ("http://server:4444/api/v2", "stored-key")
    assert "argon login" in creds.source
    creds = find_credentials({**env, "ARGON_API_KEY": "k1"})
    assert creds is not None and (creds.api_url, creds.api_key) == ("http://server:4444/api/v2", "k1")
    creds = find_credentials({**env, "ARGON_API_KEY": "k1", "ARGON_API_URL": "http://other:1/"})
    assert creds is not None and creds.api_url == "http://other:1/api/v2"
    creds = find_credentials({**env, "NEON_API_KEY": "napi_x"})
    assert creds is not None and (creds.api_url, creds.api_key) == (NEON_DEFAULT_URL, "napi_x")
    creds = find_credentials({**env, "NEON_API_KEY": "napi_x", "NEON_API_HOST": "http://h:2/api/v2"})
    assert creds is not None and creds.api_url == "http://h:2/api/v2"
    # the same file the CLI writes
    from argon.cli.client import cli_config_path as cli_path

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert cli_path() == stored == cli_config_path()


def test_branch_names() -> None:
    names = names_for(project_id="p", base_branch_id="br-a-b-c", user="neondb_owner", alias="default",
                      state="0123456789abcdef" * 4)
    assert names.template == f"django-template-{names.ident}-0123456789ab"
    assert names.builder().startswith(names.template + "-build-") and names.builder() != names.builder()
    assert names.run() != names.run() and names.run().startswith(f"django-test-{names.ident}-0123456789ab-")
    assert names.keep("test_neondb") != names.keep("test_neondb_gw1")
    assert names.keep("test_neondb", "2") == names.keep("test_neondb") + "-2"
    assert names.keep("test_neondb").startswith(names.keep_prefix)
    for name in (names.template, names.builder(), names.run(), names.keep("t")):
        assert not BRANCH_ID.match(name), "neonctl would take the name for a branch id"
    other = names_for(project_id="p", base_branch_id="br-d-e-f", user="neondb_owner", alias="default",
                      state="0123456789abcdef" * 4)
    assert other.ident != names.ident and isinstance(other, BranchNames)


def test_api_retries_while_the_project_is_locked_and_waits_for_operations() -> None:
    """Neon's rules, scripted: 423 while another operation runs (retried, Retry-After honoured),
    operations that finish later (polled), one that fails (its error reported)."""
    import httpx

    from argon.django.api import Api, ApiError, Credentials

    seen: list[str] = []
    polls = {"op-1": ["running", "finished"], "op-2": ["failed"]}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        assert request.headers["Authorization"] == "Bearer napi_k"
        if request.method == "POST" and seen.count("POST /api/v2/projects/p/branches") <= 2:
            return httpx.Response(423, json={"code": "", "message": "project already has running operations"},
                                  headers={"Retry-After": "0"})
        if request.method == "POST":
            return httpx.Response(201, json={"branch": {"id": "br-a-b-c", "name": "x"}, "endpoints": [],
                                             "operations": [{"id": "op-1", "action": "create_branch",
                                                             "status": "running"}]})
        if request.url.path.endswith("/operations/op-1"):
            return httpx.Response(200, json={"operation": {"id": "op-1", "status": polls["op-1"].pop(0)}})
        if request.url.path.endswith("/operations/op-2"):
            return httpx.Response(200, json={"operation": {"id": "op-2", "action": "delete_timeline",
                                                           "status": "failed", "error": "disk full"}})
        if request.method == "DELETE":
            return httpx.Response(200, json={"branch": {}, "operations": [{"id": "op-2", "status": "running"}]})
        return httpx.Response(401, json={"code": "", "message": "invalid API key"})

    api = Api(Credentials("http://neon.test/api/v2", "napi_k", "NEON_API_KEY"), transport=httpx.MockTransport(handler))
    created = api.create_branch("p", name="x", parent_id="br-p-q-r", expires_at=None, compute=False)
    assert created["branch"]["id"] == "br-a-b-c"
    assert seen.count("POST /api/v2/projects/p/branches") == 3 and polls["op-1"] == []
    with pytest.raises(ApiError, match="operation delete_timeline on p failed: disk full"):
        api.delete_branch("p", "br-a-b-c")
    with pytest.raises(ApiError, match=r"invalid API key \(HTTP 401\) \(the key comes from NEON_API_KEY\)"):
        api.projects()

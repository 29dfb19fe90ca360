"""The `argon` CLI as a user runs it (a subprocess) against a live platform: projects, connection
strings used by psql, branches, and errors that say what to do instead of a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.fixtures.platform import API_KEY, RunningPlatform

pytestmark = pytest.mark.pg


def argon(platform: RunningPlatform, *args: str, key: str = API_KEY, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ARGON_API_URL": platform.api_url, "ARGON_API_KEY": key, "NO_COLOR": "1",
           "HOME": str(platform.root)}
    out = subprocess.run([sys.executable, "-m", "argon", *args], env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_projects_connection_string_and_branches(platform: RunningPlatform) -> None:
    created = json.loads(argon(platform, "--output", "json", "projects", "create", "--name", "cli-app").stdout)
    pid = created["project"]["id"]
    try:
        assert pid in argon(platform, "projects", "list").stdout
        uri = argon(platform, "connection-string", "--project-id", pid).stdout.strip()
        assert uri.startswith("postgresql://neondb_owner:") and "options=endpoint%3D" in uri
        psql = subprocess.run(["psql", "-X", "-At", "-c", "select current_user", uri], capture_output=True, text=True,
                              timeout=60)
        assert psql.stdout.strip() == "neondb_owner", psql.stderr
        django = argon(platform, "connection-string", "--project-id", pid, "--format", "django").stdout
        assert "django.db.backends.postgresql" in django and "endpoint=" in django

        out = argon(platform, "branches", "create", "--project-id", pid, "--name", "feature").stdout
        assert "Created branch feature" in out and "postgresql://" in out
        listed = json.loads(argon(platform, "--output", "json", "branches", "list", "--project-id", pid).stdout)
        assert {b["name"] for b in listed["branches"]} == {"main", "feature"}
        branch_uri = argon(platform, "connection-string", "--project-id", pid, "--branch", "feature").stdout.strip()
        psql = subprocess.run(["psql", "-X", "-At", "-c", "select 40 + 2", branch_uri], capture_output=True,
                              text=True, timeout=60)
        assert psql.stdout.strip() == "42", psql.stderr
        assert "Deleted branch feature" in argon(platform, "branches", "delete", "feature", "--project-id", pid).stdout
        missing = argon(platform, "branches", "delete", "feature", "--project-id", pid, check=False)
        assert missing.returncode != 0 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    finally:
        argon(platform, "projects", "delete", pid, check=False)
    assert pid not in argon(platform, "projects", "list").stdout


def test_errors_say_what_to_do(platform: RunningPlatform) -> None:
    wrong = argon(platform, "projects", "list", key="argon_wrong", check=False)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert "API key" in wrong.stderr or "authenticat" in wrong.stderr.lower(), wrong.stderr
    bad: dict[str, Any] = {"ARGON_API_URL": "http://127.0.0.1:9"}
    env = {**os.environ, **bad, "ARGON_API_KEY": API_KEY, "HOME": str(platform.root)}
    down = subprocess.run([sys.executable, "-m", "argon", "projects", "list"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert down.returncode != 0 and "Traceback" not in down.stderr and "argon up" in down.stderr, down.stderr
    helptext = argon(platform, "branches", "--help").stdout
    assert "create" in helptext and "copy" in helptext


def test_roles_databases_and_operations(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid = project["project"]["id"]
    created = json.loads(argon(platform, "--output", "json", "roles", "create", "app", "--project-id", pid).stdout)
    password = created["role"]["password"]
    assert "app" in argon(platform, "roles", "list", "--project-id", pid).stdout
    assert "Created database appdb" in argon(platform, "databases", "create", "appdb", "--owner", "app",
                                             "--project-id", pid).stdout
    uri = argon(platform, "connection-string", "--project-id", pid, "--role", "app", "--database", "appdb").stdout
    assert password in uri
    new = argon(platform, "roles", "reset-password", "app", "--project-id", pid).stdout.strip().rsplit(" ", 1)[-1]
    assert new != password and new.startswith("npg_")
    psql = subprocess.run(["psql", "-X", "-At", "-c", "select current_user", uri.strip().replace(password, new)],
                          capture_output=True, text=True, timeout=60)
    assert psql.stdout.strip() == "app", psql.stderr
    argon(platform, "databases", "delete", "appdb", "--project-id", pid)
    argon(platform, "roles", "delete", "app", "--project-id", pid)
    names = {d["name"] for d in json.loads(argon(platform, "--output", "json", "databases", "list", "--project-id",
                                                 pid).stdout)["databases"]}
    assert names == {"neondb"}
    ops = argon(platform, "operations", "--project-id", pid).stdout
    assert "apply_config" in ops or "create_timeline" in ops


def test_login_logout_and_completion(platform: RunningPlatform, tmp_path: Any) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "NO_COLOR": "1"}
    env.pop("ARGON_API_KEY", None)
    env.pop("ARGON_API_URL", None)

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "argon", *args], env=env, input=stdin, capture_output=True,
                              text=True, timeout=120)

    bad = run("login", "--api-url", platform.api_url, "--api-key", "argon_wrong")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "401" in bad.stderr, bad.stderr
    ok = run("login", "--api-url", platform.api_url, stdin=API_KEY + "\n")  # the key typed at a hidden prompt
    assert ok.returncode == 0 and "Signed in" in ok.stdout, ok.stderr
    saved = next((tmp_path / "cfg").rglob("cli.json"))
    assert oct(saved.stat().st_mode & 0o777) == "0o600" and API_KEY in saved.read_text()
    listed = run("projects", "list")  # no flags, no environment: the saved login
    assert listed.returncode == 0, listed.stderr
    assert "Removed the API key" in run("logout").stdout
    after = run("projects", "list")
    assert after.returncode != 0 and "argon login" in after.stderr
    script = run("completion", "bash")
    assert script.returncode == 0 and "_ARGON_COMPLETE" in script.stdout
    assert "complete" in run("completion", "zsh").stdout
    words = subprocess.run([sys.executable, "-m", "argon"], capture_output=True, text=True, timeout=60,
                           env={**env, "_ARGON_COMPLETE": "bash_complete", "COMP_WORDS": "argon branches re",
                                "COMP_CWORD": "2"})
    assert "reset" in words.stdout and "restore" in words.stdout


def test_connection_string_forms_and_endpoint_commands(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid = project["project"]["id"]
    env_line = argon(platform, "connection-string", "--project-id", pid, "-o", "env").stdout.strip()
    assert env_line.startswith("DATABASE_URL=postgresql://")
    pooled = argon(platform, "connection-string", "--project-id", pid, "--pooled").stdout.strip()
    assert "-pooler" in pooled
    psql = subprocess.run(["psql", "-X", "-At", "-c", "select 1", pooled], capture_output=True, text=True, timeout=60)
    assert psql.stdout.strip() == "1", psql.stderr
    ep = project["endpoints"][0]["id"]
    pools = argon(platform, "endpoints", "pooler", ep, "--project-id", pid).stdout
    assert "neondb_owner" in pools and "transaction" in pools and "Clients active" in pools
    pool = json.loads(argon(platform, "-o", "json", "endpoints", "pooler", ep, "--project-id", pid).stdout)["pools"][0]
    assert pool["cl_active"] == pool["cl_waiting"] == 0 and pool["total_xact_count"] >= 1
    as_json = json.loads(argon(platform, "connection-string", "--project-id", pid, "--output", "json").stdout)
    assert as_json["parameters"]["dbname"] == "neondb" and as_json["role"] == "neondb_owner"
    renamed = json.loads(argon(platform, "-o", "json", "projects", "update", pid, "--name", "renamed",
                               "--history-retention", "7200").stdout)["project"]
    assert renamed["name"] == "renamed" and renamed["history_retention_seconds"] == 7200
    ep = project["endpoints"][0]["id"]
    assert ep in argon(platform, "endpoints", "restart", ep, "--project-id", pid).stdout
    assert f"Deleted endpoint {ep}" in argon(platform, "endpoints", "delete", ep, "--project-id", pid).stdout
    created = json.loads(argon(platform, "-o", "json", "endpoints", "create", "--project-id", pid).stdout)
    assert created["endpoint"]["branch_id"] == project["branch"]["id"]
    uri = argon(platform, "connection-string", "--project-id", pid).stdout.strip()
    psql = subprocess.run(["psql", "-X", "-At", "-c", "select 2", uri], capture_output=True, text=True, timeout=60)
    assert psql.stdout.strip() == "2", psql.stderr
    replica = json.loads(argon(platform, "-o", "json", "endpoints", "create", "--project-id", pid,
                               "--type", "read_only").stdout)["endpoint"]
    assert replica["type"] == "read_only" and replica["branch_id"] == project["branch"]["id"]


def test_endpoint_commands_find_their_project(platform: RunningPlatform) -> None:
    """Endpoint ids are unique: with several projects, `--project-id` is not needed for them."""
    first, second = (platform.create_project(name=f"find-{i}") for i in range(2))
    try:
        ep = second["endpoints"][0]["id"]
        assert ep in argon(platform, "endpoints", "suspend", ep).stdout
        assert json.loads(argon(platform, "-o", "json", "events", ep).stdout)["events"] is not None
        argon(platform, "endpoints", "update", ep, "--suspend-timeout", "60")
        assert platform.endpoint(second["project"]["id"], ep)["suspend_timeout_seconds"] == 60
        missing = argon(platform, "logs", "ep-no-such-endpoint-12345678", check=False)
        assert missing.returncode != 0 and "no endpoint ep-no-such-endpoint-12345678" in missing.stderr
        assert "Traceback" not in missing.stderr
    finally:
        for created in (first, second):
            platform.delete_project(created["project"]["id"])


def test_api_keys_create_list_use_and_revoke(platform: RunningPlatform) -> None:
    made = argon(platform, "api-keys", "create", "--name", "cli-made").stdout
    key = next(word for word in made.split() if word.startswith("argon_"))
    assert "not shown again" in made
    listed = json.loads(argon(platform, "-o", "json", "api-keys", "list").stdout)
    mine = next(k for k in listed if k["name"] == "cli-made")
    assert key not in json.dumps(listed)  # only hashes are kept: the list never shows a key
    assert argon(platform, "projects", "list", key=key).returncode == 0  # the new key works
    assert f"Revoked API key cli-made (id {mine['id']})" in argon(platform, "api-keys", "revoke", str(mine["id"])).stdout
    refused = argon(platform, "projects", "list", key=key, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr and "API key" in refused.stderr
    gone = argon(platform, "api-keys", "revoke", str(mine["id"]), check=False)
    assert gone.returncode != 0 and "not found" in gone.stderr


def test_config_check_reports_without_a_traceback(tmp_path: Any) -> None:
    """`argon config check` validates settings and finds Postgres (as root too, where the embedded
    wheel is normally copied to a runtime dir: a check only looks). A bad value is a problem line."""
    env = {**os.environ, "ARGON_DATA_DIR": str(tmp_path / "data"), "ARGON_RUN_DIR": str(tmp_path / "run"),
           "ARGON_CONFIG_FILE": str(tmp_path / "none.toml"), "HOME": str(tmp_path), "NO_COLOR": "1"}
    env.pop("ARGON_API_KEY", None)
    ok = subprocess.run([sys.executable, "-m", "argon", "config", "check"], env=env, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "settings are valid" in ok.stdout and "postgres " in ok.stdout
    assert not (tmp_path / "data").exists(), "a check must not create the data directory"
    typo = subprocess.run([sys.executable, "-m", "argon", "config", "check"], env={**env, "ARGON_HTTP_PROT": "1"},
                          capture_output=True, text=True, timeout=120)
    assert typo.returncode == 0, typo.stderr  # a warning, not a failure
    assert "ARGON_HTTP_PROT is not a setting (did you mean ARGON_HTTP_PORT?)" in typo.stderr, typo.stderr
    bad = subprocess.run([sys.executable, "-m", "argon", "config", "check"], capture_output=True, text=True,
                         timeout=120, env={**env, "ARGON_PG_BINDIRS": f"15={tmp_path}"})
    assert bad.returncode != 0 and "Traceback" not in bad.stderr + bad.stdout
    assert "ARGON_PG_BINDIRS" in bad.stderr, bad.stderr
    secret = subprocess.run([sys.executable, "-m", "argon", "config", "check"], capture_output=True, text=True,
                            timeout=120, env={**env, "ARGON_BACKUP_KEY": "do-not-print-me",
                                              "ARGON_BACKUP_URL": "file:///tmp/x", "ARGON_BACKUP_RETENTION": "36h"})
    assert secret.returncode == 0 and "do-not-print-me" not in secret.stdout + secret.stderr
    assert "(set; not shown)" in secret.stdout and "36h" in secret.stdout
    wrong = subprocess.run([sys.executable, "-m", "argon", "config", "check"], capture_output=True, text=True,
                           timeout=120, env={**env, "ARGON_BACKUP_URL": "ftp://x", "ARGON_BACKUP_RETENTION": "soon"})
    assert wrong.returncode != 0 and "ARGON_BACKUP_URL" in wrong.stderr and "ARGON_BACKUP_RETENTION" in wrong.stderr


@pytest.mark.slow
def test_neonctl_command_lines_replay_with_argon(platform: RunningPlatform, project: dict[str, Any]) -> None:
    """neonctl's spellings: --role-name, --database-name, --owner-name, --name, a positional branch,
    `cs`, branches get/rename/add-compute/set-expiration, --cu, --expires-at, --type, `-o yaml` anywhere."""
    from datetime import UTC, datetime, timedelta

    import yaml

    pid = project["project"]["id"]
    soon = (datetime.now(UTC) + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def run(line: str) -> str:
        return argon(platform, *line.replace("$P", pid).split()).stdout

    created = yaml.safe_load(run(f"branches create --name dev --cu 0.5-1 --expires-at {soon} --project-id $P -o yaml"))
    assert created["branch"]["name"] == "dev" and created["branch"]["expires_at"] == soon
    assert created["endpoints"][0]["autoscaling_limit_max_cu"] == 1
    assert "dev" in run("branches get dev --project-id $P")
    renamed = json.loads(run("branches rename dev dev2 --project-id $P -o json"))
    assert renamed["branch"]["name"] == "dev2"
    cleared = json.loads(run("branches set-expiration dev2 --project-id $P -o json"))
    assert cleared["branch"]["expires_at"] is None
    replica = json.loads(run("branches add-compute dev2 --project-id $P -o json"))
    assert replica["endpoint"]["type"] == "read_only"
    run("roles create --name app --branch dev2 --project-id $P")
    run("databases create --name appdb --owner-name app --branch dev2 --project-id $P")
    uri = run("cs dev2 --role-name app --database-name appdb --project-id $P").strip()
    psql = subprocess.run(["psql", "-X", "-At", "-c", "select current_user || '@' || current_database()", uri],
                          capture_output=True, text=True, timeout=60)
    assert psql.stdout.strip() == "app@appdb", psql.stderr
    ro = yaml.safe_load(run("branches create --name ro --type read_only --project-id $P -o yaml"))
    assert ro["endpoints"][0]["type"] == "read_only"


def test_project_scoped_api_key(platform: RunningPlatform, project: dict[str, Any]) -> None:
    """A key for one project (what CI and Terraform get): that project's resources, nothing else."""
    import httpx

    pid = project["project"]["id"]
    made = json.loads(argon(platform, "-o", "json", "api-keys", "create", "--name", "gha", "--project-id", pid).stdout)
    assert made["project_id"] == pid
    scoped = httpx.Client(base_url=platform.api_url + "/api/v2", headers={"Authorization": f"Bearer {made['key']}"},
                          timeout=60)
    other = platform.create_project(name="not-yours")
    try:
        assert scoped.get(f"/projects/{pid}").status_code == 200
        assert scoped.post(f"/projects/{pid}/branches", json={"branch": {"name": "ci"}}).status_code == 201
        assert scoped.get("/users/me").status_code == 200
        for method, path in (("GET", f"/projects/{other['project']['id']}"), ("GET", "/projects"),
                             ("POST", "/projects"), ("DELETE", f"/projects/{pid}"), ("GET", "/api_keys"),
                             ("POST", f"/projects/{pid}/recover")):
            resp = scoped.request(method, path)
            assert resp.status_code == 403 and f"limited to project {pid}" in resp.json()["message"], (path, resp.text)
        metrics = httpx.get(platform.api_url + "/metrics", headers={"Authorization": f"Bearer {made['key']}"})
        assert metrics.status_code == 403, metrics.text  # every project's figures: not for a scoped key
        branches = json.loads(argon(platform, "-o", "json", "branches", "list", "--project-id", pid,
                                    key=made["key"]).stdout)["branches"]
        assert {b["name"] for b in branches} == {"main", "ci"}
    finally:
        scoped.close()
        platform.delete_project(other["project"]["id"])
        argon(platform, "api-keys", "revoke", str(made["id"]))

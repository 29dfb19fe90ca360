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

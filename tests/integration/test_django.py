"""Django exactly as the seed guide configures it, through the proxy: migrate, test (the runner
creates and drops its test database through the proxy), persistent connections across a suspend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.platform import API_KEY, RunningPlatform

pytestmark = [pytest.mark.pg, pytest.mark.slow]

APP = Path(__file__).resolve().parent.parent / "django_app"


def django_database(created: dict[str, Any]) -> dict[str, Any]:
    """The DATABASES["default"] values a user copies from the Connection Details."""
    p = created["connection_uris"][0]["connection_parameters"]
    options = {"sslmode": "require"}
    if p.get("options"):
        options["options"] = p["options"]
    return {"NAME": p["database"], "USER": p["role"], "PASSWORD": p["password"], "HOST": p["host"],
            "PORT": str(p["port"]), "OPTIONS": options}


def manage(created: dict[str, Any], *args: str, env: dict[str, str] | None = None,
           script: str = "manage.py") -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "ARGON_DJANGO_DATABASE": json.dumps(django_database(created)),
                "PYTHONPATH": str(APP), **(env or {})}
    return subprocess.run([sys.executable, script, *args], cwd=APP, env=full_env, capture_output=True,
                          text=True, timeout=240)


def test_migrate_and_test(platform: RunningPlatform, project: dict[str, Any]) -> None:
    out = manage(project, "migrate", "--noinput")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Applying notes.0001_initial... OK" in out.stdout
    out = manage(project, "test", "--noinput", "-v", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Ran 4 tests" in out.stderr and "OK" in out.stderr
    assert "Destroying test database" in out.stderr


def test_parallel_test_runner_clones_databases(platform: RunningPlatform, project: dict[str, Any]) -> None:
    out = manage(project, "test", "--noinput", "--parallel", "2")
    assert out.returncode == 0, out.stdout + out.stderr


def test_persistent_connections_survive_a_suspend(platform: RunningPlatform, project: dict[str, Any]) -> None:
    assert manage(project, "migrate", "--noinput").returncode == 0
    pid, eid = project["project"]["id"], project["endpoints"][0]["id"]
    platform.api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": {"suspend_timeout_seconds": 1}})
    out = manage(project, platform.api_url, API_KEY, pid, eid, script="across_suspend.py",
                 env={"ARGON_CONN_MAX_AGE": "600", "ARGON_CONN_HEALTH_CHECKS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok")


@pytest.mark.parametrize("prepared", [False, True], ids=["django-defaults", "server-side-prepared"])
def test_persistent_connections_on_the_pooled_host_never_see_a_suspend(platform: RunningPlatform,
                                                                        project: dict[str, Any], prepared: bool) -> None:
    """Issue 16, item 3: CONN_MAX_AGE = None, no health checks, three suspends; the same connection
    serves every request and never sees an error. Django as it comes (it turns psycopg's prepared
    statements off), and with server-side binding and psycopg's auto-prepare on."""
    assert manage(project, "migrate", "--noinput").returncode == 0
    pid, eid = project["project"]["id"], project["endpoints"][0]["id"]
    platform.api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": {"suspend_timeout_seconds": 1}})
    database = django_database(project)
    database["OPTIONS"]["options"] = f"endpoint={eid}-pooler"
    if prepared:
        database["OPTIONS"].update(prepare_threshold=5, server_side_binding=True)
    env = {"ARGON_CONN_MAX_AGE": "None", "ARGON_DJANGO_DATABASE": json.dumps(database)}
    out = manage(project, platform.api_url, API_KEY, pid, eid, "3", script="pooled_across_suspends.py", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok 4")

"""argon.django's test runner and pytest plugin against a real platform, with the real Django
project of tests/django_app (copied per test, so a test may add migrations): the test database is
a branch of a template branch keyed by the migration state.

Whether migrations ran is counted by a data migration with a side effect (notes 0002 appends a line
to $ARGON_TEST_MIGRATION_LOG each time it runs), never by time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.platform import API_KEY, RunningPlatform, short_tmpdir, uid_range

pytestmark = [pytest.mark.pg, pytest.mark.slow]

APP = Path(__file__).resolve().parent.parent / "django_app"
MIGRATION_0003 = '''from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("notes", "0002_record")]
    operations = [migrations.AddField("note", "pinned", models.BooleanField(default=False))]
'''


class App:
    """A copy of the Django project, run as a user runs it: manage.py test (or pytest) in a
    subprocess, configured by DATABASE_URL and the API's environment variables only."""

    def __init__(self, root: Path, platform: RunningPlatform, url: str) -> None:
        self.dir = root / "app"
        shutil.copytree(APP, self.dir, ignore=shutil.ignore_patterns("__pycache__"))
        self.migrations = root / "migrations.log"
        self.record = root / "record.jsonl"
        self.env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(self.dir),
                    "DJANGO_TEST_RUNNER": "argon.django.BranchTestRunner",
                    "ARGON_API_URL": platform.api_url, "ARGON_API_KEY": API_KEY,
                    "XDG_CONFIG_HOME": str(root / "config"),  # never this machine's `argon login`
                    "ARGON_TEST_MIGRATION_LOG": str(self.migrations), "ARGON_TEST_RECORD": str(self.record)}
        for name in ("NEON_API_KEY", "NEON_API_HOST", "ARGON_PROJECT_ID", "DJANGO_SETTINGS_MODULE"):
            self.env.pop(name, None)

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "manage.py", "test", "--noinput", *args], cwd=self.dir,
                                env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def test(self, *args: str, env: dict[str, str] | None = None, ok: bool = True) -> str:
        proc = self.start(*args, env=env)
        out, err = proc.communicate(timeout=240)
        if ok:
            assert proc.returncode == 0, out + err
            assert "Ran 4 tests" in err and "\nOK" in err, err
        return out + err

    def migrated(self) -> int:
        """How many times notes 0002 ran so far."""
        return len(self.migrations.read_text().splitlines()) if self.migrations.exists() else 0

    def records(self) -> list[dict[str, Any]]:
        lines = self.record.read_text().splitlines() if self.record.exists() else []
        self.record.unlink(missing_ok=True)
        return [json.loads(line) for line in lines]

    def add_migration(self) -> None:
        (self.dir / "notes" / "migrations" / "0003_pinned.py").write_text(MIGRATION_0003)
        models = self.dir / "notes" / "models.py"
        models.write_text(models.read_text() + "    pinned = models.BooleanField(default=False)\n")


def branch_names(platform: RunningPlatform, project_id: str) -> list[str]:
    resp = platform.api.get(f"/projects/{project_id}/branches")
    assert resp.status_code == 200, resp.text
    return sorted(b["name"] for b in resp.json()["branches"])


def django_branches(platform: RunningPlatform, project_id: str) -> list[str]:
    return [n for n in branch_names(platform, project_id) if n.startswith("django-")]


@pytest.fixture
def app(platform: RunningPlatform, project: dict[str, Any], tmp_path: Path) -> App:
    return App(tmp_path, platform, platform.dsn(project))


def test_first_run_builds_the_template_later_runs_branch_it(platform: RunningPlatform, project: dict[str, Any],
                                                            app: App) -> None:
    pid = project["project"]["id"]
    out = app.test("-v", "2")
    assert app.migrated() == 1, out
    assert "Building the test database template" in out
    templates = django_branches(platform, pid)
    assert len(templates) == 1 and templates[0].startswith("django-template-"), templates
    # Its one database already has the test database's name: later runs need no rename.
    (template,) = [b for b in platform.api.get(f"/projects/{pid}/branches").json()["branches"]
                   if b["name"] == templates[0]]
    dbs = platform.api.get(f"/projects/{pid}/branches/{template['id']}/databases").json()["databases"]
    assert [d["name"] for d in dbs] == ["test_neondb"], dbs
    app.records()

    out = app.test("-v", "3")
    assert app.migrated() == 1, "the second run migrated again:\n" + out
    assert "Building" not in out
    assert "created with its compute starting in" in out and "database renamed" not in out, out
    assert django_branches(platform, pid) == templates, "the run's branch is deleted, the template kept"
    (record,) = {(r["database"], r["options"]) for r in app.records()}
    assert record[0] == "test_neondb"
    assert project["endpoints"][0]["id"] not in record[1], "tests ran on another endpoint than the app's"

    app.add_migration()  # a changed migration state: a new template, which has the new column
    out = app.test()
    assert app.migrated() == 2, out
    assert "Building the test database template" in out
    now = django_branches(platform, pid)
    assert len(now) == 2 and templates[0] in now, now


def test_a_failing_migration_keeps_no_template(platform: RunningPlatform, project: dict[str, Any], app: App) -> None:
    out = app.test(env={"ARGON_TEST_FAIL_MIGRATION": "1"}, ok=False)
    assert "this migration fails on purpose" in out
    assert "building the test database template failed" in out and "nothing was kept" in out
    assert django_branches(platform, project["project"]["id"]) == []
    app.test()  # and the next run builds it
    assert app.migrated() == 2
    (template,) = django_branches(platform, project["project"]["id"])
    out = app.test(env={"ARGON_TEST_BAD_CACHE": "1"}, ok=False)  # set-up fails after the branch was made
    assert 'bad"name' in out and "Ran 4 tests" not in out
    assert django_branches(platform, project["project"]["id"]) == [template], "the run's branch was deleted"


def test_two_runs_at_once(platform: RunningPlatform, project: dict[str, Any], app: App) -> None:
    runs = [app.start(), app.start()]
    outs = [p.communicate(timeout=240) for p in runs]
    for proc, (out, err) in zip(runs, outs, strict=True):
        assert proc.returncode == 0, out + err
        assert "Ran 4 tests" in err
    assert 1 <= app.migrated() <= 2
    templates = django_branches(platform, project["project"]["id"])
    assert len(templates) == 1 and templates[0].startswith("django-template-"), templates
    app.test()
    assert app.migrated() <= 2


def test_parallel_workers_get_branches_of_their_own(platform: RunningPlatform, project: dict[str, Any],
                                                   app: App) -> None:
    for start_method in ("fork", "spawn"):  # spawned workers (macOS) set their connections up afresh
        env = {"ARGON_TEST_RENDEZVOUS": "2", **({"ARGON_TEST_SPAWN": "1"} if start_method == "spawn" else {})}
        out = app.test("--parallel", "2", "-v", "2", env=env)
        assert app.migrated() == 1, out
        records = app.records()
        assert len({r["pid"] for r in records}) == 2, records
        assert len({r["postmaster"] for r in records}) == 2, f"both {start_method}ed workers ran on one Postgres"
        assert len({r["options"] for r in records}) == 2
        assert all(r["database"] == "test_neondb" for r in records)
        assert out.count("Cloning test database") == 1 and "as clone 1" in out
        names = django_branches(platform, project["project"]["id"])
        assert len(names) == 1 and names[0].startswith("django-template-"), "clones and the run's branch deleted"


def test_keepdb_keeps_the_branch(platform: RunningPlatform, project: dict[str, Any], app: App) -> None:
    pid = project["project"]["id"]
    app.test("--keepdb")
    kept = [n for n in django_branches(platform, pid) if n.startswith("django-keep-")]
    assert len(kept) == 1, django_branches(platform, pid)
    first = {r["options"] for r in app.records()}
    out = app.test("--keepdb", "-v", "2")
    assert "Using existing test database" in out
    assert {r["options"] for r in app.records()} == first, "the kept branch's endpoint served the second run"
    assert [n for n in django_branches(platform, pid) if n.startswith("django-keep-")] == kept
    assert app.migrated() == 1


def test_a_non_default_branch(platform: RunningPlatform, project: dict[str, Any], tmp_path: Path) -> None:
    pid = project["project"]["id"]
    resp = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "dev"},
                                                                 "endpoints": [{"type": "read_write"}]})
    assert resp.status_code == 201, resp.text
    dev = resp.json()
    app = App(tmp_path, platform, dev["connection_uris"][0]["connection_uri"])
    app.test()
    branches = platform.api.get(f"/projects/{pid}/branches").json()["branches"]
    (template,) = [b for b in branches if b["name"].startswith("django-template-")]
    assert template["parent_id"] == dev["branch"]["id"]


def test_pytest_django_plugin(platform: RunningPlatform, project: dict[str, Any], app: App) -> None:
    """pytest-django with the plugin: the first run builds the template; a run under xdist gives
    each worker a branch of it, its database renamed to pytest-django's per-worker name."""
    # The plugins this run needs, named (pytest-django, xdist, ours): the venv's others (schemathesis,
    # hypothesis, anyio...) would be imported by each of the up to three pytest processes for nothing.
    (app.dir / "pytest.ini").write_text("[pytest]\nDJANGO_SETTINGS_MODULE = seedsite.settings\n"
                                        "python_files = tests.py\naddopts = -p pytest_django.plugin -p xdist.plugin"
                                        " -p argon.django.pytest_plugin\n")
    for args in ([], ["-n", "2"]):
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=app.dir,
                             env={**app.env, "ARGON_TEST_RENDEZVOUS": "2" if args else "1",
                                  "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
                             capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "4 passed" in out.stdout
        assert app.migrated() == 1
        records = app.records()
        assert {r["database"] for r in records} == ({"test_neondb_gw0", "test_neondb_gw1"} if args else {"test_neondb"})
        assert len({r["postmaster"] for r in records}) == (2 if args else 1)
    assert [n for n in django_branches(platform, project["project"]["id"]) if not n.startswith("django-template-")] == []


def test_without_a_key_django_creates_the_database_as_usual(platform: RunningPlatform, project: dict[str, Any],
                                                            app: App) -> None:
    out = app.test(env={"ARGON_API_KEY": ""})
    assert "argon: no API key" in out and "Django creates the test database for alias 'default' as usual" in out
    assert app.migrated() == 1
    assert django_branches(platform, project["project"]["id"]) == []


def test_after_a_restart_the_template_is_reused(tmp_path: Path) -> None:
    """A platform of its own (the session one cannot be stopped), started twice on one data dir. Its
    computes get uids of their own: a project deleted on another platform of this host must not
    share its uid with ours."""
    root = short_tmpdir("dj")
    uids = uid_range()  # the same range for both starts
    try:
        first = RunningPlatform(root, **uids)
        try:
            created = first.create_project(name="restart")
            app = App(tmp_path, first, first.dsn(created))
            app.test()
        finally:
            first.stop()
        second = RunningPlatform(root, **uids)
        try:
            app.env["ARGON_API_URL"] = second.api_url
            app.env["DATABASE_URL"] = app.env["DATABASE_URL"].replace(f":{first.proxy_port}/", f":{second.proxy_port}/")
            app.test()
            assert app.migrated() == 1
        finally:
            second.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

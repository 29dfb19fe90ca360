"""argon.django in a real Django process, without a database: the settings helper without Django,
what the migration state hash follows, and the one-line notices when branches are not possible.
Each case runs in its own Python (Django's settings are configured once per process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "django_app"
ARGON_URL = "postgresql://neondb_owner:pw@127.0.0.1:5432/neondb?sslmode=require&options=endpoint%3Dep-cool-leaf-a1b2c3d4"
SCRIPT = """
import django
django.setup()
from django.db import connection
from argon.django.creation import install
from argon.django.keys import migration_state
print("state", migration_state(connection))
for line in install(verbosity=0):
    print("notice", line)
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    shutil.copytree(APP, tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "app" / "probe.py").write_text(SCRIPT)
    return tmp_path / "app"


def probe(app: Path, **env: str) -> tuple[str, list[str]]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ARGON_", "NEON_"))}
    full.update({"PYTHONPATH": str(app), "DJANGO_SETTINGS_MODULE": "seedsite.settings",
                 "XDG_CONFIG_HOME": str(app / "config"), "DATABASE_URL": ARGON_URL, **env})
    out = subprocess.run([sys.executable, "probe.py"], cwd=app, env=full, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    state = next(line.split()[1] for line in lines if line.startswith("state "))
    return state, [line.removeprefix("notice ") for line in lines if line.startswith("notice ")]


def test_the_settings_helper_needs_no_django() -> None:
    code = ("import sys; sys.modules['django'] = None\n"  # any `import django` now fails
            "import argon.django\n"
            f"print(argon.django.database({ARGON_URL!r})['OPTIONS']['options'])\n"
            "try:\n    argon.django.BranchTestRunner\nexcept ImportError:\n    print('runner needs django')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["endpoint=ep-cool-leaf-a1b2c3d4", "runner", "needs", "django"]


def test_the_template_key_follows_migrations_not_model_code(app: Path) -> None:
    first, _ = probe(app)
    assert probe(app)[0] == first, "the same files give the same key"
    models = app / "notes" / "models.py"
    models.write_text(models.read_text() + "\n    def __str__(self) -> str:\n        return self.title\n")
    assert probe(app)[0] == first, "a model method is no reason to migrate again"
    migration = app / "notes" / "migrations" / "0001_initial.py"
    migration.write_text(migration.read_text().replace("max_length=200", "max_length=300"))
    changed, _ = probe(app)
    assert changed != first
    (app / "notes" / "migrations" / "0003_more.py").write_text(
        "from django.db import migrations\n\n\nclass Migration(migrations.Migration):\n"
        "    dependencies = [('notes', '0002_record')]\n    operations: list[object] = []\n")
    assert probe(app)[0] not in (first, changed)


FILES_SCRIPT = """
import sys
import django
django.setup()
from django.apps import apps
from django.db import connection
from django.db.migrations.loader import MigrationLoader
from argon.django.keys import _migration_files, migration_state
migration_state(connection)
print("imported", sorted(m for m in sys.modules if ".migrations." in m and m.rsplit(".", 1)[1][:1].isdigit()))
loader = MigrationLoader(None, ignore_no_migrations=True)
found = {(c.label, n): str(p) for c in apps.get_app_configs() for n, p in _migration_files(c.label) or []}
print("same", found == {k: sys.modules[type(m).__module__].__file__ for k, m in loader.disk_migrations.items()})
"""


def test_the_key_hashes_the_loaders_migration_files_without_importing_them(app: Path) -> None:
    (app / "files.py").write_text(FILES_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARGON_", "NEON_"))}
    env.update({"PYTHONPATH": str(app), "DJANGO_SETTINGS_MODULE": "seedsite.settings", "DATABASE_URL": ARGON_URL})
    out = subprocess.run([sys.executable, "files.py"], cwd=app, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == ["imported []", "same True"]  # importing hundreds of migrations was most of the cost


def test_notices_when_branches_are_not_possible(app: Path) -> None:
    _, notices = probe(app)
    assert notices == ["argon: no API key (set ARGON_API_KEY or NEON_API_KEY, or run `argon login`); "
                       "Django creates the test database for alias 'default' as usual."]
    _, notices = probe(app, ARGON_API_KEY="k", DATABASE_URL="postgresql://u:p@db.example.com/app")
    assert len(notices) == 1 and "argon: it is plain PostgreSQL" in notices[0]
    _, notices = probe(app, ARGON_API_KEY="k", ARGON_API_URL="http://127.0.0.1:9")
    assert notices == ["argon: cannot reach the API at http://127.0.0.1:9/api/v2 (ConnectError); "
                       "Django creates the test database for alias 'default' as usual."]

"""What a test database template is keyed by, and the names of the branches the runner makes.

A template is a branch holding one migrated database; it is reused as long as two things are
unchanged: *where* it comes from (project, base branch, role, database alias: `ident`) and *what*
migrating produced (`state`: a hash of every migration file, of the models of apps without
migrations, of Django's version and of the test settings that shape the database). Names:

    django-template-<ident>-<state>                    the published template (no compute)
    django-template-<ident>-<state>-build-<nonce>      a template being built (expires)
    django-test-<ident>-<state>-<nonce>[-<n>]          one run's database, its --parallel clones (expire)
    django-keep-<ident>-<state>-<db>[-<n>]             the --keepdb database (kept)

Publishing a template is renaming its builder; branch names are unique in a project, so two runs
building at once cannot both publish (the second gets 409 and uses the first's).
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEME = "argon-django-template/1"  # bump to invalidate every template when the recipe changes
TEMPLATE_DB = "django_test_template"  # the database's name inside a template; runs rename it


def _short(*parts: object, size: int = 8) -> str:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:size]


@dataclass(frozen=True)
class BranchNames:
    ident: str
    state: str

    @property
    def template(self) -> str:
        return f"django-template-{self.ident}-{self.state}"

    @property
    def template_prefix(self) -> str:
        return f"django-template-{self.ident}-"

    def builder(self) -> str:
        return f"{self.template}-build-{secrets.token_hex(3)}"

    def run(self) -> str:
        return f"django-test-{self.ident}-{self.state}-{secrets.token_hex(3)}"

    def keep(self, test_db: str, suffix: str | None = None) -> str:
        return f"django-keep-{self.ident}-{self.state}-{_short(test_db)}" + (f"-{suffix}" if suffix else "")

    @property
    def keep_prefix(self) -> str:
        return f"django-keep-{self.ident}-"


def names_for(*, project_id: str, base_branch_id: str, user: str, alias: str, state: str) -> BranchNames:
    return BranchNames(ident=_short(project_id, base_branch_id, user, alias), state=state[:12])


def _module_files(module: Any) -> list[Path]:
    """The source files of a module, or of every module of a package."""
    paths = getattr(module, "__path__", None)
    if paths:
        return sorted(p for root in paths for p in Path(root).rglob("*.py"))
    file = getattr(module, "__file__", None)
    return [Path(file)] if file else []


def migration_state(connection: Any) -> str:
    """A hash of everything `migrate --run-syncdb` builds the test database from. Needs Django set up."""
    import django
    from django.apps import apps
    from django.db.migrations.loader import MigrationLoader

    digest = hashlib.sha256(f"{SCHEME}\0django={django.get_version()}".encode())
    test = connection.settings_dict.get("TEST") or {}
    migrate = test.get("MIGRATE", True) is not False
    digest.update(repr((test.get("CHARSET"), test.get("TEMPLATE"), migrate)).encode())

    def add(label: str, path: Path) -> None:
        digest.update(f"\0{label}\0{path.name}\0".encode())
        digest.update(path.read_bytes())

    unmigrated = {c.label for c in apps.get_app_configs()}
    if migrate:
        loader = MigrationLoader(None, ignore_no_migrations=True)
        for (app_label, name), migration in sorted(loader.disk_migrations.items()):
            module = sys.modules.get(type(migration).__module__)
            for path in _module_files(module):
                add(f"{app_label}.{name}", path)
        unmigrated = set(loader.unmigrated_apps)
    for config in sorted(apps.get_app_configs(), key=lambda c: c.label):
        if config.label in unmigrated and config.models_module is not None:
            for path in _module_files(config.models_module):
                add(f"{config.label}.models", path)
    return digest.hexdigest()

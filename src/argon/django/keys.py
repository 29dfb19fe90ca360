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
import importlib
import pkgutil
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEME = "argon-django-template/1"  # bump to invalidate every template when the recipe changes
TEMPLATE_DB = "django_test_template"  # the database's name inside templates built before it took the test name


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


def _migration_files(app_label: str) -> list[tuple[str, Path]] | None:
    """The migration files of an app as Django's MigrationLoader.load_disk finds them (same
    module, same rules), without importing the migrations themselves: None for an app without
    migrations. Importing and instantiating hundreds of migrations is most of what hashing cost."""
    from django.db.migrations.loader import MIGRATIONS_MODULE_NAME, MigrationLoader

    module_name, explicit = MigrationLoader.migrations_module(app_label)
    if module_name is None:
        return None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if explicit or MIGRATIONS_MODULE_NAME in (exc.name or "").split("."):
            return None  # the loader's ignore_no_migrations=True, as the runner's hash always used
        raise
    if not hasattr(module, "__path__"):
        return None  # a migrations.py module, not a package
    if getattr(module, "__file__", None) is None and not isinstance(module.__path__, list):
        return None  # an empty directory: a namespace package
    found = []
    for info in pkgutil.iter_modules(module.__path__):
        if info.ispkg or info.name[0] in "_~":
            continue
        spec = info.module_finder.find_spec(f"{module_name}.{info.name}", None)  # type: ignore[call-arg]
        origin = getattr(spec, "origin", None)
        if origin is None:
            raise ImportError(f"cannot find the file of migration {module_name}.{info.name}")
        found.append((info.name, Path(origin)))
    return found


def migration_state(connection: Any) -> str:
    """A hash of everything `migrate --run-syncdb` builds the test database from. Needs Django set up."""
    import django
    from django.apps import apps

    digest = hashlib.sha256(f"{SCHEME}\0django={django.get_version()}".encode())
    test = connection.settings_dict.get("TEST") or {}
    migrate = test.get("MIGRATE", True) is not False
    digest.update(repr((test.get("CHARSET"), test.get("TEMPLATE"), migrate)).encode())

    def add(label: str, path: Path) -> None:
        digest.update(f"\0{label}\0{path.name}\0".encode())
        digest.update(path.read_bytes())

    unmigrated = {c.label for c in apps.get_app_configs()}
    if migrate:
        files = {}
        for config in apps.get_app_configs():
            found = _migration_files(config.label)
            if found is not None:
                unmigrated.discard(config.label)
                files.update({(config.label, name): path for name, path in found})
        for (app_label, name), path in sorted(files.items()):
            add(f"{app_label}.{name}", path)
    for config in sorted(apps.get_app_configs(), key=lambda c: c.label):
        if config.label in unmigrated and config.models_module is not None:
            for path in _module_files(config.models_module):
                add(f"{config.label}.models", path)
    return digest.hexdigest()

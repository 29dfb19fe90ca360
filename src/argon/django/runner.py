"""`TEST_RUNNER = "argon.django.BranchTestRunner"`: Django's DiscoverRunner whose test databases are
branches of a migrated template (see argon.django.creation).

With `--parallel N` every worker gets a branch of its own. Forked workers inherit the creation
objects; spawned ones (macOS, or a start method set to spawn) build fresh ones, so the worker
initialiser teaches Django's base class to read the clone's settings from the settings dict.
"""

from __future__ import annotations

from typing import Any

from django.db.backends.base.creation import BaseDatabaseCreation
from django.test.runner import DiscoverRunner, ParallelTestSuite
from django.test.runner import _init_worker as _django_init_worker

from argon.django.creation import clone_settings, install


def _init_worker(counter: Any, *args: Any, **kwargs: Any) -> None:
    """ParallelTestSuite's worker initialiser (module level: spawned workers import it by name)."""
    original = BaseDatabaseCreation.get_test_db_clone_settings
    if not getattr(original, "argon", False):
        def get_test_db_clone_settings(self: BaseDatabaseCreation, suffix: Any) -> dict[str, Any]:
            found = clone_settings(self.connection.settings_dict, suffix)
            return found if found is not None else original(self, suffix)

        get_test_db_clone_settings.argon = True  # type: ignore[attr-defined]
        BaseDatabaseCreation.get_test_db_clone_settings = get_test_db_clone_settings  # type: ignore[method-assign]
    _django_init_worker(counter, *args, **kwargs)


class BranchParallelTestSuite(ParallelTestSuite):
    init_worker = _init_worker


class BranchTestRunner(DiscoverRunner):
    """DiscoverRunner with test databases as branches (Argon or Neon), Django's own otherwise."""

    parallel_test_suite = BranchParallelTestSuite

    def setup_databases(self, **kwargs: Any) -> Any:
        install(kwargs.get("aliases"), verbosity=self.verbosity, workers=self.parallel)
        return super().setup_databases(**kwargs)

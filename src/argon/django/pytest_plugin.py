"""pytest-django plugin: the test databases of `pytest` runs are branches, as with BranchTestRunner.

Enable it with `-p argon.django.pytest_plugin` (in `addopts`, say) or `pytest_plugins =
["argon.django.pytest_plugin"]` in the top conftest.py. `--reuse-db` keeps the test database (a
kept branch), `--create-db` starts again from the template; under pytest-xdist each worker gets a
branch of the same template.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef: Any, request: pytest.FixtureRequest) -> None:
    """Just before pytest-django's `django_db_setup` creates the test databases, let them be
    branches (returns None, so pytest goes on to run the fixture itself)."""
    if fixturedef.argname == "django_db_setup":
        from argon.django.creation import install

        install(verbosity=request.config.option.verbose)

"""Django on Argon (and Neon): a settings helper and test databases that are branches.

    DATABASES = {"default": argon.django.database(os.environ["DATABASE_URL"])}
    TEST_RUNNER = "argon.django.BranchTestRunner"

`database` needs no Django (settings.py runs it first); the runner is imported on first use.
The pytest-django plugin is `argon.django.pytest_plugin`.
"""

from __future__ import annotations

from typing import Any

from argon.django.connstr import ConnectionStringError, database

__all__ = ["BranchTestRunner", "ConnectionStringError", "database"]


def __getattr__(name: str) -> Any:
    if name == "BranchTestRunner":
        from argon.django.runner import BranchTestRunner

        return BranchTestRunner
    raise AttributeError(f"module 'argon.django' has no attribute {name!r}")

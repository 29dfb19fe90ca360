"""Shared test configuration: fixtures live in tests/fixtures and are registered here.

The suite runs on two pytest-xdist workers (`-n 2 --dist loadfile` in pyproject's addopts): each
test file runs whole on one worker, so module fixtures and module-level state stay within one
process. What is per worker, and how a test gets its own port, uid range and platform, is in
tests/README.md.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures.platform", "tests.fixtures.s3"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with the most `slow` tests first (otherwise in their usual order): with
    `--no-loadscope-reorder` xdist hands out files in this order, so the long ones start early and
    the many short ones fill in at the end instead of one long file running alone at the end.
    Deterministic, as xdist requires every worker to collect the same order."""
    slow: dict[str, int] = {}
    for item in items:
        if item.get_closest_marker("slow") is not None:
            slow[item.nodeid.split("::")[0]] = slow.get(item.nodeid.split("::")[0], 0) + 1
    if slow:
        position = {item.nodeid: n for n, item in enumerate(items)}
        items.sort(key=lambda item: (-slow.get(item.nodeid.split("::")[0], 0), position[item.nodeid]))

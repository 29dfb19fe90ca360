"""Shared test configuration: fixtures live in tests/fixtures and are registered here.

The suite runs on two pytest-xdist workers (`-n 2 --dist loadfile` in pyproject's addopts): each
test file runs whole on one worker, so module fixtures and module-level state stay within one
process. The files are handed out longest first, by the seconds each took in a measured whole run
(tests/durations.json, rewritten by `--store-durations`). What is per worker, and how a test gets
its own port, uid range and platform, is in tests/README.md.
"""

from __future__ import annotations

import compileall
import json
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures.platform", "tests.fixtures.s3"]

DURATIONS = Path(__file__).resolve().parent / "durations.json"
# A file not in durations.json counts this much per test: slow, other integration or browser, unit.
UNMEASURED_SECONDS = {"slow": 20.0, "other": 1.0, "unit": 0.1}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store-durations", action="store_true",
                     help="write each file's seconds in this run to tests/durations.json (after a whole run)")


def file_seconds() -> dict[str, float]:
    try:
        measured = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in measured.get("files", {}).items()}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files longest first (by tests/durations.json; a file not there by its tests: `slow` ones count most),
    otherwise in their usual order: with `--no-loadscope-reorder` xdist hands out files in this order,
    so the long ones start early and the many short ones fill in at the end, and neither worker is
    left running one long file alone. Deterministic, as xdist requires every worker to collect the
    same order."""
    measured = file_seconds()
    guess: dict[str, float] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        kind = ("slow" if item.get_closest_marker("slow") else "unit" if path.startswith("tests/unit/")
                else "other")
        guess[path] = guess.get(path, 0.0) + UNMEASURED_SECONDS[kind]
    seconds = {path: measured.get(path, estimate) for path, estimate in guess.items()}
    position = {item.nodeid: n for n, item in enumerate(items)}
    items.sort(key=lambda item: (-seconds[item.nodeid.split("::")[0]], position[item.nodeid]))


class _Durations:
    """`--store-durations`: on the controller (or a run without xdist), each file's setup, call and
    teardown seconds added up, written to tests/durations.json at the end of the session."""

    def __init__(self) -> None:
        self.files: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        path = report.nodeid.split("::")[0]
        self.files[path] = self.files.get(path, 0.0) + report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        known = file_seconds()  # a partial run updates the files it ran
        known.update({path: round(s, 1) for path, s in self.files.items()})
        body = {"note": "seconds per test file in a whole run, for the order files are handed out in "
                        "(tests/conftest.py); rewrite with `python -m pytest --store-durations`",
                "files": dict(sorted(known.items(), key=lambda kv: -kv[1]))}
        DURATIONS.write_text(json.dumps(body, indent=1) + "\n")


def compile_argon() -> None:
    """Write argon's bytecode once, before any test starts `argon up` or the CLI as a subprocess (the suite
    starts hundreds): with PYTHONDONTWRITEBYTECODE set (or a source tree nobody imported yet) every one of
    them would compile its ~150 modules again, ~0.5 s of CPU a start on 2 loaded cores. An installed
    package has its bytecode already; this makes the source tree behave the same."""
    import argon

    compileall.compile_dir(Path(argon.__file__).parent, quiet=2)  # not writable (another user's tree): as before


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # once, on the controller, before the workers start
        compile_argon()
    if config.getoption("--store-durations") and not hasattr(config, "workerinput"):  # not in an xdist worker
        config.pluginmanager.register(_Durations(), "argon-store-durations")

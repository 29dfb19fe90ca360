"""Density (ADR 0022) on the session's platform: reads measure nothing (the storage figures are kept in
the background and read from memory), the figures follow a suspend on their own, and an idle
project's disk stays within the template's size bound."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from argon.control import figures as figures_module
from argon.storage.usage import disk_usage
from tests.fixtures.platform import RunningPlatform

pytestmark = pytest.mark.pg

MB = 1 << 20
IDLE_PROJECT_BOUND = 45 * MB  # an idle fresh project on the copy backend (was ~74 MB: ADR 0022)


def wait_for(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return got


def idle(platform: RunningPlatform, pid: str, ep: str) -> None:
    wait_for("the first start", lambda: platform.endpoint(pid, ep)["current_state"] == "active")
    assert platform.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200


def test_reads_never_walk_a_disk_nor_run_pg_controldata(platform: RunningPlatform, project: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pid, bid, ep = project["project"]["id"], project["branch"]["id"], project["endpoints"][0]["id"]
    figures = platform.control.figures
    platform.call(figures.settle())
    known = figures.get(bid)
    assert known.logical_size > 5_000_000
    calls: list[str] = []
    control_data = figures_module.wal.control_data

    def walked(path: Any) -> Any:
        calls.append(f"walk {path}")
        return disk_usage(path)

    def controldata(*args: Any, **kwargs: Any) -> Any:
        calls.append("pg_controldata")
        return control_data(*args, **kwargs)

    platform.call(figures.stop())  # the background measures nothing meanwhile: whatever runs is a read's
    try:
        monkeypatch.setattr(figures_module, "disk_usage", walked)
        monkeypatch.setattr(figures_module, "wal", SimpleNamespace(control_data=controldata,
                                                                   parse_lsn=figures_module.wal.parse_lsn))
        figures.touch(bid)  # even a branch that is due is not measured by a read
        for path in ("/projects?limit=400", f"/projects/{pid}", f"/projects/{pid}/branches",
                     f"/projects/{pid}/branches/{bid}", f"/projects/{pid}/endpoints", f"/projects/{pid}/endpoints/{ep}"):
            assert platform.api.get(path).status_code == 200, path
        assert calls == []
        listed = platform.api.get("/projects?limit=400").json()["projects"]
        assert next(p for p in listed if p["id"] == pid)["synthetic_storage_size"] == figures.project_bytes(pid) > 0
        branch = platform.api.get(f"/projects/{pid}/branches/{bid}").json()["branch"]
        assert branch["logical_size"] == known.logical_size  # from memory
    finally:
        platform.call(_restart(figures))


async def _restart(figures: figures_module.Figures) -> None:
    figures.start()


def test_figures_follow_a_suspend_in_the_background(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, bid, ep = project["project"]["id"], project["branch"]["id"], project["endpoints"][0]["id"]
    figures = platform.control.figures
    before = figures.get(bid).logical_size  # before the write: a running branch is measured every 15 s,
    # and a look after the CREATE would already count the table (seen on a busy machine)
    with psycopg.connect(platform.dsn(project), autocommit=True) as conn:
        conn.execute("CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 30000) g")
    assert platform.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200
    # nobody asks for them: the background sees the suspend (the endpoint's record changed) and measures;
    # the WAL written shows once the stop's checkpoint is in the control file
    after = wait_for("the figures to follow the suspend", lambda: (f := figures.get(bid)).logical_size
                     >= before + 5_000_000 and f.written_data_bytes >= 5_000_000 and f)
    listed = platform.api.get(f"/projects/{pid}/branches").json()["branches"]
    assert listed[0]["logical_size"] == after.logical_size


def test_an_idle_project_stays_within_the_template_bound(platform: RunningPlatform) -> None:
    """A fresh project after its first start and suspend: its data directory, WAL recycled for later
    left out (min_wal_size is initdb's), and its history, whose base snapshot is the shared template
    (not a copy of it)."""
    if platform.plane.backend.name != "copy":
        pytest.skip("the bound is the copy backend's (a reflink clone shares the template's blocks)")
    created = platform.create_project(name="idle", default_endpoint_settings={"suspend_timeout_seconds": 1})
    pid, bid, ep = created["project"]["id"], created["branch"]["id"], created["endpoints"][0]["id"]
    try:
        idle(platform, pid, ep)
        platform.call(platform.plane.drain())
        layout = platform.plane.layout
        history = disk_usage(layout.branch_dir(pid, bid) / "history").allocated
        assert history < 2 * MB, history  # a manifest and the WAL archived since: no copy of the template
        template = disk_usage(platform.plane.templates[created["project"]["pg_version"]]).allocated
        total = disk_usage(layout.project_dir(pid)).allocated
        assert total <= IDLE_PROJECT_BOUND and total < template + 10 * MB, (total, template)
    finally:
        platform.delete_project(pid)

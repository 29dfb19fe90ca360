"""Storage figures in the API are measured: they grow with the data a branch holds and writes."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from argon.control.figures import TTL, BranchFigures
from tests.fixtures.platform import RunningPlatform

pytestmark = pytest.mark.pg


def test_storage_figures_follow_the_data(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, bid = project["project"]["id"], project["branch"]["id"]
    ep = project["endpoints"][0]["id"]

    def figures() -> tuple[dict[str, Any], dict[str, Any]]:
        platform.control.figures.forget(bid)  # skip the few seconds of caching
        b = platform.api.get(f"/projects/{pid}/branches/{bid}").json()["branch"]
        p = platform.api.get(f"/projects/{pid}").json()["project"]
        return b, p

    before, project_before = figures()
    assert before["logical_size"] > 5_000_000  # the template's databases alone
    assert project_before["synthetic_storage_size"] > before["logical_size"]
    with psycopg.connect(platform.dsn(project), autocommit=True) as conn:
        conn.execute("CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 50000) g")
    assert platform.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200  # a checkpoint
    after, project_after = figures()
    assert after["logical_size"] >= before["logical_size"] + 10_000_000
    assert after["written_data_bytes"] >= before["written_data_bytes"] + 10_000_000
    assert project_after["synthetic_storage_size"] >= project_before["synthetic_storage_size"] + 10_000_000
    assert project_after["written_data_bytes"] >= after["written_data_bytes"]
    listed = platform.api.get(f"/projects/{pid}/branches").json()["branches"]
    assert listed[0]["logical_size"] == after["logical_size"]


def test_stale_figures_are_served_while_measured_again(platform: RunningPlatform, project: dict[str, Any]) -> None:
    """An API read never waits for a walk of the branch's files once it has figures: stale ones are
    answered and measured again in the background (new branches are measured at once)."""
    pid, bid = project["project"]["id"], project["branch"]["id"]
    figures = platform.control.figures
    fresh = platform.api.get(f"/projects/{pid}/branches/{bid}").json()["branch"]
    assert fresh["logical_size"] > 5_000_000  # measured on the first read
    old = time.monotonic() - TTL - 1
    figures._branches[bid] = (old, BranchFigures(logical_size=1, written_data_bytes=1, allocated_bytes=1))
    assert platform.api.get(f"/projects/{pid}/branches/{bid}").json()["branch"]["logical_size"] == 1
    deadline = time.monotonic() + 30
    while figures._branches[bid][0] == old:
        assert time.monotonic() < deadline, "the stale figures were never measured again"
        time.sleep(0.05)
    assert figures.get(bid).logical_size > 5_000_000

"""Storage figures in the API are measured: they grow with the data a branch holds and writes."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.fixtures.platform import RunningPlatform

pytestmark = pytest.mark.pg


def test_storage_figures_follow_the_data(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, bid = project["project"]["id"], project["branch"]["id"]
    ep = project["endpoints"][0]["id"]

    def figures() -> tuple[dict[str, Any], dict[str, Any]]:
        platform.control.figures.touch(bid)  # measured now rather than at the next tick
        platform.call(platform.control.figures.settle())
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

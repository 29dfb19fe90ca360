"""The pooled host on a whole platform: what the API says about it, its pools as the API shows
them, and pooled clients that outlive suspends (ADR 0017)."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from tests.fixtures.platform import RunningPlatform
from tests.integration.test_ops import ids, scrape, value

pytestmark = pytest.mark.pg


def pooled_dsn(project: dict[str, Any]) -> str:
    uri = project["connection_uris"][0]["connection_uri"]
    eid = project["endpoints"][0]["id"]
    return uri.replace(f"endpoint%3D{eid}", f"endpoint%3D{eid}-pooler")


def test_the_api_describes_the_pooler_and_refuses_to_turn_it_off(platform: RunningPlatform,
                                                                   project: dict[str, Any]) -> None:
    pid, eid = project["project"]["id"], project["endpoints"][0]["id"]
    ep = platform.endpoint(pid, eid)
    assert ep["pooler_enabled"] is True and ep["pooler_mode"] == "transaction"
    ok = platform.api.patch(f"/projects/{pid}/endpoints/{eid}",
                            json={"endpoint": {"pooler_enabled": True, "pooler_mode": "transaction"}})
    assert ok.status_code == 200, ok.text
    off = platform.api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": {"pooler_enabled": False}})
    assert off.status_code == 400 and "pooler_enabled" in off.json()["message"]
    session = platform.api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": {"pooler_mode": "session"}})
    assert session.status_code == 400 and "transaction" in session.json()["message"]


def test_pools_as_the_api_shows_them(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, eid = project["project"]["id"], project["endpoints"][0]["id"]
    conns = [psycopg.connect(pooled_dsn(project), autocommit=True) for _ in range(5)]
    try:
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with conns[0].transaction():
            conns[0].execute("SELECT 1")
            pools = platform.api.get(f"/projects/{pid}/endpoints/{eid}/pooler").json()["pools"]
            metrics = scrape(platform)
        assert len(pools) == 1
        pool = pools[0]
        assert pool["database"] == "neondb" and pool["user"] == "neondb_owner" and pool["pool_mode"] == "transaction"
        assert pool["cl_active"] == 1 and pool["cl_idle"] == 4 and pool["cl_waiting"] == 0
        assert pool["sv_active"] == 1 and pool["total_xact_count"] >= 5
        assert pool["pool_size"] == 93  # 90% of a 0.25 CU compute's max_connections (104)
        labels = ids(project)  # /metrics shows the same figures
        assert value(metrics, "argon_pool_clients", **labels, state="active") == 1
        assert value(metrics, "argon_pool_clients", **labels, state="idle") == 4
        assert value(metrics, "argon_pool_servers", **labels, state="active") == 1
        assert value(metrics, "argon_pool_transactions_total", **labels) >= 5
        assert value(metrics, "argon_backup_enabled") == 0  # the test platform backs up nothing
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.slow
def test_idle_pooled_clients_outlive_suspends(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, eid = project["project"]["id"], project["endpoints"][0]["id"]
    platform.api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": {"suspend_timeout_seconds": 1}})
    conns = [psycopg.connect(pooled_dsn(project), autocommit=True) for _ in range(20)]
    try:
        for round_ in range(2):
            for conn in conns:
                assert conn.execute("SELECT %s::int", (round_,)).fetchone() == (round_,)
            deadline = time.monotonic() + 30
            while platform.endpoint(pid, eid)["current_state"] != "idle":
                assert time.monotonic() < deadline, "the endpoint did not suspend"
                time.sleep(0.1)
        for conn in conns:  # each woke (or found awake) the compute and ran, on the same connection
            assert conn.execute("SELECT 42").fetchone() == (42,) and not conn.closed
    finally:
        for conn in conns:
            conn.close()

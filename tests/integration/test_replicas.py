"""Read replicas (read_only endpoints): a hot standby of the branch that follows its primary within
seconds, refuses writes, keeps serving while the primary is suspended, and is rebuilt after a reset;
neonctl's `branches add-compute` (read_only by default) works."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from tests.fixtures.platform import RunningPlatform
from tests.integration.test_branches import scalar

pytestmark = pytest.mark.pg


def eventually(fn: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
            if value:
                return value
        except psycopg.Error:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("not reached in time")
        time.sleep(0.2)


def test_read_replica_follows_its_primary(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, bid = project["project"]["id"], project["branch"]["id"]
    primary_ep = project["endpoints"][0]["id"]
    uri = platform.dsn(project)
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (v int)")
        conn.execute("INSERT INTO t VALUES (1)")
    resp = platform.api.post(f"/projects/{pid}/endpoints", json={"endpoint": {"branch_id": bid, "type": "read_only"}})
    assert resp.status_code == 201, resp.text
    ro = resp.json()["endpoint"]
    assert ro["type"] == "read_only"
    ro_uri = uri.replace(primary_ep, ro["id"])
    assert scalar(ro_uri, "SELECT pg_is_in_recovery()") is True
    assert scalar(ro_uri, "SELECT count(*) FROM t") == 1  # same role, same password, the branch's data
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), psycopg.connect(ro_uri) as conn:
        conn.execute("INSERT INTO t VALUES (99)")
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("INSERT INTO t SELECT generate_series(2, 1000)")
    eventually(lambda: scalar(ro_uri, "SELECT count(*) FROM t") == 1000)  # it follows the primary
    # The primary suspended: the replica keeps serving what it has; new writes wake the primary
    # and reach the replica again.
    assert platform.api.post(f"/projects/{pid}/endpoints/{primary_ep}/suspend").status_code == 200
    assert scalar(ro_uri, "SELECT count(*) FROM t") == 1000
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (1001)")
    eventually(lambda: scalar(ro_uri, "SELECT max(v) FROM t") == 1001)
    # The replica itself suspends and wakes like any compute.
    assert platform.api.post(f"/projects/{pid}/endpoints/{ro['id']}/suspend").status_code == 200
    assert scalar(ro_uri, "SELECT count(*) FROM t") == 1001
    logs = platform.api.get(f"/projects/{pid}/endpoints/{ro['id']}/logs").text
    assert "FATAL" not in logs, logs[-2000:]
    # Reset the branch (new data): the replica copies the new state at its next start.
    child = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "c"},
                                                                   "endpoints": [{"type": "read_write"}]}).json()
    c_uri = child["connection_uris"][0]["connection_uri"]
    with psycopg.connect(c_uri, autocommit=True) as conn:
        conn.execute("DELETE FROM t WHERE v > 10")
    resp = platform.api.post(f"/projects/{pid}/branches/{bid}/restore",
                             json={"source_branch_id": child["branch"]["id"]})
    assert resp.status_code == 200, resp.text
    eventually(lambda: scalar(ro_uri, "SELECT count(*) FROM t") == 10)
    assert platform.api.delete(f"/projects/{pid}/endpoints/{ro['id']}").status_code == 200
    assert not platform.plane.layout.replica_dir(pid, bid, ro["id"]).exists()

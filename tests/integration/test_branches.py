"""Branches from the parent's head, through the API and real clients: inheritance, divergence,
transactional consistency under pgbench write load, a stopped parent, deletion rules."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import psycopg
import pytest

from tests.fixtures.platform import RunningPlatform

pytestmark = pytest.mark.pg


@pytest.fixture(scope="module", params=["copy", "reflink"])
def platform(request: pytest.FixtureRequest, platform: RunningPlatform) -> RunningPlatform:
    """Every branching test runs on both clone backends: the session's platform (this machine's
    filesystem: plain copies on ext4) and one on a loop-mounted XFS volume (reflinks; root only)."""
    if request.param == "copy":
        return platform
    reflink: RunningPlatform = request.getfixturevalue("reflink_platform")
    assert reflink.plane.backend.name == "reflink"
    return reflink


def wait_for(predicate: Any, timeout: float = 20, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def branch(platform: RunningPlatform, project_id: str, **spec: Any) -> dict[str, Any]:
    resp = platform.api.post(f"/projects/{project_id}/branches",
                             json={"branch": spec, "endpoints": [{"type": "read_write"}]})
    assert resp.status_code == 201, resp.text
    return resp.json()


def uri_of(created: dict[str, Any]) -> str:
    return str(created["connection_uris"][0]["connection_uri"])


def scalar(uri: str, sql: str) -> Any:
    with psycopg.connect(uri, connect_timeout=20) as conn:
        row = conn.execute(sql).fetchone()
        return row[0] if row else None


def test_branch_inherits_and_diverges(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid = project["project"]["id"]
    parent_uri = platform.dsn(project)
    with psycopg.connect(parent_uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (v int)")
        conn.execute("INSERT INTO t VALUES (1)")
    bid = project["branch"]["id"]
    resp = platform.api.post(f"/projects/{pid}/branches/{bid}/databases",
                             json={"database": {"name": "reports", "owner_name": "neondb_owner"}})
    assert resp.status_code == 201, resp.text
    created = branch(platform, pid, name="dev")  # parent running: online backup protocol
    b = created["branch"]
    assert b["parent_id"] == project["branch"]["id"] and b["name"] == "dev" and b["parent_lsn"]
    assert [r["name"] for r in created["roles"]] == ["neondb_owner"]
    # Every database of the parent is the branch's too, each its own row.
    assert {d["name"] for d in created["databases"]} == {"neondb", "reports"}
    listed_dbs = platform.api.get(f"/projects/{pid}/branches/{b['id']}/databases").json()["databases"]
    assert {d["name"] for d in listed_dbs} == {"neondb", "reports"}
    assert len({d["id"] for d in listed_dbs}) == 2
    ep = created["endpoints"][0]["id"]
    assert ep != project["endpoints"][0]["id"]
    child_uri = uri_of(created)
    # Same role, same password, another endpoint: the parent's password works on the branch.
    assert project["connection_uris"][0]["connection_parameters"]["password"] in child_uri
    assert scalar(child_uri, "SELECT count(*) FROM t") == 1
    with psycopg.connect(child_uri, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (2)")
    with psycopg.connect(parent_uri, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (3)")
    assert scalar(child_uri, "SELECT array_agg(v ORDER BY v)::text FROM t") == "{1,2}"
    assert scalar(parent_uri, "SELECT array_agg(v ORDER BY v)::text FROM t") == "{1,3}"
    listed = platform.api.get(f"/projects/{pid}/branches").json()
    assert {x["name"] for x in listed["branches"]} == {"main", "dev"} and listed["annotations"] == {}
    # A branch of a suspended parent is a plain copy of the stopped cluster.
    assert platform.api.post(f"/projects/{pid}/endpoints/{project['endpoints'][0]['id']}/suspend").status_code == 200
    wait_for(lambda: platform.endpoint(pid, project["endpoints"][0]["id"])["current_state"] == "idle")
    cold = branch(platform, pid, name="from-stopped")
    assert scalar(uri_of(cold), "SELECT array_agg(v ORDER BY v)::text FROM t") == "{1,3}"
    # Deleting: children first; never the default branch.
    resp = platform.api.delete(f"/projects/{pid}/branches/{project['branch']['id']}")
    assert resp.status_code == 412 and "default branch" in resp.json()["message"]
    for doomed in (created, cold):
        assert platform.api.delete(f"/projects/{pid}/branches/{doomed['branch']['id']}").status_code == 200
    assert platform.api.get(f"/projects/{pid}/branches/{b['id']}").status_code == 404
    wait_for(lambda: not platform.plane.layout.branch_dir(pid, b["id"]).exists(), timeout=60)  # removed in the background
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(child_uri, connect_timeout=10)


def test_branch_under_write_load_is_consistent(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid = project["project"]["id"]
    uri = platform.dsn(project)
    init = subprocess.run(["pgbench", "-i", "-s", "2", "-q", uri], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    load = subprocess.Popen(["pgbench", "-c", "4", "-j", "2", "-T", "6", "-n", uri],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        with psycopg.connect(uri) as conn:
            committed_before = conn.execute("SELECT count(*) FROM pgbench_history").fetchone()[0]
        created = branch(platform, pid, name="under-load")
    finally:
        _out, err = load.communicate(timeout=60)
    assert load.returncode == 0, err
    child = uri_of(created)
    with psycopg.connect(child, connect_timeout=20) as conn:
        sums = conn.execute(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches),"
            " (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
            " (SELECT count(*) FROM pgbench_history)").fetchone()
    assert sums[0] == sums[1] == sums[2] == sums[3], sums  # every transaction whole, or not at all
    assert sums[4] >= committed_before > 0  # nothing committed before the request is missing
    with psycopg.connect(uri) as conn:
        assert conn.execute("SELECT count(*) FROM pgbench_history").fetchone()[0] > sums[4]  # the parent went on
    platform.api.delete(f"/projects/{pid}/branches/{created['branch']['id']}")


def test_branch_requests_are_validated(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid = project["project"]["id"]
    resp = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"parent_id": "br-nope-nope-12345678"}})
    assert resp.status_code == 404
    resp = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "main"}})
    assert resp.status_code == 409
    resp = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"parent_lsn": "0/1"}})
    assert resp.status_code == 400 and "before the start" in resp.json()["message"]
    # No endpoints asked for: a branch without compute (neonctl --no-compute).
    resp = platform.api.post(f"/projects/{pid}/branches", json={"endpoints": []})
    assert resp.status_code == 201 and resp.json()["endpoints"] == [] and resp.json()["connection_uris"] == []
    bid = resp.json()["branch"]["id"]
    assert resp.json()["branch"]["name"] == bid
    assert platform.api.patch(f"/projects/{pid}/branches/{bid}", json={"branch": {"protected": True}}).json()[
        "branch"]["protected"] is True
    assert platform.api.delete(f"/projects/{pid}/branches/{bid}").status_code == 412
    platform.api.patch(f"/projects/{pid}/branches/{bid}", json={"branch": {"protected": False, "name": "renamed"}})
    assert platform.api.get(f"/projects/{pid}/branches/{bid}").json()["branch"]["name"] == "renamed"
    resp = platform.api.post(f"/projects/{pid}/branches/{bid}/set_as_default")
    assert resp.status_code == 200 and resp.json()["branch"]["default"] is True
    assert platform.api.get(f"/projects/{pid}/branches/{project['branch']['id']}").json()["branch"]["default"] is False


def test_reset_from_parent_keeps_ids_and_can_preserve(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid = project["project"]["id"]
    parent_uri = platform.dsn(project)
    with psycopg.connect(parent_uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE r (v text)")
        conn.execute("INSERT INTO r VALUES ('parent-1')")
    child = branch(platform, pid, name="feature")
    child_uri = uri_of(child)
    bid = child["branch"]["id"]
    with psycopg.connect(child_uri, autocommit=True) as conn:
        conn.execute("INSERT INTO r VALUES ('child-work')")
    with psycopg.connect(parent_uri, autocommit=True) as conn:
        conn.execute("INSERT INTO r VALUES ('parent-2')")
    idle_client = psycopg.connect(child_uri, autocommit=True)  # connected through the reset
    resp = platform.api.post(f"/projects/{pid}/branches/{bid}/restore",
                             json={"source_branch_id": project["branch"]["id"], "preserve_under_name": "feature-old"})
    assert resp.status_code == 200, resp.text
    restored = resp.json()["branch"]
    assert restored["id"] == bid and restored["name"] == "feature"
    with pytest.raises(psycopg.OperationalError):  # a clean Postgres error, then reconnect
        idle_client.execute("SELECT 1")
    idle_client.close()
    # Same connection string, the parent's current data.
    assert scalar(child_uri, "SELECT string_agg(v, ',' ORDER BY v) FROM r") == "parent-1,parent-2"
    backup = platform.api.get(f"/projects/{pid}/branches/{restored['parent_id']}").json()["branch"]
    assert backup["name"] == "feature-old"
    # The old state lives on in the preserved branch (give it a compute to look).
    ep = platform.api.post(f"/projects/{pid}/endpoints", json={"endpoint": {"branch_id": backup["id"],
                                                                             "type": "read_write"}})
    assert ep.status_code == 201, ep.text
    ep_id = ep.json()["endpoint"]["id"]
    old_uri = child_uri.replace(child["endpoints"][0]["id"], ep_id)
    assert scalar(old_uri, "SELECT string_agg(v, ',' ORDER BY v) FROM r") == "child-work,parent-1"
    resp = platform.api.post(f"/projects/{pid}/branches/{bid}/restore", json={"source_branch_id": bid})
    assert resp.status_code == 400


def test_expired_branches_are_deleted_with_their_computes(platform: RunningPlatform, project: dict[str, Any]) -> None:
    from datetime import UTC, datetime, timedelta

    pid = project["project"]["id"]
    # far enough ahead that a slow POST on a loaded machine still sends a future time
    soon = (datetime.now(UTC) + timedelta(seconds=8)).isoformat().replace("+00:00", "Z")
    created = branch(platform, pid, name="ephemeral", expires_at=soon)
    bid, ep = created["branch"]["id"], created["endpoints"][0]["id"]
    assert created["branch"]["expires_at"]
    later = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    kept = branch(platform, pid, name="kept", expires_at=later)
    # An explicit null clears the expiry; a past time or the default branch are refused.
    resp = platform.api.patch(f"/projects/{pid}/branches/{kept['branch']['id']}", json={"branch": {"expires_at": None}})
    assert resp.status_code == 200 and resp.json()["branch"]["expires_at"] is None
    past = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"expires_at": "2020-01-01T00:00:00Z"}})
    assert past.status_code == 400 and "future" in past.json()["message"]
    default = platform.api.patch(f"/projects/{pid}/branches/{project['branch']['id']}",
                                 json={"branch": {"expires_at": later}})
    assert default.status_code == 400
    wait_for(lambda: platform.api.get(f"/projects/{pid}/branches/{bid}").status_code == 404, timeout=40)
    assert platform.api.get(f"/projects/{pid}/endpoints/{ep}").status_code == 404
    wait_for(lambda: not platform.plane.layout.branch_dir(pid, bid).exists(), timeout=60)
    assert platform.api.get(f"/projects/{pid}/branches/{kept['branch']['id']}").status_code == 200


def test_twenty_branches_at_once(platform: RunningPlatform, project: dict[str, Any]) -> None:
    import concurrent.futures

    pid = project["project"]["id"]
    with psycopg.connect(platform.dsn(project), autocommit=True) as conn:
        conn.execute("CREATE TABLE many (v int)")
        conn.execute("INSERT INTO many SELECT generate_series(1, 1000)")

    def create(i: int) -> int:
        resp = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"name": f"b{i:02d}"}, "endpoints": []})
        return resp.status_code

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(create, range(20)))
    assert codes == [201] * 20
    listed = platform.api.get(f"/projects/{pid}/branches").json()["branches"]
    assert len(listed) == 21
    sample = next(b for b in listed if b["name"] == "b07")
    ep = platform.api.post(f"/projects/{pid}/endpoints", json={"endpoint": {"branch_id": sample["id"],
                                                                             "type": "read_write"}})
    assert ep.status_code == 201, ep.text
    uri = platform.dsn(project).replace(project["endpoints"][0]["id"], ep.json()["endpoint"]["id"])
    assert scalar(uri, "SELECT count(*) FROM many") == 1000


def test_branch_while_the_parent_runs_migrations(platform: RunningPlatform, project: dict[str, Any]) -> None:
    """Tables created and dropped during the copy (files vanish mid-walk, like a Django migrate):
    every branch starts, and holds each table whole or not at all."""
    import threading

    pid = project["project"]["id"]
    uri = platform.dsn(project)
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            with psycopg.connect(uri, autocommit=True) as conn:
                i = 0
                while not stop.is_set():
                    conn.execute(f"CREATE TABLE churn_{i} AS SELECT g FROM generate_series(1, 2000) g")
                    conn.execute(f"CREATE INDEX ON churn_{i} (g)")
                    if i:
                        conn.execute(f"DROP TABLE churn_{i - 1}")
                    i += 1
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=churn)
    worker.start()
    created = []
    try:
        time.sleep(0.3)
        for n in range(3):
            created.append(branch(platform, pid, name=f"mid-migration-{n}"))
    finally:
        stop.set()
        worker.join(30)
    assert not errors, errors
    for c in created:
        with psycopg.connect(uri_of(c), connect_timeout=20) as conn:
            tables = [r[0] for r in conn.execute("SELECT relname FROM pg_class WHERE relname LIKE 'churn\\_%'"
                                                 " AND relkind = 'r'").fetchall()]
            assert 1 <= len(tables) <= 2, tables
            for name in tables:
                assert conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0] == 2000
        platform.api.delete(f"/projects/{pid}/branches/{c['branch']['id']}")

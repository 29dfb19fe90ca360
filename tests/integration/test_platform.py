"""The serverless core end to end: the API creates projects, real clients connect through the real
proxy with the connection string as returned, computes wake on connect and suspend when idle."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from argon import ids
from tests.fixtures.platform import RunningPlatform, short_tmpdir

pytestmark = pytest.mark.pg


def wait_for(predicate: Any, timeout: float = 20, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def ep_id(created: dict[str, Any]) -> str:
    return str(created["endpoints"][0]["id"])


def pid_of(created: dict[str, Any]) -> str:
    return str(created["project"]["id"])


def test_create_project_has_neons_shape(platform: RunningPlatform, project: dict[str, Any]) -> None:
    p = project["project"]
    assert ids.ID_RE.match(p["id"]) and p["name"] == "test"
    assert project["branch"]["name"] == "main" and project["branch"]["default"] is True
    assert ids.BRANCH_ID_RE.match(project["branch"]["id"])
    ep = project["endpoints"][0]
    assert ids.ENDPOINT_ID_RE.match(ep["id"]) and ep["type"] == "read_write"
    assert ep["host"] == platform.plane.endpoint(None, ep["id"]).address  # its own address (ADR 0031)
    assert project["roles"][0]["name"] == "neondb_owner" and project["roles"][0]["password"]
    assert project["databases"][0] == {**project["databases"][0], "name": "neondb", "owner_name": "neondb_owner"}
    details = project["connection_uris"][0]
    assert details["connection_parameters"]["password"] == project["roles"][0]["password"]
    assert {o["action"] for o in project["operations"]} == {"create_timeline", "start_compute"}
    got = platform.api.get(f"/projects/{p['id']}").json()["project"]
    assert got["id"] == p["id"] and got["pg_version"] == p["pg_version"]


def test_returned_uri_works_with_psycopg_psql_and_asyncpg(platform: RunningPlatform, project: dict[str, Any]) -> None:
    uri = platform.dsn(project)
    # Without ARGON_DOMAIN the host needs no DNS at all (an address); the endpoint rides in `options`.
    socket.getaddrinfo(urlsplit(uri).hostname, None, flags=socket.AI_NUMERICHOST)
    assert "options=endpoint%3D" + project["endpoints"][0]["id"] in uri
    with psycopg.connect(uri) as conn:
        row = conn.execute("select current_user, current_database(), current_setting('server_version')").fetchone()
        assert row is not None and row[:2] == ("neondb_owner", "neondb")
        conn.execute("create table t (x int)")
        conn.execute("insert into t values (42)")
    out = subprocess.run(["psql", uri, "-XAtc", "select x from t"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"

    import asyncio

    import asyncpg

    async def via_asyncpg() -> int:
        conn = await asyncpg.connect(uri + "&channel_binding=require")  # must be filtered, not forwarded
        try:
            return int(await conn.fetchval("select x from t"))
        finally:
            await conn.close()

    assert asyncio.run(via_asyncpg()) == 42


@pytest.mark.parametrize("version", [15, 18])
def test_each_installed_version(platform: RunningPlatform, version: int) -> None:
    if version not in platform.plane.installs:
        pytest.skip(f"PostgreSQL {version} is not installed here")
    created = platform.create_project(pg_version=version, name=f"pg{version}")
    try:
        with psycopg.connect(platform.dsn(created)) as conn:
            assert conn.info.server_version // 10000 == version
    finally:
        platform.delete_project(pid_of(created))


def test_a_version_no_project_uses_is_prepared_after_the_start() -> None:
    """`argon up` serves once the default version and the projects' versions are ready; another
    installed version is built in the background, a project created on it meanwhile waits for it, and
    once a project uses it the next start has it ready before serving."""
    root = short_tmpdir("vp")
    (root / "data" / "templates").mkdir(parents=True)  # not seeded: the templates are built here
    running = RunningPlatform(root, spare_clusters=0)
    try:
        installs = sorted(running.plane.installs)
        if len(installs) < 2:
            pytest.skip("one PostgreSQL version is installed here")
        default = running.settings.default_pg_version or installs[-1]
        other = next(m for m in installs if m != default)
        assert set(running.plane.preparing) == set(installs) - {default}
        assert default in running.plane.templates
        created = running.create_project(pg_version=other, name="other")  # waits for the build under way
        with psycopg.connect(running.dsn(created)) as conn:
            assert conn.info.server_version // 10000 == other
    finally:
        running.stop()
    running = RunningPlatform(root, spare_clusters=0)
    try:
        assert other not in running.plane.preparing and other in running.plane.templates
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_wrong_password_unknown_role_and_endpoint_look_the_same(platform: RunningPlatform,
                                                                project: dict[str, Any]) -> None:
    params = platform.params(project)
    plane = platform.plane
    pid, ep = pid_of(project), ep_id(project)
    wait_for(lambda: platform.endpoint(pid, ep)["current_state"] == "active")  # the first start is done
    assert platform.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200
    wait_for(lambda: platform.endpoint(pid, ep)["current_state"] == "idle")
    cases = [
        dict(params, password="wrong"),
        dict(params, user="nobody_here"),
        dict(params, options="endpoint=ep-no-such-12345678"),
    ]
    for case in cases:
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(**case, connect_timeout=10)
        assert f"password authentication failed for user '{case['user']}'" in str(err.value)
    assert plane.computes.get(ep) is None  # nothing was woken


def test_suspend_on_idle_and_wake_on_connect(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, eid = pid_of(project), ep_id(project)
    uri = platform.dsn(project)
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("create table kept (v text)")
        conn.execute("insert into kept values ('survives suspend')")
    resp = platform.api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": {"suspend_timeout_seconds": 1}})
    assert resp.status_code == 200, resp.text
    idle_conn = psycopg.connect(uri, autocommit=True)
    wait_for(lambda: platform.endpoint(pid, eid)["current_state"] == "idle")
    ep = platform.endpoint(pid, eid)
    assert ep["suspended_at"] and ep["last_active"]
    with pytest.raises(psycopg.OperationalError) as err:  # idle sessions get Postgres's own error
        idle_conn.execute("select 1")
    assert "terminating connection due to administrator command" in str(err.value)
    idle_conn.close()
    with psycopg.connect(uri) as conn:  # wakes the compute
        assert conn.execute("select v from kept").fetchone() == ("survives suspend",)
    assert platform.endpoint(pid, eid)["current_state"] == "active"
    events = platform.api.get(f"/projects/{pid}/endpoints/{eid}/events").json()["events"]
    kinds = [e["kind"] for e in events]
    assert "suspend" in kinds and "wake" in kinds
    assert all(e["duration_ms"] > 0 for e in events if e["kind"] == "wake")


def test_open_transaction_keeps_compute_awake(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, eid = pid_of(project), ep_id(project)
    platform.api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": {"suspend_timeout_seconds": 1}})
    with psycopg.connect(platform.dsn(project)) as conn:
        conn.execute("select 1")  # psycopg opened a transaction: idle in transaction counts as active
        time.sleep(2.5)
        assert platform.endpoint(pid, eid)["current_state"] == "active"
        conn.execute("select 1")


def test_fifty_clients_wake_an_idle_endpoint_once(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, eid = pid_of(project), ep_id(project)
    wait_for(lambda: platform.endpoint(pid, eid)["current_state"] == "active")
    assert platform.api.post(f"/projects/{pid}/endpoints/{eid}/suspend").json()["endpoint"]["current_state"] == "idle"
    wakes_before = sum(1 for e in platform.api.get(f"/projects/{pid}/endpoints/{eid}/events").json()["events"]
                       if e["kind"] == "wake")
    uri = platform.dsn(project)
    results: list[Any] = []
    barrier = threading.Barrier(50)

    def client() -> None:
        try:
            barrier.wait(10)
            with psycopg.connect(uri, connect_timeout=30) as conn:
                results.append(conn.execute("select 1").fetchone())
        except Exception as exc:  # collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=client) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count((1,)) == 50, [r for r in results if r != (1,)][:3]
    platform.call(platform.plane.drain())
    wakes_after = sum(1 for e in platform.api.get(f"/projects/{pid}/endpoints/{eid}/events").json()["events"]
                      if e["kind"] == "wake")
    assert wakes_after == wakes_before + 1


def test_client_arriving_during_suspend_is_served(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, eid = pid_of(project), ep_id(project)
    uri = platform.dsn(project)
    psycopg.connect(uri).close()
    suspender = threading.Thread(target=lambda: platform.api.post(f"/projects/{pid}/endpoints/{eid}/suspend"))
    suspender.start()
    with psycopg.connect(uri, connect_timeout=30) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    suspender.join(30)


def test_api_start_suspend_and_validation(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, eid = pid_of(project), ep_id(project)
    api = platform.api
    assert api.post(f"/projects/{pid}/endpoints/{eid}/suspend").json()["endpoint"]["current_state"] == "idle"
    out = api.post(f"/projects/{pid}/endpoints/{eid}/start").json()
    assert out["endpoint"]["current_state"] == "active"
    assert [o["action"] for o in out["operations"]] == ["start_compute"]
    for bad in ({"suspend_timeout_seconds": 604801}, {"suspend_timeout_seconds": -2},
                {"autoscaling_limit_max_cu": 0.3}, {"autoscaling_limit_min_cu": 2, "autoscaling_limit_max_cu": 1}):
        resp = api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": bad})
        assert resp.status_code == 400, (bad, resp.text)
        assert resp.json()["message"]
    resp = api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": {"autoscaling_limit_max_cu": 1}})
    assert resp.status_code == 200 and resp.json()["endpoint"]["autoscaling_limit_max_cu"] == 1
    # No restart (ADR 0019): the size's Postgres settings follow at the next start, and the API says so.
    assert "max_connections" in resp.json()["applied"]["next_start"]
    assert [o["action"] for o in resp.json()["operations"]] == ["apply_config"]
    assert api.post(f"/projects/{pid}/endpoints/{eid}/restart").status_code == 200
    with psycopg.connect(platform.dsn(project)) as conn:
        assert conn.execute("show max_connections").fetchone() == ("419",)


def test_api_errors_are_neon_shaped(platform: RunningPlatform) -> None:
    import httpx

    anon = httpx.get(platform.api_url + "/api/v2/projects")
    assert anon.status_code == 401 and set(anon.json()) == {"code", "message", "request_id"}  # Neon's GeneralError
    bad_key = httpx.get(platform.api_url + "/api/v2/projects", headers={"Authorization": "Bearer nope"})
    assert bad_key.status_code == 401
    assert platform.api.get("/projects/no-such-project").status_code == 404
    for body in ({"project": {"pg_version": 11}}, {"project": {"region_id": "mars-1"}},
                 {"project": {"name": ""}}, {"project": {"branch": {"role_name": "pg_evil"}}}, {"project": "x"}):
        resp = platform.api.post("/projects", json=body)
        assert resp.status_code == 400, (body, resp.text)
        assert resp.json()["message"]
    resp = platform.api.post("/projects", content=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["message"].startswith("invalid request: the request body is not valid JSON"), resp.text
    assert "at character 1" in resp.json()["message"], resp.text


def test_reveal_password_and_listing(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, bid = pid_of(project), project["branch"]["id"]
    roles = platform.api.get(f"/projects/{pid}/branches/{bid}/roles").json()["roles"]
    assert [r["name"] for r in roles] == ["neondb_owner"]  # the platform's own role is never listed
    pw = platform.api.get(f"/projects/{pid}/branches/{bid}/roles/neondb_owner/reveal_password").json()["password"]
    assert pw == project["roles"][0]["password"]
    listed = platform.api.get("/projects", params={"limit": 400}).json()
    assert pid in [p["id"] for p in listed["projects"]]
    after = platform.api.get("/projects", params={"limit": 400, "cursor": listed["pagination"]["cursor"]}).json()
    assert after["projects"] == []  # the page after the last one is empty, so clients stop


def test_custom_names_and_hostile_identifiers(platform: RunningPlatform) -> None:
    created = platform.create_project(branch={"database_name": 'app"; drop database x; --', "role_name": "Ünïcode role"})
    try:
        with psycopg.connect(**platform.params(created)) as conn:
            row = conn.execute("select current_user, current_database()").fetchone()
            assert row == ("Ünïcode role", 'app"; drop database x; --')
    finally:
        platform.delete_project(pid_of(created))


def test_logs_and_delete(platform: RunningPlatform) -> None:
    created = platform.create_project(name="to-delete")
    pid, eid = pid_of(created), ep_id(created)
    psycopg.connect(platform.dsn(created)).close()
    logs = platform.api.get(f"/projects/{pid}/endpoints/{eid}/logs").text
    assert "ready to accept connections" in logs
    assert "npg_" not in logs  # passwords never reach logs
    data_dir = platform.plane.layout.project_dir(pid)
    assert data_dir.is_dir()
    assert platform.api.delete(f"/projects/{pid}").status_code == 200
    assert not data_dir.exists()
    assert platform.api.get(f"/projects/{pid}").status_code == 404
    # Through the proxy's own address the endpoint is unknown (Neon's answer, which does not say whether
    # it ever existed); its own address (ADR 0031) is no longer listened on.
    params = platform.params(created)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**(params | {"host": platform.settings.connect_host}), connect_timeout=10)
    with pytest.raises(psycopg.OperationalError, match="refused"):
        psycopg.connect(platform.dsn(created), connect_timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="per-project OS users exist only when argon runs as root")
def test_projects_are_isolated_by_os_user(platform: RunningPlatform) -> None:
    a = platform.create_project(name="a")
    b = platform.create_project(name="b")
    try:
        for created in (a, b):
            psycopg.connect(platform.dsn(created)).close()
        plane = platform.plane
        pa, pb = plane.project(pid_of(a)), plane.project(pid_of(b))
        assert pa.os_uid is not None and pb.os_uid is not None and pa.os_uid != pb.os_uid
        for proj, created in ((pa, a), (pb, b)):
            pgdata = plane.layout.pgdata(proj.id, created["branch"]["id"])
            st = pgdata.stat()
            assert (st.st_uid, st.st_mode & 0o777) == (proj.os_uid, 0o700)
            pm = plane.computes.get(ep_id(created))
            status = Path(f"/proc/{pm.pid}/status").read_text()
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            gid_line = next(line for line in status.splitlines() if line.startswith("Gid:"))
            assert uid_line.split()[1] == str(proj.os_uid)
            assert gid_line.split()[1] != "0"
        # The owner role of a cannot escalate to running programs, and could not read b's files anyway.
        with psycopg.connect(platform.dsn(a), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("grant pg_execute_server_program to current_user")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("copy (select 1) to program 'id'")
            b_file = plane.layout.pgdata(pb.id, b["branch"]["id"]) / "PG_VERSION"
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("select pg_read_file(%s)", (str(b_file),))
    finally:
        platform.delete_project(pid_of(a))
        platform.delete_project(pid_of(b))


def test_each_start_and_suspend_is_one_operation(platform: RunningPlatform) -> None:
    """Operations are recorded by the use case that asked, once: the first start, an API start and
    suspend, a disable, a wake through the proxy and a suspend on idle each add exactly one."""
    created = platform.create_project(name="ops")
    pid, eid = pid_of(created), ep_id(created)

    def counts() -> Counter[str]:
        platform.call(platform.plane.drain())  # operations of wakes are written in the background
        ops = platform.api.get(f"/projects/{pid}/operations", params={"limit": 1000}).json()["operations"]
        assert all(o["status"] == "finished" for o in ops), ops
        return Counter(o["action"] for o in ops)

    try:
        wait_for(lambda: platform.endpoint(pid, eid)["current_state"] == "active")
        assert counts() == {"create_timeline": 1, "start_compute": 1}
        api = platform.api
        assert api.post(f"/projects/{pid}/endpoints/{eid}/suspend").status_code == 200
        assert api.post(f"/projects/{pid}/endpoints/{eid}/start").status_code == 200
        assert counts() == {"create_timeline": 1, "start_compute": 2, "suspend_compute": 1}
        out = api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": {"disabled": True}}).json()
        assert sorted(o["action"] for o in out["operations"]) == ["apply_config", "suspend_compute"]
        assert counts() == {"create_timeline": 1, "start_compute": 2, "suspend_compute": 2, "apply_config": 1}
        api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": {"disabled": False}})
        with psycopg.connect(platform.dsn(created)) as conn:  # a wake through the proxy
            conn.execute("select 1")
        assert counts() == {"create_timeline": 1, "start_compute": 3, "suspend_compute": 2, "apply_config": 2}
        api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": {"suspend_timeout_seconds": 1}})
        wait_for(lambda: platform.endpoint(pid, eid)["current_state"] == "idle")  # the suspend monitor
        assert counts() == {"create_timeline": 1, "start_compute": 3, "suspend_compute": 3, "apply_config": 3}
    finally:
        platform.delete_project(pid)

"""Neon's own clients against a live Argon: neonctl (npm, pinned) and the neon-api Python package.

These clients validate shapes themselves (neon-api's pydantic dataclasses reject a missing required
field or an unknown enum value), so a passing run means the API is what they expect.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from argon.platform import names_resolve
from tests.fixtures.argon_process import free_port
from tests.fixtures.npm import npm_install
from tests.fixtures.platform import API_KEY, RunningPlatform, short_tmpdir, uid_range

pytestmark = [pytest.mark.pg, pytest.mark.slow]

NEONCTL_VERSION = "5.0.1"
API_CLIENT_VERSION = "2.7.3"  # @neondatabase/api-client


@pytest.fixture(scope="session")
def neonctl() -> Path:
    return npm_install(f"neonctl@{NEONCTL_VERSION}", ".bin/neonctl") / "node_modules" / ".bin" / "neonctl"


API_CLIENT_FLOW = """
import { createApiClient } from '@neondatabase/api-client';
const api = createApiClient({ apiKey: process.env.NEON_API_KEY, baseURL: process.env.NEON_API_URL });
const out = {};
const created = (await api.createProject({ project: { name: 'ts-client' } })).data;
const projectId = created.project.id;
try {
  out.uri = created.connection_uris[0].connection_uri;
  out.listed = (await api.listProjects({})).data.projects.some((p) => p.id === projectId);
  const branch = (await api.createProjectBranch(projectId, {
    branch: { name: 'ts-dev' }, endpoints: [{ type: 'read_write' }] })).data;
  out.branch = branch.branch.name;
  out.branchUri = branch.connection_uris[0].connection_uri;
  out.branches = (await api.listProjectBranches({ projectId })).data.branches.map((b) => b.name).sort();
  await api.setSnapshotSchedule(projectId, branch.branch.id, {
    schedule: [{ frequency: 'daily', hour: 3, retention_seconds: 604800 }] });
  out.schedule = (await api.getSnapshotSchedule(projectId, branch.branch.id)).data.schedule;
  out.endpoints = (await api.listProjectEndpoints(projectId)).data.endpoints.length;
  out.connectionUri = (await api.getConnectionUri({
    projectId, database_name: 'neondb', role_name: 'neondb_owner' })).data.uri;
} finally {
  await api.deleteProject(projectId);
}
console.log(JSON.stringify(out));
"""


def test_neondatabase_api_client(platform: RunningPlatform) -> None:
    prefix = npm_install(f"@neondatabase/api-client@{API_CLIENT_VERSION}", "@neondatabase/api-client/package.json")
    script = prefix / "flow.mjs"
    script.write_text(API_CLIENT_FLOW)
    env = {**os.environ, "NEON_API_KEY": API_KEY, "NEON_API_URL": platform.api_url + "/api/v2"}
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["listed"] and result["branch"] == "ts-dev" and result["branches"] == ["main", "ts-dev"]
    assert result["endpoints"] == 2 and result["connectionUri"].startswith("postgresql://neondb_owner:")
    assert result["schedule"] == [{"frequency": "daily", "hour": 3, "retention_seconds": 604800}]  # ADR 0032


def run_neonctl(platform: RunningPlatform, exe: Path, *args: str, output_json: bool = True) -> Any:
    env = {**os.environ, "NEON_API_HOST": platform.api_url + "/api/v2", "NEON_API_KEY": API_KEY, "CI": "true",
           "NEON_CONFIG_DIR": str(platform.root / "neonctl-config")}
    cmd = [str(exe), *args, "--no-analytics"] + (["-o", "json"] if output_json else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, f"neonctl {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout) if output_json else out.stdout


def test_neonctl_smoke(platform: RunningPlatform, neonctl: Path) -> None:
    created = run_neonctl(platform, neonctl, "projects", "create", "--name", "smoke")
    pid = created["project"]["id"]
    try:
        listed = run_neonctl(platform, neonctl, "projects", "list")
        assert pid in json.dumps(listed)
        got = run_neonctl(platform, neonctl, "projects", "get", pid)
        assert got["id"] == pid
        run_neonctl(platform, neonctl, "roles", "create", "--name", "app", "--project-id", pid)
        run_neonctl(platform, neonctl, "databases", "create", "--name", "appdb", "--owner-name", "app",
                    "--project-id", pid)
        roles = run_neonctl(platform, neonctl, "roles", "list", "--project-id", pid)
        assert {r["name"] for r in roles} == {"neondb_owner", "app"}
        uri = run_neonctl(platform, neonctl, "connection-string", "--project-id", pid, "--role-name", "app",
                          "--database-name", "appdb", output_json=False).strip()
        assert "channel_binding=require" in uri and "sslmode=require" in uri
        # As printed: the host is the endpoint's own address (ADR 0031), TLS, SCRAM-SHA-256-PLUS; no DNS.
        # (The port is the test platform's; a real one listens on 5432, which the string leaves out.)
        env = {**os.environ, "PGPORT": str(platform.proxy_port)}
        out = subprocess.run(["psql", uri, "-XAtc", "select current_user || '@' || current_database()"],
                             capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "app@appdb"
        # The Neon name form, <endpoint>.<domain>, routed by SNI, and the certificate verifies against the
        # CA `argon up` generated (sslmode=verify-full needs the name: the certificate names no endpoint address).
        ep = platform.api.get(f"/projects/{pid}/endpoints").json()["endpoints"][0]
        ca = platform.plane.layout.tls_dir / "ca.crt"
        strict = uri.replace(f"@{ep['host']}/", f"@{ep['id']}.argon.localhost/").replace(
            "sslmode=require", f"sslmode=verify-full&sslrootcert={ca}")
        out = subprocess.run(["psql", strict, "-XAtc", "select ssl from pg_stat_ssl where pid = pg_backend_pid()"],
                             capture_output=True, text=True, timeout=60, env={**env, "PGHOSTADDR": "127.0.0.1"})
        assert out.returncode == 0 and out.stdout.strip() == "f", out.stderr  # TLS ends at the proxy
        ops = run_neonctl(platform, neonctl, "operations", "list", "--project-id", pid)
        assert {o["action"] for o in ops} >= {"create_timeline", "apply_config"}
        run_neonctl(platform, neonctl, "projects", "update", pid, "--name", "renamed")
        assert platform.api.get(f"/projects/{pid}").json()["project"]["name"] == "renamed"
        me = run_neonctl(platform, neonctl, "me")
        assert me["login"]
    finally:
        run_neonctl(platform, neonctl, "projects", "delete", pid)
    assert platform.api.get(f"/projects/{pid}").status_code == 404


def test_neonctl_branches_smoke(platform: RunningPlatform, neonctl: Path) -> None:
    """The branch half of the reference's smoke sequence, plus point in time as neonctl sends it."""
    created = run_neonctl(platform, neonctl, "projects", "create", "--name", "branches-smoke")
    pid = created["project"]["id"]
    env = {**os.environ, "PGPORT": str(platform.proxy_port)}  # the strings as printed, on the test's port

    def psql(uri: str, sql: str) -> str:
        out = subprocess.run(["psql", uri, "-XAtc", sql], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def cs(*args: str) -> str:
        return str(run_neonctl(platform, neonctl, "connection-string", *args, "--project-id", pid,
                               output_json=False)).strip()

    try:
        main_uri = cs("main")
        psql(main_uri, "CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
        # neonctl accepts timestamps with milliseconds: round up, so the first commit is included.
        mark = psql(main_uri, "SELECT pg_current_wal_lsn() || ' ' || to_char(date_trunc('milliseconds', "
                              "clock_timestamp() AT TIME ZONE 'UTC') + interval '1 millisecond', "
                              "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')").split()
        psql(main_uri, "INSERT INTO t VALUES (2)")
        # Point in time, as neonctl sends it: --parent <timestamp> (of the default branch).
        run_neonctl(platform, neonctl, "branches", "create", "--name", "past", "--parent", mark[1],
                    "--project-id", pid)
        assert psql(cs("past"), "SELECT count(*) FROM t") == "1"
        run_neonctl(platform, neonctl, "branches", "create", "--name", "dev", "--project-id", pid)
        assert psql(cs("dev"), "SELECT count(*) FROM t") == "2"
        pooled = cs("dev", "--pooled")  # an address carries no id to append -pooler to: the direct one
        assert urlsplit(pooled).hostname == urlsplit(cs("dev")).hostname and psql(pooled, "SELECT 1") == "1"
        run_neonctl(platform, neonctl, "roles", "create", "--name", "app", "--branch", "dev", "--project-id", pid)
        run_neonctl(platform, neonctl, "databases", "create", "--name", "appdb", "--owner-name", "app", "--branch",
                    "dev", "--project-id", pid)
        assert psql(cs("dev", "--role-name", "app", "--database-name", "appdb"), "SELECT current_user") == "app"
        run_neonctl(platform, neonctl, "branches", "create", "--name", "bare", "--no-compute", "--project-id", pid)
        run_neonctl(platform, neonctl, "branches", "add-compute", "bare", "--project-id", pid)  # a read replica
        assert psql(cs("bare"), "SELECT count(*) FROM t") == "2"
        run_neonctl(platform, neonctl, "branches", "rename", "dev", "dev2", "--project-id", pid)
        run_neonctl(platform, neonctl, "branches", "set-default", "dev2", "--project-id", pid)
        psql(main_uri, "INSERT INTO t VALUES (3)")
        run_neonctl(platform, neonctl, "branches", "reset", "dev2", "--parent", "--project-id", pid)
        assert psql(cs("dev2"), "SELECT count(*) FROM t") == "3"
        got = run_neonctl(platform, neonctl, "branches", "get", "dev2", "--project-id", pid)
        assert got["name"] == "dev2" and got["default"] is True
        # restore <target> ^self@<lsn>: main back to its first row.
        run_neonctl(platform, neonctl, "branches", "restore", "main", f"^self@{mark[0]}", "--project-id", pid,
                    output_json=False)
        assert psql(main_uri, "SELECT count(*) FROM t") == "1"
        run_neonctl(platform, neonctl, "branches", "delete", "bare", "--project-id", pid)
        names = {b["name"] for b in run_neonctl(platform, neonctl, "branches", "list", "--project-id", pid)}
        assert names == {"main", "dev2", "past"}
    finally:
        run_neonctl(platform, neonctl, "projects", "delete", pid)


def test_neon_api_python_package(platform: RunningPlatform) -> None:
    from neon_api import NeonAPI

    neon = NeonAPI(API_KEY, base_url=platform.api_url + "/api/v2/")
    created = neon.project_create(project={"name": "py-client"})
    pid = created.project.id
    try:
        assert pid in [p.id for p in neon.projects().projects]
        assert neon.project(pid).project.name == "py-client"
        branch_id = neon.branches(pid).branches[0].id
        endpoints = neon.endpoints(pid).endpoints
        assert endpoints[0].current_state.value in ("init", "active", "idle")
        role = neon.role_create(pid, branch_id, "pyrole").role
        assert role.password
        assert neon.role_password_reveal(pid, branch_id, "pyrole").password == role.password
        neon.database_create(pid, branch_id, database={"name": "pydb", "owner_name": "pyrole"})
        assert {d.name for d in neon.databases(pid, branch_id).databases} == {"neondb", "pydb"}
        ep = endpoints[0].id
        neon.endpoint_suspend(pid, ep)
        assert neon.endpoint(pid, ep).endpoint.current_state.value == "idle"
        neon.endpoint_start(pid, ep)
        assert neon.endpoint(pid, ep).endpoint.current_state.value == "active"
        ops = neon.operations(pid).operations
        assert ops and all(o.status.value == "finished" for o in ops if o.action.value != "start_compute")
        uri = neon.connection_uri(pid, database_name="pydb", role_name="pyrole").uri
        with psycopg.connect(uri) as conn:
            assert conn.execute("select current_user").fetchone() == ("pyrole",)
    finally:
        neon.project_delete(pid)


def test_neonctl_project_workflow(platform: RunningPlatform, neonctl: Path, tmp_path: Path) -> None:
    """neonctl 5's project workflow (link, checkout, env pull, status) in a directory of its own, the
    settings it writes (ip-allow, logical replication), and the reads it makes of what Argon lacks."""
    created = run_neonctl(platform, neonctl, "projects", "create", "--name", "workflow")
    pid = created["project"]["id"]
    env = {**os.environ, "NEON_API_HOST": platform.api_url + "/api/v2", "NEON_API_KEY": API_KEY, "CI": "true",
           "NEON_CONFIG_DIR": str(platform.root / "neonctl-config")}

    def plain(*args: str) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([str(neonctl), *args, "--no-analytics"], capture_output=True, text=True, timeout=120,
                             env=env, cwd=tmp_path)
        assert out.returncode == 0, f"neonctl {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
        return out

    try:
        plain("link", "--project-id", pid)
        assert json.loads((tmp_path / ".neon").read_text())["projectId"] == pid
        run_neonctl(platform, neonctl, "branches", "create", "--name", "feature", "--project-id", pid)
        plain("checkout", "feature")
        pulled = plain("env", "pull")
        assert "DATABASE_URL" in pulled.stderr + pulled.stdout
        url = next(line.split("=", 1)[1].strip().strip('"') for line in (tmp_path / ".env.local").read_text().splitlines()
                   if line.startswith("DATABASE_URL="))
        with psycopg.connect(url, connect_timeout=30) as conn:
            assert conn.execute("select current_database()").fetchone() == ("neondb",)
        status = plain("status").stdout
        assert pid in status and "feature" in status
        assert run_neonctl(platform, neonctl, "projects", "list", "--recoverable-only") == []
        ro = run_neonctl(platform, neonctl, "branches", "create", "--name", "reader", "--type", "read_only",
                         "--project-id", pid)
        assert ro["endpoints"][0]["type"] == "read_only"
        allowed = run_neonctl(platform, neonctl, "ip-allow", "add", "127.0.0.1", "192.0.2.0/24", "--project-id", pid)
        assert allowed["IP_addresses"] == ["127.0.0.1", "192.0.2.0/24"], allowed
        got = platform.api.get(f"/projects/{pid}").json()["project"]["settings"]["allowed_ips"]
        assert got == {"ips": ["127.0.0.1", "192.0.2.0/24"], "protected_branches_only": False}
        assert platform.api.get(f"/projects/{pid}/branches/count").json() == {"count": 3}
    finally:
        run_neonctl(platform, neonctl, "projects", "delete", pid)


def test_neonctl_strings_reach_each_endpoint_by_its_address_across_a_restart(neonctl: Path) -> None:
    """ADR 0031 on a platform as it comes (endpoint_hosts left on auto): where `ep-….argon.localhost`
    does not resolve, endpoint.host is each endpoint's own loopback address. neonctl's strings, direct
    and --pooled, used as printed by psql and psycopg reach the endpoint they name (two projects: the
    address routes, nothing else in the string does), and still do after `argon up` starts again on
    the same data directory and port. The API's pooled host (127.2.X.Y) reaches the pooler."""
    root = short_tmpdir("hs")
    uids, port = uid_range(), free_port()
    env = {**os.environ, "PGPORT": str(port)}  # a real install listens on 5432, which the strings leave out

    def psql(uri: str, sql: str) -> str:
        out = subprocess.run(["psql", uri, "-XAtc", sql], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def whose(uri: str) -> str:  # through psycopg, libpq's environment as psql has it
        with psycopg.connect(uri, port=port, connect_timeout=60) as conn:
            row = conn.execute("select p from whose").fetchone()
        assert row is not None
        return str(row[0])

    try:
        first = RunningPlatform(root, proxy_port=port, compute_limits="off", spare_clusters=0, **uids)
        try:
            if first.platform.info.endpoint_hosts != "addresses":
                assert asyncio.run(names_resolve("argon.localhost"))
                pytest.skip("*.argon.localhost resolves on this machine: endpoint.host keeps Neon's name form")
            strings: dict[str, tuple[str, str]] = {}
            for name in ("one", "two"):
                pid = run_neonctl(first, neonctl, "projects", "create", "--name", name)["project"]["id"]
                direct = run_neonctl(first, neonctl, "cs", "--project-id", pid, output_json=False).strip()
                pooled = run_neonctl(first, neonctl, "cs", "--pooled", "--project-id", pid, output_json=False).strip()
                host = urlsplit(direct).hostname or ""
                assert host.startswith("127.1.") and "options" not in direct and "channel_binding=require" in direct
                assert urlsplit(pooled).hostname == host  # nothing to append -pooler to: the direct address
                psql(direct, f"create table whose (p text); insert into whose values ('{pid}')")
                strings[pid] = (direct, pooled)
            assert len({urlsplit(d).hostname for d, _ in strings.values()}) == 2
            for pid, (direct, pooled) in strings.items():
                assert psql(direct, "select p from whose") == pid and whose(pooled) == pid
            pid = next(iter(strings))
            details = first.api.get(f"/projects/{pid}/connection_uri",
                                    params={"database_name": "neondb", "role_name": "neondb_owner",
                                            "pooled": "true"}).json()["uri"]
            assert urlsplit(details).hostname == urlsplit(strings[pid][0]).hostname.replace("127.1.", "127.2.", 1)
            proxy = first.platform.proxy
            assert proxy is not None and proxy.address_listeners == 4
            pooler = proxy.ctx.pooler
            assert pooler is not None
            with psycopg.connect(details.split("?")[0] + "?sslmode=require", connect_timeout=60) as conn:
                assert conn.execute("select p from whose").fetchone() == (pid,)
                assert pooler.clients >= 1  # the pooled address reached the transaction pooler
        finally:
            first.stop()
        second = RunningPlatform(root, proxy_port=port, compute_limits="off", spare_clusters=0, **uids)
        try:
            for pid, (direct, pooled) in strings.items():  # the strings from before the restart, unchanged
                assert run_neonctl(second, neonctl, "cs", "--project-id", pid, output_json=False).strip() == direct
                assert psql(direct, "select p from whose") == pid and whose(pooled) == pid
            for pid in strings:
                run_neonctl(second, neonctl, "projects", "delete", pid)
            assert second.platform.proxy is not None and second.platform.proxy.address_listeners == 0
        finally:
            second.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

"""Compute units enforced by the kernel (cgroups, v2 or v1): the cgroup follows the compute, a PATCH
resizes it live, an OOM stays inside one compute, and autoscaling moves a compute under pgbench.
On a platform of this module's own with limits on (the shared one runs without them: a quarter CPU
per compute slows the rest of the suite) and a 2 s quiet period. Skipped, with the reason the
platform gives, where limits are not enforced (not root, no controllers): there `argon up` runs as
before, which the rest of the suite covers."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from argon.compute.cgroups import Cgroups, Limits
from argon.compute.manager import ComputeManager, ComputeSpec
from argon.compute.osuser import OsUser, chown_tree
from argon.settings import Settings
from argon.storage.clone import pick_backend
from argon.storage.layout import Layout
from tests.fixtures.platform import RunningPlatform, short_tmpdir
from tests.integration.test_ops import ids, scrape, value

pytestmark = [pytest.mark.pg, pytest.mark.slow]  # a platform of its own, with cgroup limits


@pytest.fixture(scope="module")
def platform() -> Iterator[RunningPlatform]:
    root = short_tmpdir("lim")
    running = RunningPlatform(root, autoscaling_quiet_seconds=2.0)
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def groups(platform: RunningPlatform) -> Cgroups:
    found = platform.plane.computes.cgroups
    if found is None:
        pytest.skip(f"compute limits not enforced here: {platform.plane.computes.limits_note}")
    return found


def _wait(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def sized(platform: RunningPlatform) -> Iterator[Callable[..., dict[str, Any]]]:
    made: list[str] = []

    def make(lo: float, hi: float) -> dict[str, Any]:
        created = platform.create_project(name="cu", default_endpoint_settings={
            "autoscaling_limit_min_cu": lo, "autoscaling_limit_max_cu": hi})
        made.append(created["project"]["id"])
        with psycopg.connect(platform.dsn(created), connect_timeout=30) as conn:
            conn.execute("SELECT 1")
        return created

    yield make
    for pid in made:
        platform.delete_project(pid)


def _ids(created: dict[str, Any]) -> tuple[str, str]:
    return created["project"]["id"], created["endpoints"][0]["id"]


def _events(platform: RunningPlatform, project_id: str, endpoint_id: str) -> list[dict[str, Any]]:
    resp = platform.api.get(f"/projects/{project_id}/endpoints/{endpoint_id}/events")
    assert resp.status_code == 200, resp.text
    return list(resp.json()["events"])


def test_cgroup_follows_the_compute_and_resizes_live(platform: RunningPlatform, groups: Cgroups,
                                                     sized: Callable[..., dict[str, Any]]) -> None:
    assert platform.api.get("/versions").json()["compute_limits"].startswith(
        f"CPU and memory per compute unit (1 CPU, {platform.settings.compute_memory_per_cu:g} GiB), cgroup v")
    created = sized(0.25, 0.25)
    project_id, endpoint_id = _ids(created)
    limits = groups.limits(endpoint_id)
    assert limits is not None and limits.cpus == 0.25
    assert limits.memory_bytes == int(0.25 * platform.settings.compute_memory_per_cu * 2**30)
    pm = platform.plane.computes.get(endpoint_id)
    assert pm is not None and pm.pid in groups.pids(endpoint_id)

    with psycopg.connect(platform.dsn(created), autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert backend is not None and backend[0] in groups.pids(endpoint_id)  # forked inside
        resp = platform.api.patch(f"/projects/{project_id}/endpoints/{endpoint_id}",
                                  json={"endpoint": {"autoscaling_limit_min_cu": 1, "autoscaling_limit_max_cu": 2}})
        assert resp.status_code == 200, resp.text
        applied = resp.json()["applied"]
        assert applied["now"] == ["autoscaling_limit_min_cu", "autoscaling_limit_max_cu"]
        assert "shared_buffers" in applied["next_start"] and "max_connections" in applied["next_start"]
        assert resp.json()["operations"][0]["action"] == "apply_config"  # no suspend, no start
        now = groups.limits(endpoint_id)
        assert now is not None and now.cpus == 1.0 and now.memory_bytes == 4 * limits.memory_bytes
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == backend  # same session: no restart
        assert conn.execute("SHOW shared_buffers").fetchone() == ("32MB",)  # follows at the next start
        metrics = scrape(platform)  # /metrics says the size it has now
        labels = ids(created)
        assert value(metrics, "argon_compute_cu", **labels) == 1.0
        assert value(metrics, "argon_compute_memory_limit_bytes", **labels) == now.memory_bytes
    kinds = [e["kind"] for e in _events(platform, project_id, endpoint_id)]
    assert "autoscale" in kinds

    resp = platform.api.post(f"/projects/{project_id}/endpoints/{endpoint_id}/suspend")
    assert resp.status_code == 200, resp.text
    assert endpoint_id not in groups.names()  # removed with the compute
    resp = platform.api.patch(f"/projects/{project_id}/endpoints/{endpoint_id}",
                              json={"endpoint": {"autoscaling_limit_max_cu": 1}})
    assert resp.json()["applied"] == {"now": [], "next_start": [  # suspended: everything at its next start
        "autoscaling_limit_min_cu", "autoscaling_limit_max_cu", "effective_cache_size", "max_connections",
        "shared_buffers", "temp_file_limit"]}
    with psycopg.connect(platform.dsn(created), autocommit=True) as conn:
        assert conn.execute("SHOW shared_buffers").fetchone() == ("128MB",)
        after = groups.limits(endpoint_id)
        assert after is not None and after.cpus == 1.0  # a new start begins at the new minimum


def test_out_of_memory_stays_in_its_compute(platform: RunningPlatform, groups: Cgroups,
                                            sized: Callable[..., dict[str, Any]]) -> None:
    victim, neighbour = sized(0.25, 0.25), sized(0.25, 0.25)
    project_id, endpoint_id = _ids(victim)
    limit = 0.25 * platform.settings.compute_memory_per_cu * 2**30
    chunk = int(min(limit * 0.6, 900 * 2**20))  # two of these and their concatenation exceed the limit
    with psycopg.connect(platform.dsn(neighbour), autocommit=True) as other:
        other_pid = other.execute("SELECT pg_backend_pid()").fetchone()
        with psycopg.connect(platform.dsn(victim), autocommit=True) as conn, pytest.raises(psycopg.OperationalError):
            conn.execute(f"SELECT length(a || b) FROM (SELECT repeat('x', {chunk}) a, repeat('y', {chunk}) b) s")
        assert other.execute("SELECT pg_backend_pid()").fetchone() == other_pid  # untouched
    event = _wait("the oom_kill event", lambda: next(
        (e for e in _events(platform, project_id, endpoint_id) if e["kind"] == "oom_kill"), None))
    assert "out of memory at its limit of 1.00 GiB" in event["detail"] and "no other compute" in event["detail"]
    def reconnect() -> bool:  # Postgres restarts its sessions after a moment of crash recovery
        try:
            with psycopg.connect(platform.dsn(victim), connect_timeout=10) as conn:
                return conn.execute("SELECT 1").fetchone() == (1,)
        except psycopg.OperationalError:
            return False

    started = time.monotonic()
    _wait("a new session on the compute", reconnect, timeout=30)
    print(f"reconnected after {time.monotonic() - started:.1f} s")
    assert platform.plane.is_running(endpoint_id)


def test_autoscaling_under_pgbench(platform: RunningPlatform, groups: Cgroups,
                                   sized: Callable[..., dict[str, Any]]) -> None:
    pgbench = shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"
    if not os.path.exists(pgbench):
        pytest.skip("pgbench is not installed")
    created = sized(0.25, 2)
    project_id, endpoint_id = _ids(created)
    autoscaler = platform.control.autoscaler
    assert autoscaler.current_cu(endpoint_id) == 0.25
    p = platform.params(created)
    env = {**os.environ, "PGHOST": p["host"], "PGPORT": p["port"], "PGUSER": p["user"],
           "PGPASSWORD": p["password"], "PGDATABASE": p["dbname"], "PGSSLMODE": "disable",
           "PGOPTIONS": f"endpoint={endpoint_id}"}
    script = platform.root / "cpu.sql"
    script.write_text("SELECT sum(g) FROM generate_series(1, 200000) g;\n")
    started = time.monotonic()
    bench = subprocess.Popen([pgbench, "-n", "-c", "4", "-T", "8", "-f", str(script)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait("a scale-up", lambda: (autoscaler.current_cu(endpoint_id) or 0) >= 1, timeout=8)
        up = time.monotonic() - started
    finally:
        out, _ = bench.communicate(timeout=60)
    assert bench.returncode == 0, out
    _wait("the scale-down", lambda: autoscaler.current_cu(endpoint_id) == 0.25, timeout=20)
    details = [e["detail"] for e in _events(platform, project_id, endpoint_id) if e["kind"] == "autoscale"]
    assert any("-> 0.5 CU" in d or "-> 1 CU" in d for d in details), details
    assert any("-> 0.25 CU: 2 s below" in d for d in details), details
    assert up < 8


def test_temp_files_are_capped_per_cu(platform: RunningPlatform, sized: Callable[..., dict[str, Any]]) -> None:
    """Enforced by Postgres itself, with or without cgroups: the tenant cannot lift it."""
    settings = platform.plane.settings
    platform.plane.settings = settings.model_copy(update={"compute_temp_files_per_cu": 4 / 1024})  # 1 MB at 0.25 CU
    try:
        created = sized(0.25, 0.25)
    finally:
        platform.plane.settings = settings
    with psycopg.connect(platform.dsn(created), autocommit=True) as conn:
        assert conn.execute("SHOW temp_file_limit").fetchone() == ("1MB",)
        conn.execute("SET work_mem = '64kB'")
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="temp_file_limit"):
            conn.execute("SELECT count(*) FROM (SELECT g FROM generate_series(1, 300000) g ORDER BY g DESC) s")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET temp_file_limit = -1")
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on


def test_a_scratch_postmaster_runs_in_a_cgroup_of_its_own(platform: RunningPlatform, groups: Cgroups,
                                                          sized: Callable[..., dict[str, Any]],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A branch at a past LSN is rebuilt by a scratch postmaster (recovery): it runs within one compute
    unit in a cgroup of its own, removed afterwards (ADR 0025)."""
    seen: list[tuple[str, Limits | None, list[int]]] = []
    attach = groups.attach

    def watching(name: str, pid: int) -> int:
        moved = attach(name, pid)
        if name.startswith("sc-"):
            seen.append((name, groups.limits(name), groups.pids(name)))
        return moved

    monkeypatch.setattr(groups, "attach", watching)
    created = sized(0.25, 0.25)
    with psycopg.connect(platform.dsn(created), autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT 1 AS v")
        lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]  # type: ignore[index]
        conn.execute("INSERT INTO t VALUES (2)")
    pid = created["project"]["id"]
    resp = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "then", "parent_lsn": lsn}})
    assert resp.status_code == 201, resp.text
    assert seen, "no scratch postmaster ran in a cgroup"
    name, limits, pids = seen[0]
    per_cu = platform.plane.settings.compute_memory_per_cu
    assert limits == Limits(cpus=1.0, memory_bytes=int(per_cu * 2**30))
    assert pids  # the postmaster, moved in before it was ready
    assert name not in groups.names()  # removed with it


def test_a_restarted_argon_adopts_the_cgroup_and_its_size(platform: RunningPlatform, groups: Cgroups) -> None:
    """Adoption (as after a crash of `argon up`): the new manager keeps the size the compute had,
    not the one it would start with; the stop removes the cgroup; leftovers are tidied at start-up.
    Under a parent of its own, so the tidying cannot reach the shared platform's computes."""
    groups = Cgroups(groups.version, {ctl: p.parent / f"argon-test-{secrets.token_hex(4)}"
                                      for ctl, p in groups.parents.items()})
    groups.ensure_parents()
    major = max(platform.plane.templates)
    root = short_tmpdir("ad")
    layout = Layout(root / "data", root / "run")
    layout.init()
    name = f"ep-adopt-{secrets.token_hex(4)}"
    user = OsUser(299000, 299000) if os.geteuid() == 0 else None
    spec = ComputeSpec(endpoint_id=name, install=platform.plane.installs[major], pgdata=layout.pgdata("p-ad", "br"),
                       socket_dir=layout.socket_dir(name), log_file=layout.compute_log("p-ad", "br"), user=user,
                       gucs={"max_connections": "20"}, argon_os_user=platform.plane.os_user,
                       limits=Limits(cpus=0.25, memory_bytes=2**30))
    pick_backend(layout.data_dir).clone_tree(platform.plane.templates[major], spec.pgdata)
    if user is not None:
        chown_tree(layout.project_dir("p-ad"), user)

    async def scenario() -> None:
        first = ComputeManager(cgroups=groups)
        pm = await first.start(spec)
        try:
            assert groups.limits(name) == spec.limits and pm.pid in groups.pids(name)
            assert first.set_limits(name, Limits(cpus=1, memory_bytes=2**31))
            later = ComputeManager(cgroups=groups)
            assert later.adopt(spec) is not None
            assert later.limits(name) == Limits(cpus=1, memory_bytes=2**31)  # kept its size
            assert groups.limits(name) == Limits(cpus=1, memory_bytes=2**31)
            assert pm.pid in groups.pids(name)
            await later.stop(name)
            assert name not in groups.names()
            groups.create(name, Limits(cpus=1, memory_bytes=2**30))  # as a start that failed half-way leaves it
            assert later.tidy_cgroups() == [name] and name not in groups.names()
        finally:
            pm.kill_group()

    try:
        asyncio.run(scenario())
    finally:
        groups.remove(name)
        for parent in set(groups.parents.values()):
            parent.rmdir()
        shutil.rmtree(root, ignore_errors=True)


def test_limits_off_or_unavailable_are_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from argon.platform import compute_limits

    note, found = compute_limits(Settings(data_dir=tmp_path, compute_limits="off"))
    assert found is None and note.startswith("off (ARGON_COMPUTE_LIMITS=off)")
    note, found = compute_limits(Settings(data_dir=tmp_path))
    if os.geteuid() != 0:  # the unprivileged run: said once, as a warning, and nothing enforced
        assert found is None and note == "not enforced: not running as root: computes run without CPU and memory limits"
        assert "compute limits are not enforced" in caplog.text
    elif found is not None:
        assert note.startswith("CPU and memory per compute unit") and all(p.is_dir() for p in found.parents.values())
        for parent in set(found.parents.values()):
            parent.rmdir()  # this data directory's parent, empty

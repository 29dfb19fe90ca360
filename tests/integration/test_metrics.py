"""The metrics sampler on a live platform: samples of real computes reached through the proxy, and
the API's figures that come from them. A platform of its own samples every 0.3 s."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from argon.compute.admin import connect_admin_sync
from argon.metadata.store import MetricSample
from tests.fixtures.platform import RunningPlatform, short_tmpdir

pytestmark = [pytest.mark.pg, pytest.mark.slow]  # a platform of its own, sampling every INTERVAL

INTERVAL = 0.3


@pytest.fixture(scope="module")
def sampled() -> Iterator[RunningPlatform]:
    root = short_tmpdir("mx")
    running = RunningPlatform(root, metrics_interval=INTERVAL, spare_clusters=0)
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def _samples(platform: RunningPlatform, project_id: str) -> list[MetricSample]:
    plane = platform.plane
    return list(platform.call(plane.db(plane.store.metric_samples, project_id, plane.clock().replace(year=2000))))


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(INTERVAL)


def test_samples_are_real_and_the_api_figures_follow_them(sampled: RunningPlatform) -> None:
    created = sampled.create_project(name="metrics")
    pid, bid = created["project"]["id"], created["branch"]["id"]
    ep = created["endpoints"][0]["id"]
    dsn = sampled.dsn(created)

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")
        # Our open session is counted; the platform's own are not, and never sit in a user database.
        seen = _wait_for("a sample with our connection", lambda: [
            s for s in _samples(sampled, pid) if s.endpoint_id == ep and (s.connections or 0) >= 1])
        assert seen[-1].wal_lsn and seen[-1].xacts
        with connect_admin_sync(sampled.plane.layout.socket_dir(ep)) as admin:  # a superuser sees every session
            platform_sessions = admin.execute(
                "SELECT datname FROM pg_stat_activity WHERE usename = 'cloud_admin' AND backend_type = 'client backend'"
                " AND pid <> pg_backend_pid()").fetchall()
        assert platform_sessions and {r[0] for r in platform_sessions} == {"postgres"}

        first_storage = _wait_for("a storage sample", lambda: [
            s for s in _samples(sampled, pid) if s.endpoint_id is None and s.branch_id == bid])[-1]
        assert first_storage.storage_bytes and first_storage.storage_bytes > first_storage.logical_bytes > 5_000_000
        before_api = sampled.api.get(f"/projects/{pid}/branches/{bid}").json()["branch"]

        for _ in range(400):
            conn.execute("SELECT 1")
        conn.execute("CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 50000) g")
        marker = sampled.plane.clock()

        def grown() -> list[MetricSample]:
            # the logical size comes from the compute at once, the bytes on disk from the storage
            # figures, which measure a running branch every 5 looks: wait for both
            return [s for s in _samples(sampled, pid) if s.endpoint_id is None and s.branch_id == bid
                    and s.at > marker and (s.logical_bytes or 0) >= first_storage.logical_bytes + 10_000_000
                    and (s.storage_bytes or 0) >= first_storage.storage_bytes + 10_000_000]

        later = _wait_for("the logical size to grow by 10 MB", grown)[-1]
        assert later.storage_bytes and later.storage_bytes >= first_storage.storage_bytes + 10_000_000

        def counted() -> list[MetricSample]:  # an idle backend reports its counts within ~10 s (PG15+)
            compute = [s for s in _samples(sampled, pid) if s.endpoint_id == ep and s.xacts is not None]
            return compute if compute[-1].xacts - compute[0].xacts >= 400 else []  # type: ignore[operator]

        compute = _wait_for("our 400 SELECTs in pg_stat_database", counted)
        assert max(s.qps or 0 for s in compute) > 10
        lsns = [s.wal_lsn or 0 for s in compute]
        assert lsns[-1] - lsns[0] >= 10_000_000  # the table's WAL

        # The API: measured sizes, WAL written before any checkpoint (the sampled LSN), consumption.
        sampled.control.figures.touch(bid)
        sampled.call(sampled.control.figures.settle())
        branch = sampled.api.get(f"/projects/{pid}/branches/{bid}").json()["branch"]
        assert branch["logical_size"] >= before_api["logical_size"] + 10_000_000
        assert branch["written_data_bytes"] >= before_api["written_data_bytes"] + 10_000_000
        project = _wait_for("consumption figures", lambda: (
            p := sampled.api.get(f"/projects/{pid}").json()["project"])["active_time_seconds"] >= 1 and p)
        assert project["compute_time_seconds"] == project["cpu_used_sec"] >= 0
        assert project["active_time"] == project["active_time_seconds"]
        assert project["data_storage_bytes_hour"] > 0
        assert project["consumption_period_start"] <= project["consumption_period_end"]
        assert project["synthetic_storage_size"] >= later.storage_bytes - 5_000_000
        assert branch["active_time_seconds"] >= 1 or sampled.api.get(
            f"/projects/{pid}/branches/{bid}").json()["branch"]["active_time_seconds"] >= 1

    # Suspended: no more compute samples, the admin session is gone, storage is still measured.
    assert sampled.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200
    time.sleep(INTERVAL * 2)
    cut = sampled.plane.clock()
    _wait_for("a storage sample of the idle branch", lambda: [
        s for s in _samples(sampled, pid) if s.endpoint_id is None and s.at > cut])
    assert not [s for s in _samples(sampled, pid) if s.endpoint_id == ep and s.at > cut]
    idle = [s for s in _samples(sampled, pid) if s.endpoint_id is None and s.at > cut][-1]
    assert idle.logical_bytes == later.logical_bytes or abs((idle.logical_bytes or 0) - later.logical_bytes) < 2_000_000
    assert sampled.plane.computes.admin(ep) is None
    # The platform had its admin session open on the compute: the stop closed it first, so the
    # compute's log shows no FATAL "terminating connection" for the platform's own sampler.
    logs = sampled.api.get(f"/projects/{pid}/endpoints/{ep}/logs").text
    assert "shutting down" in logs and "FATAL" not in logs, logs[-2000:]
    sampled.delete_project(pid)
    assert _samples(sampled, pid) == []


def _on_disk(path: Path) -> tuple[int, int]:
    """(allocated bytes under `path`, each inode once; allocated bytes of files with more than one link)."""
    total = linked = 0
    seen: set[int] = set()
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            total += st.st_blocks * 512
            linked += st.st_blocks * 512 if st.st_nlink > 1 else 0
    return total, linked


def test_linked_history_bases_are_counted_once(sampled: RunningPlatform) -> None:
    """A branch's history base hard-linked to its parent's snapshot (ADR 0010) is one copy on disk: the
    branches' storage samples (what data_storage_bytes_hour adds up) and the project's
    synthetic_storage_size both add up to what the disk holds, not one copy per branch."""
    if sampled.plane.backend.name != "copy":
        pytest.skip("history bases are linked on the copy backend only")
    created = sampled.create_project(name="linked")
    pid, main = created["project"]["id"], created["branch"]["id"]
    ep = created["endpoints"][0]["id"]
    _wait_for("the first start", lambda: sampled.endpoint(pid, ep)["current_state"] == "active")
    assert sampled.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200
    resp = sampled.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "child"}})
    assert resp.status_code == 201, resp.text
    child = resp.json()["branch"]["id"]
    marker = sampled.plane.clock()
    disk, linked = _on_disk(sampled.plane.layout.project_dir(pid))
    assert linked > 10_000_000  # the child's base shares the parent's snapshot

    def latest() -> dict[str, int]:
        rows = [s for s in _samples(sampled, pid) if s.endpoint_id is None and s.at > marker]
        return {s.branch_id: s.storage_bytes or 0 for s in rows}

    storage = _wait_for("storage samples of both branches", lambda: (got := latest()).keys() >= {main, child} and got)
    assert abs(storage[main] + storage[child] - disk) < 1_000_000, (storage, disk, linked)
    sampled.control.figures.touch(main)
    sampled.control.figures.touch(child)
    sampled.call(sampled.control.figures.settle())
    project = sampled.api.get(f"/projects/{pid}").json()["project"]
    assert abs(project["synthetic_storage_size"] - disk) < 1_000_000, (project["synthetic_storage_size"], disk)
    sampled.delete_project(pid)

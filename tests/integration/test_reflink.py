"""The reflink backend on a real copy-on-write filesystem: `argon storage init` loop-mounts an XFS
image (reflink=1) at a data directory, and branching runs on it: a branch from head under pgbench
write load is consistent and costs next to no disk; a point-in-time branch works too."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.fixtures.platform import RunningPlatform, reflink_volume
from tests.integration.test_branches import branch, uri_of

pytestmark = pytest.mark.pg


@pytest.fixture
def xfs_root() -> Iterator[Path]:
    with reflink_volume() as root:
        yield root


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.slow  # a loop-mounted XFS volume and a platform on it
def test_branching_on_a_reflink_volume(xfs_root: Path) -> None:
    running = RunningPlatform(xfs_root)
    try:
        assert running.plane.backend.name == "reflink"
        assert running.api.get("/versions").json()["clone_backend"] == "reflink"  # the API says so too
        created = running.create_project(name="cow")
        pid = created["project"]["id"]
        uri = running.dsn(created)
        init = subprocess.run(["pgbench", "-i", "-s", "5", "-q", uri], capture_output=True, text=True, timeout=180)
        assert init.returncode == 0, init.stderr
        with psycopg.connect(uri) as conn:
            mark = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
        data = xfs_root / "data"
        # Idle parent: a branch is a reflink clone of ~80 MB (its history base links the parent's
        # snapshot, its WAL is copied with copy_file_range), which a plain copy would double.
        os.sync()
        time.sleep(1)
        before = _used(data)
        started = time.monotonic()
        idle_child = branch(running, pid, name="cow-idle")
        took = time.monotonic() - started
        os.sync()
        grown = _used(data) - before
        assert grown < 40 * 1024 * 1024, f"a reflink branch used {grown / 1e6:.0f} MB"
        assert took < 5, took
        with psycopg.connect(uri_of(idle_child), connect_timeout=30) as conn:
            assert conn.execute("SELECT count(*) FROM pgbench_accounts").fetchone() == (500000,)
        load = subprocess.Popen(["pgbench", "-c", "4", "-j", "2", "-T", "5", "-n", uri],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1)
            child = branch(running, pid, name="cow-child")
        finally:
            _out, err = load.communicate(timeout=60)
        assert load.returncode == 0, err
        with psycopg.connect(uri_of(child), connect_timeout=30) as conn:
            sums = conn.execute("SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
                                "(SELECT sum(bbalance) FROM pgbench_branches), "
                                "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)").fetchone()
        assert sums[0] == sums[1] == sums[2], sums  # consistent under write load
        past = branch(running, pid, name="cow-past", parent_lsn=mark)
        with psycopg.connect(uri_of(past), connect_timeout=30) as conn:
            assert conn.execute("SELECT count(*) FROM pgbench_history").fetchone() == (0,)
    finally:
        running.stop()

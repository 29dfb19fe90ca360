"""A full disk: project or branch creation fails with a clear 507, leaves nothing half made, loses nothing.

The data directory lives on a small tmpfs (root only: mounting needs it), so the disk really fills.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fixtures.platform import RunningPlatform, short_tmpdir

pytestmark = [pytest.mark.pg, pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")]


@pytest.fixture
def small_disk(request: pytest.FixtureRequest) -> Iterator[Path]:
    root = short_tmpdir("fd")
    size = getattr(request, "param", "190m")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(root)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs as root: {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow  # a platform of its own (its data on the small disk), filled
def test_full_disk_is_a_clear_error_and_loses_nothing(small_disk: Path) -> None:
    running = RunningPlatform(small_disk, spare_clusters=0)
    try:
        created: list[dict[str, Any]] = []
        failure = None
        for i in range(12):
            resp = running.api.post("/projects", json={"project": {"name": f"p{i}"}})
            if resp.status_code != 201:
                failure = resp
                break
            created.append(resp.json())
        assert failure is not None, "the disk never filled"
        assert created, "not even one project fitted"
        assert failure.status_code == 507, failure.text
        assert "no space left" in failure.json()["message"]
        # No half project: only the successful ones exist, on disk and in the API.
        listed = {p["id"] for p in running.api.get("/projects").json()["projects"]}
        assert listed == {c["project"]["id"] for c in created}
        assert {p.name for p in running.plane.layout.projects_dir.iterdir()} == listed
        # What was committed before is still there and readable.
        with psycopg.connect(running.dsn(created[0]), connect_timeout=30) as conn:
            assert conn.execute("select current_database()").fetchone() == ("neondb",)
        # Freeing space makes creation work again.
        for c in created[:2]:
            assert running.api.delete(f"/projects/{c['project']['id']}").status_code == 200
        resp = running.api.post("/projects", json={"project": {"name": "after"}})
        assert resp.status_code == 201, resp.text
    finally:
        with contextlib.suppress(Exception):
            running.stop()


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["300m"], indirect=True)
def test_full_disk_during_a_branch_copy_leaves_no_half_branch(small_disk: Path) -> None:
    running = RunningPlatform(small_disk, spare_clusters=0)
    try:
        created = running.create_project(name="parent")
        pid = created["project"]["id"]
        with psycopg.connect(running.dsn(created), autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g")
        failure = None
        for i in range(12):
            resp = running.api.post(f"/projects/{pid}/branches", json={"branch": {"name": f"b{i}"}})
            if resp.status_code != 201:
                failure = resp
                break
        assert failure is not None, "the disk never filled"
        assert i > 0, "not even one branch fitted"
        assert failure.status_code == 507 and "no space left" in failure.json()["message"], failure.text
        listed = {b["id"] for b in running.api.get(f"/projects/{pid}/branches").json()["branches"]}
        on_disk = {p.name for p in (running.plane.layout.project_dir(pid) / "branches").iterdir()}
        assert on_disk == listed  # no half branch
        with psycopg.connect(running.dsn(created), connect_timeout=30) as conn:  # the parent is intact
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (10000,)
    finally:
        with contextlib.suppress(Exception):
            running.stop()


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["300m"], indirect=True)
def test_a_tenant_filling_the_disk_meets_the_reserve_and_the_platform_keeps_working(small_disk: Path) -> None:
    """ADR 0025: a project without a size limit writes until the filesystem is within the platform's
    reserve (here a tenth of 300 MB); then its writes are refused, not failed by a full disk, Argon's
    metadata is still written, and dropping the data brings writes back."""
    running = RunningPlatform(small_disk, spare_clusters=0, disk_check_interval=0.25)
    try:
        created = running.create_project(name="filler")
        pid = created["project"]["id"]
        with psycopg.connect(running.dsn(created), autocommit=True, connect_timeout=30) as conn:
            conn.execute("CREATE TABLE t (v text)")
            refused = None
            for _ in range(2000):
                try:
                    conn.execute("INSERT INTO t SELECT repeat(md5(g::text), 32) FROM generate_series(1, 500) g")
                except psycopg.Error as exc:
                    refused = exc
                    break
                time.sleep(0.05)  # an application's pace: the guard looks 4 times a second
            assert isinstance(refused, psycopg.errors.ReadOnlySqlTransaction | psycopg.errors.QueryCanceled), refused
            resp = running.api.post("/projects", json={"project": {"name": "more"}})
            assert resp.status_code == 507 and "ARGON_DISK_RESERVE" in resp.json()["message"], resp.text
            assert running.api.patch(f"/projects/{pid}", json={"project": {"name": "renamed"}}).status_code == 200
            conn.execute("SET default_transaction_read_only = off")
            conn.execute("DROP TABLE t")
            conn.execute("RESET default_transaction_read_only")
            deadline = time.monotonic() + 30
            while True:
                try:
                    conn.execute("CREATE TABLE again (v int)")
                    break
                except psycopg.errors.ReadOnlySqlTransaction:
                    assert time.monotonic() < deadline, "writes never came back"
                    time.sleep(0.2)
        assert running.api.get(f"/projects/{pid}").json()["project"]["name"] == "renamed"
    finally:
        with contextlib.suppress(Exception):
            running.stop()

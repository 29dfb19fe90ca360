"""A full disk: project creation fails with a clear 507, leaves no half project, and loses nothing.

The data directory lives on a small tmpfs (root only: mounting needs it), so the disk really fills.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fixtures.platform import RunningPlatform, short_tmpdir

pytestmark = [pytest.mark.pg, pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")]


@pytest.fixture
def small_disk() -> Iterator[Path]:
    root = short_tmpdir("fd")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=190m,mode=0755", "tmpfs", str(root)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs as root: {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)


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

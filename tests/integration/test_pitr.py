"""Point in time: branches at an LSN or a timestamp recorded between commits, restoring a branch to
its own past (across earlier restores), history retention and pruning with a simulated clock.

Semantics under test (docs/architecture.md, "Point in time"): an LSN read with pg_current_wal_lsn()
after a commit includes that commit; a timestamp includes every commit at or before it."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from argon import model
from argon.storage.wal import parse_lsn, segment_start
from tests.fixtures.platform import RunningPlatform
from tests.integration.test_branches import branch, scalar, uri_of

pytestmark = pytest.mark.pg


def commits_with_marks(uri: str, n: int, start: int = 1) -> list[tuple[str, datetime]]:
    """Insert rows start..start+n-1, one transaction each; after each commit record (LSN, time)."""
    marks = []
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t (v int)")
        for i in range(start, start + n):
            conn.execute("INSERT INTO t VALUES (%s)", (i,))
            row = conn.execute("SELECT pg_current_wal_lsn()::text, clock_timestamp()").fetchone()
            assert row is not None
            marks.append((row[0], row[1]))
    return marks


def rfc3339(t: datetime) -> str:
    return t.astimezone().isoformat().replace("+00:00", "Z")


@pytest.fixture
def clock(platform: RunningPlatform) -> Iterator[list[timedelta]]:
    """Move the platform's clock: `clock[0] = timedelta(hours=1)`."""
    offset = [timedelta(0)]
    plane = platform.plane
    plane.clock = lambda: model.utcnow() + offset[0]
    try:
        yield offset
    finally:
        plane.clock = model.utcnow


def count_at(platform: RunningPlatform, pid: str, **point: Any) -> int:
    created = branch(platform, pid, **point)
    try:
        return int(scalar(uri_of(created), "SELECT count(*) FROM t"))
    finally:
        platform.api.delete(f"/projects/{pid}/branches/{created['branch']['id']}")


def test_branch_at_lsn_and_timestamp(platform: RunningPlatform, project: dict[str, Any],
                                     clock: list[timedelta]) -> None:
    pid = project["project"]["id"]
    marks = commits_with_marks(platform.dsn(project), 4)
    # LSNs between commits: exactly the commits before each one.
    assert count_at(platform, pid, parent_lsn=marks[0][0]) == 1
    assert count_at(platform, pid, parent_lsn=marks[2][0]) == 3
    # Timestamps between commits, as neonctl sends them (UTC, Z) and with an offset.
    assert count_at(platform, pid, parent_timestamp=rfc3339(marks[1][1])) == 2
    assert count_at(platform, pid, parent_timestamp=marks[2][1].isoformat()) == 3
    created = branch(platform, pid, parent_timestamp=rfc3339(marks[0][1]))
    assert created["branch"]["parent_timestamp"].startswith(marks[0][1].astimezone().strftime("%Y-%m-%dT%H:%M"))
    platform.api.delete(f"/projects/{pid}/branches/{created['branch']['id']}")
    # A quiet database an hour after its last write: the target lies after every commit.
    clock[0] = timedelta(hours=1)
    assert count_at(platform, pid, parent_timestamp=rfc3339(marks[-1][1] + timedelta(hours=1))) == 4
    clock[0] = timedelta(0)
    # Out of range, malformed: clear 400s.
    for point, words in [({"parent_timestamp": rfc3339(model.utcnow() + timedelta(hours=2))}, "future"),
                         ({"parent_timestamp": rfc3339(model.utcnow() - timedelta(days=2))}, "retention"),
                         ({"parent_timestamp": "yesterday"}, "not a timestamp"),
                         ({"parent_lsn": "zz"}, "not an LSN"),
                         ({"parent_lsn": "FF/0"}, "ahead")]:
        resp = platform.api.post(f"/projects/{pid}/branches", json={"branch": point})
        assert resp.status_code == 400 and words in resp.json()["message"], (point, resp.text)


def test_point_in_time_on_every_installed_version(platform: RunningPlatform) -> None:
    for version in sorted(platform.plane.installs):
        created = platform.create_project(name=f"pitr-{version}", pg_version=version)
        pid = created["project"]["id"]
        try:
            marks = commits_with_marks(platform.dsn(created), 2)
            assert count_at(platform, pid, parent_lsn=marks[0][0]) == 1, version
            assert count_at(platform, pid, parent_timestamp=rfc3339(marks[1][1])) == 2, version
        finally:
            platform.delete_project(pid)


def test_point_in_time_of_a_compute_larger_than_the_smallest(platform: RunningPlatform) -> None:
    """A recovery run has the smallest compute's settings; the branch's compute ran with more
    connections (2 CU: 839), which its WAL records. A hot standby would refuse that WAL (it paused at
    the parameter-change record until the request timed out); the recovery run is not one."""
    two_cu = {"autoscaling_limit_min_cu": 2, "autoscaling_limit_max_cu": 2}
    created = platform.create_project(name="pitr-2cu", default_endpoint_settings=two_cu)
    pid = created["project"]["id"]
    try:
        assert int(scalar(platform.dsn(created), "SHOW max_connections")) > 104
        marks = commits_with_marks(platform.dsn(created), 3)
        assert count_at(platform, pid, parent_lsn=marks[1][0]) == 2
        assert count_at(platform, pid, parent_timestamp=rfc3339(marks[2][1])) == 3
    finally:
        platform.delete_project(pid)


def test_point_in_time_of_a_suspended_branch_and_of_a_child(platform: RunningPlatform,
                                                            project: dict[str, Any]) -> None:
    pid = project["project"]["id"]
    marks = commits_with_marks(platform.dsn(project), 3)
    ep = project["endpoints"][0]["id"]
    assert platform.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200
    # Stopped: the last segment was never archived, it is read from the branch's pg_wal.
    assert count_at(platform, pid, parent_lsn=marks[1][0]) == 2
    assert count_at(platform, pid, parent_timestamp=rfc3339(marks[2][1])) == 3
    # A child taken from the head (an online backup as its base) has its own history.
    child = branch(platform, pid, name="child")
    child_marks = commits_with_marks(uri_of(child), 2, start=10)
    cid = child["branch"]["id"]
    grandchild = branch(platform, pid, parent_id=cid, parent_lsn=child_marks[0][0])
    assert scalar(uri_of(grandchild), "SELECT string_agg(v::text, ',' ORDER BY v) FROM t") == "1,2,3,10"
    grandchild2 = branch(platform, pid, parent_id=cid, parent_timestamp=rfc3339(child_marks[1][1]))
    assert scalar(uri_of(grandchild2), "SELECT count(*) FROM t") == 5
    # The parent's password works on a point-in-time branch too.
    assert scalar(uri_of(grandchild2), "SELECT current_user") == "neondb_owner"


@pytest.fixture(params=["copy", "reflink"])
def on_either_backend(request: pytest.FixtureRequest, platform: RunningPlatform) -> Iterator[RunningPlatform]:
    """The session's platform (plain copies on this machine's ext4) or the reflink one (root only)."""
    if request.param == "copy":
        yield platform
        return
    reflink: RunningPlatform = request.getfixturevalue("reflink_platform")
    assert reflink.plane.backend.name == "reflink"
    yield reflink


def test_a_childs_history_links_its_parents_instead_of_copying(on_either_backend: RunningPlatform) -> None:
    """On both backends a child's history base is its parent's snapshot, hard-linked, plus the
    parent's WAL since it: no second copy of the data (a reflink copy shares the extents, but it
    still takes as long as the branch's own copy). Its points in time stay exact, also after the
    parent's own history is gone, and the child's own snapshots start from it."""
    platform = on_either_backend
    project = platform.create_project(name="linked")
    try:
        _links_its_parents(platform, project)
    finally:
        platform.delete_project(project["project"]["id"])


def _links_its_parents(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, parent_id = project["project"]["id"], project["branch"]["id"]
    uri = platform.dsn(project)
    with psycopg.connect(uri, autocommit=True) as conn:  # several WAL segments between the parent's base and the child
        conn.execute("CREATE TABLE pad AS SELECT g, repeat('x', 400) AS p FROM generate_series(1, 20000) g")
    commits_with_marks(uri, 2)  # parent: 1, 2 (its compute keeps running: the child is an online copy)
    child = branch(platform, pid, name="linked")
    cid = child["branch"]["id"]
    layout = platform.plane.layout
    child_manifest = json.loads((layout.branch_dir(pid, cid) / "history" / "manifest.json").read_text())
    parent_manifest = json.loads((layout.branch_dir(pid, parent_id) / "history" / "manifest.json").read_text())
    child_epoch, parent_epoch = child_manifest["epochs"][0], parent_manifest["epochs"][-1]
    base = layout.branch_dir(pid, cid) / "history" / child_epoch["id"] / "snapshots" / "base"
    parent_snap = layout.branch_dir(pid, parent_id) / "history" / parent_epoch["id"] / "snapshots" / "base"
    assert (base / "PG_VERSION").stat().st_ino == (parent_snap / "PG_VERSION").stat().st_ino  # a link, not a copy
    # The parent's WAL from its base up to the copy's first segment is in the child's archive.
    assert list((layout.branch_dir(pid, cid) / "history" / child_epoch["id"] / "wal").iterdir())
    # Points on the child, between its own commits, are exact.
    child_marks = commits_with_marks(uri_of(child), 3, start=10)
    assert count_at(platform, pid, parent_id=cid, parent_lsn=child_marks[0][0]) == 3
    assert count_at(platform, pid, parent_id=cid, parent_timestamp=rfc3339(child_marks[1][1])) == 4
    # The parent's history going away (pruning, a restore) leaves the child's whole.
    shutil.rmtree(layout.branch_dir(pid, parent_id) / "history" / parent_epoch["id"])
    assert count_at(platform, pid, parent_id=cid, parent_lsn=child_marks[1][0]) == 4
    resp = platform.api.post(f"/projects/{pid}/branches/{cid}/restore",
                             json={"source_branch_id": cid, "source_lsn": child_marks[0][0]})
    assert resp.status_code == 200, resp.text
    assert scalar(uri_of(child), "SELECT string_agg(v::text, ',' ORDER BY v) FROM t") == "1,2,10"
    assert scalar(uri_of(child), "SELECT count(*) FROM pad") == 20000


def test_restore_to_own_past_keeps_ids_and_history(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid = project["project"]["id"]
    bid = project["branch"]["id"]
    uri = platform.dsn(project)
    marks = commits_with_marks(uri, 3)
    resp = platform.api.post(f"/projects/{pid}/branches/{bid}/restore",
                             json={"source_branch_id": bid, "source_timestamp": rfc3339(marks[1][1]),
                                   "preserve_under_name": "before-restore"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["branch"]["id"] == bid
    assert scalar(uri, "SELECT count(*) FROM t") == 2  # same connection string, the past state
    kept = next(b for b in platform.api.get(f"/projects/{pid}/branches").json()["branches"]
                if b["name"] == "before-restore")
    kept_ep = platform.api.post(f"/projects/{pid}/endpoints",
                                json={"endpoint": {"branch_id": kept["id"], "type": "read_write"}})
    assert kept_ep.status_code == 201, kept_ep.text
    kept_uri = platform.dsn(project).replace(project["endpoints"][0]["id"], kept_ep.json()["endpoint"]["id"])
    assert scalar(kept_uri, "SELECT count(*) FROM t") == 3  # the state before the restore, kept
    # After a restore without preserving: new writes, then back to before the restore (older epoch).
    after = commits_with_marks(uri, 1, start=20)
    resp = platform.api.post(f"/projects/{pid}/branches/{bid}/restore",
                             json={"source_branch_id": bid, "source_lsn": marks[0][0]})
    assert resp.status_code == 200, resp.text
    assert scalar(uri, "SELECT string_agg(v::text, ',' ORDER BY v) FROM t") == "1"
    resp = platform.api.post(f"/projects/{pid}/branches/{bid}/restore",
                             json={"source_branch_id": bid, "source_timestamp": rfc3339(after[0][1])})
    assert resp.status_code == 200, resp.text
    assert scalar(uri, "SELECT string_agg(v::text, ',' ORDER BY v) FROM t") == "1,2,20"
    resp = platform.api.post(f"/projects/{pid}/branches/{bid}/restore", json={"source_branch_id": bid})
    assert resp.status_code == 400 and "own head" in resp.json()["message"]


def _history_bytes(root: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(root) for f in fs)


def test_retention_prunes_snapshots_and_wal(platform: RunningPlatform, clock: list[timedelta]) -> None:
    created = platform.create_project(name="retention", history_retention_seconds=3600)
    pid, bid = created["project"]["id"], created["branch"]["id"]
    ep = created["endpoints"][0]["id"]
    uri = platform.dsn(created)
    history = platform.plane.layout.branch_dir(pid, bid) / "history"
    try:
        def write_and_suspend(rows: int) -> None:
            with psycopg.connect(uri, autocommit=True) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS big (v int, pad text)")
                conn.execute("INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, %s) g", (rows,))
            assert platform.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200

        write_and_suspend(20000)  # the base is fresh: no snapshot yet
        manifest = json.loads((history / "manifest.json").read_text())
        assert [s["name"] for s in manifest["epochs"][0]["snapshots"]] == ["base"]
        clock[0] = timedelta(hours=2)
        write_and_suspend(20000)  # a snapshot is due: the newest is older than half the window
        clock[0] = timedelta(hours=4)
        before = _history_bytes(history)
        write_and_suspend(20000)  # another; the base and the WAL before the first snapshot go
        manifest = json.loads((history / "manifest.json").read_text())
        names = [s["name"] for s in manifest["epochs"][0]["snapshots"]]
        assert "base" not in names and len(names) == 2, names
        epoch = manifest["epochs"][0]["id"]
        assert not (history / epoch / "snapshots" / "base").exists()
        first_redo = parse_lsn(manifest["epochs"][0]["snapshots"][0]["redo_lsn"])
        archived = [segment_start(p.name, 1 << 20) for p in (history / epoch / "wal").iterdir()]
        assert archived and min(seg[1] for seg in archived if seg) + (1 << 20) > first_redo  # older WAL pruned
        # bounded: what is left is the two kept snapshots and the WAL after the first (the base, the
        # template itself until a restore needs it, took no space of the branch's: ADR 0022)
        kept = sum(_history_bytes(history / epoch / "snapshots" / name) for name in names)
        assert _history_bytes(history) < kept + 8 * 1024 * 1024, (_history_bytes(history), kept, before)
        # Inside the window: works (replays from the kept snapshot). Before it: a clear 400.
        now = model.utcnow() + clock[0]
        child = branch(platform, pid, parent_timestamp=rfc3339(now - timedelta(minutes=10)))
        assert scalar(uri_of(child), "SELECT count(*) FROM big") == 60000
        resp = platform.api.post(f"/projects/{pid}/branches",
                                 json={"branch": {"parent_timestamp": rfc3339(model.utcnow())}})
        assert resp.status_code == 400 and "retention" in resp.json()["message"]
    finally:
        clock[0] = timedelta(0)
        platform.delete_project(pid)


def test_cli_branches_at_a_point_and_restore(platform: RunningPlatform, project: dict[str, Any]) -> None:
    from tests.integration.test_cli import argon

    pid = project["project"]["id"]
    uri = platform.dsn(project)
    marks = commits_with_marks(uri, 3)
    out = argon(platform, "branches", "create", "--project-id", pid, "--name", "at-lsn",
                "--parent", f"main@{marks[0][0]}").stdout
    assert "Created branch at-lsn" in out
    lsn_uri = next(line.strip() for line in out.splitlines() if line.strip().startswith("postgresql://"))
    assert scalar(lsn_uri, "SELECT count(*) FROM t") == 1
    out = argon(platform, "branches", "restore", "main", f"^self@{rfc3339(marks[1][1])}", "--project-id", pid,
                "--preserve-under-name", "main-before").stdout
    assert "Restored branch main" in out and "main-before" in out
    assert scalar(uri, "SELECT count(*) FROM t") == 2
    bad = argon(platform, "branches", "restore", "main", "^self@yesterday", "--project-id", pid, check=False)
    assert bad.returncode != 0 and "neither an LSN" in bad.stderr and "Traceback" not in bad.stderr


def test_online_snapshot_of_a_compute_that_never_suspends(platform: RunningPlatform, clock: list[timedelta]) -> None:
    from argon.control.retention import maintain

    created = platform.create_project(name="busy", history_retention_seconds=3600)
    pid, bid = created["project"]["id"], created["branch"]["id"]
    uri = platform.dsn(created)
    history = platform.plane.layout.branch_dir(pid, bid) / "history"
    try:
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE TABLE big AS SELECT g AS v, repeat('x', 100) AS pad FROM generate_series(1, 20000) g")
        clock[0] = timedelta(hours=2)
        platform.call(maintain(platform.plane))
        snaps = json.loads((history / "manifest.json").read_text())["epochs"][0]["snapshots"]
        assert len(snaps) == 2, snaps
        epoch = json.loads((history / "manifest.json").read_text())["epochs"][0]["id"]
        assert (history / epoch / "snapshots" / snaps[1]["name"] / "backup_label").exists()
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("INSERT INTO big VALUES (0, 'after')")
        child = branch(platform, pid, parent_timestamp=rfc3339(model.utcnow() + clock[0]))
        assert scalar(uri_of(child), "SELECT count(*) FROM big") == 20001  # replayed from the online snapshot
    finally:
        clock[0] = timedelta(0)
        platform.delete_project(pid)


def test_a_throw_away_cluster_at_a_point(platform: RunningPlatform, project: dict[str, Any]) -> None:
    from argon.compute.admin import connect_admin
    from argon.control.pitr import cluster_at

    pid, bid = project["project"]["id"], project["branch"]["id"]
    marks = commits_with_marks(platform.dsn(project), 2)
    plane = platform.plane

    async def read() -> int:
        async with cluster_at(plane, plane.project(pid), plane.branch(pid, bid), lsn=marks[0][0]) as socket_dir:
            conn = await connect_admin(socket_dir, "neondb")
            try:
                cur = await conn.execute("SELECT count(*) FROM t")
                row = await cur.fetchone()
                return int(row[0]) if row else -1
            finally:
                await conn.close()

    assert platform.call(read()) == 1
    assert not list(plane.layout.branch_dir(pid, bid).glob("tmp-*"))

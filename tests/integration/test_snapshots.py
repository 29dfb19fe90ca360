"""Neon's snapshots API (ADR 0028) on the shared platform: a snapshot of a branch's head and at an
LSN, list / get / rename / re-date / delete, restore to a previewed new branch and finalize it,
restore onto a branch at once, expiry; Neon's errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from tests.fixtures.platform import RunningPlatform

pytestmark = [pytest.mark.pg, pytest.mark.slow]


def rows(platform: RunningPlatform, created: dict[str, Any], endpoint_id: str | None = None) -> list[int]:
    dsn = platform.dsn(created)
    if endpoint_id:
        dsn = dsn.replace(created["endpoints"][0]["id"], endpoint_id)
    with psycopg.connect(dsn, connect_timeout=30) as conn:
        return [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v").fetchall()]


def insert(platform: RunningPlatform, created: dict[str, Any], v: int) -> str:
    with psycopg.connect(platform.dsn(created), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t (v int)")
        conn.execute("INSERT INTO t VALUES (%s)", (v,))
        return str(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]


def test_snapshot_lifecycle_restore_preview_finalize_and_in_place(platform: RunningPlatform,
                                                                   project: dict[str, Any]) -> None:
    api, pid, main = platform.api, project["project"]["id"], project["branch"]["id"]
    after_1 = insert(platform, project, 1)
    insert(platform, project, 2)

    resp = api.post(f"/projects/{pid}/branches/{main}/snapshot", params={"name": "head"})
    assert resp.status_code == 200, resp.text
    head = resp.json()["snapshot"]
    assert head["name"] == "head" and head["source_branch_id"] == main and head["manual"] is True
    assert head["id"].startswith("snap-") and head["lsn"] and resp.json()["operations"]
    at_lsn = api.post(f"/projects/{pid}/branches/{main}/snapshot", params={"lsn": after_1}).json()["snapshot"]
    assert at_lsn["lsn"] == after_1 and at_lsn["name"]  # a name is made up when none is given

    # Neon's errors: both a point and a time; an unknown branch or snapshot; a past expiry.
    both = api.post(f"/projects/{pid}/branches/{main}/snapshot", params={"lsn": after_1, "timestamp": "2026-01-01T00:00:00Z"})
    assert both.status_code == 400, both.text
    assert api.post(f"/projects/{pid}/branches/br-none-00000000/snapshot").status_code == 404
    assert api.get(f"/projects/{pid}/snapshots/snap-none-00000000").status_code == 404
    past = api.post(f"/projects/{pid}/branches/{main}/snapshot", params={"expires_at": "2020-01-01T00:00:00Z"})
    assert past.status_code == 400 and "future" in past.json()["message"], past.text

    listed = api.get(f"/projects/{pid}/snapshots").json()["snapshots"]
    assert [s["id"] for s in listed] == [head["id"], at_lsn["id"]]
    expiry = (datetime.now(UTC) + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    patched = api.patch(f"/projects/{pid}/snapshots/{head['id']}",
                        json={"snapshot": {"name": "renamed", "expires_at": expiry}}).json()["snapshot"]
    assert patched["name"] == "renamed" and patched["expires_at"] == expiry
    cleared = api.patch(f"/projects/{pid}/snapshots/{head['id']}", json={"snapshot": {"expires_at": None}})
    assert "expires_at" not in cleared.json()["snapshot"] and cleared.json()["snapshot"]["name"] == "renamed"

    insert(platform, project, 3)  # main moves on; the snapshots do not
    # Neon's default: a new branch to look at first (restore_status "restored").
    resp = api.post(f"/projects/{pid}/snapshots/{at_lsn['id']}/restore", json={"name": "preview"})
    assert resp.status_code == 200, resp.text
    preview = resp.json()["branch"]
    assert preview["restored_from"] == at_lsn["id"] and preview["restore_status"] == "restored"
    ep = api.post(f"/projects/{pid}/endpoints", json={"endpoint": {"branch_id": preview["id"], "type": "read_write"}})
    assert ep.status_code == 201, ep.text
    assert rows(platform, project, ep.json()["endpoint"]["id"]) == [1]
    assert rows(platform, project) == [1, 2, 3]
    not_restored = api.post(f"/projects/{pid}/branches/{main}/finalize_restore", json={})
    assert not_restored.status_code == 400, not_restored.text

    # Finalize: main gets the preview's data (its endpoint and connection string stay), its old state
    # is kept under the given name, the preview branch is gone.
    resp = api.post(f"/projects/{pid}/branches/{preview['id']}/finalize_restore", json={"name": "main-before"})
    assert resp.status_code == 200, resp.text
    assert rows(platform, project) == [1]
    names = {b["name"]: b for b in api.get(f"/projects/{pid}/branches").json()["branches"]}
    assert "preview" not in names and "main-before" in names
    restored_main = api.get(f"/projects/{pid}/branches/{main}").json()["branch"]
    assert restored_main["restored_from"] == at_lsn["id"] and restored_main["restore_status"] == "finalized"

    # finalize_restore at once: onto main in place, the replaced state kept under a generated name.
    resp = api.post(f"/projects/{pid}/snapshots/{head['id']}/restore",
                    json={"target_branch_id": main, "finalize_restore": True})
    assert resp.status_code == 200, resp.text
    assert resp.json()["branch"]["id"] == main and rows(platform, project) == [1, 2]
    assert len(api.get(f"/projects/{pid}/branches").json()["branches"]) == 3

    deleted = api.delete(f"/projects/{pid}/snapshots/{at_lsn['id']}")
    assert deleted.status_code == 202, deleted.text
    assert api.get(f"/projects/{pid}/snapshots/{at_lsn['id']}").status_code == 404
    assert [s["id"] for s in api.get(f"/projects/{pid}/snapshots").json()["snapshots"]] == [head["id"]]
    assert not (platform.plane.layout.snapshot_dir(pid, at_lsn["id"])).exists()


def test_an_expired_snapshot_is_deleted(platform: RunningPlatform, project: dict[str, Any]) -> None:
    from argon.control import snapshots

    api, pid, main = platform.api, project["project"]["id"], project["branch"]["id"]
    insert(platform, project, 1)
    soon = (datetime.now(UTC) + timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%SZ")  # 2-3 s from now
    snap = api.post(f"/projects/{pid}/branches/{main}/snapshot", params={"expires_at": soon}).json()["snapshot"]
    kept = api.post(f"/projects/{pid}/branches/{main}/snapshot").json()["snapshot"]
    gone = platform.call(snapshots.delete_expired(platform.control))
    assert snap["expires_at"] == soon
    assert gone == [] or datetime.now(UTC) >= datetime.fromisoformat(soon)  # (a loaded machine took that long)
    import time

    time.sleep(max(0.0, (datetime.fromisoformat(soon) - datetime.now(UTC)).total_seconds()) + 0.1)
    platform.call(snapshots.delete_expired(platform.control))  # (or the monitor did, meanwhile)
    assert [s["id"] for s in api.get(f"/projects/{pid}/snapshots").json()["snapshots"]] == [kept["id"]]


def test_neonctl_snapshots(platform: RunningPlatform, project: dict[str, Any]) -> None:
    """neonctl 5's snapshot commands as they come: create, list, get and update by name, restore
    onto the branch with --finalize, delete."""
    from tests.fixtures.npm import npm_install
    from tests.integration.test_neon_clients import NEONCTL_VERSION, run_neonctl

    exe = npm_install(f"neonctl@{NEONCTL_VERSION}", ".bin/neonctl") / "node_modules" / ".bin" / "neonctl"
    pid = project["project"]["id"]
    insert(platform, project, 1)
    snap = run_neonctl(platform, exe, "snapshots", "create", "--name", "one", "--project-id", pid)
    assert snap["name"] == "one" and snap["id"].startswith("snap-")
    insert(platform, project, 2)
    assert [s["id"] for s in run_neonctl(platform, exe, "snapshots", "list", "--project-id", pid)] == [snap["id"]]
    assert run_neonctl(platform, exe, "snapshots", "get", "one", "--project-id", pid)["id"] == snap["id"]
    renamed = run_neonctl(platform, exe, "snapshots", "update", "one", "--name", "uno", "--project-id", pid)
    assert renamed["name"] == "uno"
    run_neonctl(platform, exe, "snapshots", "restore", "uno", "--target-branch", "main", "--finalize",
                "--project-id", pid)
    assert rows(platform, project) == [1]
    run_neonctl(platform, exe, "snapshots", "delete", "uno", "--project-id", pid)
    assert run_neonctl(platform, exe, "snapshots", "list", "--project-id", pid) == []


def test_backup_schedule_takes_scheduled_snapshots_with_their_retention(platform: RunningPlatform,
                                                                         project: dict[str, Any]) -> None:
    """Neon's backup_schedule (ADR 0032): set, read back, refused when wrong; the loop's look takes a
    due snapshot once (manual false, expiring after retention_seconds); the console shows it."""
    import httpx

    from argon.control import schedules

    api, pid, main = platform.api, project["project"]["id"], project["branch"]["id"]
    path = f"/projects/{pid}/branches/{main}/backup_schedule"
    assert api.get(path).json() == {"schedule": []}
    for bad in ({"schedule": [{"frequency": "minutely"}]}, {"schedule": [{"frequency": "daily", "hour": 24}]},
                {"schedule": [{"frequency": "hourly", "retention_seconds": 60}]}, {"schedule": "daily"}):
        resp = api.put(path, json=bad)
        assert resp.status_code == 400, (bad, resp.text)
    resp = api.put(path, json={"schedule": [{"frequency": "hourly", "retention_seconds": 7200},
                                            {"frequency": "weekly", "day": 1, "hour": 2}]})
    assert resp.status_code == 200 and resp.json() == {}, resp.text
    assert api.get(path).json()["schedule"][0] == {"frequency": "hourly", "retention_seconds": 7200}
    assert api.get(f"/projects/{pid}/branches/br-none-00000000/backup_schedule").status_code == 404

    insert(platform, project, 1)
    later = datetime.now(UTC) + timedelta(days=8)  # both slots are past then, and the branch older than them
    taken = platform.call(schedules.run_once(platform.control, later), timeout=180)
    assert len(taken) == 2
    assert platform.call(schedules.run_once(platform.control, later), timeout=180) == []  # once per slot
    snaps = {s["id"]: s for s in api.get(f"/projects/{pid}/snapshots").json()["snapshots"]}
    hourly = next(snaps[i] for i in taken if "-hourly-" in snaps[i]["name"])
    assert hourly["manual"] is False and "expires_at" in hourly
    assert "expires_at" not in next(snaps[i] for i in taken if "-weekly-" in snaps[i]["name"])

    link = api.post("/console/sign_in_links").json()["url"]
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        browser.get(link)
        page = browser.get(f"{platform.api_url}/projects/{pid}/branches").text
    assert "Backup schedule: hourly, kept 2 h; weekly on Monday at 02:00 UTC, kept until deleted" in page
    assert api.put(path, json={"schedule": []}).status_code == 200
    assert api.get(path).json() == {"schedule": []}
    for snap_id in taken:
        api.delete(f"/projects/{pid}/snapshots/{snap_id}")

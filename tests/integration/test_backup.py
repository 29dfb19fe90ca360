"""Continuous backup end to end: a platform shipping to a real S3-compatible server (moto's), and
`argon restore` bringing every project back on a fresh data directory with the same ids,
passwords and API keys; point in time; damaged, missing and wrongly keyed objects."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest

from argon.control.restore import parse_at, restore
from argon.errors import ArgonError, ConfigError
from argon.settings import Settings
from argon.storage.backup.objects import CorruptObject, WrongKey
from argon.storage.layout import Layout
from tests.fixtures.argon_process import query, restored_cluster
from tests.fixtures.platform import RunningPlatform, short_tmpdir
from tests.fixtures.s3 import S3Server

pytestmark = [pytest.mark.pg, pytest.mark.slow]
KEY = "backup test key"


@pytest.fixture(scope="module")
def shipping(s3_server: S3Server) -> Iterator[tuple[RunningPlatform, str]]:
    url = f"s3://{s3_server.new_bucket()}/argon"
    root = short_tmpdir("bk")
    running = RunningPlatform(root, backup_url=url, backup_s3_endpoint=s3_server.endpoint, backup_key=KEY)
    try:
        yield running, url
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def wait_shipped(platform: RunningPlatform, branches: int, timeout: float = 60,
                 since: str | None = None) -> dict[str, Any]:
    """Until every branch's WAL is in the bucket and each has a base backup (and, with `since`, a
    metadata copy at or after that time is there)."""
    deadline = time.monotonic() + timeout
    while True:
        status = platform.api.get("/backup").json()["backup"]
        rows = status["branches"]
        meta = status["last_metadata_backup_at"]
        if (len(rows) >= branches and all(r["lag_bytes"] == 0 and r["last_base_backup"] for r in rows)
                and not status["error"] and (since is None or (meta and _t(meta) >= _t(since)))):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


def own_chunk(platform: RunningPlatform, project_id: str, branch_id: str) -> str:
    """The key of a chunk the branch's base backup needs."""
    from argon.control.backup import branch_prefix
    from argon.storage.backup import bases as bb

    service = platform.control.backup
    key = next(o.key for o in service.store.list(branch_prefix(project_id, branch_id)) if "/bases/" in o.key)
    manifest = bb.read_manifest(service.store, service.codec, key)
    entry = next(e for e in manifest["files"] if e.get("chunks") or e.get("pack"))
    return bb.chunk_key(entry["pack"] if "pack" in entry else entry["chunks"][0])


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def restore_into(settings: Settings, url: str, at: datetime | None = None, **overrides: Any) -> Path:
    root = short_tmpdir("rs")
    target = settings.model_copy(update={"data_dir": root / "data", "run_dir": root / "run", **overrides})
    try:
        asyncio.run(restore(target, url, at))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


@pytest.mark.timeout(900)  # three restores and a second platform: minutes on a loaded 2-core machine
def test_restore_brings_back_every_project_with_ids_passwords_and_keys(shipping: tuple[RunningPlatform, str]) -> None:
    platform, url = shipping
    created = platform.create_project(name="kept")
    pid = created["project"]["id"]
    with psycopg.connect(platform.dsn(created)) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")
        conn.execute("INSERT INTO t (id) SELECT generate_series(1, 1000)")
    resp = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "dev"}, "endpoints": [{"type": "read_write"}]})
    assert resp.status_code == 201, resp.text
    dev = resp.json()
    key = platform.api.post("/api_keys", json={"key_name": "restored"}).json()["key"]
    dev_ep = dev["endpoints"][0]["id"]
    dev_dsn = platform.dsn(created).replace(created["endpoints"][0]["id"], dev_ep)
    with psycopg.connect(dev_dsn) as conn:
        conn.execute("INSERT INTO t (id) VALUES (5000)")
    with psycopg.connect(platform.dsn(created), autocommit=True) as conn:
        conn.execute("INSERT INTO t (id) VALUES (1001)")
        middle, middle_lsn = conn.execute("SELECT clock_timestamp(), pg_current_wal_lsn()::text").fetchone()  # type: ignore[misc]
        time.sleep(0.05)
        conn.execute("INSERT INTO t (id) VALUES (1002)")  # the last commit before the "loss"
    # A snapshot of dev (ADR 0028) goes to the bucket too, and survives the loss of this disk.
    snap = platform.api.post(f"/projects/{pid}/branches/{dev['branch']['id']}/snapshot").json()["snapshot"]
    service = platform.control.backup
    deadline = time.monotonic() + 60
    while not service.store.exists(f"snapshots/{pid}/{snap['id']}.json"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    changed = datetime.now(UTC).isoformat()  # the API key and the branch are in a metadata copy after this
    status = wait_shipped(platform, branches=2, since=changed)
    assert status["encrypted"] and status["last_metadata_backup_at"]

    # The machine is lost now; a new one restores from the bucket alone: lazily (ADR 0032), the
    # metadata now, each branch's data on its first wake or by the background sweep.
    root = restore_into(platform.settings, url)
    assert not Layout(root / "data", root / "run").pgdata(pid, created["branch"]["id"]).exists()
    try:
        again = RunningPlatform(root, backup_url=url, backup_s3_endpoint=platform.settings.backup_s3_endpoint,
                                backup_key=KEY)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        with __import__("httpx").Client(base_url=again.api_url + "/api/v2",
                                        headers={"Authorization": f"Bearer {key}"}) as api:
            project = api.get(f"/projects/{pid}").json()["project"]  # the API key made before the loss works
            assert project["name"] == "kept"
            names = sorted(b["name"] for b in api.get(f"/projects/{pid}/branches").json()["branches"])
            assert names == ["dev", "main"]
        port = str(again.proxy_port)
        with psycopg.connect(platform.dsn(created).replace(str(platform.proxy_port), port)) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM t WHERE id > 999 ORDER BY id")]
            assert ids == [1000, 1001, 1002]  # same password, same endpoint id, nothing lost
        with psycopg.connect(dev_dsn.replace(str(platform.proxy_port), port)) as conn:
            assert conn.execute("SELECT count(*), max(id) FROM t").fetchone() == (1001, 5000)
            conn.execute("INSERT INTO t (id) VALUES (5001)")  # after the snapshot
        deadline = time.monotonic() + 300
        while (restoring := again.api.get("/backup").json()["backup"]["restoring"])["pending"]:
            assert time.monotonic() < deadline, restoring
            time.sleep(0.5)
        assert restoring["restored"] >= 2  # main and dev, by their wakes or the sweep
        ops = again.api.get(f"/projects/{pid}/operations").json()["operations"]
        fetched = [o for o in ops if o["action"] == "create_timeline" and o["branch_id"] == created["branch"]["id"]]
        assert fetched and fetched[0]["status"] == "finished", ops
        # The snapshot's cluster is not on this disk: restoring it fetches it from the bucket.
        restored = again.api.post(f"/projects/{pid}/snapshots/{snap['id']}/restore", json={"name": "from-snap"})
        assert restored.status_code == 200, restored.text
        ep = again.api.post(f"/projects/{pid}/endpoints", json={"endpoint": {
            "branch_id": restored.json()["branch"]["id"], "type": "read_write"}}).json()["endpoint"]["id"]
        with psycopg.connect(dev_dsn.replace(str(platform.proxy_port), port).replace(dev_ep, ep)) as conn:
            assert conn.execute("SELECT count(*), max(id) FROM t").fetchone() == (1001, 5000)
    finally:
        again.stop()
        shutil.rmtree(root, ignore_errors=True)

    # Point in time, by time and by LSN (`argon restore --at 0/...`): the state as of `middle` has
    # 1001 but not 1002. By LSN eagerly (main only, read straight from the cluster); by time lazily
    # (ADR 0032): `argon up` on the restored metadata, main's wake brings it back as of that time.
    root = short_tmpdir("rs")
    try:
        target = platform.settings.model_copy(update={"data_dir": root / "data", "run_dir": root / "run"})
        report = asyncio.run(restore(target, url, parse_at(middle_lsn), sample=lambda _: {created["branch"]["id"]}))
        assert [b.reached for b in report.branches if not b.skipped], report
        with restored_cluster(root, root / "data", created["branch"]["id"]) as sock:
            assert query(sock, "SELECT max(id) FROM t") == 1001
    finally:
        shutil.rmtree(root, ignore_errors=True)
    root = restore_into(platform.settings, url, middle.astimezone(UTC))
    try:
        again = RunningPlatform(root, backup_url=url, backup_s3_endpoint=platform.settings.backup_s3_endpoint,
                                backup_key=KEY)
        try:
            dsn = platform.dsn(created).replace(str(platform.proxy_port), str(again.proxy_port))
            with psycopg.connect(dsn, connect_timeout=300) as conn:
                assert conn.execute("SELECT max(id) FROM t").fetchone() == (1001,)
        finally:
            again.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_restore_refuses_wrong_key_non_empty_dir_and_damaged_objects(shipping: tuple[RunningPlatform, str],
                                                                     s3_server: S3Server, tmp_path: Path) -> None:
    platform, url = shipping
    created = platform.create_project(name="damaged")
    wait_shipped(platform, branches=1, since=created["project"]["created_at"])
    settings = platform.settings

    with pytest.raises(WrongKey, match="not the key"):
        restore_into(settings, url, backup_key="another key")
    with pytest.raises(WrongKey, match="is encrypted"):
        restore_into(settings, url, backup_key=None)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "something").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        asyncio.run(restore(settings.model_copy(update={"data_dir": tmp_path / "data"}), url, None))

    # Damage one chunk of the new project's base: the restore names it and leaves the marker.
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    bucket = url.split("/")[2]
    chunk = "argon/" + own_chunk(platform, created["project"]["id"], created["branch"]["id"])
    original = s3.get_object(Bucket=bucket, Key=chunk)["Body"].read()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 1
    s3.put_object(Bucket=bucket, Key=chunk, Body=bytes(damaged))
    root = short_tmpdir("rs")
    only_this = lambda branches: {created["branch"]["id"]}  # noqa: E731 - the other projects are not damaged
    try:
        target = settings.model_copy(update={"data_dir": root / "data", "run_dir": root / "run"})
        with pytest.raises(ArgonError) as err:
            asyncio.run(restore(target, url, None, sample=only_this))
        assert isinstance(err.value, CorruptObject) and chunk.removeprefix("argon/") in err.value.user_message
        with pytest.raises(ConfigError, match="unfinished `argon restore`"):
            Layout(target.data_dir, target.run_dir).init()  # argon up refuses it
        s3.delete_object(Bucket=bucket, Key=chunk)  # now missing altogether
        shutil.rmtree(root / "data")
        with pytest.raises(ArgonError, match="missing"):
            asyncio.run(restore(target, url, None, sample=only_this))
    finally:
        s3.put_object(Bucket=bucket, Key=chunk, Body=original)
        shutil.rmtree(root, ignore_errors=True)
        platform.delete_project(created["project"]["id"])


def test_cli_backup_status_and_verify(shipping: tuple[RunningPlatform, str]) -> None:
    import os
    import subprocess
    import sys

    from tests.fixtures.platform import API_KEY

    platform, url = shipping
    created = platform.create_project(name="verified")
    wait_shipped(platform, branches=1, since=created["project"]["created_at"])
    env = {**os.environ, "ARGON_API_URL": platform.api_url, "ARGON_API_KEY": API_KEY, "NO_COLOR": "1",
           "ARGON_BACKUP_KEY": KEY, "ARGON_BACKUP_S3_ENDPOINT": platform.settings.backup_s3_endpoint or "",
           "ARGON_CONFIG_FILE": "/nonexistent"}

    def argon(*args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "argon", *args], env={**env, **(extra or {})},
                              capture_output=True, text=True, timeout=600)

    out = argon("status")
    assert out.returncode == 0 and f"Backup: ok to {url}" in out.stdout, out.stdout + out.stderr
    out = argon("backup", "status")
    assert out.returncode == 0 and "(encrypted): ok" in out.stdout and created["project"]["id"] in out.stdout, out.stdout
    # Retention as of 8 days from now (the window is 7 days): old metadata copies and unused chunks
    # go, and what stays still restores.
    from datetime import timedelta

    from argon import model

    before = platform.api.get("/backup/usage").json()["usage"]
    deleted = platform.call(platform.control.backup.prune_once(model.utcnow() + timedelta(days=8)), timeout=300)
    after = platform.api.get("/backup/usage").json()["usage"]
    assert deleted > 0 and after["objects"] < before["objects"] and after["metadata_bytes"] < before["metadata_bytes"]
    out = argon("backup", "verify", "--from", url, "--sample", "2")
    assert out.returncode == 0 and f"Backup at {url} is good" in out.stdout, out.stderr
    assert "2 branch(es) restored, recovered and read" in out.stdout
    assert "database(s) read after recovery" in out.stderr
    out = argon("backup", "verify", "--from", url, extra={"ARGON_BACKUP_KEY": "wrong"})
    assert out.returncode == 1 and "ARGON_BACKUP_KEY is not the key" in out.stderr and "Traceback" not in out.stderr
    platform.delete_project(created["project"]["id"])


def test_a_deleted_projects_objects_go_one_window_after_its_deletion(shipping: tuple[RunningPlatform, str]) -> None:
    from datetime import timedelta

    from argon import model
    from argon.control.backup import branch_prefix

    platform, _url = shipping
    created = platform.create_project(name="deleted later")
    pid, bid = created["project"]["id"], created["branch"]["id"]
    wait_shipped(platform, branches=1, since=created["project"]["created_at"])
    service = platform.control.backup
    assert service is not None
    prefix = branch_prefix(pid, bid)
    state = platform.settings.data_dir / "backup" / pid / bid
    deadline = time.monotonic() + 60  # this branch's own row (wait_shipped counts rows of any branch)
    while not any(r["branch_id"] == bid and r["last_base_backup"]
                  for r in platform.api.get("/backup").json()["backup"]["branches"]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert state.is_dir() and service.store.list(prefix)
    platform.delete_project(pid)
    deadline = time.monotonic() + 60
    while platform.api.get(f"/projects/{pid}").status_code != 404:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    now = model.utcnow()
    platform.call(service.prune_once(now), timeout=120)  # notices the deletion: the window starts now
    assert f"{prefix}deleted.json" in {o.key for o in service.store.list(prefix)}
    assert any("/wal/" in o.key for o in service.store.list(prefix))  # a restore before the deletion needs them
    assert not state.exists()
    platform.call(service.prune_once(now + timedelta(days=6)), timeout=120)
    assert any("/wal/" in o.key for o in service.store.list(prefix))
    platform.call(service.prune_once(now + timedelta(days=8)), timeout=120)
    assert service.store.list(prefix) == []


def test_branch_at_a_time_older_than_the_local_history_comes_from_the_bucket(
        shipping: tuple[RunningPlatform, str]) -> None:
    from datetime import timedelta

    from argon import model

    platform, _url = shipping
    created = platform.create_project(name="deep history")
    pid = created["project"]["id"]
    with psycopg.connect(platform.dsn(created), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 100)")
        then = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        time.sleep(0.05)
        conn.execute("INSERT INTO t SELECT generate_series(101, 150)")
    wait_shipped(platform, branches=1, since=model.utcnow().isoformat())
    plane = platform.plane
    retained = timedelta(seconds=created["project"]["history_retention_seconds"])
    try:
        # Later than the project's own history window: the local history refuses it, the bucket has it.
        plane.clock = lambda: model.utcnow() + retained + timedelta(hours=1)
        resp = platform.api.post(f"/projects/{pid}/branches", json={
            "branch": {"name": "from-bucket", "parent_timestamp": then.astimezone(UTC).isoformat()},
            "endpoints": [{"type": "read_write"}]})
        assert resp.status_code == 201, resp.text
        dsn = platform.dsn(created).replace(created["endpoints"][0]["id"], resp.json()["endpoints"][0]["id"])
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*), max(id) FROM t").fetchone() == (100, 100)
        # Older than ARGON_BACKUP_RETENTION too: a clear 400.
        plane.clock = lambda: model.utcnow() + timedelta(days=8)
        resp = platform.api.post(f"/projects/{pid}/branches", json={
            "branch": {"name": "too-old", "parent_timestamp": then.astimezone(UTC).isoformat()}})
        assert resp.status_code == 400 and "ARGON_BACKUP_RETENTION" in resp.json()["message"], resp.text
    finally:
        plane.clock = model.utcnow
        platform.delete_project(pid)


@pytest.mark.timeout(900)
def test_a_clean_stops_base_is_restored_without_a_recovery_run(shipping: tuple[RunningPlatform, str]) -> None:
    """ADR 0032, amended: a suspended branch's base in the bucket is its clean stop's data with no
    WAL after the shutdown checkpoint, so a restore uses it as it is (no recovery run, the same
    timeline), eagerly and lazily; the restored branch then writes, ships into a new epoch of the
    same bucket, and a second restore brings that back too (replaying its WAL)."""
    from argon.control.backup import choose
    from argon.control.retention import branch_history
    from argon.storage import wal

    platform, url = shipping
    created = platform.create_project(name="clean stop")
    pid, bid, ep = created["project"]["id"], created["branch"]["id"], created["endpoints"][0]["id"]
    dsn = platform.dsn(created)
    with psycopg.connect(dsn, autocommit=True) as conn:  # WAL enough for a snapshot at the stop
        conn.execute("CREATE TABLE t AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 300000) g")
    assert platform.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200
    service, plane = platform.control.backup, platform.plane
    newest = branch_history(plane, pid, bid).load().current.snapshots[-1].name  # type: ignore[union-attr]
    deadline = time.monotonic() + 300
    while (found := choose(service.store, service.codec, pid, bid, None, None)) is None or found.base["name"] != newest:
        assert time.monotonic() < deadline, "the stop's snapshot never reached the bucket"
        time.sleep(0.5)
    try:
        root = short_tmpdir("rs")
        try:
            target = platform.settings.model_copy(update={"data_dir": root / "data", "run_dir": root / "run"})
            report = asyncio.run(restore(target, url, None, sample=lambda _: {bid}))
            item = next(b for b in report.branches if b.branch_id == bid)
            assert not item.skipped and not item.replayed, item
            pgdata = Layout(root / "data", root / "run").pgdata(pid, bid)
            assert not (pgdata / "recovery.signal").exists()
            assert len([n for n in (pgdata / "pg_wal").iterdir() if wal.segment_start(n.name, 16 << 20)]) == 1
            with restored_cluster(root, root / "data", bid) as sock:
                assert query(sock, "SELECT count(*) FROM t") == 300000
                assert query(sock, "SELECT timeline_id FROM pg_control_checkpoint()") == 1
        finally:
            shutil.rmtree(root, ignore_errors=True)

        root = restore_into(platform.settings, url)  # lazily: the wake takes the same path
        try:
            again = RunningPlatform(root, backup_url=url, backup_s3_endpoint=platform.settings.backup_s3_endpoint,
                                    backup_key=KEY)
            try:
                with psycopg.connect(dsn.replace(str(platform.proxy_port), str(again.proxy_port)),
                                     connect_timeout=300, autocommit=True) as conn:
                    assert conn.execute("SELECT count(*) FROM t").fetchone() == (300000,)
                    conn.execute("INSERT INTO t VALUES (300001, 'after the restore')")
                wait_shipped(again, branches=1)
                fetched = [o for o in again.api.get(f"/projects/{pid}/operations").json()["operations"]
                           if o["action"] == "create_timeline" and o["branch_id"] == bid]
                assert fetched and fetched[0]["status"] == "finished", fetched
            finally:
                again.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)

        # The restored branch's own epoch (the same timeline) is what the bucket restores now.
        root = short_tmpdir("rs")
        try:
            target = platform.settings.model_copy(update={"data_dir": root / "data", "run_dir": root / "run"})
            report = asyncio.run(restore(target, url, None, sample=lambda _: {bid}))
            item = next(b for b in report.branches if b.branch_id == bid)
            assert not item.skipped and item.replayed, item  # the insert's WAL after the restored base
            with restored_cluster(root, root / "data", bid) as sock:
                assert query(sock, "SELECT count(*) FROM t") == 300001
                assert query(sock, "SELECT pad FROM t WHERE id = 300001") == "after the restore"
        finally:
            shutil.rmtree(root, ignore_errors=True)
    finally:
        platform.delete_project(pid)

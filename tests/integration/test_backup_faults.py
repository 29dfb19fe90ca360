"""Backup faults: the object store unreachable for a while (commits go on, the state says so,
shipping catches up by itself and in order; past ARGON_BACKUP_MAX_LAG writes are refused with a
clear error until it has), and `kill -9` of `argon up` in the middle of shipping (no gap)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest

from argon.control.restore import restore
from argon.settings import Settings
from argon.storage.backup.store import open_store
from tests.fixtures.argon_process import query, restored_cluster
from tests.fixtures.platform import RunningPlatform, short_tmpdir
from tests.fixtures.s3 import Gate, S3Server

pytestmark = [pytest.mark.pg, pytest.mark.slow]


@pytest.fixture(scope="module")
def gated(s3_server: S3Server) -> Iterator[tuple[RunningPlatform, Gate, str]]:
    gate = Gate(s3_server.port)
    url = f"s3://{s3_server.new_bucket()}/argon"
    root = short_tmpdir("bf")
    running = RunningPlatform(root, backup_url=url, backup_s3_endpoint=gate.endpoint, backup_max_lag="3MB")
    try:
        yield running, gate, url
    finally:
        gate.reopen()
        running.stop()
        gate.stop()
        shutil.rmtree(root, ignore_errors=True)


def backup(platform: RunningPlatform) -> dict[str, Any]:
    return platform.api.get("/backup").json()["backup"]


def wait_for(platform: RunningPlatform, check: Any, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = backup(platform)
        if check(state):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.25)


def console_home(platform: RunningPlatform) -> str:
    import httpx

    link = platform.api.post("/console/sign_in_links").json()["url"]
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        browser.get(link)
        return browser.get(platform.api_url + "/").text


def caught_up(state: dict[str, Any]) -> bool:
    return not state["error"] and bool(state["branches"]) and all(
        r["lag_bytes"] == 0 and r["last_base_backup"] and not r["writes_refused"] for r in state["branches"])


def test_outage_commits_go_on_then_catch_up_and_refuse_past_max_lag(gated: tuple[RunningPlatform, Gate, str]) -> None:
    platform, gate, url = gated
    created = platform.create_project(name="outage")
    dsn = platform.dsn(created)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
    wait_for(platform, caught_up)

    gate.close()  # the object store is unreachable from now on
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(1, 201):  # commits go on
            conn.execute("INSERT INTO t VALUES (%s, 'x')", (i,))
    down = wait_for(platform, lambda s: bool(s["error"]) and s["lag_bytes"] > 0)
    assert "cannot" in down["error"] and down["state"] == "error"
    page = console_home(platform)  # the console says so too
    assert "Backup failing" in page and "shipping resumes by itself" in page

    # Past ARGON_BACKUP_MAX_LAG (3 MB here) of unshipped WAL, writes are refused with a clear error.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t SELECT g, repeat('y', 2000) FROM generate_series(1000, 4000) g")
    wait_for(platform, lambda s: any(r["writes_refused"] for r in s["branches"]))
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("INSERT INTO t VALUES (5000, 'refused')")

    gate.reopen()  # back: shipping catches up by itself, writes are allowed again
    wait_for(platform, caught_up, timeout=180)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (5001, 'after')")
    wait_for(platform, caught_up)
    page = console_home(platform)
    assert "Backup failing" not in page and f"Backup to <span class=\"mono\">{url}</span>" in page

    root = short_tmpdir("rs")
    try:
        settings = platform.settings.model_copy(update={"data_dir": root / "data", "run_dir": root / "run",
                                                        "backup_s3_endpoint": gate.endpoint})
        asyncio.run(restore(settings, url, None, eager=True))
        with restored_cluster(root, root / "data", created["branch"]["id"]) as sock:
            # Everything written during the outage came back, in order, nothing missing.
            assert query(sock, "SELECT array[count(*) FILTER (WHERE id <= 200), count(*) FILTER (WHERE id >= 1000 "
                         "AND id <= 4000), max(id)] FROM t") == [200, 3001, 5001]
    finally:
        shutil.rmtree(root, ignore_errors=True)



def test_a_reset_that_discards_the_current_state_ships_it_first(gated: tuple[RunningPlatform, Gate, str]) -> None:
    """Without preserve_under_name a reset throws the branch's current state away: while the bucket
    cannot take its last commits, the reset is refused (503) and loses nothing; once it can, the
    reset ships them, then goes ahead."""
    platform, gate, url = gated
    created = platform.create_project(name="reset")
    pid, bid = created["project"]["id"], created["branch"]["id"]
    with psycopg.connect(platform.dsn(created), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
        conn.execute("INSERT INTO t VALUES (1)")
        before = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
    # The restore below needs a metadata copy that has the project (from before the outage).
    wait_for(platform, lambda s: caught_up(s) and s["last_metadata_backup_at"] is not None
             and datetime.fromisoformat(s["last_metadata_backup_at"]) > before)
    gate.close()
    try:
        with psycopg.connect(platform.dsn(created), autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (2)")  # only on this disk so far
            after = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        body = {"source_branch_id": bid, "source_timestamp": before.isoformat()}
        resp = platform.api.post(f"/projects/{pid}/branches/{bid}/restore", json=body)
        assert resp.status_code == 503 and "preserve_under_name" in resp.json()["message"], resp.text
        with psycopg.connect(platform.dsn(created)) as conn:  # nothing lost
            assert conn.execute("SELECT array_agg(id ORDER BY id) FROM t").fetchone() == ([1, 2],)
    finally:
        gate.reopen()
    resp = platform.api.post(f"/projects/{pid}/branches/{bid}/restore", json=body)
    assert resp.status_code == 200, resp.text
    with psycopg.connect(platform.dsn(created)) as conn:
        assert conn.execute("SELECT array_agg(id ORDER BY id) FROM t").fetchone() == ([1],)
    # The discarded state is in the bucket: the branch as of `after` comes back from it alone.
    root = short_tmpdir("rs")
    try:
        settings = platform.settings.model_copy(update={"data_dir": root / "data", "run_dir": root / "run",
                                                        "backup_s3_endpoint": gate.endpoint})
        said: list[str] = []
        report = asyncio.run(restore(settings, url, after, sample=lambda branches: {bid}, say=said.append))
        assert [b for b in report.branches if b.branch_id == bid and not b.skipped], report
        with restored_cluster(root, root / "data", bid) as sock:
            # Once on CI (not reproduced since) the restore came back without `t`: say what it chose.
            def context() -> str:
                store = open_store(url, s3_endpoint=gate.endpoint)
                return (f"restored as of {after.isoformat()}: {report.branches}; it said {said}; the bucket has "
                        f"{[o.key for o in store.list(f'branches/{pid}/{bid}/')]}")
            try:
                rows = query(sock, "SELECT array_agg(id ORDER BY id) FROM t")
            except psycopg.Error as exc:
                raise AssertionError(f"{exc}; {context()}") from None
            assert rows == [1, 2], context()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        platform.delete_project(pid)


def _write(uri: str, seconds: float, start: int, acked: list[int]) -> None:
    """Commit numbered rows for `seconds`, recording each acknowledged one; stop at the first error
    (the server was killed)."""
    deadline = time.monotonic() + seconds
    with contextlib.suppress(psycopg.Error), psycopg.connect(uri, autocommit=True, connect_timeout=30) as conn:
        i = start
        while time.monotonic() < deadline:
            i += 1
            conn.execute("INSERT INTO t VALUES (%s, repeat('z', 500))", (i,))
            acked.append(i)


def test_kill_9_of_argon_up_and_of_a_compute_mid_shipping_leaves_no_gap(s3_server: S3Server) -> None:
    """`argon up` killed with SIGKILL while a writer commits (shipping in flight), started again on
    the same data directory; then the compute alone killed mid-write. A restore holds every
    acknowledged commit: shipping resumed where it was, with no gap."""
    from tests.fixtures.argon_process import ArgonProcess

    url = f"s3://{s3_server.new_bucket()}/argon"
    root = short_tmpdir("bk")
    acked: list[int] = []
    try:
        first = ArgonProcess(root, root / "data", url, s3_server.endpoint, spares=0).start()
        try:
            _pid, uri = first.create_project()
            with psycopg.connect(uri, autocommit=True) as conn:
                conn.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
            writer = threading.Thread(target=_write, args=(uri, 30, 0, acked), daemon=True)
            writer.start()
            time.sleep(2.5)
        finally:
            first.kill()
        writer.join(60)
        killed_at = acked[-1]

        second = ArgonProcess(root, root / "data", url, s3_server.endpoint, uids=first.uids, spares=0).start()  # same data dir, bucket
        try:
            uri = uri.replace(f":{first.proxy_port}/", f":{second.proxy_port}/")
            _write(uri, 1.5, 100000, acked)
            for pidfile in (root / "data").glob("projects/*/branches/*/pgdata/postmaster.pid"):
                os.killpg(int(pidfile.read_text().split()[0]), signal.SIGKILL)  # the compute dies
            deadline = time.monotonic() + 60
            while not any(i > 200000 for i in acked):  # a later connection wakes it again
                assert time.monotonic() < deadline, "the compute did not come back after its kill -9"
                _write(uri, 1.5, 200000, acked)
            deadline = time.monotonic() + 120
            while True:
                state = second.api.get("/backup").json()["backup"]
                if not state["error"] and state["branches"] and all(r["lag_bytes"] == 0 for r in state["branches"]):
                    break
                assert time.monotonic() < deadline, state
                time.sleep(0.25)
        finally:
            second.stop()

        target = root / "restored"
        settings = Settings(data_dir=target, run_dir=root / "run", backup_s3_endpoint=s3_server.endpoint)
        asyncio.run(restore(settings, url, None, eager=True))
        with restored_cluster(root, target) as sock:
            restored = set(query(sock, "SELECT array_agg(id) FROM t") or [])
        assert acked and killed_at in restored and max(acked) in restored
        assert set(acked) <= restored, sorted(set(acked) - restored)[:10]
        assert any(i > 200000 for i in acked)  # the compute came back after its kill -9
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_lazily_restored_branch_waits_for_the_bucket_on_its_wake(gated: tuple[RunningPlatform, Gate, str]) -> None:
    """ADR 0032 on the shared gated platform: a branch whose data is still in the bucket (as `argon
    restore` leaves it) is restored by its first connection; while the bucket is unreachable that
    connection gets a clear error and nothing is half there; once it is back, the next one works."""
    from argon.control import lazyrestore

    platform, gate, url = gated
    created = platform.create_project(name="lazy")
    pid, bid, ep = created["project"]["id"], created["branch"]["id"], created["endpoints"][0]["id"]
    dsn = platform.dsn(created)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT generate_series(1, 500) AS id")
    wait_for(platform, caught_up, timeout=180)
    assert platform.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200
    wait_for(platform, caught_up, timeout=180)  # the suspend's last WAL and snapshot are in the bucket
    plane, restorer = platform.control.plane, platform.control.restorer
    branch_dir = plane.layout.branch_dir(pid, bid)
    shutil.rmtree(branch_dir / "pgdata")  # the machine lost it: only the bucket has it now
    shutil.rmtree(branch_dir / "history")
    data = lazyrestore.intent(pid, bid, url, gate.endpoint, None, None)
    plane.intents.put(lazyrestore.intent_key(bid), data)
    restorer.pending[bid] = data

    gate.close()
    try:
        with pytest.raises(psycopg.OperationalError, match=r"restoring branch .main. from the backup at .* failed"):
            psycopg.connect(dsn, connect_timeout=300).close()
    finally:
        gate.reopen()
    assert restorer.is_pending(bid) and not (branch_dir / "pgdata").exists()  # nothing half there
    assert backup(platform)["restoring"]["branches"][0]["stage"] == "failed"
    import httpx

    with httpx.Client(follow_redirects=True, timeout=30) as browser:  # the console's branch list says so
        browser.get(platform.api.post("/console/sign_in_links").json()["url"])
        assert "Restore from backup failed" in browser.get(f"{platform.api_url}/projects/{pid}/branches").text
    with psycopg.connect(dsn, connect_timeout=300) as conn:  # waits like a cold start, then serves
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (500,)
    assert not restorer.is_pending(bid) and not plane.intents.has(lazyrestore.intent_key(bid))
    ops = [o for o in platform.api.get(f"/projects/{pid}/operations").json()["operations"]
           if o["action"] == "create_timeline" and o["branch_id"] == bid]
    newest = max(ops, key=lambda o: o["created_at"])  # (the project's creation has one too)
    assert newest["status"] == "finished" and [o["status"] for o in ops].count("failed") == 1, ops

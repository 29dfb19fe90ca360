"""Crash safety: `kill -9` of `argon up` while computes run, then `argon up` again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.fixtures.argon_process import ArgonProcess, free_port, running_argon

pytestmark = [pytest.mark.pg, pytest.mark.slow]

@pytest.fixture
def argon() -> Iterator[ArgonProcess]:
    with running_argon("ac") as proc:
        yield proc


def postmaster_pid(root: Path) -> int:
    pidfiles = list(root.glob("data/projects/*/branches/*/pgdata/postmaster.pid"))
    assert len(pidfiles) == 1
    return int(pidfiles[0].read_text().split()[0])


def postmaster_pids(root: Path) -> dict[str, int]:
    """Branch id -> the pid its postmaster.pid names."""
    return {f.parent.parent.name: int(f.read_text().split()[0])
            for f in root.glob("data/projects/*/branches/*/pgdata/postmaster.pid")}


def test_kill_9_then_up_adopts_running_computes(argon: ArgonProcess) -> None:
    """Several computes left running are adopted together (identified at once, recorded in one
    transaction): each keeps its process and its data, is active, and has its `adopted` event."""
    argon.start()
    created = [argon.api.post("/projects", json={"project": {"name": f"crash{i}"}}).json() for i in range(3)]
    uris = [c["connection_uris"][0]["connection_uri"] for c in created]
    for i, uri in enumerate(uris):
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("create table t (v int)")
            conn.execute("insert into t select generate_series(1, %s)", (i + 1,))
    pms = postmaster_pids(argon.root)
    assert len(pms) == 3
    argon.kill9()
    for pm in pms.values():
        os.kill(pm, 0)  # the computes outlived argon (own session, logs to a file)
    orphan = argon.root / "data" / "projects" / "half-created-00000000"
    orphan.mkdir()  # what a crash in the middle of a project creation leaves

    argon.start()
    assert postmaster_pids(argon.root) == pms  # adopted, not started twice
    assert not orphan.exists()
    for i, c in enumerate(created):
        pid, eid = c["project"]["id"], c["endpoints"][0]["id"]
        assert argon.api.get(f"/projects/{pid}/endpoints/{eid}").json()["endpoint"]["current_state"] == "active"
        events = argon.api.get(f"/projects/{pid}/endpoints/{eid}/events").json()["events"]
        assert [e["kind"] for e in events].count("adopted") == 1, events
        with psycopg.connect(uris[i]) as conn:
            assert conn.execute("select count(*) from t").fetchone() == (i + 1,)
    argon.interrupt()  # Ctrl-C stops computes too
    for pm in pms.values():
        with pytest.raises(ProcessLookupError):
            for _ in range(100):
                os.kill(pm, 0)
                time.sleep(0.05)
    assert "Argon is up" in argon.log.read_text()


def test_kill_9_with_stopped_compute_restarts_cleanly(argon: ArgonProcess) -> None:
    argon.start()
    created = argon.api.post("/projects", json={"project": {"name": "crash2"}}).json()
    uri = created["connection_uris"][0]["connection_uri"]
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("create table t as select 7 as v")
    pm = postmaster_pid(argon.root)
    argon.kill9()
    os.kill(pm, signal.SIGKILL)  # the compute died too (OOM, reboot)
    time.sleep(0.3)
    argon.start()
    try:
        conn = psycopg.connect(uri)  # crash recovery on wake, committed data kept
    except psycopg.OperationalError as exc:
        raise AssertionError(f"{exc}\n{argon.log.read_text()}") from None
    with conn:
        assert conn.execute("select v from t").fetchone() == (7,)
    argon.interrupt()


def test_a_second_up_on_the_same_data_dir_is_refused_and_touches_nothing(argon: ArgonProcess) -> None:
    """No lock once let a second `argon up` adopt the running one's computes, fail on its ports and
    stop them: an open transaction died. Now it stops at the data directory's lock."""
    argon.start()
    created = argon.api.post("/projects", json={"project": {"name": "twice"}}).json()
    uri = created["connection_uris"][0]["connection_uri"]
    with psycopg.connect(uri) as conn:
        pm = postmaster_pid(argon.root)
        conn.execute("create table t (v int)")
        conn.execute("insert into t values (1)")  # open transaction across the second start
        second = subprocess.run([sys.executable, "-m", "argon", "up"], capture_output=True, text=True, timeout=120,
                                env={**argon.env, "ARGON_HTTP_PORT": str(free_port()),
                                     "ARGON_PROXY_PORT": str(free_port())})
        assert second.returncode != 0
        assert "already running on" in second.stderr and str(argon.proc.pid) in second.stderr, second.stderr
        assert "Traceback" not in second.stderr + second.stdout
        conn.commit()
    assert postmaster_pid(argon.root) == pm
    with psycopg.connect(uri) as conn:
        assert conn.execute("select count(*) from t").fetchone() == (1,)
    # the metadata (every project's verifiers, encrypted passwords) is for Argon's user only
    for name in ("argon.db", "argon.db-wal", "argon.db-shm"):
        path = argon.root / "data" / name
        if path.exists():
            assert path.stat().st_mode & 0o077 == 0, f"{name} is {oct(path.stat().st_mode)}"
    argon.interrupt()


def test_a_failed_first_start_does_not_use_up_the_generated_api_key(argon: ArgonProcess) -> None:
    """The first start generates the API key and shows it once; a start that fails (its HTTP port
    taken) must not store a key nobody saw, or the next start has none to show."""
    env = {k: v for k, v in argon.env.items() if k != "ARGON_API_KEY"}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", int(env["ARGON_HTTP_PORT"])))
        busy.listen(1)
        failed = subprocess.run([sys.executable, "-m", "argon", "up"], capture_output=True, text=True, timeout=120,
                                env=env)
    assert failed.returncode != 0 and "cannot listen for HTTP" in failed.stderr, failed.stderr
    proc = subprocess.Popen([sys.executable, "-m", "argon", "up"], env={**env, "NO_COLOR": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        banner = []
        for line in proc.stdout:
            banner.append(line)
            if "API key" in line:
                break
        text = "".join(banner)
        assert "generated now" in text, text
        key = text.split("API key", 1)[1].split()[0]
        assert key.startswith("argon_")
        assert httpx.get(f"http://127.0.0.1:{env['ARGON_HTTP_PORT']}/api/v2/projects",
                         headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    # Restarted on another HTTP port, with keys that exist: the CLI follows, keeping its key.
    moved = {**env, "ARGON_HTTP_PORT": str(free_port()), "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "argon", "up"], env=moved, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Reconciled" in line:  # the banner's last line: it is up
                break
        status = subprocess.run([sys.executable, "-m", "argon", "projects", "list"], env=moved, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)

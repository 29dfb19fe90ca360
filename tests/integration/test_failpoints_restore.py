"""The failpoint walk of branch restores (replacing, and keeping the old data under a name),
snapshots, endpoint settings, the write gate and the lazy restore from a bucket; and the defects
the failpoints made testable (issue 12): a compute still starting when Argon restarts, a branch of
a parent in crash recovery. How a walk goes, and the check that every failpoint is walked, are in
test_failpoints.py (which this file's POINTS join); the harness is tests/fixtures/failpoint_walk.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from tests.fixtures.argon_process import ArgonProcess, postgres_processes_under, running_argon
from tests.fixtures.crash_process import check_invariants
from tests.fixtures.failpoint_walk import (
    KILLS,
    WALKED,
    Step,
    branch_named,
    check_reached,
    new_branch,
    new_project,
    query,
    walk,
)

pytestmark = [pytest.mark.pg, pytest.mark.slow]

# What this file's walks kill Argon at (test_every_point_here_is_walked checks that they did).
POINTS = {
    "branch.restore.after_copy", "history.epoch_begin.after_base", "branch.restore.after_intent",
    "branch.restore.after_epochs", "history.epoch_end.after_wal", "branch.restore.after_metadata",
    "branch.restore.after_end_epoch", "branch.restore.after_cleanup", "branch.restore.after_aside",
    "branch.restore.after_swap", "writes.gate.after_alter_system", "endpoint.update.after_metadata",
    "snapshot.create.after_copy", "backup.snapshot.after_upload", "snapshot.restore.after_copy",
    "snapshot.delete.after_metadata", "restore.lazy.before_swap", "restore.lazy.after_swap",
}


@pytest.fixture
def argon() -> Iterator[ArgonProcess]:
    with running_argon("fp") as proc:
        yield proc


# Before and after the commit point (the rename of the new copy into place) in turn: the reconciler
# finishing a restore passes the points after it, so none of those may be armed at its restart.
RESTORE_POINTS = ["branch.restore.after_copy", "history.epoch_begin.after_base", "branch.restore.after_intent",
                  "branch.restore.after_epochs", "history.epoch_end.after_wal", "branch.restore.after_metadata",
                  "branch.restore.after_end_epoch", "branch.restore.after_cleanup", "branch.restore.after_aside",
                  "branch.restore.after_swap"]
COMMITTED = {"branch.restore.after_swap", "history.epoch_begin.after_base", "branch.restore.after_epochs",
             "branch.restore.after_metadata", "branch.restore.after_cleanup"}


# With `preserve_under_name` the old data moves into the new branch's directory: the points around
# the swap again (the others do not depend on where the old data goes).
PRESERVE_POINTS = ["branch.restore.after_end_epoch", "branch.restore.after_epochs", "branch.restore.after_aside",
                   "branch.restore.after_swap"]


@pytest.mark.parametrize("preserve", [False, True], ids=["replace", "preserve"])
def test_branch_restore(argon: ArgonProcess, preserve: bool) -> None:
    """Issue 12, defect 1: an interrupted restore keeps whichever copy is complete, and the old data
    kept under a name is never deleted as an orphan. `dev` is restored from `main` and from `alt` in
    turn, whichever differs from what it holds."""
    argon.start()
    pid, main, _ = new_project(argon)
    dev = new_branch(argon, pid, "dev")
    query(argon, pid, dev, "insert into t values ('dev')")
    alt = argon.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "alt", "parent_id": dev}})
    assert alt.status_code == 201, alt.text
    contents = {main: ["main"], alt.json()["branch"]["id"]: ["dev", "main"]}
    current = ["dev", "main"]

    def restore(n: int, point: str) -> Step:
        body: dict[str, Any] = {}
        if preserve:
            body["preserve_under_name"] = f"kept{n}"

        def op() -> Any:
            body["source_branch_id"] = next(b for b, rows in contents.items() if rows != current)
            return argon.api.post(f"/projects/{pid}/branches/{dev}/restore", json=body)

        def check(state: dict[str, Any]) -> None:
            nonlocal current
            rows = sorted(r[0] for r in query(argon, pid, dev, "select v from t"))
            restored = rows == contents[body["source_branch_id"]]
            assert restored or rows == current, f"{point}: {rows}"
            assert restored == (point in COMMITTED), f"{point}: restored {restored}"
            if preserve:
                assert (branch_named(argon, pid, f"kept{n}") is not None) == restored, f"{point}: kept{n}"
            current = rows

        return point, op, check

    walk(argon, [restore(n, point) for n, point in enumerate(PRESERVE_POINTS if preserve else RESTORE_POINTS)])


def test_snapshots_settings_and_the_write_gate(argon: ArgonProcess) -> None:
    """The newer durable steps: the write gate's ALTER SYSTEM (ADR 0025), an endpoint's pg_settings,
    a snapshot's create, its shipping to the bucket, its restore and its delete (ADR 0028). The
    gate's point comes first: a restart resets every adopted compute's gate, and must not pass it."""
    argon.env["ARGON_BACKUP_URL"] = f"file://{argon.root}/bucket"
    argon.start()
    pid, main, eid = new_project(argon)
    taken: list[str] = []

    def quota(limit: int) -> None:
        resp = argon.api.patch(f"/projects/{pid}", json={"project": {"settings": {"quota": {
            "logical_size_bytes": limit}}}})
        assert resp.status_code == 200, resp.text

    def refused() -> bool:
        try:
            query(argon, pid, main, "create table if not exists probe (v int)")
        except psycopg.errors.ReadOnlySqlTransaction:
            return True
        return False

    def until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out: {what}"
            time.sleep(0.2)

    def gate(point: str) -> Step:
        def op() -> Any:
            query(argon, pid, main, "select 1")  # running: the guard's next look refuses its writes
            quota(2**20)

        def check(state: dict[str, Any]) -> None:
            until(refused, "the adopted compute refuses writes again")  # reset once, refused again
            quota(0)
            until(lambda: not refused(), "writes allowed once the limit is gone")

        return point, op, check

    def settings(point: str) -> Step:
        def op() -> Any:
            return argon.api.patch(f"/projects/{pid}/endpoints/{eid}",
                                   json={"endpoint": {"settings": {"pg_settings": {"work_mem": "7MB"}}}})

        def check(state: dict[str, Any]) -> None:
            ep = next(e for e in state[pid]["endpoints"] if e["id"] == eid)
            assert ep["settings"]["pg_settings"] == {"work_mem": "7MB"}, f"{point}: {ep['settings']}"
            assert argon.api.post(f"/projects/{pid}/endpoints/{eid}/suspend").status_code == 200
            assert query(argon, pid, main, "show work_mem") == [("7MB",)]  # what the metadata says, at a start

        return point, op, check

    def take(point: str) -> Step:
        def op() -> Any:
            resp = argon.api.post(f"/projects/{pid}/branches/{main}/snapshot", params={"name": point})
            if resp.status_code == 200:
                taken.append(resp.json()["snapshot"]["id"])
            return resp

        def check(state: dict[str, Any]) -> None:
            if point == "snapshot.create.after_copy":
                assert not state[pid]["snapshots"], f"{point}: {state[pid]['snapshots']}"
                return
            assert taken and taken[-1] in state[pid]["snapshots"], f"{point}: the snapshot is gone"
            shipped = argon.data / "backup" / "snapshots.json"  # shipped again after the restart
            until(lambda: shipped.is_file() and taken[-1] in shipped.read_text(), "the snapshot shipped")
            assert list((argon.root / "bucket").rglob(f"{taken[-1]}.json")), "no manifest in the bucket"

        return point, op, check

    def restore(point: str) -> Step:
        def op() -> Any:
            return argon.api.post(f"/projects/{pid}/snapshots/{taken[-1]}/restore", json={"name": "from-snap"})

        def check(state: dict[str, Any]) -> None:
            assert branch_named(argon, pid, "from-snap") is None, f"{point}: a branch never recorded exists"

        return point, op, check

    def delete(point: str) -> Step:
        def check(state: dict[str, Any]) -> None:
            assert taken[-1] not in state[pid]["snapshots"], f"{point}: the deleted snapshot is back"
            assert not (argon.data / "projects" / pid / "snapshots" / taken[-1]).exists(), f"{point}: its files"

        return point, lambda: argon.api.delete(f"/projects/{pid}/snapshots/{taken[-1]}"), check

    walk(argon, [gate("writes.gate.after_alter_system"), settings("endpoint.update.after_metadata"),
                 take("snapshot.create.after_copy"), take("backup.snapshot.after_upload"),
                 restore("snapshot.restore.after_copy"), delete("snapshot.delete.after_metadata")])


def test_lazy_restore_of_a_branch(argon: ArgonProcess) -> None:
    """ADR 0032: a branch whose data is still in the bucket (as a lazy `argon restore` leaves it: the
    metadata, an empty branch directory, a `fetch-` intent) is restored by `argon up`'s background
    sweep; killed before and after the rename into place, the next start resumes, and the branch is
    whole, with its data, never half there."""
    import shutil

    from argon.control import lazyrestore
    from argon.storage.intents import Intents

    url = f"file://{argon.root / 'bucket'}"
    argon.env["ARGON_BACKUP_URL"] = url
    argon.start()
    pid, main, _ = new_project(argon)
    deadline = time.monotonic() + 180
    while not ((b := argon.api.get("/backup").json()["backup"])["branches"]
               and all(r["lag_bytes"] == 0 and r["last_base_backup"] for r in b["branches"])):
        assert time.monotonic() < deadline, b
        time.sleep(0.2)
    argon.interrupt()
    branch_dir = argon.data / "projects" / pid / "branches" / main
    for point in ("restore.lazy.before_swap", "restore.lazy.after_swap"):
        if point == "restore.lazy.before_swap":  # the machine lost it: only the bucket has it
            shutil.rmtree(branch_dir / "pgdata")
            shutil.rmtree(branch_dir / "history")
            Intents(argon.data / "intents").put(lazyrestore.intent_key(main),
                                                lazyrestore.intent(pid, main, url, None, None, None))
        argon.start(ARGON_FAILPOINTS=f"{point}=kill")  # the sweep gets there by itself
        assert argon.wait_dead(300) == -signal.SIGKILL
        assert f"failpoint {point}: kill" in argon.log.read_text()
        KILLS[0] += 1
        WALKED.add(point)
        assert (branch_dir / "pgdata").exists() == (point == "restore.lazy.after_swap")
    argon.start()
    deadline = time.monotonic() + 300
    while argon.api.get("/backup").json()["backup"]["restoring"]["pending"]:
        assert time.monotonic() < deadline, argon.log.read_text()[-3000:]
        time.sleep(0.2)
    check_invariants(argon)
    assert query(argon, pid, main, "select v from t") == [("main",)]
    assert not (argon.data / "intents" / f"{lazyrestore.intent_key(main)}.json").exists()


def _held_while_starting(argon: ArgonProcess) -> tuple[str, str, int]:
    """A project whose compute was starting when argon died, held (SIGSTOP) before it is ready: a
    thread stops the postmaster the moment it appears, while the wake that spawns it kills argon."""
    argon.start()
    pid, main, _ = new_project(argon)
    argon.interrupt()  # its compute stops with it
    argon.start(ARGON_FAILPOINTS="compute.start.after_spawn=kill")
    uri = argon.api.get(f"/projects/{pid}/connection_uri", params={
        "branch_id": main, "role_name": "neondb_owner", "database_name": "neondb"}).json()["uri"]
    held: list[int] = []
    pidfile = argon.data / "projects" / pid / "branches" / main / "pgdata" / "postmaster.pid"

    def hold() -> None:  # once it has claimed its data directory (postmaster.pid), before it is ready
        deadline = time.monotonic() + 60
        while not held and time.monotonic() < deadline:
            for found in postgres_processes_under(argon.data):
                if pidfile.exists():
                    os.kill(found, signal.SIGSTOP)
                    held.append(found)

    holder = threading.Thread(target=hold)
    holder.start()
    with contextlib.suppress(psycopg.Error):  # the wake spawns the postmaster, and argon dies
        psycopg.connect(uri, connect_timeout=10).close()
    assert argon.wait_dead(60) == -signal.SIGKILL
    holder.join()
    KILLS[0] += 1
    assert held, "no postmaster was spawned"
    if pidfile.exists() and "ready" in pidfile.read_text():
        os.kill(held[0], signal.SIGCONT)
        pytest.skip("the compute became ready before the test could hold it")
    return pid, main, held[0]


def test_a_compute_ready_after_the_restart_is_adopted_and_a_branch_of_it_waits(argon: ArgonProcess) -> None:
    """Issue 12, defects 3 and 5: a postmaster that becomes ready after the restart's reconcile is
    adopted within seconds (not left running unowned, every connection failing); a branch create of
    its branch meanwhile answers 423 with a retry hint, not 500."""
    pid, main, pm = _held_while_starting(argon)
    try:
        argon.start()
        resp = argon.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "during-recovery"}})
        assert resp.status_code == 423, resp.text
        assert "retry" in resp.json()["message"] and resp.headers.get("retry-after") == "3"
    finally:
        os.kill(pm, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        eps = argon.api.get(f"/projects/{pid}/endpoints").json()["endpoints"]
        if eps[0]["current_state"] == "active":
            break
        time.sleep(0.2)
    assert eps[0]["current_state"] == "active", "the compute was never adopted"
    assert set(postgres_processes_under(argon.data)) == {pm}  # adopted, not started twice
    check_invariants(argon)
    assert query(argon, pid, main, "select v from t") == [("main",)]
    assert argon.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "after"}}).status_code == 201



def test_every_point_here_is_walked() -> None:
    """Runs last in this module: a point this file declares that its walks did not reach fails here
    (skipped when the walks did not run in this process)."""
    check_reached(POINTS)

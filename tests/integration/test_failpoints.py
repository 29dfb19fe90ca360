"""Kill `argon up` at every failpoint of every operation, restart it on the same data directory, and
check that the operation happened whole or not at all (`check_invariants` plus each operation's own
check). Also the defects the failpoints made testable (issue 12): a compute still starting when
Argon restarts, a branch of a parent in crash recovery.

The walk is one test per operation group, each on its own data directory: a start of `argon up`
with the point armed, the operation, the kill (a point never reached fails the test), a start
without failpoints, the checks. A failpoint in the code that no walk reaches and that is not listed
in UNWALKED fails `test_every_failpoint_is_walked`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from argon import failpoints
from tests.fixtures.argon_process import ArgonProcess, postgres_processes_under, running_argon
from tests.fixtures.crash_process import check_invariants

pytestmark = [pytest.mark.pg, pytest.mark.slow]

# Points a walk cannot reach in seconds, and why (each is exercised where its step runs).
UNWALKED = {
    "history.snapshot.after_copy": "a snapshot is due only after 16 MB of WAL and a minute",
    "retention.prune.after_manifest": "pruning needs history older than the retention window",
}

WALKED: set[str] = set()
KILLS = [0]


@pytest.fixture
def argon() -> Iterator[ArgonProcess]:
    with running_argon("fp") as proc:
        yield proc


def _quiet(call: Callable[[], Any]) -> httpx.Response | None:
    """An API call the kill may cut short."""
    try:
        return call()  # type: ignore[no-any-return]
    except httpx.TransportError:
        return None


def kill_at(argon: ArgonProcess, point: str, operation: Callable[[], Any], *,
            then: str | None = None) -> dict[str, Any]:
    """Run `operation` on an argon started with `point` armed (start it so if it is not running), see it
    die there, start it again (with `then` armed: the next point of a walk, one start per point) and
    check the invariants. The caller's checks and the next setup must not pass `then`."""
    if not argon.alive:
        argon.start(ARGON_FAILPOINTS=f"{point}=kill")
    _quiet(operation)
    try:
        code = argon.wait_dead(60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"failpoint {point} was never reached") from None
    assert code == -signal.SIGKILL, f"{point}: argon exited with {code}"
    assert f"failpoint {point}: kill" in argon.log.read_text()
    KILLS[0] += 1
    WALKED.add(point)
    argon.start(**({"ARGON_FAILPOINTS": f"{then}=kill"} if then else {}))
    return check_invariants(argon)


def chain(points: list[str]) -> Iterator[tuple[str, str | None]]:
    """(point, the next one) for a walk that arms the next point at the restart after each kill."""
    yield from zip(points, [*points[1:], None], strict=True)


def query(argon: ArgonProcess, pid: str, bid: str, sql: str, role: str = "neondb_owner",
          db: str = "neondb") -> list[tuple[Any, ...]]:
    resp = argon.api.get(f"/projects/{pid}/connection_uri",
                         params={"branch_id": bid, "role_name": role, "database_name": db})
    assert resp.status_code == 200, resp.text
    with psycopg.connect(resp.json()["uri"], connect_timeout=30, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def names(argon: ArgonProcess, path: str, key: str) -> set[str]:
    resp = argon.api.get(path)
    assert resp.status_code == 200, resp.text
    return {item["name"] for item in resp.json()[key]}


def new_project(argon: ArgonProcess, name: str = "base") -> tuple[str, str, str]:
    created = argon.api.post("/projects", json={"project": {"name": name}})
    assert created.status_code == 201, created.text
    body = created.json()
    pid, bid, eid = body["project"]["id"], body["branch"]["id"], body["endpoints"][0]["id"]
    query(argon, pid, bid, "create table t (v text); insert into t values ('main')")
    return pid, bid, eid


def branch_named(argon: ArgonProcess, pid: str, name: str) -> dict[str, Any] | None:
    resp = argon.api.get(f"/projects/{pid}/branches")
    return next((b for b in resp.json()["branches"] if b["name"] == name), None)


def new_branch(argon: ArgonProcess, pid: str, name: str, **extra: Any) -> str:
    resp = argon.api.post(f"/projects/{pid}/branches",
                          json={"branch": {"name": name, **extra}, "endpoints": [{"type": "read_write"}]})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["branch"]["id"])


Step = tuple[str, Callable[[], Any], Callable[[dict[str, Any]], None]]  # point, operation, check(state)


def walk(argon: ArgonProcess, steps: list[Step]) -> None:
    """Kill at each step's point in turn, one start of argon per point (the restart after a kill arms the
    next point): a step's check and the next step's operation must not pass the next point."""
    if argon.alive:
        argon.interrupt()
    for (point, operation, check), then in zip(steps, [*(s[0] for s in steps[1:]), None], strict=True):
        check(kill_at(argon, point, operation, then=then))


def test_project_create_and_delete(argon: ArgonProcess) -> None:
    """Issue 12, defect 2 among them: a project whose first start was cut short has a working password,
    also after its first suspend synced the compute's roles back."""
    argon.start()

    def create(point: str) -> Step:
        name = point.replace(".", "-")

        def check(state: dict[str, Any]) -> None:
            made = [s for s in state.values() if s["project"]["name"] == name]
            if point == "project.create.after_data":
                assert not made, f"{point}: a project whose metadata was never written exists: {made}"
                return
            assert made, f"{point}: the project is gone"
            pid, bid = made[0]["project"]["id"], made[0]["branches"][0]["id"]
            query(argon, pid, bid, "select 1")
            assert argon.api.post(f"/projects/{pid}/endpoints/{made[0]['endpoints'][0]['id']}/suspend").status_code == 200
            query(argon, pid, bid, "select 1")
            assert argon.api.delete(f"/projects/{pid}").status_code == 200

        return point, lambda: argon.api.post("/projects", json={"project": {"name": name}}), check

    walk(argon, [create(p) for p in ("project.create.after_data", "project.create.after_metadata",
                                     "project.create.after_history")])
    for point in ("compute.start.after_spawn", "compute.start.before_spec", "compute.start.after_spec"):
        walk(argon, [create(point)])  # alone: every check starts computes

    def delete(point: str) -> Step:
        made: list[str] = []

        def op() -> Any:
            made.append(new_project(argon, point.replace(".", "-"))[0])
            return argon.api.delete(f"/projects/{made[0]}")

        def check(state: dict[str, Any]) -> None:
            assert (made[0] in state) == (point == "project.delete.after_stop"), f"{point}: {sorted(state)}"

        return point, op, check

    walk(argon, [delete(p) for p in ("project.delete.after_stop", "project.delete.after_metadata",
                                     "project.delete.after_rmtree")])


def test_branch_create_and_delete(argon: ArgonProcess) -> None:
    argon.start()
    pid, main, _ = new_project(argon)
    lsn = query(argon, pid, main, "select pg_current_wal_lsn()::text")[0][0]

    def create(point: str, **extra: Any) -> Step:
        name = point.replace(".", "-").replace("_", "-")

        def check(state: dict[str, Any]) -> None:
            made = branch_named(argon, pid, name)
            if point == "branch.create.after_metadata":
                assert made is not None, f"{point}: the branch is gone"
            if made is not None:
                rows = query(argon, pid, made["id"], "select v from t")
                assert rows == ([] if "schema_only" in point else [("main",)]), f"{point}: {rows}"
                assert argon.api.delete(f"/projects/{pid}/branches/{made['id']}").status_code == 200

        return point, lambda: new_branch(argon, pid, name, **extra), check

    def delete(point: str) -> Step:
        made: list[str] = []

        def op() -> Any:
            made.append(new_branch(argon, pid, point.replace(".", "-").replace("_", "-")))
            return argon.api.delete(f"/projects/{pid}/branches/{made[0]}")

        def check(state: dict[str, Any]) -> None:
            left = {b["id"] for b in state[pid]["branches"]}
            assert (made[0] in left) == (point == "branch.delete.after_stop"), f"{point}: {left}"

        return point, op, check

    walk(argon, [create("branch.create.after_copy"), create("branch.create.after_epoch"),
                 create("branch.create.after_metadata"),
                 create("branch.create_schema_only.after_restore", init_source="schema-only"),
                 create("branch.create_at_point.after_recovery", parent_lsn=lsn),
                 delete("branch.delete.after_stop"), delete("branch.delete.after_metadata"),
                 delete("branch.delete.after_rmtree")])


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


def test_roles_and_databases(argon: ArgonProcess) -> None:
    """Issue 12, defect 4 among them: a password reset cut short leaves a password that works."""
    argon.start()
    pid, main, _ = new_project(argon)
    roles = f"/projects/{pid}/branches/{main}/roles"
    dbs = f"/projects/{pid}/branches/{main}/databases"

    def create_role(point: str) -> Step:
        name = "r_" + point.split(".")[-1]

        def check(state: dict[str, Any]) -> None:
            assert name in names(argon, roles, "roles"), f"{point}: the role is gone"
            assert query(argon, pid, main, "select current_user", role=name) == [(name,)]

        return point, lambda: argon.api.post(roles, json={"role": {"name": name}}), check

    def reset(point: str) -> Step:
        def check(state: dict[str, Any]) -> None:
            assert query(argon, pid, main, "select 1") == [(1,)]  # the stored password works

        return point, lambda: argon.api.post(f"{roles}/neondb_owner/reset_password"), check

    def delete_role(point: str) -> Step:
        name = "d_" + point.split(".")[-1]

        def op() -> Any:
            assert argon.api.post(roles, json={"role": {"name": name}}).status_code == 201
            return argon.api.delete(f"{roles}/{name}")

        def check(state: dict[str, Any]) -> None:
            assert name not in names(argon, roles, "roles"), f"{point}: the role is back"

        return point, op, check

    def database(point: str) -> Step:
        name = "db_" + point.split(".")[1] + "_" + point.split(".")[-1]
        body = {"database": {"name": name, "owner_name": "neondb_owner"}}

        def op() -> Any:
            if "delete" in point:
                assert argon.api.post(dbs, json=body).status_code == 201
                return argon.api.delete(f"{dbs}/{name}")
            return argon.api.post(dbs, json=body)

        def check(state: dict[str, Any]) -> None:
            listed = names(argon, dbs, "databases")
            live = {r[0] for r in query(argon, pid, main, "select datname from pg_database")}
            assert (name in listed) == (name in live), f"{point}: api {listed}, compute {live}"
            if "delete" in point or point.endswith("after_metadata"):
                assert (name in listed) == ("create" in point), f"{point}: api {listed}"

        return point, op, check

    walk(argon, [create_role("role.create.after_intent"), create_role("role.create.after_sql"),
                 create_role("role.create.after_metadata"),
                 reset("role.reset_password.after_intent"), reset("role.reset_password.after_sql"),
                 reset("role.reset_password.after_metadata"),
                 delete_role("role.delete.after_sql"), delete_role("role.delete.after_metadata"),
                 database("database.create.after_sql"), database("database.create.after_metadata"),
                 database("database.delete.after_sql"), database("database.delete.after_metadata")])
    argon.interrupt()  # computes stop (their roles synced back), start afresh: the passwords still work
    argon.start()
    assert query(argon, pid, main, "select 1") == [(1,)]
    assert query(argon, pid, main, "select current_user", role="r_after_sql") == [("r_after_sql",)]


def test_suspend(argon: ArgonProcess) -> None:
    argon.start()
    pid, main, eid = new_project(argon)

    def suspend(point: str) -> Step:
        def op() -> Any:
            query(argon, pid, main, "select 1")  # running
            return argon.api.post(f"/projects/{pid}/endpoints/{eid}/suspend")

        def check(state: dict[str, Any]) -> None:
            assert query(argon, pid, main, "select v from t") == [("main",)]

        return point, op, check

    walk(argon, [suspend("compute.suspend.after_sync"), suspend("compute.suspend.after_stop")])


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


def test_every_failpoint_is_walked() -> None:
    """Runs last in this module: a failpoint in the code that no walk above reached (and that is not
    listed in UNWALKED with its reason) fails here. Skipped when the walks were not all run."""
    if not WALKED:
        pytest.skip("the walks did not run in this session")
    every = {s.name for s in failpoints.sites()}
    missing = every - WALKED - set(UNWALKED)
    print(f"\nfailpoints walked: {len(WALKED)} of {len(every)}; kills injected: {KILLS[0]}")
    assert not missing, f"failpoints no walk reaches: {sorted(missing)}"

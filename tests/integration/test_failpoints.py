"""Kill `argon up` at every failpoint of every operation, restart it on the same data directory, and
check that the operation happened whole or not at all (`check_invariants` plus each operation's own
check; the harness is tests/fixtures/failpoint_walk.py). This file walks project, branch, role,
database and suspend operations; test_failpoints_restore.py the restores, snapshots, settings and
the write gate, and the defects the failpoints made testable (issue 12): a compute still starting
when Argon restarts, a branch of a parent in crash recovery.

The walk is one test per operation group, each on its own data directory: a start of `argon up`
with the point armed, the operation, the kill (a point never reached fails the test), a start
without failpoints, the checks. A failpoint in the code that neither file's POINTS declares and
that is not listed in UNWALKED fails `test_every_failpoint_is_walked`; a declared point a walk did
not reach fails it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from argon import failpoints
from tests.fixtures.argon_process import ArgonProcess, running_argon
from tests.fixtures.failpoint_walk import (
    KILLS,
    WALKED,
    Step,
    branch_named,
    check_reached,
    kill_at,
    names,
    new_branch,
    new_project,
    query,
    walk,
)
from tests.integration import test_failpoints_restore

pytestmark = [pytest.mark.pg, pytest.mark.slow]


# Points a walk cannot reach in seconds, and why (each is exercised where its step runs).
UNWALKED = {
    "history.snapshot.after_copy": "a snapshot is due only after 16 MB of WAL and a minute",
    "retention.prune.after_manifest": "pruning needs history older than the retention window",
}

# What this file's walks kill Argon at (test_every_failpoint_is_walked checks that they did).
POINTS = {
    "project.create.after_data", "project.create.after_metadata", "project.create.after_history",
    "compute.start.after_spawn", "compute.start.before_spec", "compute.start.after_spec",
    "project.delete.after_stop", "project.delete.after_metadata", "project.delete.after_rmtree",
    "branch.create.after_copy", "branch.create.after_epoch", "branch.create.after_metadata",
    "branch.create_schema_only.after_restore", "branch.create_at_point.after_recovery",
    "branch.delete.after_stop", "branch.delete.after_metadata", "branch.delete.after_rmtree",
    "branch.create.after_spec_intent",
    "role.create.after_intent", "role.create.after_sql", "role.create.after_metadata",
    "role.reset_password.after_intent", "role.reset_password.after_sql", "role.reset_password.after_metadata",
    "role.delete.after_sql", "role.delete.after_metadata", "database.create.after_sql",
    "database.create.after_metadata", "database.delete.after_sql", "database.delete.after_metadata",
    "compute.suspend.after_sync", "compute.suspend.after_stop",
}


@pytest.fixture
def argon() -> Iterator[ArgonProcess]:
    with running_argon("fp") as proc:
        yield proc


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


def test_branch_create_spec_intent(argon: ArgonProcess) -> None:
    """A create writes its endpoints' spec intents outside the project lock, before its commit (ADR
    0033): killed there, the branch is not made and the intents of its never-made endpoints are gone."""
    argon.start(ARGON_FAILPOINTS="branch.create.after_spec_intent=kill")
    pid, _, _ = new_project(argon)
    point = "branch.create.after_spec_intent"
    state = kill_at(argon, point, lambda: new_branch(argon, pid, "spec-intent"))
    assert branch_named(argon, pid, "spec-intent") is None, f"{point}: the branch was committed"
    endpoints = {e["id"] for e in state[pid]["endpoints"]}
    stray = [p.name for p in (argon.data / "intents").glob("spec-*")
             if p.name.removeprefix("spec-").removesuffix(".json") not in endpoints]
    assert not stray, f"{point}: spec intents of endpoints that never were: {stray}"
    new_branch(argon, pid, "spec-intent")  # the name is free


# Before and after the commit point (the rename of the new copy into place) in turn: the reconciler

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



def test_every_failpoint_is_walked() -> None:
    """Runs last in this module: a failpoint in the code that neither walk file declares (and that is
    not listed in UNWALKED with its reason) fails here, and so does a point of this file that its
    walks did not reach. The second check is skipped when the walks did not run in this process."""
    every = {s.name for s in failpoints.sites()}
    declared = POINTS | test_failpoints_restore.POINTS
    missing = every - declared - set(UNWALKED)
    assert not missing, f"failpoints no walk reaches: {sorted(missing)}"
    assert not declared - every, f"declared points that are not in the code: {sorted(declared - every)}"
    print(f"\nfailpoints walked here: {len(WALKED)} of {len(every)}; kills injected: {KILLS[0]}")
    check_reached(POINTS)

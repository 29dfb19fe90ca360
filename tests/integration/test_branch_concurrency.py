"""Branch creates copy their data outside the project lock (ADR 0033): while one copies, the project
answers other mutations, another create of the same parent copies beside it, the name is taken
(a second create or a rename to it is 409), and the parent can be neither deleted (412) nor given a
compute that could start under the copy (that waits for the copy).

The copy is held open at a seam: `argon.control.branches._make_data` wrapped so that it waits on
a gate the test opens (the platform runs in this process)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from argon.control import branches, spec
from argon.errors import StorageError
from tests.fixtures.platform import RunningPlatform

pytestmark = pytest.mark.pg


class Gate:
    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered: list[str] = []  # the new branches' ids, as their copies reach the gate

    def wait_entered(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.entered) < n:
            assert time.monotonic() < deadline, f"{len(self.entered)} of {n} copies started"
            time.sleep(0.02)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate()
    original = branches._make_data

    async def held(control: Any, project: Any, parent: Any, bid: str, req: Any) -> Any:
        gate.entered.append(bid)
        while not gate.open.is_set():
            await asyncio.sleep(0.02)
        return await original(control, project, parent, bid, req)

    monkeypatch.setattr(branches, "_make_data", held)
    try:
        yield gate
    finally:
        gate.open.set()


def test_creates_copy_outside_the_project_lock(platform: RunningPlatform, project: dict[str, Any],
                                               gate: Gate) -> None:
    api, pid = platform.api, project["project"]["id"]
    with psycopg.connect(platform.dsn(project), autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT generate_series(1, 100) AS v")
    gate.open.set()  # the template itself: a stopped branch without a compute, as Django's
    resp = api.post(f"/projects/{pid}/branches", json={"branch": {"name": "tmpl"}, "endpoints": []})
    assert resp.status_code == 201, resp.text
    tmpl = resp.json()["branch"]["id"]
    gate.open.clear()
    gate.entered.clear()

    def create(name: str) -> Any:
        return api.post(f"/projects/{pid}/branches", json={"branch": {"name": name, "parent_id": tmpl},
                                                           "endpoints": [{"type": "read_write"}]})

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first, second = pool.submit(create, "run-1"), pool.submit(create, "run-2")
        gate.wait_entered(2)  # both copy at once: neither waits for the other's project lock
        assert create("run-1").status_code == 409  # the name is taken while its data is made
        assert api.patch(f"/projects/{pid}/branches/{project['branch']['id']}",
                         json={"branch": {"name": "run-2"}}).status_code == 409
        assert api.get(f"/projects/{pid}/branches").status_code == 200
        deleted = api.delete(f"/projects/{pid}/branches/{tmpl}")
        assert deleted.status_code == 412, deleted.text
        assert "being copied" in deleted.json()["message"]
        compute = pool.submit(api.post, f"/projects/{pid}/endpoints",
                              json={"endpoint": {"branch_id": tmpl, "type": "read_write"}})
        time.sleep(0.5)  # give it the chance to go through too early (it must wait for the copies)
        assert not compute.done()
        gate.open.set()
        made = [first.result(), second.result()]
        assert compute.result().status_code == 201, compute.result().text
    for resp in made:
        assert resp.status_code == 201, resp.text
        uri = resp.json()["connection_uris"][0]["connection_uri"]
        with psycopg.connect(uri, connect_timeout=30) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (100,)
    names = [b["name"] for b in api.get(f"/projects/{pid}/branches").json()["branches"]]
    assert sorted(n for n in names if n.startswith("run-")) == ["run-1", "run-2"]
    for resp in made:
        assert api.delete(f"/projects/{pid}/branches/{resp.json()['branch']['id']}").status_code == 200
    assert api.delete(f"/projects/{pid}/branches/{tmpl}").status_code == 200
    branches_dir = platform.settings.data_dir / "projects" / pid / "branches"
    wait_until(lambda: {p.name for p in branches_dir.iterdir()} == {project["branch"]["id"]})  # removed in the background


def test_a_failed_copy_frees_its_name_and_leaves_nothing(platform: RunningPlatform, project: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    api, pid = platform.api, project["project"]["id"]
    original = branches._make_data

    async def broken(control: Any, project_: Any, parent: Any, bid: str, req: Any) -> Any:
        await original(control, project_, parent, bid, req)
        raise StorageError("could not copy the branch (the test's seam)")

    monkeypatch.setattr(branches, "_make_data", broken)
    failed = api.post(f"/projects/{pid}/branches", json={"branch": {"name": "doomed"}})
    assert failed.status_code == 507 and "the test's seam" in failed.json()["message"], failed.text
    monkeypatch.setattr(branches, "_make_data", original)
    assert {p.name for p in (platform.settings.data_dir / "projects" / pid / "branches").iterdir()} == \
        {project["branch"]["id"]}
    resp = api.post(f"/projects/{pid}/branches", json={"branch": {"name": "doomed"}, "endpoints": []})
    assert resp.status_code == 201, resp.text


@pytest.mark.slow
def test_branches_of_a_compute_less_parent_take_spare_copies(platform: RunningPlatform,
                                                             project: dict[str, Any]) -> None:
    """A branch without a compute (a template) gets copies made ahead after it is branched: the next
    branch is a rename of one, with the parent's data as it is now (a restore of the parent first
    makes the copies stale: the branch after it has the new data)."""
    api, pid, plane = platform.api, project["project"]["id"], platform.plane
    with psycopg.connect(platform.dsn(project), autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT 1 AS v")
    resp = api.post(f"/projects/{pid}/branches", json={"branch": {"name": "tmpl"}, "endpoints": []})
    assert resp.status_code == 201, resp.text
    tmpl = resp.json()["branch"]["id"]

    def branch_of_tmpl(name: str) -> tuple[str, list[tuple[Any, ...]]]:
        made = api.post(f"/projects/{pid}/branches", json={"branch": {"name": name, "parent_id": tmpl},
                                                           "endpoints": [{"type": "read_write"}]})
        assert made.status_code == 201, made.text
        with psycopg.connect(made.json()["connection_uris"][0]["connection_uri"], connect_timeout=30) as conn:
            rows = conn.execute("SELECT v FROM t").fetchall()
        return made.json()["branch"]["id"], rows

    def spares() -> int:
        return plane.branch_spares.count(tmpl)

    kept = branches.spares_wanted(plane, tmpl)  # 1 on the copy backend, SPARES_MAX on reflink
    first, rows = branch_of_tmpl("run-1")
    assert rows == [(1,)]
    wait_until(lambda: spares() == kept)
    second, rows = branch_of_tmpl("run-2")
    assert rows == [(1,)]
    assert f"branch {second}: a spare copy of {tmpl} taken" in platform.log_file.read_text()
    wait_until(lambda: spares() == kept)  # taken by run-2, made again
    with psycopg.connect(platform.dsn(project), autocommit=True) as conn:
        conn.execute("UPDATE t SET v = 2")
    restored = api.post(f"/projects/{pid}/branches/{tmpl}/restore",
                        json={"source_branch_id": project["branch"]["id"]})
    assert restored.status_code == 200, restored.text
    third, rows = branch_of_tmpl("run-3")
    assert rows == [(2,)]
    for bid in (first, second, third):
        assert api.delete(f"/projects/{pid}/branches/{bid}").status_code == 200
    wait_until(lambda: not plane.branch_spares.refilling)
    assert api.delete(f"/projects/{pid}/branches/{tmpl}").status_code == 200
    wait_until(lambda: spares() == 0 and not (platform.settings.data_dir / "projects" / pid / "branches" / tmpl).exists())


def wait_until(predicate: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_copy_of_a_branch_stopped_in_step_needs_no_spec(platform: RunningPlatform, project: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A branch whose compute stopped after its roles and databases were read back (its endpoint
    deleted, as Django's templates are) is in step: a copy of its head starts its compute without the
    platform's spec (no intent before the commit, no admin session at the start), and its logins
    work. A restore of it puts it out of step: the next copy's compute gets the spec again."""
    api, pid, plane = platform.api, project["project"]["id"], platform.plane
    applied: list[str] = []
    original = spec.apply_spec

    async def counted(plane_: Any, ep: Any, compute: Any) -> None:
        applied.append(ep.branch_id)
        await original(plane_, ep, compute)

    monkeypatch.setattr(spec, "apply_spec", counted)
    made = api.post(f"/projects/{pid}/branches", json={"branch": {"name": "tmpl-step"},
                                                       "endpoints": [{"type": "read_write"}]})
    assert made.status_code == 201, made.text
    tmpl, tmpl_ep = made.json()["branch"]["id"], made.json()["endpoints"][0]["id"]
    with psycopg.connect(made.json()["connection_uris"][0]["connection_uri"], connect_timeout=30,
                         autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT 1 AS v")
        conn.execute("CREATE DATABASE made_by_sql")  # read back before the stop: in the copies' metadata
    assert api.delete(f"/projects/{pid}/endpoints/{tmpl_ep}").status_code == 200
    assert platform.control.computes.in_step(tmpl)

    def run(name: str) -> tuple[str, str]:
        resp = api.post(f"/projects/{pid}/branches", json={"branch": {"name": name, "parent_id": tmpl},
                                                           "endpoints": [{"type": "read_write"}]})
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert "made_by_sql" in {d["name"] for d in body["databases"]}
        with psycopg.connect(body["connection_uris"][0]["connection_uri"], connect_timeout=30) as conn:
            assert conn.execute("SELECT v FROM t").fetchone() == (1,)
        return body["branch"]["id"], body["endpoints"][0]["id"]

    applied.clear()
    first, first_ep = run("in-step")
    assert first not in applied, "a copy of a branch in step got the spec"
    assert not plane.intents.has(f"spec-{first_ep}")
    restored = api.post(f"/projects/{pid}/branches/{tmpl}/restore", json={"source_branch_id": project["branch"]["id"]})
    assert restored.status_code == 200, restored.text
    assert not platform.control.computes.in_step(tmpl)
    resp = api.post(f"/projects/{pid}/branches", json={"branch": {"name": "after-restore", "parent_id": tmpl},
                                                       "endpoints": [{"type": "read_write"}]})
    assert resp.status_code == 201, resp.text
    second = resp.json()["branch"]["id"]
    wait_until(lambda: second in applied)  # its first start applied the spec
    for bid in (first, second, tmpl):
        assert api.delete(f"/projects/{pid}/branches/{bid}").status_code == 200

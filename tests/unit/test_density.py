"""Density (ADR 0022) without a postmaster: which branches the storage figures measure per tick, which
branches one minute of history maintenance visits, and the plane's per-project indexes."""

from __future__ import annotations

from datetime import UTC, datetime

from argon.control.figures import Seen, due
from argon.control.retention import maintenance_round

SIG_A = 7  # the plane's change number of branch a when it was measured
SIG_A_SUSPENDED = 9  # its endpoint's record changed since (a suspend)


def test_an_idle_branch_that_did_not_change_is_never_measured_again() -> None:
    seen = {"a": Seen(at=0.0, change=SIG_A, running=False)}
    assert due({"a": (SIG_A, False)}, seen, set(), set(), now=1e9) == []


def test_a_change_a_touch_a_new_branch_and_a_running_one_are_measured() -> None:
    seen = {"a": Seen(0.0, SIG_A, False), "b": Seen(0.0, 2, False), "r": Seen(100.0, 3, True)}
    view = {"a": (SIG_A_SUSPENDED, False), "b": (2, False), "new": (4, False), "r": (3, True)}
    assert due(view, seen, {"b"}, set(), now=100.0 + 14, ttl=15) == ["a", "b", "new"]  # r measured 14 s ago
    assert due(view, seen, {"b"}, set(), now=100.0 + 15, ttl=15) == ["a", "b", "new", "r"]
    # the compute stopped (a suspend), the records not written yet: measured anyway
    assert due({"r": (3, False)}, seen, set(), set(), now=100.0) == ["r"]


def test_the_budget_bounds_a_tick_and_seeded_branches_come_last() -> None:
    view = {f"s{i}": (i, False) for i in range(100)} | {"new": (100, False)}
    seeded = {f"s{i}" for i in range(100)}
    picked = due(view, {}, set(), seeded, now=0.0, budget=10)
    assert len(picked) == 10 and picked[0] == "new"


def test_maintenance_visits_every_running_branch_and_a_round_robin_of_idle_ones() -> None:
    idle = [f"b{i:02d}" for i in range(10)]
    visit, cursor = maintenance_round(idle, ["run"], "", 4)
    assert visit == ["run", "b00", "b01", "b02", "b03"] and cursor == "b03"
    visit, cursor = maintenance_round(idle, ["run"], cursor, 4)
    assert visit == ["run", "b04", "b05", "b06", "b07"]
    visit, cursor = maintenance_round(idle, [], "b07", 4)
    assert visit == ["b08", "b09", "b00", "b01"] and cursor == "b01"  # wraps around
    assert maintenance_round([], ["run"], "b01", 4) == (["run"], "b01")


def test_a_projects_branches_and_endpoints_come_from_its_own_index() -> None:
    from argon import model
    from argon.control.plane import ControlPlane

    plane = ControlPlane.__new__(ControlPlane)  # the view only: no store, no computes
    plane._projects, plane._branches, plane._endpoints, plane._verifiers = {}, {}, {}, {}
    plane._projects_sorted = None
    plane._project_branches, plane._project_endpoints, plane._changes, plane._change_seq = {}, {}, {}, 0
    plane._endpoint_locks = {}
    now = datetime(2026, 12, 1, tzinfo=UTC)

    class Telemetry:
        def forget_compute(self, labels: object) -> None:
            pass

    class Activity:
        def forget(self, endpoint_id: str) -> None:
            pass

    plane.telemetry, plane.activity = Telemetry(), Activity()  # type: ignore[assignment]
    for p in ("p1", "p2"):
        plane._see(model.Project(id=p, name=p, region_id="local", pg_version=18, created_at=now, updated_at=now))
        for b in ("main", "dev"):
            plane._see(model.Branch(id=f"{p}-{b}", project_id=p, name=b, created_at=now, updated_at=now))
            plane._see(model.Endpoint(id=f"{p}-{b}-ep", project_id=p, branch_id=f"{p}-{b}", created_at=now,
                                      updated_at=now))
    assert [b.id for b in plane.branches("p1")] == ["p1-dev", "p1-main"]
    changes = dict(plane.branch_changes())
    plane._see(plane.endpoint("p1", "p1-main-ep").replace(current_state=model.ComputeState.IDLE))
    assert plane.branch_changes()["p1-main"] > changes["p1-main"]  # an endpoint's change is its branch's
    assert plane.branch_changes()["p1-dev"] == changes["p1-dev"]
    assert [e.id for e in plane.endpoints("p2", "p2-main")] == ["p2-main-ep"]
    assert len(plane.endpoints()) == 4
    plane._unsee(plane.branch("p1", "p1-dev"))
    assert [b.id for b in plane.branches("p1")] == ["p1-main"] and len(plane.endpoints("p1")) == 1
    plane._unsee(plane.project("p2"))
    assert plane.branches("p2") == [] and plane.endpoints("p2") == [] and len(plane.endpoints()) == 1


def test_a_console_page_is_a_window_newest_first_with_a_cursor_and_a_search() -> None:
    import pytest

    from argon.console.paging import newest_first
    from argon.errors import UserError

    items = [(datetime(2026, 12, 1, i // 60, i % 60, tzinfo=UTC), f"p-{i:03d}", f"name{i}") for i in range(120)]  # oldest first

    def page(**kw: object) -> tuple[list[str], str | None]:
        got = newest_first(items, key=lambda t: (t[0], t[1]), name=lambda t: t[2], size=50, **kw)  # type: ignore[arg-type]
        return [t[1] for t in got.rows], got.older

    first, older = page()
    assert first[0] == "p-119" and first[-1] == "p-070" and older is not None
    second, older = page(before=older)
    assert second[0] == "p-069" and second[-1] == "p-020"
    third, older = page(before=older)
    assert third == [f"p-{i:03d}" for i in range(19, -1, -1)] and older is None  # the last page
    # a search by name (any case) or by a part of the id; paged the same way
    assert page(search="NAME11")[0] == ["p-119", "p-118", "p-117", "p-116", "p-115", "p-114", "p-113", "p-112",
                                       "p-111", "p-110", "p-011"]
    assert page(search="p-00")[0] == [f"p-{i:03d}" for i in range(9, -1, -1)]
    assert page(search="nothing") == ([], None)
    with pytest.raises(UserError, match="start again"):
        page(before="not-a-cursor")


def test_start_up_checks_run_a_bounded_number_at_once_in_order() -> None:
    """Adoption's identity checks (and pending specs) at start-up: several at once, never more than
    the bound, results in the order given."""
    import asyncio

    from argon.control.reconcile import bounded

    running, peak = 0, 0

    async def check(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01 * (i % 3))
        running -= 1
        return i * 10

    assert asyncio.run(bounded(3, [check(i) for i in range(10)])) == [i * 10 for i in range(10)]
    assert peak == 3

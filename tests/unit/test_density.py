"""Density (ADR 0022) without a postmaster: which branches the storage figures measure per tick, which
branches one minute of history maintenance visits, and the plane's per-project indexes."""

from __future__ import annotations

from datetime import UTC, datetime

from argon.control.figures import due
from argon.control.retention import maintenance_round


def test_an_idle_branch_that_did_not_change_is_never_measured_again() -> None:
    assert due([], {}, [], now=1e9) == []


def test_a_change_a_touch_a_new_branch_and_a_running_one_are_measured() -> None:
    running = {"r": 100.0, "r2": 90.0, "fresh": None}  # fresh: never measured (it is among the changed)
    assert due(["a", "b", "fresh"], running, [], now=100.0 + 14, ttl=15) == ["a", "b", "fresh", "r2"]
    assert due(["a", "b", "fresh"], running, [], now=100.0 + 15, ttl=15) == ["a", "b", "fresh", "r2", "r"]
    assert due(["r"], running, [], now=100.0 + 15, ttl=15) == ["r", "r2"]  # never twice


def test_the_budget_bounds_a_tick_and_seeded_branches_come_last() -> None:
    seeded = [f"s{i}" for i in range(100)]
    picked = due(["new"], {"r": 0.0}, seeded, now=100.0, budget=10)
    assert len(picked) == 10 and picked[:3] == ["new", "r", "s0"]
    assert due([f"c{i}" for i in range(30)], {"r": 0.0}, seeded, now=100.0, budget=10) == [f"c{i}" for i in range(10)]


def test_maintenance_visits_every_running_branch_and_a_round_robin_of_idle_ones() -> None:
    idle = [f"b{i:02d}" for i in range(10)]
    visit, cursor = maintenance_round(idle, ["run"], "", 4)
    assert visit == ["run", "b00", "b01", "b02", "b03"] and cursor == "b03"
    visit, cursor = maintenance_round(idle, ["run"], cursor, 4)
    assert visit == ["run", "b04", "b05", "b06", "b07"]
    visit, cursor = maintenance_round(idle, [], "b07", 4)
    assert visit == ["b08", "b09", "b00", "b01"] and cursor == "b01"  # wraps around
    assert maintenance_round([], ["run"], "b01", 4) == (["run"], "b01")


def test_idle_branches_are_visited_when_their_history_has_something_to_prune_not_round_robin() -> None:
    from datetime import timedelta

    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    idle = [f"b{i}" for i in range(6)]
    due = {"b0": None, "b1": now - timedelta(seconds=1), "b2": now + timedelta(hours=1), "b3": now - timedelta(hours=1),
           "b4": None}
    # b3 and b1 are ripe (soonest first), b5 was never visited; b0, b4 (nothing to prune) and b2 (later) wait
    assert maintenance_round(idle, ["run"], "", 50, due, now) == (["run", "b3", "b1", "b5"], "b5")
    assert maintenance_round(idle, [], "", 1, due, now) == (["b3"], "")  # the budget bounds it
    assert maintenance_round(idle, [], "", 50, {b: None for b in idle}, now) == ([], "")  # all known: no work


def test_next_prune_is_when_an_old_epoch_or_a_second_snapshot_leaves_the_window() -> None:
    from datetime import timedelta

    from argon.control.retention import next_prune_at, plan_pruning
    from argon.storage import history as hs

    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    day = timedelta(days=1)

    def snap(name: str, at: datetime) -> hs.Snapshot:
        return hs.Snapshot(name=name, taken_at=at, redo_lsn="0/1000000", consistent_lsn="0/1000100")

    one = hs.Manifest((hs.Epoch(id="e1", started_at=t0, timeline=1, start_lsn="0/1000000", segsize=1 << 20, snapshots=(snap("base", t0),)),))
    assert next_prune_at(one, day) is None  # one snapshot, one epoch: nothing will ever go
    two = hs.Manifest((hs.Epoch(id="e1", started_at=t0, timeline=1, start_lsn="0/1000000", segsize=1 << 20,
                                snapshots=(snap("base", t0), snap("s1", t0 + 2 * day))),))
    at = next_prune_at(two, day)
    assert at == t0 + 3 * day
    assert plan_pruning(two, at - timedelta(seconds=1) - day).empty and not plan_pruning(two, at + timedelta(seconds=1) - day).empty
    ended = hs.Manifest((hs.Epoch(id="e0", started_at=t0, timeline=1, start_lsn="0/1000000", segsize=1 << 20, snapshots=(snap("base", t0),),
                                  ended_at=t0 + day, end_lsn="0/2000000"), *two.epochs))
    assert next_prune_at(ended, day) == t0 + 2 * day  # the old epoch goes first


def test_a_projects_branches_and_endpoints_come_from_its_own_index() -> None:
    from argon import model
    from argon.control.plane import ControlPlane

    plane = ControlPlane.__new__(ControlPlane)  # the view only: no store, no computes
    plane._projects, plane._branches, plane._endpoints, plane._verifiers = {}, {}, {}, {}
    plane._projects_sorted = None
    plane._project_branches, plane._project_endpoints, plane.branch_watchers = {}, {}, []
    plane._endpoint_locks, plane._slots_taken, plane._address_next = {}, {}, 0
    told: list[str] = []
    plane.branch_watchers.append(told.append)
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
    told.clear()
    plane._see(plane.endpoint("p1", "p1-main-ep").replace(current_state=model.ComputeState.IDLE))
    assert told == ["p1-main"]  # an endpoint's change is its branch's, and no other branch's
    assert [e.id for e in plane.endpoints("p2", "p2-main")] == ["p2-main-ep"]
    assert len(plane.endpoints()) == 4
    told.clear()
    plane._unsee(plane.branch("p1", "p1-dev"))
    assert [b.id for b in plane.branches("p1")] == ["p1-main"] and len(plane.endpoints("p1")) == 1
    assert told == ["p1-dev"]  # gone: the figures forget it
    plane._unsee(plane.project("p2"))
    assert plane.branches("p2") == [] and plane.endpoints("p2") == [] and len(plane.endpoints()) == 1


def test_a_new_endpoint_address_is_a_lookup_in_the_slots_the_view_keeps() -> None:
    """ADR 0031's rule (none a live endpoint holds; past every one given or seen, so a deleted one's
    address comes back only once the slots have gone round), kept as endpoints come and go."""
    from argon import model
    from argon.control import addresses
    from argon.control.plane import ControlPlane

    plane = ControlPlane.__new__(ControlPlane)
    plane._endpoints, plane._branches, plane._project_endpoints = {}, {}, {}
    plane._endpoint_locks, plane._slots_taken, plane._address_next, plane.branch_watchers = {}, {}, 0, []
    now = datetime(2026, 12, 1, tzinfo=UTC)

    class Forget:
        def forget_compute(self, labels: object) -> None:
            pass

        def forget(self, endpoint_id: str) -> None:
            pass

    plane.telemetry = plane.activity = Forget()  # type: ignore[assignment]

    def endpoint(eid: str, slot: int) -> model.Endpoint:
        ep = model.Endpoint(id=eid, project_id="p", branch_id="b", created_at=now, updated_at=now,
                            address=addresses.address_of(slot))
        plane._see(ep)
        return ep

    endpoint("e0", 0)
    high = endpoint("e7", 7)  # loaded from the store: new addresses start past it
    assert plane.new_endpoint_address() == addresses.address_of(8)
    plane._unsee(high)
    assert plane.new_endpoint_address() == addresses.address_of(9)  # not 7 again, not 8 twice
    moved = endpoint("e0", 0).replace(address=addresses.address_of(10))
    plane._see(moved)  # its address changed: slot 0 is free, 10 is taken
    assert plane._slots_taken == {10: 1}
    plane._address_next = addresses.SLOTS - 1
    assert plane.new_endpoint_address() == addresses.address_of(addresses.SLOTS - 1)
    assert plane.new_endpoint_address() == addresses.address_of(0)  # round: the freed slot 0


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

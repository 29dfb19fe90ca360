"""The pure decisions of the control plane: suspend and start-up reconciliation."""

from argon import model
from argon.control import reconcile, suspend
from argon.proxy.activity import ActivityRegistry, EndpointActivity


def act(sessions: int = 0, busy: int = 0, last: float | None = None) -> EndpointActivity:
    return EndpointActivity(sessions=sessions, busy=busy, last_activity=last)


def test_suspend_after_timeout_of_inactivity() -> None:
    assert suspend.decide(now=100, timeout=10, activity=act(last=89), running_since=0).suspend
    assert not suspend.decide(now=100, timeout=10, activity=act(last=95), running_since=0).suspend


def test_idle_sessions_do_not_keep_it_awake_but_busy_ones_do() -> None:
    assert suspend.decide(now=100, timeout=10, activity=act(sessions=3, last=50), running_since=0).suspend
    assert not suspend.decide(now=100, timeout=10, activity=act(sessions=3, busy=1, last=50), running_since=0).suspend


def test_never_suspend_and_fresh_start() -> None:
    assert not suspend.decide(now=100, timeout=None, activity=act(last=0), running_since=0).suspend
    # started 2 s ago, no bytes yet: wait a full timeout from the start
    assert not suspend.decide(now=100, timeout=10, activity=act(), running_since=98).suspend


def test_activity_registry_tracks_busy_sessions() -> None:
    reg = ActivityRegistry()
    s1 = reg.open("ep")
    s2 = reg.open("ep")
    s1.in_transaction = True
    snap = reg.snapshot("ep")
    assert (snap.sessions, snap.busy) == (2, 1)
    reg.close(s1)
    reg.close(s2)
    snap = reg.snapshot("ep")
    assert (snap.sessions, snap.busy) == (0, 0) and snap.last_activity is not None


def test_endpoint_timeout_rules() -> None:
    now = model.utcnow()
    ep = model.Endpoint(id="e", project_id="p", branch_id="b", created_at=now, updated_at=now)
    assert ep.effective_suspend_timeout(300) == 300
    assert ep.replace(suspend_timeout_seconds=-1).effective_suspend_timeout(300) is None
    assert ep.replace(suspend_timeout_seconds=5).effective_suspend_timeout(300) == 5


def test_reconcile_plan() -> None:
    snap = reconcile.Snapshot(
        endpoints={"ep-1": model.ComputeState.ACTIVE, "ep-2": model.ComputeState.ACTIVE,
                   "ep-3": model.ComputeState.IDLE},
        adoptable=frozenset({"ep-1"}), unfinished_ops=("op",), project_ids=frozenset({"p1"}),
        project_dirs=frozenset({"p1", "orphan"}))
    plan = reconcile.decide(snap)
    assert plan.adopt == ["ep-1"]
    assert plan.mark_idle == ["ep-2"]
    assert plan.fail_ops == ["op"]
    assert plan.remove_dirs == ["orphan"]
    assert "adopted 1" in plan.summary()


def test_reconcile_plan_for_branches_and_interrupted_restores() -> None:
    snap = reconcile.Snapshot(
        endpoints={}, adoptable=frozenset(), unfinished_ops=(), project_ids=frozenset({"p1"}),
        project_dirs=frozenset({"p1"}), branch_ids=frozenset({"b1", "b2", "b3"}),
        branch_dirs=frozenset({("p1", "b1"), ("p1", "b2"), ("p1", "b3"), ("p1", "half-made")}),
        branch_entries={("p1", "b1"): frozenset({"pgdata", "history", "log", "tmp-1a2b3c4d"}),
                        ("p1", "b2"): frozenset({"pgdata", "pgdata.restoring"}),
                        ("p1", "b3"): frozenset({"pgdata.restoring", "history"})})
    plan = reconcile.decide(snap)
    assert plan.remove_branch_paths == ["p1/b1/tmp-1a2b3c4d", "p1/b2/pgdata.restoring", "p1/half-made"]
    assert plan.finish_restores == ["p1/b3"]
    assert "finished 1 interrupted restore" in plan.summary()

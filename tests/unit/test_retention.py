"""History policy without a postmaster: when a snapshot is due, what pruning keeps, which epoch and
snapshot serve a point in time, and which targets are refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from argon.control import pitr, retention
from argon.errors import UserError
from argon.storage import history as hs

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
MB = 1 << 20


def snap(name: str, at: datetime, lsn: str) -> hs.Snapshot:
    return hs.Snapshot(name=name, taken_at=at, redo_lsn=lsn, consistent_lsn=lsn)


def epoch(eid: str, start: datetime, lsn: str, *snaps: hs.Snapshot, ended: datetime | None = None) -> hs.Epoch:
    return hs.Epoch(id=eid, started_at=start, start_lsn=lsn, timeline=1, segsize=MB, snapshots=snaps,
                    ended_at=ended, end_lsn="0/9000000" if ended else None)


def test_a_snapshot_is_due_after_enough_wal_or_time() -> None:
    e = epoch("e1", T0, "0/1000000", snap("base", T0, "0/1000000"))
    day = 86400
    assert not retention.snapshot_due(e, MB - 1, now=T0 + timedelta(days=1), retention_seconds=day, cheap=False)
    assert retention.snapshot_due(e, retention.WAL_SNAPSHOT_TRIGGER, now=T0, retention_seconds=day, cheap=False)
    # Copies every half window, reflinks every 1/24 of it (never more often than once a minute).
    assert not retention.snapshot_due(e, 2 * MB, now=T0 + timedelta(hours=11), retention_seconds=day, cheap=False)
    assert retention.snapshot_due(e, 2 * MB, now=T0 + timedelta(hours=12), retention_seconds=day, cheap=False)
    assert retention.snapshot_due(e, 2 * MB, now=T0 + timedelta(hours=1), retention_seconds=day, cheap=True)
    assert not retention.snapshot_due(e, 2 * MB, now=T0 + timedelta(seconds=59), retention_seconds=60, cheap=True)



def test_a_snapshot_is_due_once_the_wal_since_is_half_the_data() -> None:
    """A bulk load's WAL is as large as its data: replaying it from the last snapshot (a restore
    from the bucket, a point in time) is bounded by a snapshot at the next stop."""
    e = epoch("e1", T0, "0/1000000", snap("base", T0, "0/1000000"))
    day = 86400
    soon = T0 + timedelta(minutes=5)
    assert not retention.snapshot_due(e, 89 * MB, now=soon, retention_seconds=day, cheap=False)  # size unknown
    assert retention.snapshot_due(e, 89 * MB, now=soon, retention_seconds=day, cheap=False, data_bytes=117 * MB)
    assert not retention.snapshot_due(e, 50 * MB, now=soon, retention_seconds=day, cheap=False, data_bytes=117 * MB)
    # A small cluster: a few segments at least; a large one: never later than the fixed trigger.
    assert not retention.snapshot_due(e, 3 * MB, now=soon, retention_seconds=day, cheap=False, data_bytes=2 * MB)
    assert retention.snapshot_due(e, 4 * MB, now=soon, retention_seconds=day, cheap=False, data_bytes=2 * MB)
    assert retention.snapshot_due(e, retention.WAL_SNAPSHOT_TRIGGER, now=soon, retention_seconds=day, cheap=False,
                                  data_bytes=100 << 30)


def test_pruning_keeps_the_newest_snapshot_before_the_window_and_everything_after() -> None:
    old = epoch("e1", T0, "0/1000000", snap("base", T0, "0/1000000"), ended=T0 + timedelta(hours=1))
    ended_inside = epoch("e2", T0 + timedelta(hours=1), "0/2000000",
                         snap("base", T0 + timedelta(hours=1), "0/2000000"),
                         snap("s1", T0 + timedelta(hours=10), "0/2800000"), ended=T0 + timedelta(hours=30))
    current = epoch("e3", T0 + timedelta(hours=30), "0/3000000",
                    snap("base", T0 + timedelta(hours=30), "0/3000000"),
                    snap("s1", T0 + timedelta(hours=40), "0/4000000"))
    window = T0 + timedelta(hours=20)
    plan = retention.plan_pruning(hs.Manifest((old, ended_inside, current)), window)
    assert plan.epochs == ("e1",)  # ended before the window; e2 ended inside it and stays
    assert plan.snapshots == (("e2", "base"),)  # e2's s1 is the newest before the window: kept
    assert [e.id for e in plan.manifest.epochs] == ["e2", "e3"]
    assert [s.name for s in plan.manifest.epochs[0].snapshots] == ["s1"]
    assert [s.name for s in plan.manifest.epochs[1].snapshots] == ["base", "s1"]
    assert [(e.id, cut) for e, cut in plan.wal] == [("e2", 0x2800000), ("e3", 0x3000000)]
    nothing = retention.plan_pruning(plan.manifest, window)
    assert nothing.empty and nothing.manifest == plan.manifest
    later = retention.plan_pruning(hs.Manifest((current,)), T0 + timedelta(days=30))
    assert later.epochs == () and later.snapshots == (("e3", "base"),)  # the current epoch never goes whole


def test_a_target_is_served_by_its_epoch_and_the_newest_snapshot_before_it() -> None:
    first = epoch("e1", T0, "0/1000000", snap("base", T0, "0/1000000"),
                  snap("s1", T0 + timedelta(hours=2), "0/1800000"), ended=T0 + timedelta(hours=3))
    second = epoch("e2", T0 + timedelta(hours=3), "0/2000000", snap("base", T0 + timedelta(hours=3), "0/2000000"))
    manifest = hs.Manifest((first, second))
    assert pitr.choose(manifest, "main", T0 + timedelta(hours=1), None) == (first, first.snapshots[0])
    assert pitr.choose(manifest, "main", T0 + timedelta(hours=2, minutes=1), None) == (first, first.snapshots[1])
    assert pitr.choose(manifest, "main", T0 + timedelta(hours=4), None) == (second, second.snapshots[0])
    assert pitr.choose(manifest, "main", None, 0x1900000) == (first, first.snapshots[1])
    assert pitr.choose(manifest, "main", None, 0x2000001) == (second, second.snapshots[0])
    with pytest.raises(UserError, match="before the start of the history of branch 'main' "):
        pitr.choose(manifest, "main", None, 0x100)
    with pytest.raises(UserError, match="no longer in the branch's retained history"):
        pitr.choose(manifest, "main", T0 - timedelta(hours=1), None)  # before the first epoch
    linked = epoch("e1", T0, "0/1000000", snap("base", T0 - timedelta(hours=1), "0/1000000"))  # an older base
    with pytest.raises(UserError, match="has no data before"):
        pitr.choose(hs.Manifest((linked,)), "main", T0 - timedelta(minutes=30), None)
    pruned = hs.Manifest((epoch("e1", T0, "0/1000000", snap("s1", T0 + timedelta(hours=2), "0/1800000")),))
    with pytest.raises(UserError, match="no longer in the branch's retained history"):
        pitr.choose(pruned, "main", T0 + timedelta(hours=1), None)
    with pytest.raises(UserError, match="has no history yet"):
        pitr.choose(hs.Manifest(), "main", T0, None)


def test_targets_in_the_future_or_before_the_window_are_refused() -> None:
    pitr.check_time(T0 - timedelta(hours=1), now=T0, retention_seconds=86400)
    pitr.check_time(T0 + timedelta(milliseconds=500), now=T0, retention_seconds=86400)  # clock skew
    with pytest.raises(UserError, match="is in the future"):
        pitr.check_time(T0 + timedelta(seconds=5), now=T0, retention_seconds=86400)
    with pytest.raises(UserError, match="outside the project's history retention window"):
        pitr.check_time(T0 - timedelta(days=2), now=T0, retention_seconds=86400)
    with pytest.raises(UserError, match="not a timestamp"):
        pitr.parse_timestamp("yesterday")
    with pytest.raises(UserError, match="needs a time zone"):
        pitr.parse_timestamp("2026-11-24T12:00:00")
    with pytest.raises(UserError, match="not an LSN"):
        pitr.parse_lsn("16B3748")


def test_a_target_before_the_snapshot_is_consistent_stops_at_consistency() -> None:
    s = snap("s1", T0, "0/1800000")
    assert pitr.recovery_target(s, "0/1900000")["recovery_target_lsn"] == "0/1900000"
    early = pitr.recovery_target(s, "0/1700000")
    assert early["recovery_target"] == "immediate" and "recovery_target_lsn" not in early
    assert "recovery_target_lsn" not in pitr.recovery_target(s, None)  # to the end of the WAL


def test_pruning_never_plans_away_wal_the_backup_bucket_does_not_have() -> None:
    """With continuous backup (ADR 0018), an old epoch goes only once its WAL is shipped past its
    end, and a kept epoch's archive is cut no later than what is shipped."""
    old = epoch("e1", T0, "0/1000000", snap("base", T0, "0/1000000"), ended=T0 + timedelta(hours=1))
    current = epoch("e2", T0 + timedelta(hours=1), "0/A000000", snap("base", T0 + timedelta(hours=1), "0/A000000"),
                    snap("s1", T0 + timedelta(hours=10), "0/B000000"))
    window = T0 + timedelta(hours=20)
    manifest = hs.Manifest((old, current))
    unshipped = retention.plan_pruning(manifest, window, {"e1": 0x8000000, "e2": 0xA400000})
    assert unshipped.epochs == ()  # e1 ends at 0/9000000: not all in the bucket yet
    assert [(e.id, cut) for e, cut in unshipped.wal] == [("e1", 0x1000000), ("e2", 0xA400000)]
    shipped = retention.plan_pruning(manifest, window, {"e1": 0x9100000, "e2": 0xC000000})
    assert shipped.epochs == ("e1",)
    assert [(e.id, cut) for e, cut in shipped.wal] == [("e2", 0xB000000)]
    assert retention.plan_pruning(manifest, window).epochs == ("e1",)  # no backup: as before

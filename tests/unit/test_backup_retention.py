"""What bucket retention deletes: whole epochs that ended before the window, bases older than the
newest one at or before it, the WAL before the oldest kept base, old metadata, unused chunks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from argon.storage.backup.retention import EpochObjects, plan, unreferenced_chunks
from argon.storage.wal import format_lsn, segment_name

SEG = 1024 * 1024
NOW = datetime(2026, 12, 1, tzinfo=UTC)
CUTOFF = NOW - timedelta(days=7)


def at(days: float) -> str:
    return (NOW - timedelta(days=days)).isoformat()


def base(days: float, redo_seg: int) -> dict[str, str]:
    return {"taken_at": at(days), "redo_lsn": format_lsn(redo_seg * SEG + 40)}


def wal(prefix: str, *segs: int) -> list[str]:
    return [f"{prefix}wal/{segment_name(1, s * SEG, SEG)}" for s in segs]


def test_plan_keeps_exactly_what_the_window_needs() -> None:
    old = EpochObjects("branches/p/b/e1/", {"started_at": at(20), "ended_at": at(10), "segsize": SEG},
                       {"branches/p/b/e1/bases/base.json": base(20, 1)}, wal("branches/p/b/e1/", 1, 2))
    current = EpochObjects("branches/p/b/e2/", {"started_at": at(10), "ended_at": None, "segsize": SEG},
                           {"branches/p/b/e2/bases/base.json": base(10, 3),
                            "branches/p/b/e2/bases/s1.json": base(8, 5),  # the newest at or before the cutoff
                            "branches/p/b/e2/bases/s2.json": base(1, 9)},
                           [*wal("branches/p/b/e2/", 3, 4, 5, 6, 9, 10), "branches/p/b/e2/wal/00000002.history"])
    unsent = EpochObjects("branches/p/c/e3/", None, {"branches/p/c/e3/bases/base.json": base(30, 1)})
    meta = {"meta/1.tar": NOW - timedelta(days=9), "meta/2.tar": NOW - timedelta(days=8),
            "meta/3.tar": NOW - timedelta(days=1)}
    doomed = set(plan([old, current, unsent], meta, CUTOFF))
    assert doomed == {
        "branches/p/b/e1/bases/base.json", *wal("branches/p/b/e1/", 1, 2), "branches/p/b/e1/epoch.json",
        "branches/p/b/e2/bases/base.json", *wal("branches/p/b/e2/", 3, 4),
        "meta/1.tar",
    }


def test_unreferenced_chunks() -> None:
    manifests = [{"files": [{"chunks": ["a", "b"]}, {"chunks": []}]}, {"files": [{"chunks": ["b", "c"]}]}]
    assert unreferenced_chunks({"a", "b", "c", "d", "e"}, manifests) == {"d", "e"}


def test_a_deleted_branch_goes_whole_once_its_deletion_is_older_than_the_window() -> None:
    def objects(prefix: str) -> EpochObjects:
        return EpochObjects(prefix, {"started_at": at(1), "ended_at": None, "segsize": SEG},
                            {f"{prefix}bases/base.json": base(1, 1)}, wal(prefix, 1, 2))

    long_ago, recently, live = objects("branches/p/old/e1/"), objects("branches/p/new/e1/"), objects("branches/p/b/e1/")
    unsent = EpochObjects("branches/p/old/e2/", None, {}, wal("branches/p/old/e2/", 7))
    deleted = {"branches/p/old/": NOW - timedelta(days=8), "branches/p/new/": NOW - timedelta(days=1)}
    doomed = set(plan([long_ago, recently, live, unsent], {}, CUTOFF, deleted))
    assert doomed == {"branches/p/old/deleted.json", "branches/p/old/e1/bases/base.json",
                      *wal("branches/p/old/e1/", 1, 2), "branches/p/old/e1/epoch.json",
                      *wal("branches/p/old/e2/", 7), "branches/p/old/e2/epoch.json"}

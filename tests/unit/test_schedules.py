"""Backup schedules (ADR 0032): Neon's body checked, each frequency's latest slot, what is due."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from argon import model
from argon.control import schedules
from argon.errors import UserError

NOW = datetime(2026, 3, 31, 10, 30, tzinfo=UTC)  # a Tuesday


@pytest.mark.parametrize(("item", "slot"), [
    ({"frequency": "hourly"}, datetime(2026, 3, 31, 10, tzinfo=UTC)),
    ({"frequency": "daily", "hour": 3}, datetime(2026, 3, 31, 3, tzinfo=UTC)),
    ({"frequency": "daily", "hour": 11}, datetime(2026, 3, 30, 11, tzinfo=UTC)),
    ({"frequency": "weekly", "day": 1}, datetime(2026, 3, 30, 0, tzinfo=UTC)),
    ({"frequency": "weekly", "day": 3, "hour": 5}, datetime(2026, 3, 25, 5, tzinfo=UTC)),
    ({"frequency": "monthly", "day": 31, "hour": 12}, datetime(2026, 2, 28, 12, tzinfo=UTC)),  # a short month
    ({"frequency": "monthly"}, datetime(2026, 3, 1, tzinfo=UTC)),
    ({"frequency": "yearly", "month": 6, "day": 1}, datetime(2025, 6, 1, tzinfo=UTC)),
])
def test_latest_slot(item: dict, slot: datetime) -> None:
    assert schedules.latest_slot(item, NOW) == slot


def test_check_takes_neons_shape_and_refuses_the_rest() -> None:
    assert schedules.check({"schedule": [{"frequency": "daily", "hour": 3, "retention_seconds": 86400}]}) == [
        {"frequency": "daily", "hour": 3, "retention_seconds": 86400}]
    assert schedules.check({"schedule": []}) == []
    for bad, why in [({"schedule": [{"frequency": "often"}]}, "frequency"),
                     ({"schedule": [{"frequency": "weekly", "day": 9}]}, "day of the week"),
                     ({"schedule": [{"frequency": "daily", "retention_seconds": 10}]}, "at least 3600"),
                     ({"schedule": [{"frequency": "daily", "minute": 3}]}, "unknown"),
                     ({"schedule": [{"frequency": "daily"}, {"frequency": "daily", "hour": 2}]}, "at most once"),
                     ({}, "body")]:
        with pytest.raises(UserError, match=why):
            schedules.check(bad)


def test_due_once_per_slot_and_not_before_the_branch_existed() -> None:
    item = {"frequency": "daily", "hour": 3}
    branch = model.Branch(id="br-a", project_id="p", name="main", created_at=datetime(2026, 1, 1, tzinfo=UTC),
                          updated_at=NOW, backup_schedule=[item])
    slot = datetime(2026, 3, 31, 3, tzinfo=UTC)
    assert schedules.due(branch, [], NOW) == [(item, slot)]
    snap = model.Snapshot(id="snap-1", project_id="p", name=schedules.snapshot_name(branch, item, slot),
                          created_at=datetime(2026, 3, 31, 3, 1, tzinfo=UTC), updated_at=NOW,
                          source_branch_id="br-a", manual=False)
    assert schedules.due(branch, [snap], NOW) == []
    young = model.Branch(id="br-b", project_id="p", name="dev", created_at=datetime(2026, 3, 31, 9, tzinfo=UTC),
                         updated_at=NOW, backup_schedule=[item])
    assert schedules.due(young, [], NOW) == []
    assert schedules.describe({"frequency": "weekly", "day": 1, "hour": 2, "retention_seconds": 604800}) == \
        "weekly on Monday at 02:00 UTC, kept 7 d"

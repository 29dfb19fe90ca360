"""A branch's backup schedule (Neon's `GET/PUT /projects/{p}/branches/{b}/backup_schedule`, ADR 0032).

The schedule is Neon's `BackupSchedule`: `{"schedule": [item, ...]}`, each item a `frequency`
(`hourly`, `daily`, `weekly`, `monthly`, `yearly`) with the `hour` (0-23), `day` (of the week,
1 = Monday, for `weekly`; of the month, 1-31, for `monthly` and `yearly`) and `month` (1-12, for
`yearly`) it applies at, all UTC, and `retention_seconds` (at least 3600; none: kept until
deleted). It is stored on the branch (`branches.backup_schedule`).

A loop inside `argon up` looks every `SCHEDULE_INTERVAL` seconds: an item whose latest slot (the
newest instant at or before now that it names) has no scheduled snapshot of the branch taken at or
after it gets one now (ADR 0028 snapshots, `manual: false`, named `<branch>-<frequency>-<slot>`,
expiring `retention_seconds` after it: the expiry monitor deletes it then). A machine that was
down at a slot takes the snapshot when it comes back; missed older slots are not made up.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from argon import model
from argon.errors import ArgonError, UserError

if TYPE_CHECKING:
    from argon.control.services import Control

log = logging.getLogger(__name__)

FREQUENCIES = ("hourly", "daily", "weekly", "monthly", "yearly")
SCHEDULE_INTERVAL = 60.0
MIN_RETENTION = 3600


def check(body: Any) -> list[dict[str, Any]]:
    """Neon's `BackupSchedule` body, checked; returns the items as stored (only the fields given)."""
    if not isinstance(body, dict) or not isinstance(body.get("schedule"), list):
        raise UserError('the body must be {"schedule": [{"frequency": "daily", ...}, ...]}')
    items = []
    for n, raw in enumerate(body["schedule"]):
        where = f"schedule[{n}]"
        if not isinstance(raw, dict):
            raise UserError(f"{where} must be an object")
        unknown = set(raw) - {"frequency", "hour", "day", "month", "retention_seconds"}
        if unknown:
            raise UserError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        frequency = raw.get("frequency")
        if frequency not in FREQUENCIES:
            raise UserError(f"{where}.frequency must be one of {', '.join(FREQUENCIES)}")
        item: dict[str, Any] = {"frequency": frequency}
        for name, low, high in (("hour", 0, 23), ("day", 1, 31), ("month", 1, 12)):
            value = raw.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UserError(f"{where}.{name} must be an integer from {low} to {high}")
            item[name] = value
        if frequency == "weekly" and item.get("day", 1) > 7:
            raise UserError(f"{where}.day is the day of the week for a weekly schedule: 1 (Monday) to 7 (Sunday)")
        keep = raw.get("retention_seconds")
        if keep is not None:
            if isinstance(keep, bool) or not isinstance(keep, int) or keep < MIN_RETENTION:
                raise UserError(f"{where}.retention_seconds must be an integer of at least {MIN_RETENTION}")
            item["retention_seconds"] = keep
        items.append(item)
    frequencies = [i["frequency"] for i in items]
    if len(set(frequencies)) != len(frequencies):
        raise UserError("give each frequency at most once")
    return items


def latest_slot(item: dict[str, Any], now: datetime) -> datetime:
    """The newest instant at or before `now` (UTC) that the item names."""
    now = now.astimezone(UTC)
    hour = int(item.get("hour", 0))
    if item["frequency"] == "hourly":
        return now.replace(minute=0, second=0, microsecond=0)
    day_start = now.replace(hour=hour, minute=0, second=0, microsecond=0)
    if item["frequency"] == "daily":
        return day_start if day_start <= now else day_start - timedelta(days=1)
    if item["frequency"] == "weekly":
        back = (now.isoweekday() - int(item.get("day", 1))) % 7
        slot = day_start - timedelta(days=back)
        return slot if slot <= now else slot - timedelta(days=7)
    if item["frequency"] == "monthly":
        year, month = now.year, now.month
        for _ in range(2):
            slot = _on(year, month, int(item.get("day", 1)), hour)
            if slot <= now:
                return slot
            year, month = (year, month - 1) if month > 1 else (year - 1, 12)
        return slot
    for year in (now.year, now.year - 1):  # yearly
        slot = _on(year, int(item.get("month", 1)), int(item.get("day", 1)), hour)
        if slot <= now:
            return slot
    return slot


def _on(year: int, month: int, day: int, hour: int) -> datetime:
    """That day of that month (its last day if it is shorter) at that hour, UTC."""
    return datetime(year, month, min(day, calendar.monthrange(year, month)[1]), hour, tzinfo=UTC)


def describe(item: dict[str, Any]) -> str:
    """For the console: `daily at 03:00 UTC, kept 7 d`."""
    hour = f"{int(item.get('hour', 0)):02d}:00 UTC"
    when = {"hourly": "hourly",
            "daily": f"daily at {hour}",
            "weekly": f"weekly on {calendar.day_name[int(item.get('day', 1)) - 1]} at {hour}",
            "monthly": f"monthly on day {item.get('day', 1)} at {hour}",
            "yearly": f"yearly on {calendar.month_abbr[int(item.get('month', 1))]} {item.get('day', 1)} at {hour}",
            }[item["frequency"]]
    keep = item.get("retention_seconds")
    if keep is None:
        return f"{when}, kept until deleted"
    days, rest = divmod(int(keep), 86400)
    return f"{when}, kept {days} d" if days and not rest else f"{when}, kept {int(keep) // 3600} h"


def snapshot_name(branch: model.Branch, item: dict[str, Any], slot: datetime) -> str:
    return f"{branch.name}-{item['frequency']}-{slot:%Y%m%d-%H%M}"


def due(branch: model.Branch, snapshots: list[model.Snapshot], now: datetime) -> list[tuple[dict[str, Any], datetime]]:
    """The schedule items of `branch` whose latest slot has no scheduled snapshot yet, with that slot."""
    out = []
    for item in branch.backup_schedule or []:
        slot = latest_slot(item, now)
        if branch.created_at > slot:
            continue  # the branch did not exist at that slot: its first is the next one
        name, marker = snapshot_name(branch, item, slot), f"{branch.name}-{item['frequency']}-"
        taken = any(not s.manual and s.source_branch_id == branch.id
                    and (s.name == name or (s.name.startswith(marker) and s.created_at >= slot)) for s in snapshots)
        if not taken:
            out.append((item, slot))
    return out


def get(control: Control, project_id: str, branch_id: str) -> dict[str, Any]:
    return {"schedule": list(control.plane.branch(project_id, branch_id).backup_schedule or [])}


async def put(control: Control, project_id: str, branch_id: str, body: Any) -> dict[str, Any]:
    """Replace the branch's schedule (an empty list: none)."""
    items = check(body)
    plane = control.plane
    async with plane.project_lock(project_id):
        branch = plane.branch(project_id, branch_id)
        await plane.commit(put=[branch.replace(backup_schedule=items or None)])
    log.info("backup schedule of branch %s: %s", branch_id, "; ".join(describe(i) for i in items) or "none")
    return {"schedule": items}


async def run_once(control: Control, now: datetime | None = None) -> list[str]:
    """Take every snapshot that is due; returns their ids. A failure is logged and tried again at
    the next look."""
    from argon.control import snapshots

    plane = control.plane
    now = now or plane.clock()
    taken = []
    for project in plane.projects():
        branches = [b for b in plane.branches(project.id) if b.backup_schedule]
        if not branches:
            continue
        existing = await snapshots.list_snapshots(control, project.id)
        for branch in branches:
            for item, slot in due(branch, existing, now):
                keep = item.get("retention_seconds")
                try:
                    snap, _ = await snapshots.create_snapshot(
                        control, project.id, branch.id, name=snapshot_name(branch, item, slot),
                        expires_at=now + timedelta(seconds=keep) if keep else None, manual=False)
                except ArgonError as exc:
                    log.warning("scheduled %s snapshot of branch %s failed (tried again in %.0f s): %s",
                                item["frequency"], branch.id, SCHEDULE_INTERVAL, exc.user_message)
                    continue
                taken.append(snap.id)
                log.info("scheduled %s snapshot %s of branch %s taken", item["frequency"], snap.id, branch.id)
    return taken


class Scheduler:
    """The loop that takes scheduled snapshots inside `argon up`."""

    def __init__(self, control: Control, interval: float = SCHEDULE_INTERVAL) -> None:
        self.control = control
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await run_once(self.control)
            except Exception:
                log.exception("the backup schedule's look failed")
            await asyncio.sleep(self.interval)

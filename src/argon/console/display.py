"""How the console writes times, durations and sizes for people (Jinja2 filters and helpers)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from argon import model


def when(value: datetime | None) -> str:
    """An absolute time: `May 1, 2026 14:05 UTC`."""
    if value is None:
        return "never"
    return f"{value:%b} {value.day}, {value:%Y %H:%M} UTC"


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """A relative time: `just now`, `5 minutes ago`, `3 hours ago`; after a month, the date."""
    if value is None:
        return "never"
    seconds = ((now or model.utcnow()) - value).total_seconds()
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return _count(int(seconds // 60), "minute") + " ago"
    if seconds < 86400:
        return _count(int(seconds // 3600), "hour") + " ago"
    if seconds < 30 * 86400:
        return _count(int(seconds // 86400), "day") + " ago"
    return when(value)


def duration(seconds: int) -> str:
    """`300` -> `5 minutes`; exact units only, else seconds."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            return _count(seconds // size, unit)
    return _count(seconds, "second")


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def compute_units(lo: float, hi: float) -> str:
    return f"{lo:g} CU" if lo == hi else f"{lo:g} to {hi:g} CU"


FILTERS: dict[str, Any] = {"when": when, "ago": ago, "duration": duration}

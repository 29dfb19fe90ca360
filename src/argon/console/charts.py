"""Server-rendered SVG charts for the Monitoring tab: pure functions, data in, markup out.

No JavaScript and no external assets: each chart is an inline `<svg>` with a `viewBox` (it scales
to the card's width), a `<title>` and a `<desc>` for screen readers, and CSS classes for colours
(the console's stylesheet gives them light and dark values; the page's CSP forbids inline styles).
Lines break where samples are missing (a suspended compute has no samples), rather than drawing a
straight line over the gap.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

from markupsafe import Markup

Point = tuple[datetime, float]
Formatter = Callable[[float], str]

WIDTH, HEIGHT = 480, 180  # viewBox units; about the rendered size in a half-width card, so text stays legible
LEFT, RIGHT, TOP, BOTTOM = 56, 10, 10, 24  # plot margins (axis labels live there)


# Numbers for people ------------------------------------------------------------------------------------


def fmt_bytes(value: float) -> str:
    """`1536` -> `1.5 kB` (decimal units, as storage is sold)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def fmt_number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value / 1000:.3g}k"
    if abs(value) >= 10 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.2g}"


def fmt_duration(seconds: float) -> str:
    """`42` -> `42 s`, `600` -> `10 min`, `5400` -> `1.5 h`."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.3g} h"


def fmt_ms(value: float) -> str:
    return f"{value / 1000:.2g} s" if value >= 1000 else f"{value:.0f} ms"


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above `value` (an axis maximum); 1 for nothing."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    base = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * base * (1 + 1e-9):
            return step * base
    return 10 * base  # pragma: no cover


def time_ticks(start: datetime, end: datetime, count_: int = 4) -> list[tuple[datetime, str]]:
    """Evenly spaced labels for the time axis: clock times within two days, dates beyond."""
    span = (end - start).total_seconds()
    fmt = "%H:%M" if span <= 2 * 86400 else "%b %d"
    return [(t, t.strftime(fmt)) for t in (start + timedelta(seconds=span * i / count_) for i in range(count_ + 1))]


def downsample(points: Sequence[Point], start: datetime, end: datetime, buckets: int = 240,
               combine: Callable[[list[float]], float] = max) -> list[Point]:
    """At most `buckets` points: each bucket's values combined (max keeps peaks visible), placed at
    the bucket's last sample. Empty buckets stay empty, so gaps survive."""
    if len(points) <= buckets:
        return list(points)
    width = (end - start).total_seconds() / buckets or 1.0
    grouped: dict[int, list[Point]] = {}
    for at, value in points:
        grouped.setdefault(int((at - start).total_seconds() // width), []).append((at, value))
    return [(group[-1][0], combine([v for _, v in group])) for _, group in sorted(grouped.items())]


# Geometry ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    start: datetime
    end: datetime
    top: float  # the value at the top of the plot

    def x(self, at: datetime) -> float:
        span = (self.end - self.start).total_seconds() or 1.0
        frac = min(1.0, max(0.0, (at - self.start).total_seconds() / span))
        return round(LEFT + frac * (WIDTH - LEFT - RIGHT), 1)

    def y(self, value: float) -> float:
        frac = min(1.0, max(0.0, value / self.top)) if self.top else 0.0
        return round(HEIGHT - BOTTOM - frac * (HEIGHT - TOP - BOTTOM), 1)


def segments(points: Sequence[Point], gap: timedelta) -> list[list[Point]]:
    """Split a series where two samples are further apart than `gap` (no data in between)."""
    out: list[list[Point]] = []
    for point in points:
        if out and point[0] - out[-1][-1][0] <= gap:
            out[-1].append(point)
        else:
            out.append([point])
    return out


def _axes(frame: _Frame, fmt: Callable[[float], str]) -> list[str]:
    parts = []
    for i in range(5):
        value = frame.top * i / 4
        y = frame.y(value)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y}" y2="{y}"/>')
        parts.append(f'<text class="axis" x="{LEFT - 6}" y="{y + 4}" text-anchor="end">{escape(fmt(value))}</text>')
    for at, label in time_ticks(frame.start, frame.end):
        x = frame.x(at)
        anchor = "start" if x <= LEFT else ("end" if x >= WIDTH - RIGHT else "middle")
        parts.append(f'<text class="axis" x="{x}" y="{HEIGHT - 6}" text-anchor="{anchor}">{label}</text>')
    return parts


def _svg(title: str, desc: str, body: list[str], kind: str) -> Markup:
    n = hashlib.sha1(title.encode()).hexdigest()[:10]  # stable ids: titles are unique on a page
    return Markup(
        f'<svg class="chart chart-{kind}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="chart-{n}-t chart-{n}-d" preserveAspectRatio="xMidYMid meet">'
        f'<title id="chart-{n}-t">{escape(title)}</title><desc id="chart-{n}-d">{escape(desc)}</desc>'
        + "".join(body) + "</svg>")


# Charts ------------------------------------------------------------------------------------------------


def line_chart(points: Sequence[Point], *, start: datetime, end: datetime, title: str,
               fmt: Callable[[float], str] = fmt_number, gap: timedelta | None = None,
               floor_top: float = 1.0) -> Markup:
    """A line with a light area under it, over [start, end]; breaks where samples are `gap` apart."""
    points = [(at, value) for at, value in points if start <= at <= end]
    peak = max((v for _, v in points), default=0.0)
    frame = _Frame(start, end, nice_ceiling(max(peak, floor_top)))
    body = _axes(frame, fmt)
    gap = gap or (end - start)
    for seg in segments(points, gap):
        coords = [(frame.x(at), frame.y(v)) for at, v in seg]
        if len(coords) == 1:
            x, y = coords[0]
            body.append(f'<circle class="dot" cx="{x}" cy="{y}" r="2.5"/>')
            continue
        line = " ".join(f"{x},{y}" for x, y in coords)
        base = frame.y(0)
        body.append(f'<polygon class="area" points="{coords[0][0]},{base} {line} {coords[-1][0]},{base}"/>')
        body.append(f'<polyline class="line" points="{line}"/>')
    if points:
        latest = points[-1][1]
        desc = f"{len(points)} samples; latest {fmt(latest)}, highest {fmt(peak)}."
    else:
        desc = "No samples in this period."
    return _svg(title, desc, body, "line")


def activity_chart(*, runs: Sequence[tuple[datetime, datetime]], wakes: Sequence[tuple[datetime, float]],
                   suspends: Sequence[datetime], start: datetime, end: datetime, title: str) -> Markup:
    """When the compute ran (shaded bands), its wakes as bars as tall as their cold start (ms), and
    its suspends as ticks on the time axis."""
    wakes = [(at, ms) for at, ms in wakes if start <= at <= end]
    suspends = [at for at in suspends if start <= at <= end]
    peak = max((ms for _, ms in wakes), default=0.0)
    frame = _Frame(start, end, nice_ceiling(max(peak, 100.0)))
    body = _axes(frame, fmt_ms)
    top, bottom = frame.y(frame.top), frame.y(0)
    for begin, finish in runs:
        if finish < start or begin > end:
            continue
        x1, x2 = frame.x(max(begin, start)), frame.x(min(finish, end))
        body.append(f'<rect class="run" x="{x1}" y="{top}" width="{max(x2 - x1, 1.0)}" height="{bottom - top}"/>')
    for at in suspends:
        x = frame.x(at)
        body.append(f'<line class="suspend" x1="{x}" x2="{x}" y1="{bottom - 8}" y2="{bottom}"/>')
    for at, ms in wakes:
        x, y = frame.x(at), frame.y(ms)
        body.append(f'<rect class="wake" x="{x - 2}" y="{y}" width="4" height="{max(bottom - y, 1.0)}">'
                    f'<title>wake at {at:%H:%M:%S} UTC, cold start {escape(fmt_ms(ms))}</title></rect>')
    desc = (f"{len(wakes)} wake(s), {len(suspends)} suspend(s)"
            + (f"; slowest cold start {fmt_ms(peak)}." if wakes else "."))
    return _svg(title, desc, body, "activity")

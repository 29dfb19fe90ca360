"""The console's Monitoring tab: per endpoint, charts of the metrics sampler's samples, of the
compute's wakes and suspends and of its size in CU as autoscaling moved it (the events table), over
the last hour, day or week, and the live state of its transaction pools (ADR 0017).

The route reads the samples and events of the range through `control.plane.db` (the store's thread), turns
them into series here (pure helpers, unit-tested) and lets `argon.console.charts` draw them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from markupsafe import Markup

from argon import model
from argon.console import charts
from argon.console.web import ConsoleRoute, ControlDep, SignedIn, render
from argon.control.metrics import STORAGE_EVERY, Usage
from argon.metadata.store import MetricSample

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)

RANGES: dict[str, tuple[str, timedelta]] = {
    "1h": ("1 hour", timedelta(hours=1)),
    "24h": ("24 hours", timedelta(hours=24)),
    "7d": ("7 days", timedelta(days=7)),
}
BUCKETS = 240  # points per chart at most
_STARTS = (model.EventKind.WAKE, model.EventKind.ADOPTED)
_RESIZE = re.compile(r"^([\d.]+) -> ([\d.]+) CU")  # an autoscale event's detail (argon.control.autoscale)


def cu_steps(events: list[model.Event], *, start: datetime, end: datetime, running: bool) -> list[charts.Point]:
    """The compute's size over time from its `autoscale` events (oldest first): a step at each,
    held until `end` while it runs. Empty when nothing resized it in the range."""
    points: list[charts.Point] = []
    for ev in events:
        match = _RESIZE.match(ev.detail) if ev.kind is model.EventKind.AUTOSCALE else None
        if match is None:
            continue
        points += [(max(start, ev.at - timedelta(milliseconds=1)), float(match[1])), (ev.at, float(match[2]))]
    if points and running:
        points.append((end, points[-1][1]))
    return points


def compute_runs(events: list[model.Event], *, start: datetime, end: datetime,
                 running: bool) -> list[tuple[datetime, datetime]]:
    """When a compute ran, from its events (oldest first): a wake or an adoption opens a run, a
    suspend closes it. A suspend with no wake before it in the range closes a run open since `start`;
    a run still open at the end lasts until `end` if the compute runs now."""
    runs: list[tuple[datetime, datetime]] = []
    since: datetime | None = None
    first = True
    for ev in events:
        if ev.kind in _STARTS:
            since = since or ev.at
        elif ev.kind is model.EventKind.SUSPEND:
            begin = since or (start if first else None)
            if begin is not None:
                runs.append((begin, ev.at))
            since = None
        else:
            continue
        first = False
    if running:
        begin = since or (start if first else None)
        if begin is not None:
            runs.append((begin, end))
    return runs


def series(samples: list[MetricSample], attr: str) -> list[charts.Point]:
    out = []
    for s in samples:
        value = getattr(s, attr)
        if value is not None:
            out.append((s.at, float(value)))
    return out


@dataclass(frozen=True)
class EventRow:
    at: datetime
    kind: str
    cold_start_ms: float | None
    detail: str


@dataclass(frozen=True)
class EndpointPanel:
    endpoint: model.Endpoint
    branch_name: str
    running: bool
    has_samples: bool
    connections: Markup
    qps: Markup
    storage: Markup | None  # None: no storage sample yet
    activity: Markup
    size: Markup | None  # None: autoscaling did not move it in the range
    events: list[EventRow]
    latest: MetricSample | None
    storage_latest: MetricSample | None


def _line(points: list[charts.Point], *, start: datetime, end: datetime, gap: timedelta, title: str,
          fmt: charts.Formatter = charts.fmt_number, floor_top: float = 1.0) -> Markup:
    if len(points) > BUCKETS:
        points = charts.downsample(points, start, end, BUCKETS)
        gap = max(gap, (end - start) / BUCKETS * 2.5)
    return charts.line_chart(points, start=start, end=end, title=title, fmt=fmt, gap=gap, floor_top=floor_top)


def endpoint_panel(ep: model.Endpoint, branch_name: str, samples: list[MetricSample], events: list[model.Event], *,
                   start: datetime, end: datetime, interval: float, running: bool) -> EndpointPanel:
    """Everything the page shows for one endpoint (pure: samples and events in, charts out)."""
    mine = [s for s in samples if s.endpoint_id == ep.id]
    storage = [s for s in samples if s.endpoint_id is None and s.branch_id == ep.branch_id]
    gap = timedelta(seconds=interval * 2.5)
    name = ep.name or ep.id
    wakes = [(ev.at, ev.duration_ms or 0.0) for ev in events if ev.kind is model.EventKind.WAKE]
    suspends = [ev.at for ev in events if ev.kind is model.EventKind.SUSPEND]
    steps = cu_steps(events, start=start, end=end, running=running)
    rows = [EventRow(ev.at, ev.kind.value.replace("_", " "),
                     ev.duration_ms if ev.kind is model.EventKind.WAKE else None, ev.detail)
            for ev in reversed(events)][:12]
    return EndpointPanel(
        endpoint=ep, branch_name=branch_name, running=running, has_samples=bool(mine),
        connections=_line(series(mine, "connections"), start=start, end=end, gap=gap,
                          title=f"Connections of {name}"),
        qps=_line(series(mine, "qps"), start=start, end=end, gap=gap, title=f"Queries per second on {name}"),
        storage=_line(series(storage, "storage_bytes"), start=start, end=end, gap=gap * STORAGE_EVERY,
                      title=f"Storage of branch {branch_name} ({name})", fmt=charts.fmt_bytes,
                      floor_top=1_000_000) if storage else None,
        activity=charts.activity_chart(runs=compute_runs(events, start=start, end=end, running=running),
                                       wakes=wakes, suspends=suspends, start=start, end=end,
                                       title=f"Wakes and suspends of {name}"),
        size=charts.line_chart(steps, start=start, end=end, title=f"Size of {name} in compute units",
                               fmt=charts.fmt_number, gap=end - start, floor_top=0.25) if steps else None,
        events=rows, latest=mine[-1] if mine else None, storage_latest=storage[-1] if storage else None)


@router.get("/projects/{project_id}/monitoring")
async def monitoring(request: Request, session: SignedIn, control: ControlDep, project_id: str,
                     period: Annotated[str, Query(alias="range")] = "1h", endpoint: str | None = None) -> Response:
    plane = control.plane
    project = plane.project(project_id)
    key = period if period in RANGES else "1h"
    end = model.utcnow()
    start = end - RANGES[key][1]
    endpoints = plane.endpoints(project_id)
    if endpoint:
        endpoints = [e for e in endpoints if e.id == endpoint] or endpoints
    names = {b.id: b.name for b in plane.branches(project_id)}
    samples = await plane.db(plane.store.metric_samples, project_id, start)
    events = await plane.db(plane.store.events_since, [e.id for e in endpoints], start)
    panels = [endpoint_panel(ep, names.get(ep.branch_id, ep.branch_id), samples,
                             [ev for ev in events if ev.endpoint_id == ep.id], start=start, end=end,
                             interval=plane.settings.metrics_interval, running=plane.is_running(ep.id))
              for ep in endpoints]
    usage: Usage = control.metrics.project_usage(project)
    pools = {ep.id: plane.activity.pools(ep.id) for ep in endpoints}  # live, as PgBouncer's SHOW POOLS
    return render(request, "monitoring.html", session=session, project=project, tab="monitoring", panels=panels,
                  pools=pools,
                  ranges=[(k, label) for k, (label, _) in RANGES.items()], range_key=key,
                  range_label=RANGES[key][0], usage=usage, interval=plane.settings.metrics_interval,
                  storage_every=plane.settings.metrics_interval * STORAGE_EVERY, selected=endpoint,
                  fmt_bytes=charts.fmt_bytes, fmt_ms=charts.fmt_ms, fmt_number=charts.fmt_number,
                  fmt_duration=charts.fmt_duration)

"""The Monitoring tab's SVG charts and the series behind them: pure functions, checked on their output."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

from argon import model
from argon.console import charts
from argon.console.pages_monitoring import compute_runs, cu_steps, endpoint_panel
from argon.metadata.store import MetricSample

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
SVG = "{http://www.w3.org/2000/svg}"


def _parse(markup: str) -> ET.Element:
    return ET.fromstring(str(markup).replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1))


def _at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_number_formats_for_people() -> None:
    assert charts.fmt_bytes(512) == "512 B"
    assert charts.fmt_bytes(1_500) == "1.5 kB"
    assert charts.fmt_bytes(12_300_000) == "12.3 MB"
    assert charts.fmt_bytes(7e12) == "7 TB"
    assert charts.fmt_number(0) == "0"
    assert charts.fmt_number(0.25) == "0.25"
    assert charts.fmt_number(42.4) == "42"
    assert charts.fmt_number(2500) == "2.5k"
    assert charts.fmt_ms(38.2) == "38 ms"
    assert charts.fmt_duration(42) == "42 s"
    assert charts.fmt_duration(600) == "10 min"
    assert charts.fmt_duration(5400) == "1.5 h"
    assert charts.fmt_ms(1500) == "1.5 s"


def test_axis_maximum_is_a_round_number_at_or_above_the_peak() -> None:
    assert charts.nice_ceiling(0) == 1
    assert charts.nice_ceiling(3) == 5
    assert charts.nice_ceiling(10) == 10
    assert charts.nice_ceiling(11) == 20
    assert charts.nice_ceiling(230) == 250
    assert charts.nice_ceiling(0.07) == 0.1


def test_segments_break_where_samples_are_missing() -> None:
    points = [(_at(0), 1.0), (_at(0.25), 2.0), (_at(5), 3.0), (_at(5.25), 4.0), (_at(5.5), 5.0)]
    parts = charts.segments(points, timedelta(seconds=40))
    assert [len(p) for p in parts] == [2, 3]


def test_downsample_keeps_peaks_and_gaps() -> None:
    points = [(_at(i / 60), float(i % 7)) for i in range(3600)]  # one hour, a sample a second
    points += [(_at(90 + i / 60), 1.0) for i in range(60)]  # a minute, half an hour later
    out = charts.downsample(points, _at(0), _at(120), buckets=120)
    assert len(out) <= 120
    assert max(v for _, v in out) == 6.0
    assert not [p for p in out if _at(61) < p[0] < _at(90)]  # the gap stays empty


def test_line_chart_is_valid_svg_with_accessible_text() -> None:
    points = [(_at(m), m * 2.0) for m in range(0, 30)] + [(_at(m), 5.0) for m in range(45, 60)]
    svg = charts.line_chart(points, start=_at(0), end=_at(60), title="Connections of ep-x",
                            gap=timedelta(minutes=2))
    root = _parse(svg)
    assert root.get("role") == "img" and root.get("viewBox") == f"0 0 {charts.WIDTH} {charts.HEIGHT}"
    assert root.find(f"{SVG}title").text == "Connections of ep-x"  # type: ignore[union-attr]
    assert "latest 5, highest 58" in (root.find(f"{SVG}desc").text or "")  # type: ignore[union-attr]
    lines = root.findall(f"{SVG}polyline")
    assert len(lines) == 2  # one per stretch of samples, nothing drawn over the gap
    ys = [float(pair.split(",")[1]) for pair in lines[0].get("points", "").split()]
    assert min(ys) >= charts.TOP and max(ys) <= charts.HEIGHT - charts.BOTTOM
    labels = [t.text for t in root.findall(f"{SVG}text")]
    assert "100" in labels and "12:00" in labels and "13:00" in labels  # peak 58 -> axis up to 100
    assert "style=" not in svg  # the console's CSP forbids inline styles


def test_line_chart_escapes_text_and_handles_no_data() -> None:
    svg = charts.line_chart([], start=_at(0), end=_at(60), title="<b>&", fmt=charts.fmt_bytes)
    root = _parse(svg)
    assert root.find(f"{SVG}title").text == "<b>&"  # type: ignore[union-attr]
    assert root.find(f"{SVG}desc").text == "No samples in this period."  # type: ignore[union-attr]
    assert not root.findall(f"{SVG}polyline")


def test_activity_chart_shows_runs_wakes_and_suspends() -> None:
    svg = charts.activity_chart(runs=[(_at(5), _at(20)), (_at(40), _at(60))], wakes=[(_at(5), 45.0), (_at(40), 1200.0)],
                                suspends=[_at(20)], start=_at(0), end=_at(60), title="Wakes of ep-x")
    root = _parse(svg)
    assert len(root.findall(f"{SVG}rect[@class='run']")) == 2
    wakes = root.findall(f"{SVG}rect[@class='wake']")
    assert len(wakes) == 2 and float(wakes[1].get("height", 0)) > float(wakes[0].get("height", 0))
    assert "cold start 1.2 s" in (wakes[1].find(f"{SVG}title").text or "")  # type: ignore[union-attr]
    assert len(root.findall(f"{SVG}line[@class='suspend']")) == 1
    assert "slowest cold start 1.2 s" in (root.find(f"{SVG}desc").text or "")  # type: ignore[union-attr]


def _ev(kind: model.EventKind, minutes: float, ms: float | None = None) -> model.Event:
    return model.Event(endpoint_id="ep-x", kind=kind, at=_at(minutes), duration_ms=ms)


def test_runs_from_events() -> None:
    W, S, A = model.EventKind.WAKE, model.EventKind.SUSPEND, model.EventKind.ADOPTED
    start, end = _at(0), _at(60)
    assert compute_runs([], start=start, end=end, running=False) == []
    assert compute_runs([], start=start, end=end, running=True) == [(start, end)]  # up the whole time
    events = [_ev(S, 10), _ev(W, 20, 40), _ev(A, 25), _ev(S, 30), _ev(model.EventKind.START_FAILED, 35), _ev(W, 50)]
    assert compute_runs(events, start=start, end=end, running=True) == [(start, _at(10)), (_at(20), _at(30)),
                                                                          (_at(50), end)]
    assert compute_runs(events[:4], start=start, end=end, running=False) == [(start, _at(10)), (_at(20), _at(30))]


def test_size_steps_from_autoscale_events() -> None:
    start, end = _at(0), _at(60)
    resized = [model.Event(endpoint_id="ep-x", kind=model.EventKind.AUTOSCALE, at=_at(m), detail=d) for m, d in
               ((10, "0.25 -> 1 CU: CPU or memory demand needs 1 CU (CPU 0.70, memory 40 MiB)"),
                (30, "1 -> 0.25 CU: 30 s below 1 CU"))]
    steps = cu_steps([_ev(model.EventKind.WAKE, 5, 40), *resized], start=start, end=end, running=True)
    assert [v for _, v in steps] == [0.25, 1, 1, 0.25, 0.25] and steps[-1][0] == end
    assert cu_steps([], start=start, end=end, running=True) == []
    panel = endpoint_panel(model.Endpoint(id="ep-x", project_id="p", branch_id="b", created_at=start, updated_at=start),
                           "main", [], resized, start=start, end=end, interval=60, running=False)
    assert panel.size is not None and "Size of ep-x in compute units" in panel.size


def test_endpoint_panel_from_samples() -> None:
    now = model.utcnow()
    ep = model.Endpoint(id="ep-x", project_id="p", branch_id="br-x", created_at=now, updated_at=now)
    samples = [MetricSample(at=_at(m), project_id="p", branch_id="br-x", endpoint_id="ep-x", connections=m % 3,
                            qps=float(m)) for m in range(10)]
    samples.append(MetricSample(at=_at(5), project_id="p", branch_id="br-x", storage_bytes=40_000_000,
                                logical_bytes=30_000_000))
    panel = endpoint_panel(ep, "main", samples, [_ev(model.EventKind.WAKE, 0, 50)], start=_at(-60), end=_at(10),
                           interval=60, running=True)
    assert panel.has_samples and panel.latest is not None and panel.latest.qps == 9.0
    assert panel.storage_latest is not None and panel.storage_latest.logical_bytes == 30_000_000
    assert panel.storage is not None and "40 MB" in panel.storage
    assert "Queries per second on ep-x" in panel.qps
    assert [e.cold_start_ms for e in panel.events] == [50]
    idle = endpoint_panel(ep, "main", [], [], start=_at(-60), end=_at(10), interval=60, running=False)
    assert not idle.has_samples and idle.storage is None and idle.events == [] and idle.size is None

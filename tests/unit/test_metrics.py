"""The metrics sampler's arithmetic (rates, counters across restarts, byte-hours), its /proc and disk
readings, and the store's sample accessors with retention."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from argon import model
from argon.control import metrics
from argon.control.metrics import MetricsSampler, ProcTimes, _Look, byte_hours, counter_delta, rate
from argon.metadata.store import MetricSample, Store
from argon.settings import Settings


def test_counter_delta_handles_first_reading_restarts_and_resets() -> None:
    assert counter_delta(None, 50) is None  # nothing to compare with: unknown, not 50
    assert counter_delta(10, 50) == 40
    assert counter_delta(50, 50) == 0
    assert counter_delta(50, 7) == 7  # went down: reset, counted from zero
    assert counter_delta(10, 50, same_run=False) == 50  # a new postmaster: all of it is new


def test_rate_is_per_second_without_our_own_statements() -> None:
    assert rate(None, (10.0, 100)) is None
    assert rate((10.0, 100), (12.0, 300)) == 100.0
    assert rate((10.0, 100), (12.0, 300), own=2) == 99.0
    assert rate((10.0, 100), (12.0, 101), own=2) == 0.0  # never negative
    assert rate((10.0, 500), (15.0, 20)) == 4.0  # stats reset (crash): the new count over the interval
    assert rate((10.0, 1), (10.0, 5)) is None  # no time passed


def test_byte_hours() -> None:
    assert byte_hours(0, 0, 75) == 0
    # 48 samples of 1 GB, one every 75 s = one hour of 1 GB
    assert byte_hours(48 * 10**9, 48, 75) == 10**9


def test_proc_times_of_a_real_process() -> None:
    times = metrics.proc_times(os.getpid())
    assert times is not None and times.pid == os.getpid()
    assert times.cpu_seconds > 0 and times.uptime_seconds > 0
    assert metrics.proc_times(2**22 + 12345) is None  # no such process


def _sampler(interval: float = 1.0) -> MetricsSampler:
    plane: Any = SimpleNamespace(settings=Settings(metrics_interval=interval))
    return MetricsSampler(plane)


def test_compute_rows_derive_rates_and_usage_across_a_restart() -> None:
    sampler = _sampler(interval=10)
    now = model.utcnow()
    ep = model.Endpoint(id="ep-x", project_id="p", branch_id="br-x", created_at=now, updated_at=now)

    def row(at: float, xacts: int, proc: ProcTimes | None) -> MetricSample:
        return sampler._compute_row(_Look(ep, connections=2, xacts=xacts, lsn=1000 + xacts, at=at), proc, now, own=1)

    first = row(100.0, 500, ProcTimes(pid=7, cpu_seconds=30.0, uptime_seconds=3600.0))
    assert first.qps is None and first.cpu_seconds is None and first.active_seconds is None  # adopted: unknown
    second = row(110.0, 701, ProcTimes(pid=7, cpu_seconds=31.5, uptime_seconds=3610.0))
    assert second.qps == 20.0 and second.cpu_seconds == 1.5 and second.active_seconds == 10.0
    assert second.connections == 2 and second.wal_lsn == 1701 and second.endpoint_id == "ep-x"
    restarted = row(120.0, 711, ProcTimes(pid=9, cpu_seconds=0.4, uptime_seconds=4.0))
    assert restarted.cpu_seconds == 0.4 and restarted.active_seconds == 4.0
    no_proc = row(130.0, 721, None)
    assert no_proc.cpu_seconds is None and no_proc.qps == pytest.approx(0.9)
    sampler._last.clear()  # suspended, then woken: a young postmaster is counted from its start
    woken = row(200.0, 800, ProcTimes(pid=11, cpu_seconds=0.2, uptime_seconds=12.0))
    assert woken.cpu_seconds == 0.2 and woken.active_seconds == 12.0


def _store(tmp_path: Path) -> Store:
    store = Store.sqlite(tmp_path / "argon.db")
    store.migrate()
    return store


def test_samples_round_trip_totals_and_retention(tmp_path: Path) -> None:
    store = _store(tmp_path)
    now = model.utcnow()
    old = now - timedelta(hours=200)
    store.add_metric_samples([
        MetricSample(at=old, project_id="p", branch_id="br-a", storage_bytes=1, logical_bytes=1),
        MetricSample(at=now - timedelta(minutes=2), project_id="p", branch_id="br-a", endpoint_id="ep-a",
                     connections=3, xacts=10, qps=1.5, wal_lsn=2**40, cpu_seconds=2.0, active_seconds=15.0),
        MetricSample(at=now - timedelta(minutes=1), project_id="p", branch_id="br-a", endpoint_id="ep-a",
                     connections=1, xacts=20, qps=0.5, wal_lsn=2**40 + 5, cpu_seconds=1.0, active_seconds=15.0),
        MetricSample(at=now - timedelta(minutes=1), project_id="p", branch_id="br-a", storage_bytes=5 * 10**9,
                     logical_bytes=3 * 10**9),
        MetricSample(at=now, project_id="q", branch_id="br-b", storage_bytes=7, logical_bytes=7),
    ])
    rows = store.metric_samples("p", now - timedelta(hours=1))
    assert [r.endpoint_id for r in rows] == ["ep-a", "ep-a", None]
    assert rows[0].wal_lsn == 2**40 and rows[0].qps == 1.5 and rows[0].at.tzinfo is not None
    totals = store.metric_totals(now - timedelta(hours=1))
    assert totals.cpu_seconds == {"ep-a": 3.0} and totals.active_seconds == {"ep-a": 30.0}
    assert totals.storage_sums == {"br-a": (5 * 10**9, 1), "br-b": (7, 1)}
    latest = store.latest_storage_samples()
    assert latest["br-a"].logical_bytes == 3 * 10**9 and latest["br-b"].storage_bytes == 7
    assert store.delete_metric_samples_before(now - timedelta(hours=168)) == 1
    assert len(store.metric_samples("p", old - timedelta(hours=1))) == 3
    store.delete_branch_rows("br-a")
    assert store.metric_samples("p", old) == []
    store.delete_project_rows("q")
    assert store.latest_storage_samples() == {}


def test_events_since(tmp_path: Path) -> None:
    store = _store(tmp_path)
    now = model.utcnow()
    for minutes, kind in ((90, model.EventKind.WAKE), (30, model.EventKind.SUSPEND), (10, model.EventKind.WAKE)):
        store.add_event(model.Event(endpoint_id="ep-a", kind=kind, at=now - timedelta(minutes=minutes), duration_ms=40))
    store.add_event(model.Event(endpoint_id="ep-b", kind=model.EventKind.WAKE, at=now))
    got = store.events_since(["ep-a"], now - timedelta(hours=1))
    assert [e.kind for e in got] == [model.EventKind.SUSPEND, model.EventKind.WAKE]
    assert store.events_since([], now) == []


def test_migration_0002_upgrades_a_0001_database(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    store = Store.sqlite(tmp_path / "argon.db")
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(metrics.__file__).parents[1] / "metadata" / "migrations"))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    assert store.schema_revision() == "0001"
    store.migrate()
    assert store.schema_revision() >= "0002"  # the newest revision
    store.add_metric_samples([MetricSample(at=model.utcnow(), project_id="p", branch_id="b", storage_bytes=1)])
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert store.schema_revision() == "0001"

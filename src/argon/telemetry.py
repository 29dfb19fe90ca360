"""The platform's Prometheus metrics: one registry per platform, counted where things happen.

`Telemetry` holds the counters and histograms the layers update in place (a wake, a login, an
API request); numbers that are state (how many projects, what runs, what the proxy holds) are
read at scrape time by the collectors each layer registers (`argon.control.exposition`,
`argon.proxy.exposition`), so nothing is kept twice. A scrape (`/metrics`, `argon.api.ops`) takes
what the collectors report on the event loop, where only copies are made for the big views
(`register_view`), and builds and writes the text in a worker thread.

Names follow Prometheus' conventions: `argon_` first, `_total` for counters, `_seconds` and
`_bytes` for units. Per-compute series carry `project_id`, `branch_id` and `endpoint_id`; the
platform-wide ones carry small fixed label sets only (a state, an outcome, a route template).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import Metric

disable_created_metrics()  # no `_created` series: they double what is sent and no dashboard reads them

S = TypeVar("S")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
COMPUTE_LABELS = ("project_id", "branch_id", "endpoint_id")

# Cold starts are tens of milliseconds when a compute is warm on disk, seconds when a replica copies
# its branch or WAL replays after a crash.
COLD_START_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Telemetry:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()  # what is counted in place; collected in a worker thread
        self._on_loop: list[Callable[[], Iterable[Metric]]] = []
        self._views: list[tuple[Callable[[], Any], Callable[[Any], Iterable[Metric]]]] = []
        # Computes (argon.control.lifecycle)
        self.wakes = Counter("argon_compute_wakes", "Compute starts (a wake on connect, an API start, a first start)",
                             COMPUTE_LABELS, registry=r)
        self.suspends = Counter("argon_compute_suspends", "Compute stops (idle suspends, API suspends, restarts, "
                                "unexpected exits)", COMPUTE_LABELS, registry=r)
        self.start_failures = Counter("argon_compute_start_failures", "Compute starts that failed",
                                      COMPUTE_LABELS, registry=r)
        self.cold_start = Histogram("argon_compute_cold_start_seconds", "Time from the start request to a compute "
                                    "accepting connections", buckets=COLD_START_BUCKETS, registry=r)
        # Operations (argon.control.plane)
        self.operations = Counter("argon_operations", "Operations finished, by action and outcome (status)",
                                  ("action", "status"), registry=r)
        # The proxy (argon.proxy.session)
        self.logins = Counter("argon_proxy_logins", "Client logins through the proxy, by outcome",
                              ("outcome",), registry=r)
        self.sessions = Counter("argon_proxy_sessions", "Relayed sessions that ended", registry=r)
        self.session_seconds = Histogram("argon_proxy_session_duration_seconds", "Duration of relayed sessions",
                                         buckets=(0.1, 1, 10, 60, 300, 1800, 3600, 6 * 3600, 24 * 3600), registry=r)
        # Bytes the Python relay moved (its sessions', at their end); the C relay keeps its own totals,
        # live, and `argon.proxy.exposition` reports the sum as argon_proxy_relayed_bytes_total.
        self.python_relayed = [0, 0]  # from clients, from computes
        # HTTP (argon.api.ops: the API, the console and the serverless driver's routes)
        self.http_requests = Counter("argon_http_requests", "HTTP requests, by route template, method and status",
                                     ("route", "method", "status"), registry=r)
        self.http_seconds = Histogram("argon_http_request_duration_seconds", "HTTP request latency, by route "
                                      "template and method", ("route", "method"), buckets=HTTP_BUCKETS, registry=r)
        self.info = Gauge("argon_build_info", "Argon's version (always 1)", ("version",), registry=r)

    def register(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Report state at scrape time: `collect` yields metric families (prometheus_client.core).
        It runs on the event loop: for a few figures read from memory."""
        self._on_loop.append(collect)

    def register_view(self, take: Callable[[], S], build: Callable[[S], Iterable[Metric]]) -> None:
        """Report state whose families cost more than a copy of it: at scrape time `take` copies
        what they need on the event loop, and `build` makes the families from the copy in a worker
        thread (the per-compute and per-project series at 1,000 projects)."""
        self._views.append((take, build))

    def session_ended(self, seconds: float, python_from_client: int = 0, python_from_compute: int = 0) -> None:
        self.sessions.inc()
        self.session_seconds.observe(seconds)
        self.python_relayed[0] += python_from_client
        self.python_relayed[1] += python_from_compute

    def forget_compute(self, labels: tuple[str, str, str]) -> None:
        """An endpoint was deleted: its counters go (Prometheus sees the series end)."""
        for counter in (self.wakes, self.suspends, self.start_failures):
            with contextlib.suppress(KeyError):
                counter.remove(*labels)

    def collect(self) -> Scrape:
        """On the event loop: what the registered collectors report now, and copies of the views."""
        return Scrape([f for collect in self._on_loop for f in collect()],
                      [(build, take()) for take, build in self._views])

    def render(self, scrape: Scrape) -> bytes:
        """The text format of a scrape, with the counters and histograms counted in place (a worker
        thread does it: prometheus_client's metrics are thread-safe, the views are copies)."""
        families = list(self.registry.collect()) + scrape.families
        for build, view in scrape.views:
            families.extend(build(view))
        return generate_latest(_Collected(families))  # type: ignore[arg-type]

    def exposition(self) -> bytes:
        return self.render(self.collect())


@dataclass(frozen=True)
class Scrape:
    """A scrape's state, taken on the event loop: families already built, and views to build from."""

    families: list[Metric]
    views: list[tuple[Callable[[Any], Iterable[Metric]], Any]]


class _Collected:
    """Families already collected, in the shape `generate_latest` reads."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def compute_labels(ep: Any) -> tuple[str, str, str]:
    """The label values of an endpoint's series (anything with project_id, branch_id, id)."""
    return (ep.project_id, ep.branch_id, ep.id)

"""What the proxy reports at scrape time: connections by state, refusals, the C relay's figures.

Read from what the server keeps anyway (its admission counts, the session activity the suspend
policy reads, the C relay thread's `stats()`), so the relay's hot path does no extra work for
metrics. Logins are counted in `argon.telemetry`; relayed bytes are the C relay's live totals plus
what the Python relay counted for its sessions when they ended.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from argon.proxy.server import ProxyServer


def collect(server: ProxyServer) -> Iterator[Metric]:
    sessions, busy = server.ctx.activity.counts()
    states = GaugeMetricFamily("argon_proxy_connections", "Client connections held by the proxy: authenticating "
                               "(not logged in yet), idle and busy (a query in flight or a transaction open)",
                               labels=["state"])
    states.add_metric(["authenticating"], server.unauthenticated)
    states.add_metric(["idle"], sessions - busy)
    states.add_metric(["busy"], busy)
    yield states
    refused = CounterMetricFamily("argon_proxy_refused_connections", "Connections refused at admission, by the "
                                  "limit reached", labels=["reason"])
    for reason, n in sorted(server.refused.items()):
        refused.add_metric([reason], n)
    yield refused
    dropped = CounterMetricFamily("argon_proxy_dropped_connections", "Unauthenticated connections dropped to make "
                                  "room, by the limit reached", labels=["reason"])
    for reason, n in sorted(server.evicted.items()):
        dropped.add_metric([reason], n)
    yield dropped
    relays = server.ctx.relays
    stats = relays.core.stats() if relays is not None else (0, 0, 0, 0)
    python = server.ctx.telemetry.python_relayed
    relayed = CounterMetricFamily("argon_proxy_relayed_bytes", "Bytes relayed after login: the C relay's as they "
                                  "pass, the Python relay's when its session ends", labels=["direction"])
    relayed.add_metric(["from_client"], python[0] + stats[2])
    relayed.add_metric(["from_compute"], python[1] + stats[3])
    yield relayed
    native = GaugeMetricFamily("argon_proxy_native_relay_sessions", "Sessions relayed on the C thread")
    buffered = GaugeMetricFamily("argon_proxy_relay_buffered_bytes", "Bytes the C relay holds, read from one side "
                                 "and not yet written to the other")
    if relays is not None:
        native.add_metric([], stats[0])
        buffered.add_metric([], stats[1])
    yield native
    yield buffered

"""What the proxy reports at scrape time: connections by state, refusals, the C relay's figures.

Read from what the server keeps anyway (its admission counts, the session activity the suspend
policy reads, the C relay thread's `stats()`), so the relay's hot path does no extra work for
metrics. Logins and relayed bytes are counted in `argon.telemetry` where a session ends.
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
    native = GaugeMetricFamily("argon_proxy_native_relay_sessions", "Sessions relayed on the C thread")
    buffered = GaugeMetricFamily("argon_proxy_relay_buffered_bytes", "Bytes the C relay holds, read from one side "
                                 "and not yet written to the other")
    if relays is not None:
        count, held = relays.core.stats()[:2]
        native.add_metric([], count)
        buffered.add_metric([], held)
    yield native
    yield buffered

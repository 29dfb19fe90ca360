"""What the control plane reports at scrape time: the view's counts and each compute's last look.

A scrape copies what it reports on the event loop (`snapshot`: lists of the view's immutable
records, the running computes' figures) and builds the families from the copy in a worker thread
(`families`), so its cost at 1,000 projects does not stall the loop. Nothing here touches a compute
or the disk: projects, branches and endpoints come from the
in-memory view, per-compute Postgres figures from the metrics sampler's newest look (taken every
`ARGON_METRICS_INTERVAL` seconds on running computes only, so a scrape never wakes anything and a
suspended compute simply has no per-compute series), and disk from its last storage walk. Every
family is always present (with no samples when there is nothing to report), so a dashboard's
queries name metrics that exist from the first scrape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from argon import model
from argon.compute.cgroups import Usage
from argon.control.metrics import _Last
from argon.control.services import Control
from argon.telemetry import COMPUTE_LABELS, compute_labels


@dataclass(frozen=True)
class View:
    """What the families are built from, copied on the event loop (`snapshot`): the view's records
    (immutable) and the running computes' figures. Building the families from it is pure and runs in
    a worker thread (`families`): at 1,000 projects a scrape walks 1,000 endpoints and 1,100 branches,
    which must not stall the proxy's and the API's loop."""

    projects: int
    branches: list[model.Branch]
    endpoints: list[model.Endpoint]
    running: frozenset[str]
    looks: dict[str, _Last]  # running compute -> the sampler's newest look at it
    allocated: dict[str, tuple[str, int]]  # branch -> (project, bytes on disk)
    logical: dict[str, int]  # branch -> logical size
    sizes: dict[str, tuple[float, int, Usage | None]]  # limited compute -> (cu, memory limit, cgroup usage)
    pools: dict[str, tuple[dict[str, int], dict[str, int], int]]  # endpoint -> (clients, servers, xacts)
    backup: tuple[bool, list[tuple[str, str, int, float, datetime | None]]] | None  # failing, branches


def snapshot(control: Control) -> View:
    """On the loop: copies of what a scrape reports. Its per-platform work is copying lists (C speed);
    what it walks in Python is the running computes and the pools only."""
    plane, sampler, scaler = control.plane, control.metrics, control.autoscaler
    endpoints = plane.endpoints_unordered()
    running = plane.running_endpoints()
    looks = {e.id: last for e in running if (last := sampler.latest(e.id)) is not None}
    sizes: dict[str, tuple[float, int, Usage | None]] = {}
    if scaler.enforced:
        for e in running:
            cu = scaler.current_cu(e.id)
            if cu is not None:
                sizes[e.id] = (cu, scaler.limits_for(cu).memory_bytes, scaler.last_usage(e.id))
    pools = {}
    for ep_id in plane.activity.endpoints_in_use():
        views = plane.activity.pools(ep_id)
        if views:
            pools[ep_id] = ({s: sum(getattr(p.stats, f"cl_{s}") for p in views) for s in ("active", "waiting", "idle")},
                            {s: sum(getattr(p.stats, f"sv_{s}") for p in views) for s in ("active", "idle", "used",
                                                                                          "login")},
                            sum(p.stats.xact_count for p in views))
    backup = None
    if control.backup is not None:
        status = control.backup.status
        backup = (bool(status.error), [(b.project_id, b.branch_id, b.lag_bytes(), b.lag_seconds(), b.last_shipped_at)
                                       for b in list(status.branches.values())])
    return View(projects=plane.project_count(), branches=plane.all_branches(), endpoints=endpoints,
                running=frozenset(e.id for e in running), looks=looks, allocated=dict(sampler.allocated()),
                logical=sampler.logical_sizes(), sizes=sizes, pools=pools, backup=backup)


def collect(control: Control) -> Iterator[Metric]:
    """Every family, at once (tests; the platform snapshots on the loop and builds in a thread)."""
    return families(snapshot(control))


def families(view: View) -> Iterator[Metric]:
    """The control plane's families from a snapshot (pure: a worker thread runs it)."""
    yield _gauge("argon_projects", "Projects", [((), view.projects)])

    branches = view.branches
    by_state = Counter(b.state.value for b in branches)
    yield _gauge("argon_branches", "Branches, by state", [((s,), n) for s, n in sorted(by_state.items())],
                 ("state",))

    endpoints = sorted(view.endpoints, key=lambda e: (e.created_at, e.id))
    by_kind = Counter((e.current_state.value, e.type.value) for e in endpoints)
    yield _gauge("argon_endpoints", "Endpoints, by state (init, active, idle) and type",
                 [(k, n) for k, n in sorted(by_kind.items())], ("state", "type"))
    yield _gauge("argon_compute_up", "1 while the endpoint's compute runs, 0 while it is suspended",
                 [((*compute_labels(e), e.type.value), 1 if e.id in view.running else 0) for e in endpoints],
                 (*COMPUTE_LABELS, "type"))

    allocated = view.allocated
    per_project: Counter[str] = Counter()
    for project_id, size in allocated.values():
        per_project[project_id] += size
    yield _gauge("argon_project_disk_bytes", "Bytes a project's directory holds on disk (data, history; "
                 "measured every 5th metrics interval)", [((p,), n) for p, n in sorted(per_project.items())],
                 ("project_id",))
    yield _gauge("argon_branch_disk_bytes", "Bytes a branch's directory holds on disk",
                 [((p, b), n) for b, (p, n) in sorted(allocated.items())], ("project_id", "branch_id"))
    logical = [((b.project_id, b.id), size) for b in branches if (size := view.logical.get(b.id)) is not None]
    yield _gauge("argon_branch_logical_size_bytes", "Size of a branch's databases (pg_database_size, or its "
                 "files while suspended)", logical, ("project_id", "branch_id"))

    running = [e for e in endpoints if e.id in view.looks]
    yield from _computes(view, running)
    yield from _limits(view, [e for e in endpoints if e.id in view.sizes])
    yield from _pools(view, [e for e in endpoints if e.id in view.pools])
    yield from _backup(view)


def _computes(view: View, endpoints: list[model.Endpoint]) -> Iterator[Metric]:
    labels = COMPUTE_LABELS
    connections = GaugeMetricFamily("argon_compute_connections", "Client connections on a compute "
                                    "(pg_stat_activity, the platform's own left out)", labels=labels)
    xacts = CounterMetricFamily("argon_compute_transactions", "Commits and rollbacks on a compute since it "
                                "started (pg_stat_database)", labels=labels)
    hits = CounterMetricFamily("argon_compute_blocks_hit", "Block reads served from shared buffers",
                               labels=labels)
    reads = CounterMetricFamily("argon_compute_blocks_read", "Block reads that went to the OS", labels=labels)
    ratio = GaugeMetricFamily("argon_compute_cache_hit_ratio", "blocks hit / (hit + read) since the compute "
                              "started", labels=labels)
    size = GaugeMetricFamily("argon_compute_database_size_bytes", "Sum of pg_database_size on a running "
                             "read-write compute", labels=labels)
    wal = GaugeMetricFamily("argon_compute_wal_position_bytes", "WAL position (written, or replayed on a "
                            "replica) as a byte offset", labels=labels)
    lag = GaugeMetricFamily("argon_compute_replication_lag_bytes", "WAL a read replica has still to replay "
                            "behind its running primary", labels=labels)
    cpu = CounterMetricFamily("argon_compute_cpu_seconds", "CPU time of a compute's processes since it started",
                              labels=labels)
    uptime = GaugeMetricFamily("argon_compute_uptime_seconds", "Seconds since the compute started", labels=labels)
    sampled = GaugeMetricFamily("argon_compute_last_sample_timestamp_seconds", "When the figures above were "
                                "read (Unix time)", labels=labels)
    primaries: dict[str, int] = {}
    looks = []
    for ep in endpoints:
        last = view.looks[ep.id]
        looks.append((ep, last))
        if ep.type is model.EndpointType.READ_WRITE:
            primaries[ep.branch_id] = last.lsn
    for ep, last in looks:
        values = list(compute_labels(ep))
        connections.add_metric(values, last.connections)
        xacts.add_metric(values, last.xacts)
        hits.add_metric(values, last.blocks_hit)
        reads.add_metric(values, last.blocks_read)
        total = last.blocks_hit + last.blocks_read
        if total:
            ratio.add_metric(values, last.blocks_hit / total)
        wal.add_metric(values, last.lsn)
        sampled.add_metric(values, last.wall.timestamp())
        if ep.type is model.EndpointType.READ_WRITE:
            logical = view.logical.get(ep.branch_id)
            if logical is not None:
                size.add_metric(values, logical)
        elif ep.branch_id in primaries:
            lag.add_metric(values, max(0, primaries[ep.branch_id] - last.lsn))
        if last.proc is not None:
            cpu.add_metric(values, last.proc.cpu_seconds)
            uptime.add_metric(values, last.proc.uptime_seconds)
    yield from (connections, xacts, hits, reads, ratio, size, wal, lag, cpu, uptime, sampled)


def _limits(view: View, endpoints: list[model.Endpoint]) -> Iterator[Metric]:
    """Compute units as enforced (ADR 0019): each running compute's size and its cgroup's figures at
    the autoscaler's last look. No samples when limits are not enforced."""
    labels = COMPUTE_LABELS
    cu = GaugeMetricFamily("argon_compute_cu", "The compute units a running compute's limits stand for now",
                           labels=labels)
    limit = GaugeMetricFamily("argon_compute_memory_limit_bytes", "A running compute's memory limit", labels=labels)
    resident = GaugeMetricFamily("argon_compute_memory_resident_bytes", "Anonymous and shared memory charged to "
                                 "a compute's cgroup (what the kernel cannot drop)", labels=labels)
    cpu = CounterMetricFamily("argon_compute_cgroup_cpu_seconds", "CPU time charged to a compute's cgroup",
                              labels=labels)
    throttled = CounterMetricFamily("argon_compute_throttled_seconds", "Time a compute's cgroup was throttled "
                                    "at its CPU quota", labels=labels)
    ooms = CounterMetricFamily("argon_compute_oom_kills", "Processes of a compute the kernel killed at its "
                               "memory limit", labels=labels)
    for ep in endpoints:
        size, memory, usage = view.sizes[ep.id]
        values = list(compute_labels(ep))
        cu.add_metric(values, size)
        limit.add_metric(values, memory)
        if usage is not None:
            resident.add_metric(values, usage.resident_bytes)
            cpu.add_metric(values, usage.cpu_usec / 1e6)
            throttled.add_metric(values, usage.throttled_usec / 1e6)
            ooms.add_metric(values, usage.oom_kills)
    yield from (cu, limit, resident, cpu, throttled, ooms)


def _pools(view: View, endpoints: list[model.Endpoint]) -> Iterator[Metric]:
    """The transaction pools of the `-pooler` hosts (ADR 0017), summed per endpoint over its
    (database, role) pools: PgBouncer's SHOW POOLS figures."""
    labels = COMPUTE_LABELS
    clients = GaugeMetricFamily("argon_pool_clients", "Pooled client connections, by state (active: has a "
                                "server; waiting: wants one; idle: between transactions)", labels=[*labels, "state"])
    servers = GaugeMetricFamily("argon_pool_servers", "Server connections the pools hold, by state",
                                labels=[*labels, "state"])
    xacts = CounterMetricFamily("argon_pool_transactions", "Transactions run through the pools", labels=labels)
    for ep in endpoints:
        by_client, by_server, transactions = view.pools[ep.id]
        values = list(compute_labels(ep))
        for state, n in by_client.items():
            clients.add_metric([*values, state], n)
        for state, n in by_server.items():
            servers.add_metric([*values, state], n)
        xacts.add_metric(values, transactions)
    yield from (clients, servers, xacts)


def _backup(view: View) -> Iterator[Metric]:
    """Continuous backup (ADR 0018): present, with no samples, when ARGON_BACKUP_URL is not set."""
    branch_labels = ["project_id", "branch_id"]
    enabled = GaugeMetricFamily("argon_backup_enabled", "1 when ARGON_BACKUP_URL is set")
    failing = GaugeMetricFamily("argon_backup_failing", "1 while a backup loop reports an error (see "
                                "GET /api/v2/backup)")
    lag = GaugeMetricFamily("argon_backup_lag_bytes", "WAL a branch wrote that is not in the bucket yet",
                            labels=branch_labels)
    lag_seconds = GaugeMetricFamily("argon_backup_lag_seconds", "Seconds since a branch's WAL was last all in "
                                    "the bucket (0 when it is)", labels=branch_labels)
    shipped = GaugeMetricFamily("argon_backup_last_wal_shipped_timestamp_seconds", "When a branch's WAL was last "
                                "shipped (Unix time)", labels=branch_labels)
    enabled.add_metric([], 1 if view.backup is not None else 0)
    if view.backup is not None:
        is_failing, branches = view.backup
        failing.add_metric([], 1 if is_failing else 0)
        for project_id, branch_id, lag_b, lag_s, last_shipped_at in branches:
            values = [project_id, branch_id]
            lag.add_metric(values, lag_b)
            lag_seconds.add_metric(values, lag_s)
            if last_shipped_at is not None:
                shipped.add_metric(values, last_shipped_at.timestamp())
    yield from (enabled, failing, lag, lag_seconds, shipped)


def _gauge(name: str, doc: str, samples: list[tuple[tuple[str, ...], float]],
           labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family

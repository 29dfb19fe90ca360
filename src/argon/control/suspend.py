"""Suspend on idle (Neon's semantics): decide from the proxy's view, confirm with Postgres, stop.

An endpoint is idle when no client session is busy (an open transaction counts as busy) and no
byte moved for `suspend_timeout_seconds`. Before stopping, under the endpoint lock, one look at
`pg_stat_activity` catches work that sends no bytes (a long CREATE INDEX, autovacuum, walsenders,
background workers); then the proxy's sessions are checked again, so a client that arrived
meanwhile is served, not killed. Idle client connections receive Postgres's own
`terminating connection due to administrator command` (57P01) from the fast shutdown; pooled
clients hold no server connection while idle, and the pools' idle ones are closed first
(`ActivityRegistry.quiesce`), so a suspend closes nothing a pooled client can see.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from argon import model
from argon.control import snapshots
from argon.control.branches import delete_expired
from argon.control.periodic import Periodic
from argon.control.reconcile import adopt_strays
from argon.control.retention import PruneSchedule, maintain
from argon.control.services import Control
from argon.proxy.activity import EndpointActivity

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.5  # seconds between looks; Neon's compute monitor uses the same period
EXPIRY_EVERY = 4  # look for expired branches and computes to adopt (`reconcile.adopt_strays`) every 2 s
BUSY_TIMEOUT = 10.0  # seconds for the pg_stat_activity look before a suspend
HISTORY_EVERY = 120  # ticks (one minute): snapshots of computes that never suspend, pruning

# Work in Postgres that keeps a compute awake although no client sends bytes.
BUSY_BACKENDS_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE pid <> pg_backend_pid()
  AND coalesce(usename, '') <> 'cloud_admin'
  AND (
        (backend_type = 'client backend' AND state IS NOT NULL AND state <> 'idle')
     OR backend_type IN ('walsender', 'autovacuum worker')
     OR (backend_type NOT IN ('client backend', 'autovacuum launcher', 'logical replication launcher',
                              'background writer', 'checkpointer', 'walwriter', 'startup', 'archiver',
                              'io worker', 'walsummarizer', 'slotsync worker', 'autovacuum worker',
                              'walsender', 'walreceiver')
         AND backend_type NOT LIKE 'parallel worker%')
  )
"""


@dataclass(frozen=True)
class Decision:
    suspend: bool
    reason: str


def decide(*, now: float, timeout: float | None, activity: EndpointActivity, running_since: float) -> Decision:
    """Pure: should this running compute be suspended now?"""
    if timeout is None:
        return Decision(False, "suspend disabled (suspend_timeout_seconds = -1)")
    if activity.busy:
        return Decision(False, f"{activity.busy} session(s) busy")
    last = max(activity.last_activity or 0.0, running_since)
    idle_for = now - last
    if idle_for < timeout:
        return Decision(False, f"idle for {idle_for:.1f}s of {timeout}s")
    return Decision(True, f"no activity for {idle_for:.0f}s (timeout {timeout}s)")


class SuspendMonitor:
    def __init__(self, control: Control) -> None:
        self.control = control
        self.plane = control.plane
        self.loop = Periodic("suspend check", self._tick, CHECK_INTERVAL, first_delay=CHECK_INTERVAL, logger=log)
        self._ticks = 0
        self._running_since: dict[str, float] = {}
        self._history: asyncio.Task[None] | None = None
        self._history_cursor = ""  # where the round robin of idle branches not visited yet goes on
        self._prune_schedule = PruneSchedule()  # when each visited idle branch needs pruning again
        self.plane.branch_watchers.append(self._prune_schedule.forget)  # changed: visit it again

    def start(self) -> None:
        self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()

    async def _tick(self) -> None:
        self._ticks += 1
        await self.check_all()
        if self._ticks % EXPIRY_EVERY == 0:
            await delete_expired(self.control)
            await snapshots.delete_expired(self.control)
            await adopt_strays(self.control)
        if self._ticks % HISTORY_EVERY == 0 and (self._history is None or self._history.done()):
            self._history = self.plane.spawn(self._maintain(), "history snapshots and pruning")

    async def _maintain(self) -> None:
        done = await maintain(self.plane, self._history_cursor, schedule=self._prune_schedule)
        self._history_cursor = done.cursor
        for branch_id in done.pruned:  # files gone that no record shows: measure again
            self.control.figures.touch(branch_id)

    async def check_all(self) -> None:
        plane = self.plane
        now = time.monotonic()
        running = plane.running_endpoints()  # the work per look grows with the running, not the idle
        ids = {ep.id for ep in running}
        for gone in [e for e in self._running_since if e not in ids]:
            del self._running_since[gone]
        for ep in running:
            since = self._running_since.setdefault(ep.id, now)
            timeout = ep.effective_suspend_timeout(plane.settings.suspend_timeout)
            decision = decide(now=now, timeout=timeout, activity=plane.activity.snapshot(ep.id), running_since=since)
            if decision.suspend:
                await self.try_suspend(ep.id, decision.reason)

    async def try_suspend(self, endpoint_id: str, reason: str) -> bool:
        plane = self.plane
        lock = plane.endpoint_lock(endpoint_id)
        if lock.locked():
            return False  # a wake or another stop is under way
        async with lock:
            if not plane.is_running(endpoint_id):
                return False
            busy = await self._busy_in_postgres(endpoint_id)
            if busy:
                plane.activity.touch(endpoint_id)  # look again after a full timeout
                log.debug("compute %s not suspended: %d backend(s) working", endpoint_id, busy)
                return False
            if plane.activity.snapshot(endpoint_id).busy:
                return False
            # the transaction pools hand out no server from here and close their idle ones, so the stop
            # reaches no pooled client; a pool whose server is in use calls the suspend off (ADR 0017)
            if not await plane.activity.quiesce(endpoint_id):
                return False
            self._running_since.pop(endpoint_id, None)
            started = time.monotonic()
            try:
                if not await self.control.computes.stop_locked(endpoint_id, reason=reason):
                    return False
            finally:
                plane.activity.resume(endpoint_id)
        ep = plane.endpoint(None, endpoint_id)
        await plane.record(ep.project_id, model.OperationAction.SUSPEND_COMPUTE, branch_id=ep.branch_id,
                           endpoint_id=endpoint_id, started=started)
        return True

    async def _busy_in_postgres(self, endpoint_id: str) -> int:
        session = self.plane.computes.admin(endpoint_id)
        try:
            if session is None:
                raise RuntimeError("no admin session")
            row = await session.fetchone(BUSY_BACKENDS_SQL, timeout=BUSY_TIMEOUT)
        except Exception as exc:
            log.warning("cannot check activity of %s (%s); suspending anyway", endpoint_id, exc)
            return 0
        return int(row[0]) if row else 0

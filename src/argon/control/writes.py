"""Which running computes refuse writes, and why: one switch that several loops ask for.

A compute refuses writes with `default_transaction_read_only` set by the platform (`ALTER SYSTEM`,
then a reload): every new transaction starts read-only. Two loops ask for it: continuous backup when
a branch has too much WAL the bucket lacks (ADR 0018), and the disk guard when a branch reaches its
project's size limit or the data directory's filesystem runs into the platform's reserve (ADR 0025).
Each asks under its own reason; the compute refuses writes while any reason holds, and only the last
reason lifted lets it write again (two loops writing the setting on their own undid each other).

`postgresql.auto.conf` is emptied at each start, so a restarted compute (a new postmaster pid) gets
the setting again at the next `sync` (the loops call it every look: a woken compute that must refuse
writes does so within one look); one this process started needs nothing to write freely, and one it
adopted from a previous `argon up` is reset once.
"""

from __future__ import annotations

import logging

from argon.compute.manager import ComputeManager
from argon.failpoints import failpoint_async

log = logging.getLogger(__name__)


class WriteGate:
    def __init__(self, computes: ComputeManager) -> None:
        self.computes = computes
        self._reasons: dict[str, dict[str, str]] = {}  # endpoint -> reason -> why (for logs and status)
        self._applied: dict[str, tuple[int, bool]] = {}  # endpoint -> (postmaster pid, refusing) in force

    def refused(self, endpoint_id: str) -> dict[str, str]:
        """Why the compute refuses writes (empty: it does not)."""
        return dict(self._reasons.get(endpoint_id, {}))

    async def set(self, endpoint_id: str, reason: str, refuse: bool, why: str = "") -> bool:
        """Ask (or stop asking) for `endpoint_id` to refuse writes under `reason`; True when the
        compute's setting now matches what the reasons together want (False: not running, or the
        admin session failed; the next `sync` retries)."""
        reasons = self._reasons.setdefault(endpoint_id, {})
        if refuse:
            reasons[reason] = why or reason
        else:
            reasons.pop(reason, None)
        if not reasons:
            del self._reasons[endpoint_id]
        return await self.sync(endpoint_id)

    async def sync(self, endpoint_id: str) -> bool:
        want = bool(self._reasons.get(endpoint_id))
        pm = self.computes.get(endpoint_id)
        if pm is None or not pm.alive:
            self._applied.pop(endpoint_id, None)
            return False
        applied = self._applied.get(endpoint_id)
        if applied == (pm.pid, want):
            return True
        if not want and (applied is None or applied[0] != pm.pid) and pm.proc is not None:
            self._applied[endpoint_id] = (pm.pid, False)  # started here: its auto.conf was emptied
            return True
        session = self.computes.admin(endpoint_id)
        if session is None:
            return False
        try:
            if want:
                await session.fetchall("ALTER SYSTEM SET default_transaction_read_only = on", timeout=10)
            else:
                await session.fetchall("ALTER SYSTEM RESET default_transaction_read_only", timeout=10)
            await failpoint_async("writes.gate.after_alter_system")  # a restart resets an adopted compute once
            await session.fetchone("SELECT pg_reload_conf()", timeout=10)
        except Exception as exc:
            log.warning("could not %s writes on compute %s: %s", "refuse" if want else "allow", endpoint_id, exc)
            return False
        self._applied[endpoint_id] = (pm.pid, want)
        return True

    def forget(self, endpoint_id: str) -> None:
        """The endpoint is gone (deleted): drop its reasons."""
        self._reasons.pop(endpoint_id, None)
        self._applied.pop(endpoint_id, None)

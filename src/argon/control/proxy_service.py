"""What the proxy asks the control plane (its `ControlClient` seam): role verifiers and wakes.

Endpoints arrive as compute ids: the proxy strips a pooled host's `-pooler` suffix when it routes
(`argon.proxy.routing`; ADR 0017). A verifier is read live from the compute's `pg_authid` while it runs
settled (one indexed lookup on the compute's admin session, ~0.2 ms), so a password changed
through SQL works at once; otherwise the copy synced when the compute last stopped serves. Looking
a verifier up changes nothing; `refresh_role_secret` (after a failed login) syncs it into the
view. A wake that starts a compute is a `start_compute` operation, recorded off the connection's
path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from argon import model
from argon.control import spec
from argon.control.services import Control
from argon.errors import ArgonError, NotFound
from argon.proxy.control_client import ComputeAddress

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 2.0  # seconds; a compute that does not answer gets the stored verifier
_VERIFIER_SQL = ("SELECT rolpassword FROM pg_authid WHERE rolname = %s AND rolcanlogin "
                 "AND (rolvaliduntil IS NULL OR rolvaliduntil > now())")
_UNKNOWN = object()


class _LookupAbandoned(Exception):
    """A verifier lookup others had joined was cancelled before it was sent."""


class ProxyService:
    def __init__(self, control: Control) -> None:
        self.control = control
        self._queued: dict[tuple[str, str], asyncio.Future[str | object | None]] = {}  # lookups not sent yet

    async def get_role_secret(self, endpoint_id: str, role: str) -> str | None:
        """The verifier the proxy checks a login against (None: unknown endpoint or role)."""
        plane = self.control.plane
        ep = plane.find_endpoint(endpoint_id)
        if ep is None or role == model.PLATFORM_ROLE:
            return None
        if self.control.computes.settled(ep.id):
            live = await self._live_verifier(ep, role)
            if live is not _UNKNOWN:
                return live  # type: ignore[return-value]
        return plane.verifier(ep.branch_id, role)

    async def _live_verifier(self, ep: model.Endpoint, role: str) -> str | object | None:
        """`pg_authid`'s verifier of a login role, None if there is none, `_UNKNOWN` if unreadable.

        Logins that arrive together share one lookup, but only one not sent yet: a login joins a
        lookup still waiting for its turn on the admin session, never one already on its way, so
        what it gets was read after it arrived (a password changed or a role dropped through SQL
        counts at once, as with a lookup of its own). Under a login storm the lookups queue on the
        one admin session, and each queued lookup serves every login that came meanwhile."""
        key = (ep.id, role)
        while (queued := self._queued.get(key)) is not None:
            try:
                return await asyncio.shield(queued)
            except _LookupAbandoned:  # its login went away before the lookup was sent: make our own
                continue
        mine: asyncio.Future[str | object | None] = asyncio.get_running_loop().create_future()
        self._queued[key] = mine

        def sending() -> None:
            if self._queued.get(key) is mine:
                del self._queued[key]

        try:
            result = await self._lookup(ep, role, sending)
        except BaseException:
            sending()
            if not mine.done():
                mine.set_exception(_LookupAbandoned())
                mine.exception()  # retrieved: nobody may be waiting
            raise
        sending()
        mine.set_result(result)
        return result

    async def _lookup(self, ep: model.Endpoint, role: str, sending: Callable[[], None]) -> str | object | None:
        session = self.control.plane.computes.admin(ep.id)
        if session is None:
            return _UNKNOWN
        try:
            row = await session.fetchone(_VERIFIER_SQL, (role,), timeout=LOOKUP_TIMEOUT, sending=sending)
        except Exception as exc:
            log.debug("live verifier lookup on %s failed: %s", ep.id, exc)
            return _UNKNOWN
        if row is None or not row[0] or not str(row[0]).startswith("SCRAM-SHA-256$"):
            return None
        return str(row[0])

    async def refresh_role_secret(self, endpoint_id: str, role: str) -> str | None:
        """After a failed login: take the compute's current verifier into the view (it may have been
        changed through SQL), then answer from the view."""
        plane = self.control.plane
        ep = plane.find_endpoint(endpoint_id)
        if ep is None or role == model.PLATFORM_ROLE:
            return None
        if plane.is_running(ep.id):
            try:
                await spec.sync_verifier(plane, ep, role)
            except Exception as exc:
                log.debug("refreshing the verifier of %s on %s failed: %s", role, ep.id, exc)
        return plane.verifier(ep.branch_id, role)

    async def wake(self, endpoint_id: str) -> ComputeAddress:
        plane = self.control.plane
        if plane.find_endpoint(endpoint_id) is None:
            raise ArgonError("Control plane request failed: endpoint cannot be found", kind=NotFound.kind)
        started = time.monotonic()
        address = await self.control.computes.ensure_running(endpoint_id)
        if address.cold_start:
            ep = plane.endpoint(None, endpoint_id)
            plane.spawn(plane.record(ep.project_id, model.OperationAction.START_COMPUTE, branch_id=ep.branch_id,
                                     endpoint_id=ep.id, started=started), "recording a start")
        return address

    def allowed_ips(self, endpoint_id: str) -> tuple[str, ...]:
        plane = self.control.plane
        ep = plane.find_endpoint(endpoint_id)
        if ep is None:
            return ()
        try:
            return plane.project(ep.project_id).settings.guards(plane.branch(ep.project_id, ep.branch_id))
        except NotFound:  # deleted meanwhile
            return ()

    def endpoint_exists(self, endpoint_id: str) -> bool:
        return self.control.plane.find_endpoint(endpoint_id) is not None

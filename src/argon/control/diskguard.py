"""Disk limits: each branch's size against its project's limit, and the platform's reserve (ADR 0025).

Every `disk_check_interval` seconds (1):

- **The reserve.** The data directory's filesystem keeps `disk_reserve` free (2 GB, at most a tenth of
  the filesystem) for what Argon itself must write: the metadata store, history, spare copies, the
  WAL its computes need to stop cleanly. Below it every running read-write compute refuses writes
  and no project or branch is created (507); both come back once there is a quarter more than the
  reserve free again (so the switch does not flap).
- **The size limit.** A project's `settings.quota.logical_size_bytes` (Neon's field; 0: none) caps the
  logical size of each of its branches (what `pg_database_size` counts over all of its databases, as
  Neon counts a branch's logical size). The guard reads each running read-write compute's size on
  its admin session; at the limit the compute refuses writes (`argon.control.writes`): new
  transactions are read-only, and the write transactions in flight at that moment are cancelled so a
  long `COPY` cannot run on past it. Reads go on, and so do `DROP`, `TRUNCATE`, `DELETE` and `VACUUM`
  in a session that asks for them (`SET default_transaction_read_only = off`), which is the way back
  under the limit, as on Neon. Once under it, writes are allowed again.
- **Past the grace.** A session that lifts read-only and keeps adding data instead grows the branch
  past what it had when writes were refused; more than `grace` (a tenth of the limit, at least
  16 MiB) past it, the compute's client sessions are ended, at every look that finds it so.

The decisions are the pure `size_state` and `reserve_state`; `DiskGuard` reads and acts.
Every refusal and every release is an event of the endpoint (`writes_refused`, `writes_allowed`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass

from argon import model
from argon.compute.admin import AdminSession
from argon.control.periodic import Periodic
from argon.control.plane import ControlPlane
from argon.errors import StorageError

log = logging.getLogger(__name__)

MIN_GRACE = 16 * 2**20
RESERVE_SHARE = 0.1  # the reserve is at most this share of the filesystem
RESERVE_RELEASE = 1.25  # writes come back with this many times the reserve free

SIZE_QUERY = "SELECT coalesce(sum(pg_database_size(oid)), 0)::bigint FROM pg_database"
# The write transactions in flight (an xid assigned) of the tenant's sessions, not the platform's.
WRITERS = ("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND backend_xid IS NOT NULL "
           "AND pid <> pg_backend_pid() AND usename IS DISTINCT FROM %s")
CLIENTS = ("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
           "AND pid <> pg_backend_pid() AND usename IS DISTINCT FROM %s")


def limit_message(limit_bytes: int) -> str:
    """What a tenant at its limit is told (Neon's words for its project size limit, in MB)."""
    return f"project size limit ({limit_bytes // 2**20} MB) has been exceeded"


def grace(limit_bytes: int) -> int:
    return max(MIN_GRACE, limit_bytes // 10)


@dataclass(frozen=True)
class SizeState:
    """A compute under its project's size limit: whether it refuses writes, and its size when it
    began to (what it may not grow past by more than the grace)."""

    refused: bool = False
    refused_at: int = 0


def size_state(state: SizeState, size: int, limit: int) -> tuple[SizeState, str]:
    """Pure: the new state after measuring `size` against `limit` (0: none), and what to do:
    "refuse", "allow", "end sessions" or "" (nothing)."""
    if limit <= 0 or size < limit:
        return SizeState(), "allow" if state.refused else ""
    if not state.refused:
        return SizeState(True, size), "refuse"
    if size > state.refused_at + grace(limit):
        return SizeState(True, size), "end sessions"
    return state, ""


def reserve_bytes(configured: int, total: int) -> int:
    """The reserve in force on a filesystem of `total` bytes."""
    return min(configured, int(total * RESERVE_SHARE))


def reserve_state(low: bool, free: int, reserve: int) -> bool:
    """Pure: whether the filesystem is within the reserve (with the release margin once it was)."""
    if reserve <= 0:
        return False
    return free < reserve * RESERVE_RELEASE if low else free < reserve


class DiskGuard:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.low = False  # the filesystem is within the reserve
        self.free_bytes = 0
        self.reserve = 0
        self.sizes: dict[str, int] = {}  # endpoint -> logical size at the last look
        self._states: dict[str, SizeState] = {}
        self.loop = Periodic("disk guard look", self.look, lambda: plane.settings.disk_check_interval, logger=log)

    def describe(self) -> str:
        """Which disk limits are enforced (`argon up`, `argon status`)."""
        reserve = self.plane.settings.disk_reserve_bytes
        kept = f"{reserve / 2**30:g} GiB (at most a tenth of the disk)" if reserve else "none (ARGON_DISK_RESERVE=0)"
        return ("project size limits (settings.quota.logical_size_bytes) by refusing writes at the limit; "
                f"temporary files by temp_file_limit; the platform's disk reserve: {kept}")

    def start(self) -> None:
        self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()

    def _measure_free(self) -> tuple[int, int]:
        usage = shutil.disk_usage(self.plane.layout.data_dir)
        return usage.free, reserve_bytes(self.plane.settings.disk_reserve_bytes, usage.total)

    def check_room(self, what: str) -> None:
        """Refuse (507) to create `what` while the filesystem is within the reserve."""
        free, reserve = self._measure_free()
        if reserve_state(self.low, free, reserve):
            raise StorageError(f"no space left for {what}: the data directory's filesystem has "
                               f"{free / 2**20:.0f} MB free, within the {reserve / 2**20:.0f} MB Argon keeps "
                               "for its metadata and WAL (ARGON_DISK_RESERVE); delete branches or projects, "
                               "or add space")

    async def look(self) -> None:
        plane = self.plane
        self.free_bytes, self.reserve = await asyncio.to_thread(self._measure_free)
        low = reserve_state(self.low, self.free_bytes, self.reserve)
        if low != self.low:
            (log.error if low else log.warning)(
                "the data directory's filesystem has %.0f MB free (reserve %.0f MB): %s", self.free_bytes / 2**20,
                self.reserve / 2**20, "every compute refuses writes" if low else "writes are allowed again")
        self.low = low
        running = set(plane.computes.running())
        for gone in set(self._states) - running:
            del self._states[gone]
            self.sizes.pop(gone, None)
        for endpoint_id in sorted(running):
            ep = plane.find_endpoint(endpoint_id)
            if ep is None or ep.type is not model.EndpointType.READ_WRITE:
                continue
            await self._reserve(ep, low)
            if plane.has_project(ep.project_id):
                await self._size(ep, plane.project(ep.project_id).settings.logical_size_limit_bytes)

    async def _reserve(self, ep: model.Endpoint, low: bool) -> None:
        gate = self.plane.writes
        had = "disk" in gate.refused(ep.id)
        why = (f"the platform's disk is within its reserve ({self.free_bytes / 2**20:.0f} MB free of the "
               f"{self.reserve / 2**20:.0f} MB kept)")
        if await gate.set(ep.id, "disk", low, why) and had != low:
            self._event(ep, model.EventKind.WRITES_REFUSED if low else model.EventKind.WRITES_ALLOWED,
                        why if low else "the platform's disk has room again")

    async def _size(self, ep: model.Endpoint, limit: int) -> None:
        state = self._states.get(ep.id, SizeState())
        if limit <= 0 and not state.refused and "size" not in self.plane.writes.refused(ep.id):
            self.sizes.pop(ep.id, None)
            return
        session = self.plane.computes.admin(ep.id)
        if session is None:
            return
        try:
            row = await session.fetchone(SIZE_QUERY, timeout=10)
        except Exception as exc:  # stopping, a database dropped meanwhile: the next look sees
            log.debug("compute %s: size not read: %s", ep.id, exc)
            return
        size = int(row[0]) if row else 0
        self.sizes[ep.id] = size
        gate = self.plane.writes
        if ep.id not in self._states and "size" in gate.refused(ep.id):
            state = SizeState(True, size)  # refused before its suspend: still refused, measured from here
        new, action = size_state(state, size, limit)
        if action == "refuse":
            why = limit_message(limit)
            if not await gate.set(ep.id, "size", True, why):
                return  # not in force: try again at the next look
            await self._cancel_writers(ep.id, session, WRITERS, "pg_cancel_backend")
            log.warning("compute %s: %.0f MB, at its project's size limit of %.0f MB: writes refused", ep.id,
                        size / 2**20, limit / 2**20)
            self._event(ep, model.EventKind.WRITES_REFUSED,
                        f"{why} ({size / 2**20:.0f} MB): new transactions are read-only; DROP, TRUNCATE or "
                        "DELETE and VACUUM in a session with default_transaction_read_only = off bring it back under")
        elif action == "allow":
            if not await gate.set(ep.id, "size", False):
                return
            log.info("compute %s: %.0f MB, under its project's size limit: writes allowed", ep.id, size / 2**20)
            self._event(ep, model.EventKind.WRITES_ALLOWED,
                        f"{size / 2**20:.0f} MB, under the project size limit"
                        + (f" of {limit // 2**20} MB" if limit else " (the limit was removed)"))
        elif action == "end sessions":
            await gate.sync(ep.id)
            ended = await self._cancel_writers(ep.id, session, CLIENTS, "pg_terminate_backend")
            log.warning("compute %s: grew to %.0f MB past its size limit of %.0f MB with writes refused: ended "
                        "%d session(s)", ep.id, size / 2**20, limit / 2**20, ended)
            self._event(ep, model.EventKind.WRITES_REFUSED,
                        f"{limit_message(limit)} and the branch kept growing ({size / 2**20:.0f} MB): "
                        f"{ended} session(s) ended")
        else:
            await gate.sync(ep.id)  # a restarted compute gets the setting again
        self._states[ep.id] = new

    async def _cancel_writers(self, endpoint_id: str, session: AdminSession, query: str, how: str) -> int:
        try:
            rows = await session.fetchall(
                f"SELECT {how}(pid) FROM ({query}) AS t", (model.PLATFORM_ROLE,), timeout=10)
        except Exception as exc:
            log.warning("compute %s: could not %s its sessions: %s", endpoint_id, how, exc)
            return 0
        return sum(1 for (done,) in rows if done)

    def _event(self, ep: model.Endpoint, kind: model.EventKind, detail: str) -> None:
        self.plane.spawn(self.plane.add_event(ep.id, kind, detail=detail), f"recording {kind.value}")

"""The lifecycle of computes: when and how an endpoint's compute starts and stops.

Mechanism (config files, the postmaster, its admin session) is `argon.compute`; this module decides
around it. A start is single-flight per endpoint (the endpoint lock): the branch's history gets its
base first if it has none, a replica gets its copy of the branch, the platform's roles and
databases are applied if they changed while the compute was stopped, and the endpoint becomes
active in the view at once (the store and the `wake` event follow in the background, off the
connection's path). A stop syncs roles and databases made through SQL, stops the postmaster (its
admin session first), snapshots and prunes the history, and marks the endpoint idle. A compute
that exits unasked is marked idle; the next connection starts it again.

Operations are not recorded here: the use case that asked for a start or a stop records it, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from argon import logs, model, safefs
from argon.compute import postmaster
from argon.compute.manager import Adoptable, ComputeSpec, rewrite_conf
from argon.compute.osuser import OsUser
from argon.compute.params import gucs_for_cu
from argon.compute.postmaster import ComputeStartError
from argon.control import replicas, retention, spec
from argon.control.autoscale import limits_for, temp_file_limit
from argon.control.plane import ControlPlane
from argon.errors import ArgonError, ComputeError, NotFound, UserError
from argon.failpoints import failpoint_async
from argon.proxy.control_client import ComputeAddress
from argon.telemetry import compute_labels

if TYPE_CHECKING:
    from argon.control.backup import BackupService
    from argon.control.lazyrestore import LazyRestore

log = logging.getLogger(__name__)


LEFT_BEHIND_WAIT = 30.0  # seconds a wake waits for a postmaster left starting by a crashed argon


def spec_key(endpoint_id: str) -> str:
    """The intent "this endpoint's compute still needs the platform's spec" (`argon.storage.intents`)."""
    return f"spec-{endpoint_id}"


@dataclasses.dataclass(frozen=True)
class LeftRunning:
    """A compute a previous argon left running, identified (`Lifecycle.identify`), not taken over yet."""

    compute: ComputeSpec
    found: Adoptable
    spec_pending: bool  # a crashed argon started it and never gave it the platform's spec

    def release(self) -> None:
        """Not taken over after all: let go of its process handle."""
        self.found.release()


class Lifecycle:
    def __init__(self, plane: ControlPlane, backup: BackupService | None = None) -> None:
        self.plane = plane
        self.backup = backup  # told when a compute stopped: its last WAL and new snapshot ship now
        self.restorer: LazyRestore | None = None  # branches a lazy `argon restore` left in the bucket
        self._needs_spec: set[str] = set()  # endpoints whose next start must apply roles and databases
        # branches whose stopped cluster holds exactly the roles and databases the store gives them (see
        # `in_step`); in memory only: after a restart no branch is, and new branches' computes get the spec
        self._in_step: dict[str, int] = {}
        self._steps = 0  # each entry into `_in_step` gets a new number: `step_mark` tells a re-entry apart
        # endpoints a previous argon left a postmaster.pid for, not adopted at start-up (still in a
        # crash recovery): `reconcile.adopt_strays` looks at these, not at every endpoint
        self.strays: set[str] = set()
        self._stopping: set[str] = set()  # stops we asked for: their exits are no crash
        plane.computes.on_exit = self._exited

    # State ------------------------------------------------------------------------------------------

    def load(self) -> None:
        """At start-up: every endpoint's next start applies the platform's spec (it may have changed)."""
        self._needs_spec.update(ep.id for ep in self.plane.endpoints())

    def mark_needs_spec(self, endpoint_id: str) -> None:
        """The endpoint's next start must apply the platform's roles and databases."""
        self._needs_spec.add(endpoint_id)
        self._leave_step(endpoint_id)

    def spec_pending(self, endpoint_id: str) -> None:
        """`mark_needs_spec`, durably (blocking: call it in a thread): a compute that a crashed argon
        started without its spec (a new project's password) is not adopted as settled, it gets the
        spec applied. Written before the metadata that needs it; cleared once applied."""
        self.plane.intents.put(spec_key(endpoint_id), {"endpoint": endpoint_id})
        self._needs_spec.add(endpoint_id)
        self._leave_step(endpoint_id)

    def needs_spec(self, endpoint_id: str) -> bool:
        return endpoint_id in self._needs_spec

    def in_step(self, branch_id: str) -> bool:
        """Whether the branch's cluster, stopped, holds the roles (verifiers included) and databases
        its metadata lists: its last compute stopped with the platform's spec applied and synced back
        (`_stop_locked`), or it was copied from such a branch's head (`enter_step`), and no compute of
        it started since, nor a restore, a spec marked for one of its endpoints or a project setting
        that changes roles (`leave_step`). A copy of it then needs no spec at its first start (ADR 0033)."""
        return branch_id in self._in_step

    def step_mark(self, branch_id: str) -> int | None:
        """A mark of the branch's current stretch in step (None: not in step). Equal marks taken before
        and after a copy of its head say it stayed in step all along: the copy is in step too."""
        return self._in_step.get(branch_id)

    def enter_step(self, branch_id: str) -> None:
        self._steps += 1
        self._in_step[branch_id] = self._steps

    def leave_step(self, branch_id: str) -> None:
        """The branch's cluster or its metadata's roles and databases may change (or are gone)."""
        self._in_step.pop(branch_id, None)

    def _leave_step(self, endpoint_id: str) -> None:
        ep = self.plane.find_endpoint(endpoint_id)
        if ep is not None and ep.type is model.EndpointType.READ_WRITE:
            self._in_step.pop(ep.branch_id, None)

    def is_running(self, endpoint_id: str) -> bool:
        return self.plane.is_running(endpoint_id)

    def settled(self, endpoint_id: str) -> bool:
        """Running with the platform's spec applied, and no start or stop under way: what the compute
        says (its `pg_authid`) is what the platform means."""
        return (endpoint_id not in self._needs_spec and not self.plane.endpoint_lock(endpoint_id).locked()
                and self.plane.is_running(endpoint_id))

    def spec(self, ep: model.Endpoint) -> ComputeSpec:
        """What the compute of `ep` runs with: its data, socket, log, OS user and settings."""
        plane = self.plane
        project = plane.project(ep.project_id)
        install = plane.installs.get(project.pg_version)
        if install is None:
            raise ComputeError(f"PostgreSQL {project.pg_version} binaries are not available on this machine; "
                               f"install them or set ARGON_PG_BINDIRS", retryable=False)
        user = OsUser(project.os_uid, project.os_uid) if project.os_uid is not None else None
        limits = limits_for(ep.autoscaling_limit_min_cu, plane.settings.compute_memory_per_cu)  # starts at its min
        capped = {"temp_file_limit": temp_file_limit(ep.autoscaling_limit_max_cu,
                                                      plane.settings.compute_temp_files_per_cu)}
        if ep.type is model.EndpointType.READ_ONLY:
            replica = replicas.replica_spec(plane, project, ep, install, user)
            return dataclasses.replace(replica, limits=limits, gucs={**replica.gucs, **capped})
        logical = {"wal_level": "logical"} if project.settings.enable_logical_replication else {}
        sized = gucs_for_cu(ep.autoscaling_limit_max_cu, limits.memory_bytes)  # buffers fit its minimum
        gucs = plane.compute_gucs(project.pg_version, sized | dict(ep.pg_settings)
                                  | retention.archive_settings(plane, project, ep.branch_id) | logical)
        return ComputeSpec(endpoint_id=ep.id, install=install, pgdata=plane.layout.pgdata(project.id, ep.branch_id),
                           socket_dir=plane.layout.socket_dir(ep.id),
                           log_file=plane.layout.compute_log(project.id, ep.branch_id),
                           user=user, gucs={**gucs, **capped}, argon_os_user=plane.os_user, limits=limits)

    async def reconfigure(self, old: model.Endpoint, new: model.Endpoint) -> bool:
        """Give a running compute `new`'s settings now where a reload can (its `postgresql.conf`
        rewritten, read back by Postgres, then reloaded); settings only a start applies wait for the
        next start. A value the compute refuses puts `old`'s file back and is a UserError. False:
        the compute is not running."""
        session = self.plane.computes.admin(new.id)
        if session is None:
            return False
        await asyncio.to_thread(rewrite_conf, self.spec(new))
        refused = await session.fetchall(
            "SELECT f.name, f.error FROM pg_file_settings f LEFT JOIN pg_settings s ON s.name = f.name "
            "WHERE f.error IS NOT NULL AND coalesce(s.context, '') <> 'postmaster'", timeout=10)
        if refused:
            await asyncio.to_thread(rewrite_conf, self.spec(old))
            raise UserError("pg_settings: the compute refused " + "; ".join(f"{n} ({e})" for n, e in refused))
        await session.fetchone("SELECT pg_reload_conf()", timeout=10)
        return True

    def identify(self, ep: model.Endpoint) -> LeftRunning | None:
        """The compute a previous argon left running for `ep`, if its identity checks out (process,
        data directory, user: `ComputeManager.identify`, which also puts it in its cgroup). Blocking;
        nothing of the view or the lifecycle changes: start-up runs these in threads, several at
        once. It reads the view (immutable records, by key) and the branch's history (the spec's
        archive settings)."""
        try:
            compute = self.spec(ep)
        except Exception:  # no binaries for it, an unreadable history: it is started afresh when needed
            return None
        found = self.plane.computes.identify(compute)
        if found is None:
            return None
        return LeftRunning(compute, found, spec_pending=self.plane.intents.has(spec_key(ep.id)))

    def take_over(self, ep: model.Endpoint, found: LeftRunning) -> bool:
        """On the loop: run `found` as `ep`'s compute. It kept its own roles: no spec to apply (unless
        a crashed argon started it and never gave it its spec); they are synced at its next stop."""
        if self.plane.computes.adopt(found.compute, found.found) is None:
            return False
        if not found.spec_pending:
            self._needs_spec.discard(ep.id)
        return True

    def adopt(self, ep: model.Endpoint) -> bool:
        """`identify`, then `take_over` (blocking: for one endpoint at a time)."""
        found = self.identify(ep)
        return found is not None and self.take_over(ep, found)

    # Start ------------------------------------------------------------------------------------------

    async def ensure_running(self, endpoint_id: str, *, reason: str = "wake") -> ComputeAddress:
        """Start the endpoint's compute if needed. Single-flight: concurrent callers share one start,
        and a caller arriving during a suspend waits for it, then starts the compute again."""
        plane = self.plane
        ep = plane.endpoint(None, endpoint_id)
        if ep.disabled:
            raise ArgonError("Control plane request failed: endpoint is disabled", kind=NotFound.kind)
        socket = str(plane.layout.socket_path(endpoint_id))
        lock = plane.endpoint_lock(endpoint_id)
        if not lock.locked() and plane.is_running(endpoint_id) and endpoint_id not in self._needs_spec:
            return ComputeAddress(socket_path=socket)  # the hot path: up, spec applied, nothing in flight
        with logs.bound(project_id=ep.project_id, branch_id=ep.branch_id, endpoint_id=endpoint_id):
            return await self._start(endpoint_id, socket, lock, reason)

    async def _start(self, endpoint_id: str, socket: str, lock: asyncio.Lock, reason: str) -> ComputeAddress:
        plane = self.plane
        async with lock:
            if plane.is_running(endpoint_id) and endpoint_id not in self._needs_spec:
                return ComputeAddress(socket_path=socket)
            ep = plane.endpoint(None, endpoint_id)
            started = time.monotonic()
            try:
                if self.restorer is not None and self.restorer.is_pending(ep.branch_id):
                    await self.restorer.ensure(ep.branch_id, reason=reason)  # its data first (ADR 0032)
                await self._ensure_history(ep)
                if ep.type is model.EndpointType.READ_ONLY:
                    await replicas.ensure_replica_data(plane, ep)
                compute = self.spec(ep)
                if ep.type is model.EndpointType.READ_WRITE:
                    self._in_step.pop(ep.branch_id, None)  # SQL may change its roles from now on
                if not plane.is_running(endpoint_id):  # a postmaster left by a crashed argon?
                    await self._adopt_left_behind(ep, compute)
                await plane.computes.start(compute)
                if endpoint_id in self._needs_spec:
                    await failpoint_async("compute.start.before_spec")
                    await spec.apply_spec(plane, ep, compute)
                    self._needs_spec.discard(endpoint_id)
                    await asyncio.to_thread(plane.intents.remove, spec_key(endpoint_id))
                    await failpoint_async("compute.start.after_spec")
            except ComputeStartError as exc:
                plane.telemetry.start_failures.labels(*compute_labels(ep)).inc()
                log.error("compute %s failed to start: %s", endpoint_id, exc.user_message)
                with contextlib.suppress(Exception):
                    await plane.computes.stop(endpoint_id, mode="immediate")
                plane.spawn(self._after_failed_start(ep, exc.user_message), "recording a failed start")
                raise ComputeError("Couldn't connect to compute node") from exc
            elapsed = time.monotonic() - started
            plane.telemetry.wakes.labels(*compute_labels(ep)).inc()
            plane.telemetry.cold_start.observe(elapsed)
            now = model.utcnow()
            # the record as it is now, not as it was when the start began: a PATCH that landed during
            # the start (a new suspend timeout, new limits) must not be written over; a deleted one stays gone
            current = plane.find_endpoint(endpoint_id)
            ep = (current or ep).replace(current_state=model.ComputeState.ACTIVE, pending_state=None,
                                         started_at=now, last_active=now)
            if current is not None:
                plane.commit_soon(put=[ep], what="recording a start")
            plane.activity.touch(endpoint_id)
            log.info("compute %s started in %.0f ms (%s)", endpoint_id, elapsed * 1000, reason)
            plane.spawn(plane.add_event(ep.id, model.EventKind.WAKE, duration_ms=elapsed * 1000, detail=reason),
                        "recording a wake")
            return ComputeAddress(socket_path=socket, cold_start=True)

    async def _adopt_left_behind(self, ep: model.Endpoint, compute: ComputeSpec) -> None:
        """Adopt the postmaster a crashed argon started, waiting while it is still starting (a crash
        recovery), rather than failing on "another postmaster is still running"."""
        deadline = time.monotonic() + LEFT_BEHIND_WAIT
        while not self.adopt(ep) and await asyncio.to_thread(postmaster.alive_on, compute.pgdata):
            if time.monotonic() > deadline:
                return  # the start reports it
            await asyncio.sleep(0.1)

    async def _after_failed_start(self, ep: model.Endpoint, message: str) -> None:
        """The start failed: its event, and a failed `start_compute` operation (nobody else can record
        it: the caller only sees the error)."""
        await self.plane.add_event(ep.id, model.EventKind.START_FAILED, detail=message[-2000:])
        await self.plane.record(ep.project_id, model.OperationAction.START_COMPUTE, branch_id=ep.branch_id,
                                endpoint_id=ep.id, status=model.OperationStatus.FAILED, error=message[-2000:])

    async def _ensure_history(self, ep: model.Endpoint) -> None:
        """A branch without history (data from before history existed, or retention raised from 0)
        gets its base snapshot before its compute starts."""
        plane = self.plane
        project = plane.project(ep.project_id)
        if not retention.enabled(project) or ep.type is not model.EndpointType.READ_WRITE:
            return
        if retention.branch_history(plane, project.id, ep.branch_id).exists():
            return
        pgdata = plane.layout.pgdata(project.id, ep.branch_id)
        if project.pg_version not in plane.installs or not safefs.lexists(pgdata / "PG_VERSION"):
            return
        try:
            await asyncio.to_thread(retention.begin_epoch, plane, project, ep.branch_id, pgdata,
                                    reason="history started", fresh=True)
        except Exception as exc:  # history is a feature, starting the compute is the job
            log.warning("could not start the history of branch %s: %s", ep.branch_id, exc)

    # Stop -------------------------------------------------------------------------------------------

    async def stop(self, endpoint_id: str, *, reason: str, mode: str = "fast", project_locked: bool = False,
                   sync: bool = True) -> bool:
        """Suspend: stop the compute (if running) and mark the endpoint idle. Returns True if it ran.
        `project_locked`: the caller holds the project lock (and changes no role or database).
        `sync=False`: what SQL changed is not read back first (its branch is about to be deleted)."""
        async with self.plane.endpoint_lock(endpoint_id):
            return await self.stop_locked(endpoint_id, reason=reason, mode=mode, project_locked=project_locked,
                                          sync=sync)

    async def stop_locked(self, endpoint_id: str, *, reason: str, mode: str = "fast",
                          project_locked: bool = False, sync: bool = True) -> bool:
        """`stop`, for a caller that holds the endpoint lock already."""
        plane = self.plane
        ep = plane.endpoint(None, endpoint_id)
        with logs.bound(project_id=ep.project_id, branch_id=ep.branch_id, endpoint_id=endpoint_id):
            return await self._stop_locked(ep, reason=reason, mode=mode, project_locked=project_locked, sync=sync)

    async def _stop_locked(self, ep: model.Endpoint, *, reason: str, mode: str, project_locked: bool,
                           sync: bool = True) -> bool:
        plane = self.plane
        endpoint_id = ep.id
        was_running = plane.is_running(endpoint_id)
        started = time.monotonic()
        if was_running:
            synced = False
            if ep.type is model.EndpointType.READ_WRITE and sync:  # a replica holds no changes of its own
                synced = await self._sync_before_stop(ep, project_locked=project_locked)
            await failpoint_async("compute.suspend.after_sync")
            self._stopping.add(endpoint_id)
            # the transaction pools close their idle server connections first, so no pooled client
            # is handed one that is about to die; they wake the compute again once it is down (ADR 0017)
            await plane.activity.quiesce(endpoint_id, force=True)
            try:
                await plane.computes.stop(endpoint_id, mode=mode)  # closes its admin session first
            finally:
                self._stopping.discard(endpoint_id)
                plane.activity.resume(endpoint_id)
            await failpoint_async("compute.suspend.after_stop")
            if synced and plane.find_endpoint(endpoint_id) is not None:
                self.enter_step(ep.branch_id)  # stopped as synced: what the cluster holds, the store says
            if mode != "immediate":
                await self._after_stop_history(ep)
            if self.backup is not None:
                self.backup.nudge()
        if ep.current_state is model.ComputeState.ACTIVE or was_running:
            now = model.utcnow()
            current = plane.find_endpoint(endpoint_id)  # as it is now (a PATCH may have landed meanwhile)
            if current is not None:
                await plane.commit(put=[current.replace(current_state=model.ComputeState.IDLE, pending_state=None,
                                                        suspended_at=now)])
            if was_running:
                plane.telemetry.suspends.labels(*compute_labels(ep)).inc()
                log.info("compute %s suspended (%s)", endpoint_id, reason)
                await plane.add_event(ep.id, model.EventKind.SUSPEND, at=now,
                                      duration_ms=(time.monotonic() - started) * 1000, detail=reason)
        return was_running

    async def retire(self, endpoint_id: str, *, reason: str, mode: str = "fast", project_locked: bool = False) -> bool:
        """The endpoint is being deleted: stop its compute and forget what the lifecycle knew of it."""
        ran = await self.stop(endpoint_id, reason=reason, mode=mode, project_locked=project_locked)
        self._needs_spec.discard(endpoint_id)
        await asyncio.to_thread(self.plane.intents.remove, spec_key(endpoint_id))
        return ran

    async def _sync_before_stop(self, ep: model.Endpoint, *, project_locked: bool) -> bool:
        """Pick up roles and databases changed through SQL before the compute goes away; skipped when
        another API mutation of the project is in flight (it knows what it changes, and holds the project
        lock). `project_locked`: the caller is that mutation, and one that changes no role or database
        (an endpoint deleted or disabled, a branch restored): it syncs, or what SQL made would be lost.
        Returns whether it synced: then the store's roles and databases are the compute's."""
        if not project_locked and self.plane.project_busy(ep.project_id):
            return False
        if ep.id in self._needs_spec:  # it never got the platform's spec: what it says is stale
            return False
        if self.plane.computes.admin(ep.id) is None:  # nothing to read it from
            return False
        try:
            await spec.sync_from_compute(self.plane, ep)
        except Exception as exc:  # never block a suspend on this
            log.warning("could not sync roles and databases of %s before stopping it: %s", ep.id, exc)
            return False
        return True

    async def _after_stop_history(self, ep: model.Endpoint) -> None:
        plane = self.plane
        if not plane.has_project(ep.project_id) or ep.type is not model.EndpointType.READ_WRITE:
            return
        project = plane.project(ep.project_id)
        try:
            await asyncio.to_thread(retention.after_stop, plane, project, ep.branch_id)
        except Exception as exc:
            log.warning("could not snapshot or prune the history of branch %s: %s", ep.branch_id, exc)

    def _exited(self, endpoint_id: str, returncode: int | None) -> None:
        """A compute exited without being asked to (crash, OOM kill, kill -9): mark it idle; the next
        connection starts it again."""
        ep = self.plane.find_endpoint(endpoint_id)
        if endpoint_id in self._stopping or ep is None:
            return
        usage = self.plane.computes.usage(endpoint_id)  # its cgroup is removed only after this call
        limits = self.plane.computes.limits(endpoint_id)
        oom = ""
        if usage is not None and usage.oom_kills and limits is not None:
            oom = f"; out of memory at its limit of {limits.memory_bytes / 2**30:.2f} GiB"
        log.warning("compute %s exited unexpectedly (status %s%s); it will start again on the next connection",
                    endpoint_id, returncode, oom)
        self.plane.telemetry.suspends.labels(*compute_labels(ep)).inc()
        if ep.current_state is model.ComputeState.ACTIVE:
            now = model.utcnow()
            with contextlib.suppress(RuntimeError):  # no running loop: argon is shutting down
                self.plane.commit_soon(put=[ep.replace(current_state=model.ComputeState.IDLE, suspended_at=now)],
                                       what="recording a compute exit")
                self.plane.spawn(self.plane.add_event(ep.id, model.EventKind.SUSPEND, at=now,
                                                      detail=f"exited unexpectedly ({returncode}{oom})"),
                                 "recording a compute exit")

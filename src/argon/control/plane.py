"""The control plane's core: the in-memory view of desired state, locks, and wake/stop of computes.

Policy lives here and in its sibling modules (projects, endpoints, suspend, reconcile); mechanism
(processes, files) is delegated to `argon.compute` and `argon.storage`. The metadata store is only
touched from one worker thread (`db()`), never on the event loop. Routing data the proxy needs on
every connection (endpoints, role verifiers) is served from memory and updated on every change.

`ControlPlane` implements the proxy's `ControlClient` seam.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pwd
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from argon import model, safefs
from argon.compute.admin import connect_admin
from argon.compute.binaries import PgInstall
from argon.compute.extensions import ExtensionSupport
from argon.compute.manager import ComputeManager, ComputeSpec
from argon.compute.osuser import OsUser
from argon.compute.params import gucs_for_cu
from argon.compute.pgconf import BASE_SETTINGS
from argon.compute.postmaster import ComputeStartError
from argon.control.secrets import Secrets
from argon.errors import ArgonError, ComputeError, Locked, NotFound
from argon.metadata.store import Store
from argon.proxy.activity import ActivityRegistry
from argon.proxy.control_client import ComputeAddress
from argon.settings import Settings
from argon.storage.clone import CloneBackend
from argon.storage.layout import Layout
from argon.storage.spares import SparePool

log = logging.getLogger(__name__)
T = TypeVar("T")

_UNKNOWN = object()
LOCK_TIMEOUT = 30.0  # seconds a mutation waits for another one on the same project before 423


def argon_os_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # pragma: no cover - argon itself always runs as a named user
        return str(os.getuid())


class ControlPlane:
    def __init__(self, *, settings: Settings, layout: Layout, store: Store, installs: dict[int, PgInstall],
                 backend: CloneBackend, secrets: Secrets, activity: ActivityRegistry,
                 computes: ComputeManager | None = None) -> None:
        self.settings = settings
        self.layout = layout
        self.store = store
        self.installs = installs
        self.backend = backend
        self.secrets = secrets
        self.activity = activity
        self.spares = SparePool(layout.spares_dir, backend, settings.spare_clusters)
        self.computes = computes or ComputeManager(on_exit=self._on_compute_exit)
        self.os_user = argon_os_user()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="argon-store")
        self._projects: dict[str, model.Project] = {}
        self._branches: dict[str, model.Branch] = {}
        self._endpoints: dict[str, model.Endpoint] = {}
        self._verifiers: dict[tuple[str, str], str] = {}  # (branch_id, role) -> SCRAM verifier
        self._endpoint_locks: dict[str, asyncio.Lock] = {}
        self._project_locks: dict[str, asyncio.Lock] = {}
        self._verifier_conns: dict[str, psycopg.AsyncConnection] = {}  # endpoint -> idle admin session
        self._verifier_locks: dict[str, asyncio.Lock] = {}
        self._needs_spec: set[str] = set()  # endpoints whose next start must apply roles/databases
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping: set[str] = set()
        self.templates: dict[int, Path] = {}  # Postgres major -> pristine template pgdata
        self.initdb_settings: dict[int, dict[str, str]] = {}  # Postgres major -> what initdb wrote (template.py)
        self.extensions: dict[int, ExtensionSupport] = {}  # Postgres major -> the allow-list it honours
        self.clock: Callable[[], datetime] = model.utcnow  # history windows and snapshot times (tests move it)
        from argon.control.figures import Figures

        self.figures = Figures()
        from argon.control.metrics import MetricsSampler

        self.metrics = MetricsSampler(self)  # started by the platform next to the suspend monitor
        from argon.control.apikeys import ApiKeys

        self.api_keys = ApiKeys(self)

    # Plumbing -------------------------------------------------------------------------------------

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store call on the store's own thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def spawn(self, coro: Any, what: str) -> asyncio.Task[Any]:
        """Background work whose failure is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                msg = exc.user_message if isinstance(exc, ArgonError) else repr(exc)
                log.error("%s failed: %s", what, msg, exc_info=not isinstance(exc, ArgonError))

        task.add_done_callback(done)
        return task

    async def drain(self) -> None:
        """Wait for background bookkeeping (tests and shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def load(self) -> None:
        """Fill the in-memory view from the store (at start-up)."""
        projects = await self.db(self.store.list_projects)
        for project in projects:
            self._projects[project.id] = project
            for branch in await self.db(self.store.list_branches, project.id):
                self._branches[branch.id] = branch
                for role in await self.db(self.store.list_roles, branch.id):
                    if role.verifier:
                        self._verifiers[(branch.id, role.name)] = role.verifier
            for ep in await self.db(self.store.list_endpoints, project.id):
                self._endpoints[ep.id] = ep
                self._needs_spec.add(ep.id)
        await self.api_keys.load()

    async def close(self) -> None:
        await self.metrics.stop()
        for endpoint_id in list(self._verifier_conns):
            await self._close_verifier_conn(endpoint_id)
        await self.drain()
        self._executor.shutdown(wait=True)

    # The in-memory view ----------------------------------------------------------------------------

    def project(self, project_id: str) -> model.Project:
        project = self._projects.get(project_id)
        if project is None:
            raise NotFound(f"project {project_id!r} not found")
        return project

    def projects(self) -> list[model.Project]:
        return sorted(self._projects.values(), key=lambda p: (p.created_at, p.id))

    def branch(self, project_id: str, branch_id: str) -> model.Branch:
        branch = self._branches.get(branch_id)
        if branch is None or branch.project_id != project_id:
            raise NotFound(f"branch {branch_id!r} not found in project {project_id!r}")
        return branch

    def branches(self, project_id: str) -> list[model.Branch]:
        return sorted((b for b in self._branches.values() if b.project_id == project_id),
                      key=lambda b: (b.created_at, b.id))

    def endpoint(self, project_id: str | None, endpoint_id: str) -> model.Endpoint:
        ep = self._endpoints.get(endpoint_id)
        if ep is None or (project_id is not None and ep.project_id != project_id):
            raise NotFound(f"endpoint {endpoint_id!r} not found")
        return ep

    def endpoints(self, project_id: str | None = None, branch_id: str | None = None) -> list[model.Endpoint]:
        eps = [e for e in self._endpoints.values()
               if (project_id is None or e.project_id == project_id) and (branch_id is None or e.branch_id == branch_id)]
        return sorted(eps, key=lambda e: (e.created_at, e.id))

    def remember(self, obj: Any) -> None:
        """Update the in-memory view after the store accepted a write."""
        if isinstance(obj, model.Project):
            self._projects[obj.id] = obj
        elif isinstance(obj, model.Branch):
            self._branches[obj.id] = obj
        elif isinstance(obj, model.Endpoint):
            self._endpoints[obj.id] = obj
        elif isinstance(obj, model.Role):
            if obj.verifier and obj.login:
                self._verifiers[(obj.branch_id, obj.name)] = obj.verifier
            else:
                self._verifiers.pop((obj.branch_id, obj.name), None)

    def forget_project(self, project_id: str) -> None:
        self._projects.pop(project_id, None)
        for bid in [b for b, br in self._branches.items() if br.project_id == project_id]:
            del self._branches[bid]
            for key in [k for k in self._verifiers if k[0] == bid]:
                del self._verifiers[key]
        for eid in [e for e, ep in self._endpoints.items() if ep.project_id == project_id]:
            self.forget_endpoint(eid)

    def forget_branch(self, branch_id: str) -> None:
        self._branches.pop(branch_id, None)
        for key in [k for k in self._verifiers if k[0] == branch_id]:
            del self._verifiers[key]

    def forget_endpoint(self, endpoint_id: str) -> None:
        self._endpoints.pop(endpoint_id, None)
        self._endpoint_locks.pop(endpoint_id, None)
        self._needs_spec.discard(endpoint_id)
        self.activity.forget(endpoint_id)

    async def save(self, *objs: Any) -> None:
        """Persist objects atomically, then update the view."""
        def write() -> None:
            with self.store.transaction():
                for obj in objs:
                    self.store.put(obj)
        await self.db(write)
        for obj in objs:
            self.remember(obj)

    @contextlib.asynccontextmanager
    async def project_lock(self, project_id: str) -> AsyncIterator[None]:
        """Serialise mutations of one project; a caller that waits too long gets 423 (retry later)."""
        lock = self._project_locks.setdefault(project_id, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), LOCK_TIMEOUT)
        except TimeoutError:
            raise Locked("project already has running operations, please retry later") from None
        try:
            yield
        finally:
            lock.release()

    def mark_needs_spec(self, endpoint_id: str) -> None:
        """The endpoint's next start must apply the platform's roles and databases."""
        self._needs_spec.add(endpoint_id)

    def endpoint_lock(self, endpoint_id: str) -> asyncio.Lock:
        return self._endpoint_locks.setdefault(endpoint_id, asyncio.Lock())

    async def record(self, project_id: str, action: model.OperationAction, *, branch_id: str | None = None,
                     endpoint_id: str | None = None, started: float | None = None,
                     status: model.OperationStatus = model.OperationStatus.FINISHED,
                     error: str | None = None) -> model.Operation:
        from argon import ids

        now = model.utcnow()
        duration = int((time.monotonic() - started) * 1000) if started is not None else 0
        op = model.Operation(id=ids.operation_id(), project_id=project_id, action=action, status=status,
                             created_at=now, updated_at=now, branch_id=branch_id, endpoint_id=endpoint_id,
                             error=error, failures_count=1 if error else 0, total_duration_ms=duration)
        await self.db(self.store.put, op)
        return op

    # Computes ------------------------------------------------------------------------------------------

    def compute_spec(self, ep: model.Endpoint) -> ComputeSpec:
        project = self._projects[ep.project_id]
        install = self.installs.get(project.pg_version)
        if install is None:
            raise ComputeError(f"PostgreSQL {project.pg_version} binaries are not available on this machine; "
                               f"install them or set ARGON_PG_BINDIRS", retryable=False)
        user = OsUser(project.os_uid, project.os_uid) if project.os_uid is not None else None
        if ep.type is model.EndpointType.READ_ONLY:
            from argon.control.replicas import replica_spec

            return replica_spec(self, project, ep, install, user)
        from argon.control.history import archive_settings

        gucs = self.compute_gucs(project.pg_version, gucs_for_cu(ep.autoscaling_limit_max_cu) | dict(ep.pg_settings)
                                 | archive_settings(self, project, ep.branch_id))
        return ComputeSpec(endpoint_id=ep.id, install=install,
                           pgdata=self.layout.pgdata(project.id, ep.branch_id),
                           socket_dir=self.layout.socket_dir(ep.id),
                           log_file=self.layout.compute_log(project.id, ep.branch_id),
                           user=user, gucs=gucs, argon_os_user=self.os_user)

    def compute_gucs(self, pg_version: int, gucs: Mapping[str, str], *, serving: bool = True) -> dict[str, str]:
        """A compute's settings: what initdb wrote for its version (under Argon's base settings), then
        `gucs`, then the platform's extension settings, which nothing overrides. `serving` False: a
        platform-internal run (recovery, schema restores) that loads the same libraries (`CREATE
        EXTENSION pg_cron` needs pg_cron preloaded) but runs no pg_cron job."""
        platform = dict(self.extensions[pg_version].gucs) if pg_version in self.extensions else {}
        if not serving and "cron.max_running_jobs" in platform:
            platform["cron.max_running_jobs"] = "0"
        initdb = {k: v for k, v in self.initdb_settings.get(pg_version, {}).items() if k not in BASE_SETTINGS}
        return initdb | dict(gucs) | platform

    def is_running(self, endpoint_id: str) -> bool:
        pm = self.computes.get(endpoint_id)
        return pm is not None and pm.alive

    async def ensure_running(self, endpoint_id: str, *, reason: str = "wake") -> ComputeAddress:
        """Start the endpoint's compute if needed. Single-flight: concurrent callers share one start,
        and a caller arriving during a suspend waits for it, then starts the compute again."""
        ep = self.endpoint(None, endpoint_id)
        if ep.disabled:
            raise ArgonError("Control plane request failed: endpoint is disabled", kind=NotFound.kind)
        socket = str(self.layout.socket_path(endpoint_id))
        lock = self.endpoint_lock(endpoint_id)
        if not lock.locked() and self.is_running(endpoint_id) and endpoint_id not in self._needs_spec:
            return ComputeAddress(socket_path=socket)  # the hot path: up, spec applied, nothing in flight
        async with lock:
            if self.is_running(endpoint_id) and endpoint_id not in self._needs_spec:
                return ComputeAddress(socket_path=socket)
            ep = self.endpoint(None, endpoint_id)
            started = time.monotonic()
            try:
                await self._ensure_history(ep)
                if ep.type is model.EndpointType.READ_ONLY:
                    from argon.control.replicas import ensure_replica_data

                    await ensure_replica_data(self, ep)
                spec = self.compute_spec(ep)
                await self.computes.start(spec)
                if endpoint_id in self._needs_spec:
                    from argon.control.spec import apply_spec

                    await apply_spec(self, ep, spec)
                    self._needs_spec.discard(endpoint_id)
            except ComputeStartError as exc:
                log.error("compute %s failed to start: %s", endpoint_id, exc.user_message)
                with contextlib.suppress(Exception):
                    await self.computes.stop(endpoint_id, mode="immediate")
                self.spawn(self._after_failed_start(ep, exc.user_message), "recording a failed start")
                raise ComputeError("Couldn't connect to compute node") from exc
            elapsed = time.monotonic() - started
            now = model.utcnow()
            ep = ep.replace(current_state=model.ComputeState.ACTIVE, pending_state=None, started_at=now,
                            last_active=now)
            self.remember(ep)
            self.activity.touch(endpoint_id)
            log.info("compute %s started in %.0f ms (%s)", endpoint_id, elapsed * 1000, reason)
            self.spawn(self._after_start(ep, started, elapsed, reason), "recording a start")
            return ComputeAddress(socket_path=socket, cold_start=True)

    async def _after_start(self, ep: model.Endpoint, started: float, elapsed: float, reason: str) -> None:
        await self.db(self.store.put, self.endpoint(None, ep.id))
        await self.db(self.store.add_event, model.Event(endpoint_id=ep.id, kind=model.EventKind.WAKE,
                                                        at=model.utcnow(), duration_ms=elapsed * 1000, detail=reason))
        await self.record(ep.project_id, model.OperationAction.START_COMPUTE, branch_id=ep.branch_id,
                          endpoint_id=ep.id, started=started)

    async def _after_failed_start(self, ep: model.Endpoint, message: str) -> None:
        await self.db(self.store.add_event, model.Event(endpoint_id=ep.id, kind=model.EventKind.START_FAILED,
                                                        at=model.utcnow(), detail=message[-2000:]))
        await self.record(ep.project_id, model.OperationAction.START_COMPUTE, branch_id=ep.branch_id,
                          endpoint_id=ep.id, status=model.OperationStatus.FAILED, error=message[-2000:])

    async def stop_compute(self, endpoint_id: str, *, reason: str, mode: str = "fast",
                           record: bool = True) -> bool:
        """Suspend: stop the compute (if running) and mark the endpoint idle. Returns True if it ran."""
        async with self.endpoint_lock(endpoint_id):
            return await self.stop_compute_locked(endpoint_id, reason=reason, mode=mode, record=record)

    async def stop_compute_locked(self, endpoint_id: str, *, reason: str, mode: str = "fast",
                                  record: bool = True) -> bool:
        ep = self.endpoint(None, endpoint_id)
        was_running = self.is_running(endpoint_id)
        started = time.monotonic()
        if was_running:
            if ep.type is model.EndpointType.READ_WRITE:  # a replica holds no changes of its own
                await self._sync_before_stop(ep)
            self._stopping.add(endpoint_id)
            await self._close_verifier_conn(endpoint_id)
            await self.metrics.release(endpoint_id)
            try:
                await self.computes.stop(endpoint_id, mode=mode)
            finally:
                self._stopping.discard(endpoint_id)
            if mode != "immediate":
                await self._after_stop_history(ep)
        if ep.current_state is model.ComputeState.ACTIVE or was_running:
            now = model.utcnow()
            ep = ep.replace(current_state=model.ComputeState.IDLE, pending_state=None, suspended_at=now)
            await self.save(ep)
            if was_running:
                log.info("compute %s suspended (%s)", endpoint_id, reason)
                await self.db(self.store.add_event, model.Event(
                    endpoint_id=ep.id, kind=model.EventKind.SUSPEND, at=now,
                    duration_ms=(time.monotonic() - started) * 1000, detail=reason))
                if record:
                    await self.record(ep.project_id, model.OperationAction.SUSPEND_COMPUTE, branch_id=ep.branch_id,
                                      endpoint_id=ep.id, started=started)
        return was_running

    async def _ensure_history(self, ep: model.Endpoint) -> None:
        """A branch without history (data from before history existed, or retention raised from 0)
        gets its base snapshot before its compute starts."""
        from argon.control import history

        project = self._projects[ep.project_id]
        if not history.enabled(project) or ep.type is not model.EndpointType.READ_WRITE:
            return
        if history.branch_history(self, project.id, ep.branch_id).exists():
            return
        pgdata = self.layout.pgdata(project.id, ep.branch_id)
        if project.pg_version not in self.installs or not safefs.lexists(pgdata / "PG_VERSION"):
            return
        try:
            await asyncio.to_thread(history.begin_epoch, self, project, ep.branch_id, pgdata,
                                    reason="history started", fresh=True)
        except Exception as exc:  # history is a feature, starting the compute is the job
            log.warning("could not start the history of branch %s: %s", ep.branch_id, exc)

    async def _after_stop_history(self, ep: model.Endpoint) -> None:
        from argon.control import history

        project = self._projects.get(ep.project_id)
        if project is None or ep.type is not model.EndpointType.READ_WRITE:
            return
        try:
            await asyncio.to_thread(history.after_stop, self, project, ep.branch_id)
        except Exception as exc:
            log.warning("could not snapshot or prune the history of branch %s: %s", ep.branch_id, exc)

    async def _sync_before_stop(self, ep: model.Endpoint) -> None:
        """Pick up roles and databases changed through SQL before the compute goes away; skipped when an
        API mutation of the project is in flight (it knows what it changes, and holds the project lock)."""
        lock = self._project_locks.get(ep.project_id)
        if lock is not None and lock.locked():
            return
        from argon.control.spec import sync_from_compute

        try:
            await sync_from_compute(self, ep)
        except Exception as exc:  # never block a suspend on this
            log.warning("could not sync roles and databases of %s before stopping it: %s", ep.id, exc)

    def _on_compute_exit(self, endpoint_id: str, returncode: int | None) -> None:
        """A compute exited without being asked to (crash, OOM kill, kill -9): mark it idle; the next
        connection starts it again."""
        if endpoint_id in self._stopping or endpoint_id not in self._endpoints:
            return
        log.warning("compute %s exited unexpectedly (status %s); it will start again on the next connection",
                    endpoint_id, returncode)
        ep = self._endpoints[endpoint_id]
        if ep.current_state is model.ComputeState.ACTIVE:
            now = model.utcnow()
            ep = ep.replace(current_state=model.ComputeState.IDLE, suspended_at=now)
            self.remember(ep)
            with contextlib.suppress(RuntimeError):
                self.spawn(self._after_crash(ep, returncode), "recording a compute exit")

    async def _after_crash(self, ep: model.Endpoint, returncode: int | None) -> None:
        await self.db(self.store.put, ep)
        await self.db(self.store.add_event, model.Event(endpoint_id=ep.id, kind=model.EventKind.SUSPEND,
                                                        at=model.utcnow(), detail=f"exited unexpectedly ({returncode})"))

    # ControlClient (the proxy's seam) ------------------------------------------------------------------

    async def get_role_secret(self, endpoint_id: str, role: str) -> str | None:
        """The verifier the proxy checks a login against. For a running compute it is read live from
        `pg_authid` (one indexed lookup on an idle admin session, ~0.2 ms), so a password changed
        through SQL works at once; otherwise the copy synced when the compute last stopped."""
        ep = self._endpoints.get(endpoint_id.removesuffix("-pooler"))
        if ep is None or role == model.PLATFORM_ROLE:
            return None
        settled = ep.id not in self._needs_spec and not self.endpoint_lock(ep.id).locked()  # no start/stop under way
        if settled and self.is_running(ep.id):
            live = await self._live_verifier(ep, role)
            if live is not _UNKNOWN:
                if live is None:
                    self._verifiers.pop((ep.branch_id, role), None)
                else:
                    self._verifiers[(ep.branch_id, role)] = live
                return live
        return self._verifiers.get((ep.branch_id, role))

    async def _live_verifier(self, ep: model.Endpoint, role: str) -> str | object | None:
        """`pg_authid`'s verifier of a login role, None if there is none, `_UNKNOWN` if unreadable."""
        lock = self._verifier_locks.setdefault(ep.id, asyncio.Lock())
        async with lock:
            conn = self._verifier_conns.get(ep.id)
            try:
                if conn is None or conn.closed:
                    conn = await asyncio.wait_for(connect_admin(self.layout.socket_dir(ep.id)), 2)
                    self._verifier_conns[ep.id] = conn
                cur = await asyncio.wait_for(conn.execute(
                    "SELECT rolpassword FROM pg_authid WHERE rolname = %s AND rolcanlogin "
                    "AND (rolvaliduntil IS NULL OR rolvaliduntil > now())", (role,)), 2)
                row = await cur.fetchone()
            except Exception as exc:
                log.debug("live verifier lookup on %s failed: %s", ep.id, exc)
                await self._close_verifier_conn(ep.id)
                return _UNKNOWN
        if row is None or not row[0] or not str(row[0]).startswith("SCRAM-SHA-256$"):
            return None
        return str(row[0])

    async def _close_verifier_conn(self, endpoint_id: str) -> None:
        conn = self._verifier_conns.pop(endpoint_id, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def refresh_role_secret(self, endpoint_id: str, role: str) -> str | None:
        from argon.control.spec import sync_verifier

        ep = self._endpoints.get(endpoint_id.removesuffix("-pooler"))
        if ep is None or role == model.PLATFORM_ROLE:
            return None
        if self.is_running(ep.id):
            with contextlib.suppress(Exception):
                await sync_verifier(self, ep, role)
        return self._verifiers.get((ep.branch_id, role))

    async def wake(self, endpoint_id: str) -> ComputeAddress:
        endpoint_id = endpoint_id.removesuffix("-pooler")
        if endpoint_id not in self._endpoints:
            raise ArgonError("Control plane request failed: endpoint cannot be found", kind=NotFound.kind)
        return await self.ensure_running(endpoint_id)

    def endpoint_exists(self, endpoint_id: str) -> bool:
        return endpoint_id.removesuffix("-pooler") in self._endpoints

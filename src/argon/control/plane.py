"""The control plane's core: the in-memory view of the platform and the plumbing to the store.

The view holds what the metadata store says (projects, branches, endpoints, the verifiers of login
roles) and what runs (the compute layer's `ComputeManager`, the proxy's session activity), so every
read on the hot path (the proxy's routing and SCRAM, the suspend monitor, API reads) is a dict
lookup. The store is only touched from one worker thread (`db()`), never on the event loop.

Every change of the view goes through the unit of work, `commit(put=..., delete=...)`: one store
transaction, then the same change in the view, so the two cannot drift apart. The wake path, which
must not wait for a disk write, uses `commit_soon`: the view at once, the store right behind it.

Besides the view: per-project and per-endpoint locks, operations (`record`), and background tasks
whose failures are logged (`spawn`). Policy lives in the sibling modules; this module imports none
of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import pwd
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from argon import ids, model
from argon.compute.binaries import PgInstall
from argon.compute.cgroups import Limits
from argon.compute.extensions import ExtensionSupport
from argon.compute.manager import ComputeManager
from argon.compute.params import gucs_for_cu
from argon.compute.pgconf import BASE_SETTINGS
from argon.control import addresses
from argon.control.secrets import Secrets
from argon.control.writes import WriteGate
from argon.errors import ArgonError, Locked, NotFound
from argon.metadata.store import Store
from argon.proxy.activity import ActivityRegistry
from argon.settings import Settings
from argon.storage.branch_spares import BranchSpares
from argon.storage.clone import CloneBackend
from argon.storage.intents import Intents
from argon.storage.layout import Layout
from argon.storage.spares import SparePool
from argon.telemetry import Telemetry, compute_labels

log = logging.getLogger(__name__)
T = TypeVar("T")

LOCK_TIMEOUT = 30.0  # seconds a mutation waits for another one on the same project before 423


class BranchesInCreation:
    """Branches whose data is being made outside the project lock (ADR 0033): their names, taken
    until the metadata commit, and the branches they read, which no operation may change or remove
    meanwhile. In memory only: after a `kill -9` the half-made directory belongs to no branch of the
    metadata, and the reconciler removes it at the next start (the create is rolled back).

    Bookkeeping is synchronous (a cancelled create cannot leave a name taken or a reader counted);
    waiters wait on an event set when a branch's last reader is done."""

    def __init__(self) -> None:
        self._names: dict[str, dict[str, str]] = {}  # project -> {new branch id: its name}
        self._readers: dict[str, list[str]] = {}  # branch read by creates -> the new branches' ids
        self._projects: dict[str, str] = {}  # branch read -> its project
        self._idle: dict[str, asyncio.Event] = {}  # branch read -> set when the last create is done with it
        self._peak: dict[str, int] = {}  # branch read -> the most creates of it at once (its spares)

    def name_taken(self, project_id: str, name: str) -> bool:
        return name in self._names.get(project_id, {}).values()

    def children_of(self, branch_id: str) -> list[str]:
        """The new branches being made from `branch_id` (their names are not committed yet)."""
        project = self._projects.get(branch_id)
        names = self._names.get(project or "", {})
        return [b for b in self._readers.get(branch_id, ()) if b in names]

    def peak(self, branch_id: str) -> int:
        """The most branches made from `branch_id` at once so far (at least 1)."""
        return self._peak.get(branch_id, 1)

    def begin(self, project_id: str, branch_id: str, name: str | None, reads: str) -> None:
        """Under the project lock: `branch_id` called `name` is being made from `reads` (`name`
        None: a spare copy of `reads`, which is only read)."""
        self._readers.setdefault(reads, []).append(branch_id)
        self._projects[reads] = project_id
        self._idle.setdefault(reads, asyncio.Event()).clear()
        if name is not None:
            self._names.setdefault(project_id, {})[branch_id] = name
            self._peak[reads] = max(self._peak.get(reads, 1), len(self.children_of(reads)))

    def done_reading(self, branch_id: str, reads: str) -> None:
        """The new branch's data is made: `reads` may change again (idempotent)."""
        readers = self._readers.get(reads)
        if readers is None or branch_id not in readers:
            return
        readers.remove(branch_id)
        if not readers:
            del self._readers[reads]
            self._projects.pop(reads, None)
            self._idle.pop(reads).set()

    def end(self, project_id: str, branch_id: str, reads: str) -> None:
        """The create committed or failed: its name is free again (or the branch's, in the metadata)."""
        self.done_reading(branch_id, reads)
        names = self._names.get(project_id, {})
        names.pop(branch_id, None)
        if not names:
            self._names.pop(project_id, None)

    async def settled(self, project_id: str, branch_id: str | None = None) -> None:
        """Until no create reads `branch_id` (or, without it, any branch of the project). Called under
        the project lock by what changes or removes a branch's data: no new create can start then."""
        while True:
            waiting = [ev for b, ev in self._idle.items()
                       if (b == branch_id if branch_id is not None else self._projects.get(b) == project_id)]
            if not waiting:
                return
            await asyncio.gather(*(ev.wait() for ev in waiting))


def argon_os_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # pragma: no cover - argon itself always runs as a named user
        return str(os.getuid())


class ControlPlane:
    # Told of every endpoint whose own address (ADR 0031) appears, changes or goes (None): the proxy's
    # listeners follow the view, so an endpoint is reachable at its address once it exists.
    on_endpoint_address: Callable[[str, str | None], None] | None = None

    def __init__(self, *, settings: Settings, layout: Layout, store: Store, installs: dict[int, PgInstall],
                 backend: CloneBackend, secrets: Secrets, activity: ActivityRegistry,
                 computes: ComputeManager | None = None, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self.layout = layout
        self.store = store
        self.installs = installs
        self.backend = backend
        self.secrets = secrets
        self.activity = activity
        self.intents = Intents(layout.intents_dir)  # what interrupted operations meant to do
        self.spares = SparePool(layout.spares_dir, backend, settings.spare_clusters)
        self.branch_spares = BranchSpares(backend)  # of compute-less parents (ADR 0033)
        self.computes = computes or ComputeManager()  # what runs; the lifecycle decides when
        self.writes = WriteGate(self.computes)  # which computes refuse writes, and why (ADR 0025)
        self.telemetry = telemetry or Telemetry()  # counters the use cases and the lifecycle update
        self.os_user = argon_os_user()
        self.templates: dict[int, Path] = {}  # Postgres major -> pristine template pgdata
        self.initdb_settings: dict[int, dict[str, str]] = {}  # Postgres major -> what initdb wrote (template.py)
        self.extensions: dict[int, ExtensionSupport] = {}  # Postgres major -> the allow-list it honours
        self.preparing: dict[int, asyncio.Task[None]] = {}  # majors `argon up` prepares in the background
        self.clock: Callable[[], datetime] = model.utcnow  # history windows and snapshot times (tests move it)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="argon-store")
        self._projects: dict[str, model.Project] = {}
        self._projects_sorted: list[model.Project] | None = None  # projects() until the next change
        self._branches: dict[str, model.Branch] = {}
        self._endpoints: dict[str, model.Endpoint] = {}
        # project -> its branches' and endpoints' ids: a project's reads cost what it holds, not what
        # the platform holds (a list of 400 projects among 1,000 looks at 400 projects' rows)
        self._project_branches: dict[str, dict[str, None]] = {}
        self._project_endpoints: dict[str, dict[str, None]] = {}
        # told the id of a branch whose record or one of whose endpoints' records changed, or that is gone
        # (the storage figures measure again what changed, without comparing every branch each second)
        self.branch_watchers: list[Callable[[str], None]] = []
        self._verifiers: dict[tuple[str, str], str] = {}  # (branch_id, role) -> SCRAM verifier
        self._endpoint_locks: dict[str, asyncio.Lock] = {}
        self._project_locks: dict[str, asyncio.Lock] = {}
        self.creating = BranchesInCreation()
        self._background: set[asyncio.Task[Any]] = set()
        # endpoint address slots (ADR 0031) live endpoints hold (slot -> how many: one, unless a store was
        # edited by hand), and one past the highest slot seen or given since start: a new address is a
        # lookup from there, not a scan of every endpoint
        self._slots_taken: dict[int, int] = {}
        self._address_next = 0

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

    async def template_for(self, pg_version: int) -> Path | None:
        """A version's template, once it is ready for computes: a version no project used at start-up
        is prepared in the background (`argon.platform`), and a project created on it meanwhile waits.
        None if it is not installed or its preparation failed (logged)."""
        task = self.preparing.get(pg_version)
        if task is not None and not task.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        return self.templates.get(pg_version)

    async def prepared(self) -> None:
        """Wait for the versions `argon up` prepares in the background (a stop leaves them whole)."""
        await asyncio.gather(*self.preparing.values(), return_exceptions=True)

    async def drain(self) -> None:
        """Wait for background bookkeeping (tests and shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def load(self) -> None:
        """Fill the in-memory view from the store (at start-up): four queries, one per table, in one
        visit to the store's thread (a query per project and per branch was 3,000 at 1,000 projects,
        most of a restart's time on a loaded machine). Rows of nothing the view holds stay out."""
        projects, branches, roles, endpoints = await self.db(self.store.load_view)
        for project in projects:
            self._see(project)
        for branch in branches:
            if branch.project_id in self._projects:
                self._see(branch)
        for role in roles:
            if role.branch_id in self._branches:
                self._see(role)
        for endpoint in endpoints:
            if endpoint.project_id in self._projects and endpoint.branch_id in self._branches:
                self._see(endpoint)

    async def close(self) -> None:
        await self.drain()
        self._executor.shutdown(wait=True)

    # The unit of work -----------------------------------------------------------------------------

    async def commit(self, *, put: Iterable[Any] = (), delete: Iterable[Any] = ()) -> list[Any]:
        """Delete, then put, in one store transaction; then the same change in the view. Deleting a
        project or a branch deletes everything under it; a `Database` put with id 0 gets the next
        free id. Returns what was put, as stored (databases with their ids)."""
        puts, deletes = list(put), list(delete)

        def write() -> list[Any]:
            stored = []
            with self.store.transaction():
                for obj in deletes:
                    if isinstance(obj, model.Project):
                        self.store.delete_project_rows(obj.id)
                    elif isinstance(obj, model.Branch):
                        self.store.delete_branch_rows(obj.id)
                    else:
                        self.store.delete(obj)
                for obj in puts:  # one at a time: the next database id is taken once the previous row is in
                    if isinstance(obj, model.Database) and obj.id == 0:
                        obj = dataclasses.replace(obj, id=self.store.next_database_id())
                    self.store.put(obj)
                    stored.append(obj)
            return stored

        stored = await self.db(write)
        self._count_operations(stored)
        for obj in deletes:
            self._unsee(obj)
        for obj in stored:
            self._see(obj)
        return stored

    def commit_soon(self, *, put: Iterable[Any], what: str) -> None:
        """The view at once, the store right behind it (in the background): for the wake path, which
        must not wait for a disk write, and for callbacks that cannot wait at all. Writes reach the
        store in the order they were made (one store thread)."""
        puts = list(put)
        self._count_operations(puts)
        for obj in puts:
            self._see(obj)

        def write() -> None:
            with self.store.transaction():
                for obj in puts:
                    self.store.put(obj)

        written = asyncio.get_running_loop().run_in_executor(self._executor, write)  # queued now: in order

        async def wait() -> None:
            await written

        self.spawn(wait(), what)

    def _count_operations(self, objs: Iterable[Any]) -> None:
        """An operation written in a final status is counted once, by action and outcome."""
        for obj in objs:
            if isinstance(obj, model.Operation) and obj.status.terminal:
                self.telemetry.operations.labels(obj.action.value, obj.status.value).inc()

    def _see(self, obj: Any) -> None:
        if isinstance(obj, model.Project):
            self._projects[obj.id] = obj
            self._projects_sorted = None
        elif isinstance(obj, model.Branch):
            self._branches[obj.id] = obj
            self._project_branches.setdefault(obj.project_id, {})[obj.id] = None
            self._changed(obj.id)
        elif isinstance(obj, model.Endpoint):
            old = self._endpoints.get(obj.id)
            self._endpoints[obj.id] = obj
            if old is None or old.address != obj.address:
                self._release_slot(old)
                self._take_slot(obj)
            self._project_endpoints.setdefault(obj.project_id, {})[obj.id] = None
            self._changed(obj.branch_id)
            if self.on_endpoint_address is not None and (old is None or old.address != obj.address):
                self.on_endpoint_address(obj.id, obj.address)
        elif isinstance(obj, model.Role):
            if obj.verifier and obj.login:
                self._verifiers[(obj.branch_id, obj.name)] = obj.verifier
            else:
                self._verifiers.pop((obj.branch_id, obj.name), None)

    def _take_slot(self, ep: model.Endpoint) -> None:
        slot = addresses.slot_of(ep.address)
        if slot is not None:
            self._slots_taken[slot] = self._slots_taken.get(slot, 0) + 1
            self._address_next = max(self._address_next, slot + 1)

    def _release_slot(self, ep: model.Endpoint | None) -> None:
        slot = addresses.slot_of(ep.address) if ep is not None else None
        if slot is not None and slot in self._slots_taken:
            self._slots_taken[slot] -= 1
            if not self._slots_taken[slot]:
                del self._slots_taken[slot]

    def _changed(self, branch_id: str) -> None:
        for watch in self.branch_watchers:
            watch(branch_id)

    def _unsee(self, obj: Any) -> None:
        if isinstance(obj, model.Project):
            self._projects.pop(obj.id, None)
            self._projects_sorted = None
            for branch in self.branches(obj.id):
                self._unsee(branch)
            self._project_branches.pop(obj.id, None)
            self._project_endpoints.pop(obj.id, None)
        elif isinstance(obj, model.Branch):
            self._branches.pop(obj.id, None)
            self._changed(obj.id)  # gone: a watcher finds no branch of that id any more
            self._project_branches.get(obj.project_id, {}).pop(obj.id, None)
            for key in [k for k in self._verifiers if k[0] == obj.id]:
                del self._verifiers[key]
            for ep in self.endpoints(obj.project_id, obj.id):
                self._unsee(ep)
        elif isinstance(obj, model.Endpoint):
            self.telemetry.forget_compute(compute_labels(obj))
            gone = self._endpoints.pop(obj.id, None)
            self._release_slot(gone)
            if gone is not None and self.on_endpoint_address is not None:
                self.on_endpoint_address(obj.id, None)
            self._project_endpoints.get(obj.project_id, {}).pop(obj.id, None)
            if obj.branch_id in self._branches:
                self._changed(obj.branch_id)
            self._endpoint_locks.pop(obj.id, None)
            self.activity.forget(obj.id)
        elif isinstance(obj, model.Role):
            self._verifiers.pop((obj.branch_id, obj.name), None)

    async def record(self, project_id: str, action: model.OperationAction, *, branch_id: str | None = None,
                     endpoint_id: str | None = None, started: float | None = None,
                     status: model.OperationStatus = model.OperationStatus.FINISHED,
                     error: str | None = None) -> model.Operation:
        """Write one operation (what the API's operations list shows). Use cases record, once each."""
        now = model.utcnow()
        duration = int((time.monotonic() - started) * 1000) if started is not None else 0
        op = model.Operation(id=ids.operation_id(), project_id=project_id, action=action, status=status,
                             created_at=now, updated_at=now, branch_id=branch_id, endpoint_id=endpoint_id,
                             error=error, failures_count=1 if error else 0, total_duration_ms=duration)
        await self.db(self.store.put, op)
        self._count_operations([op])
        return op

    async def add_event(self, endpoint_id: str, kind: model.EventKind, *, at: datetime | None = None,
                        duration_ms: float | None = None, detail: str = "") -> None:
        """Append to an endpoint's event log (wakes, suspends, cold-start times)."""
        await self.db(self.store.add_event, model.Event(endpoint_id=endpoint_id, kind=kind, at=at or model.utcnow(),
                                                        duration_ms=duration_ms, detail=detail))

    async def add_events(self, events: list[model.Event]) -> None:
        """Append many events in one store transaction (start-up's adoptions)."""
        await self.db(self.store.add_events, events)

    # The in-memory view ----------------------------------------------------------------------------

    def project(self, project_id: str) -> model.Project:
        project = self._projects.get(project_id)
        if project is None:
            raise NotFound(f"project {project_id!r} not found")
        return project

    def project_count(self) -> int:
        return len(self._projects)

    def projects(self) -> list[model.Project]:
        """Oldest first (a copy of the order kept since the last change: lists page through it)."""
        if self._projects_sorted is None:
            self._projects_sorted = sorted(self._projects.values(), key=lambda p: (p.created_at, p.id))
        return list(self._projects_sorted)

    def find_project(self, project_id: str) -> model.Project | None:
        return self._projects.get(project_id)

    def has_project(self, project_id: str) -> bool:
        return project_id in self._projects

    def branch(self, project_id: str, branch_id: str) -> model.Branch:
        branch = self._branches.get(branch_id)
        if branch is None or branch.project_id != project_id:
            raise NotFound(f"branch {branch_id!r} not found in project {project_id!r}")
        return branch

    def find_branch(self, branch_id: str) -> model.Branch | None:
        return self._branches.get(branch_id)

    def all_branches(self) -> list[model.Branch]:
        """Every project's branches, in no particular order (one pass, for whole-platform figures)."""
        return list(self._branches.values())

    def branches(self, project_id: str) -> list[model.Branch]:
        ids_ = self._project_branches.get(project_id, {})
        return sorted((self._branches[b] for b in ids_ if b in self._branches), key=lambda b: (b.created_at, b.id))

    def endpoint(self, project_id: str | None, endpoint_id: str) -> model.Endpoint:
        ep = self._endpoints.get(endpoint_id)
        if ep is None or (project_id is not None and ep.project_id != project_id):
            raise NotFound(f"endpoint {endpoint_id!r} not found")
        return ep

    def find_endpoint(self, endpoint_id: str) -> model.Endpoint | None:
        return self._endpoints.get(endpoint_id)

    def new_endpoint_address(self) -> str:
        """An address for a new endpoint (ADR 0031): none a live endpoint holds, and past every one given
        since start, so a deleted endpoint's address comes back only once the slots have gone round.
        Synchronous: two creations under way at once never get the same one. A lookup in the slots
        the view keeps as endpoints come and go (a scan of every endpoint took 0.5 ms at 1,000)."""
        slot = addresses.next_slot(self._slots_taken, self._address_next)
        self._address_next = slot + 1
        return addresses.address_of(slot)

    def endpoints_unordered(self, project_id: str | None = None) -> list[model.Endpoint]:
        """Every endpoint (of a project), in no particular order: for sums and copies, without the
        sort (`endpoints` sorts; a list of 400 projects asked for 800 sorts)."""
        if project_id is None:
            return list(self._endpoints.values())
        return [self._endpoints[e] for e in self._project_endpoints.get(project_id, {}) if e in self._endpoints]

    def branch_ids(self, project_id: str) -> list[str]:
        """A project's branch ids, in no particular order (for sums)."""
        return [b for b in self._project_branches.get(project_id, {}) if b in self._branches]

    def endpoints(self, project_id: str | None = None, branch_id: str | None = None) -> list[model.Endpoint]:
        pool = (self._endpoints.values() if project_id is None else
                (self._endpoints[e] for e in self._project_endpoints.get(project_id, {}) if e in self._endpoints))
        eps = [e for e in pool if branch_id is None or e.branch_id == branch_id]
        return sorted(eps, key=lambda e: (e.created_at, e.id))

    def primary(self, project_id: str, branch_id: str) -> model.Endpoint | None:
        """The branch's read-write endpoint, if it has one."""
        return next((e for e in self.endpoints(project_id, branch_id) if e.type is model.EndpointType.READ_WRITE),
                    None)

    def verifier(self, branch_id: str, role: str) -> str | None:
        """The stored SCRAM verifier of a login role (as synced when the branch's compute last stopped)."""
        return self._verifiers.get((branch_id, role))

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

    def scratch_gucs(self, pg_version: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A platform-internal run's settings (a recovery, a copy as of a point, a schema-only restore):
        the smallest compute's, no archiving, `extra` on top."""
        return self.compute_gucs(pg_version, gucs_for_cu(0.25) | {"archive_mode": "off"} | dict(extra or {}),
                                 serving=False)

    def scratch_limits(self) -> dict[str, Any]:
        """A platform-internal run's cgroup and limits, as `scratch_postmaster` takes them: one
        compute unit (1 CPU, `compute_memory_per_cu`), when computes are limited (ADR 0025)."""
        if self.computes.cgroups is None:
            return {}
        return {"cgroups": self.computes.cgroups,
                "limits": Limits(cpus=1.0, memory_bytes=int(self.settings.compute_memory_per_cu * 2**30))}

    def running_endpoints(self) -> list[model.Endpoint]:
        """The endpoints whose compute runs (what the monitor and the sampler look at: their work
        grows with the running computes, not with the number of projects)."""
        return [ep for ep_id in self.computes.running() if (ep := self._endpoints.get(ep_id)) is not None
                and self.is_running(ep_id)]

    def is_running(self, endpoint_id: str) -> bool:
        pm = self.computes.get(endpoint_id)
        return pm is not None and pm.alive

    # Locks ----------------------------------------------------------------------------------------

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

    def project_busy(self, project_id: str) -> bool:
        """An API mutation of the project is in flight (it holds the project lock)."""
        lock = self._project_locks.get(project_id)
        return lock is not None and lock.locked()

    def endpoint_lock(self, endpoint_id: str) -> asyncio.Lock:
        """Held while the endpoint's compute starts or stops, and while its cluster is copied."""
        return self._endpoint_locks.setdefault(endpoint_id, asyncio.Lock())

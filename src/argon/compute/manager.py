"""The running computes of this Argon process, by endpoint id.

Mechanism only: the control plane decides when a compute starts or stops and how big it is; the
manager renders its config, spawns or adopts the postmaster inside the compute's cgroup (when the
host gives Argon cgroups: `argon.compute.cgroups`), waits for readiness, keeps the platform's admin
session on it (closed first when it stops), changes its limits live, removes its cgroup when it is
gone and reports exits nobody asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from argon import safefs
from argon.compute import postmaster
from argon.compute.admin import AdminSession
from argon.compute.binaries import PgInstall
from argon.compute.cgroups import CgroupError, Cgroups, Limits, Usage
from argon.compute.osuser import OsUser, running_as_root
from argon.compute.pgconf import render_conf, write_config
from argon.compute.postmaster import ComputeStartError, Postmaster
from argon.failpoints import failpoint_async

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComputeSpec:
    endpoint_id: str
    install: PgInstall
    pgdata: Path
    socket_dir: Path
    log_file: Path
    user: OsUser | None
    gucs: Mapping[str, str] = field(default_factory=dict)
    argon_os_user: str = "postgres"
    standby: bool = False  # a read replica: ready when it accepts read-only connections
    limits: Limits | None = None  # CPU and memory it starts with (enforced when cgroups are available)


def prepare(spec: ComputeSpec) -> None:
    """Config files and a 0700 socket dir owned by the compute's user. The compute's uid owns the
    data directory and may have replaced anything in it with a link: no file is written through
    one, and no path resolved by following one (`argon.safefs`)."""
    owner = spec.user if running_as_root() else None
    try:
        with safefs.Dir(spec.pgdata) as d:
            complete = d.exists("PG_VERSION")
    except FileNotFoundError:
        complete = False
    except OSError as exc:
        raise ComputeStartError(f"the data directory {spec.pgdata} is unusable: {exc}") from None
    if not complete:
        raise ComputeStartError(f"the data directory {spec.pgdata} is missing or incomplete")
    try:
        postmaster.clear_stale_lock(spec.pgdata, spec.socket_dir)
        write_config(spec.pgdata, spec.socket_dir, spec.gucs, spec.argon_os_user, owner)
        if spec.standby:
            safefs.write_file(spec.pgdata / "standby.signal", b"", owner=owner)
        for directory in (spec.socket_dir, spec.log_file.parent):
            safefs.makedirs(directory, owner=owner)
            with safefs.parent(directory) as (parent, name):
                parent.chmod_dir(name, 0o700)
                if owner is not None:
                    parent.chown(name, owner)
    except safefs.UnsafePath as exc:
        raise ComputeStartError(f"refusing to start: {exc}") from None


def rewrite_conf(spec: ComputeSpec) -> None:
    """Only `postgresql.conf`, for a running compute that is to reload it (`postgresql.auto.conf`
    keeps what the platform set with ALTER SYSTEM meanwhile)."""
    owner = spec.user if running_as_root() else None
    try:
        with safefs.Dir(spec.pgdata) as d:
            d.write("postgresql.conf", render_conf(spec.socket_dir, spec.gucs), owner=owner)
    except safefs.UnsafePath as exc:
        raise ComputeStartError(f"refusing to rewrite the configuration: {exc}") from None


@dataclass(frozen=True)
class Adoptable:
    """A postmaster a previous Argon left running, identified and in its cgroup (`ComputeManager.identify`)."""

    postmaster: Postmaster
    limits: Limits | None  # what its cgroup enforces; None: not limited

    def release(self) -> None:
        """Not adopted after all: let go of its process handle (it runs on)."""
        self.postmaster.release()


class ComputeManager:
    """Running postmasters by endpoint id, each with its admin session (`argon.compute.admin`)."""

    def __init__(self, on_exit: Callable[[str, int | None], None] | None = None,
                 cgroups: Cgroups | None = None, limits_note: str = "not enforced") -> None:
        self.on_exit = on_exit  # called for an exit nobody asked for (crash, OOM kill, kill -9)
        self.cgroups = cgroups  # None: limits are not enforced (no root, no controllers)
        self.limits_note = limits_note  # which limits are enforced, or why none are (`argon status`)
        self._running: dict[str, Postmaster] = {}
        self._sessions: dict[str, AdminSession] = {}
        self._limits: dict[str, Limits] = {}  # what each running compute's cgroup enforces now
        self._removing: dict[str, asyncio.Task[bool]] = {}  # cgroups being removed (a start waits for it)

    def get(self, endpoint_id: str) -> Postmaster | None:
        return self._running.get(endpoint_id)

    def running(self) -> list[str]:
        return [ep for ep, pm in self._running.items() if pm.alive]

    def admin(self, endpoint_id: str) -> AdminSession | None:
        """The platform's session on the running compute (opened on first use), None when it is not
        running. Its stop closes it."""
        pm = self._running.get(endpoint_id)
        return self._sessions.get(endpoint_id) if pm is not None and pm.alive else None

    async def start(self, spec: ComputeSpec) -> Postmaster:
        current = self._running.get(spec.endpoint_id)
        if current is not None and current.alive:
            return current
        await asyncio.to_thread(prepare, spec)
        limited = self.cgroups is not None and spec.limits is not None
        if limited:
            removing = self._removing.get(spec.endpoint_id)
            if removing is not None:
                await asyncio.wait([removing])
            await asyncio.to_thread(self._create_cgroup, spec.endpoint_id, spec.limits)
        # The fork and exec in a thread: under load they take tens of milliseconds, which the event
        # loop (every API request, the proxy's logins, the other computes' starts) need not wait for.
        spawn = asyncio.ensure_future(asyncio.to_thread(postmaster.start, spec.install, spec.pgdata,
                                                        spec.log_file, spec.user))
        try:
            pm = await asyncio.shield(spawn)
        except asyncio.CancelledError:  # the postmaster is spawned all the same: not left running untracked
            with contextlib.suppress(Exception):
                (await spawn).kill_group()
            raise
        await failpoint_async("compute.start.after_spawn")
        self._running[spec.endpoint_id] = pm
        self._watch(spec.endpoint_id, pm)
        try:
            if limited:
                self._join(spec.endpoint_id, pm.pid)
            await pm.wait_ready(standby=spec.standby)
        except BaseException:
            self._running.pop(spec.endpoint_id, None)
            pm.kill_group()
            raise
        self._sessions[spec.endpoint_id] = AdminSession(spec.socket_dir)
        return pm

    def identify(self, spec: ComputeSpec) -> Adoptable | None:
        """The postmaster a previous Argon left serving `spec`'s data, if its identity checks out
        (`postmaster.adopt`), moved into its cgroup (keeping the size it had: autoscaling may have
        moved it; a compute without one gets spec's). Blocking (the pid file, `/proc`, the cgroup
        files), and nothing of the manager's state changes: start-up runs many at once in threads,
        then `adopt`s what they found on the loop."""
        pm = postmaster.adopt(spec.pgdata, spec.log_file, spec.user)
        if pm is None:
            return None
        limits = None
        if self.cgroups is not None and spec.limits is not None:
            try:
                limits = self.cgroups.limits(spec.endpoint_id) or spec.limits
                self.cgroups.create(spec.endpoint_id, limits)
                with contextlib.suppress(OSError), open(f"/proc/{pm.pid}/oom_score_adj", "w") as f:
                    f.write("-1000")  # as `_join`
                self.cgroups.attach(spec.endpoint_id, pm.pid)
            except CgroupError as exc:
                log.warning("the adopted compute of %s runs without limits: %s", spec.endpoint_id, exc)
                limits = None
        return Adoptable(pm, limits)

    def adopt(self, spec: ComputeSpec, found: Adoptable | None = None) -> Postmaster | None:
        """Take over the compute a previous Argon left running (`found`: what `identify` returned;
        identified here when not given)."""
        found = found if found is not None else self.identify(spec)
        if found is None:
            return None
        pm = found.postmaster
        self._running[spec.endpoint_id] = pm
        self._sessions[spec.endpoint_id] = AdminSession(spec.socket_dir)
        if found.limits is not None:
            self._limits[spec.endpoint_id] = found.limits
        self._watch(spec.endpoint_id, pm)
        log.info("adopted the running compute of %s (pid %d)", spec.endpoint_id, pm.pid)
        return pm

    # Limits ---------------------------------------------------------------------------------------

    def _create_cgroup(self, endpoint_id: str, limits: Limits) -> None:
        assert self.cgroups is not None
        try:
            self.cgroups.create(endpoint_id, limits)
        except CgroupError as exc:
            raise ComputeStartError(str(exc)) from exc
        self._limits[endpoint_id] = limits

    def _join(self, endpoint_id: str, pid: int) -> None:
        """Move a new postmaster into its cgroup, and make it the last process its OOM killer picks:
        a backend killed at the memory limit makes Postgres restart its sessions (crash recovery),
        where a killed postmaster would take the compute down. Its children reset their own
        score (`PG_OOM_ADJUST_FILE`, set in `postmaster._ENV`), as PostgreSQL's docs advise."""
        assert self.cgroups is not None
        with contextlib.suppress(OSError), open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write("-1000")
        try:
            self.cgroups.attach(endpoint_id, pid)
        except CgroupError as exc:
            raise ComputeStartError(str(exc)) from exc

    def limits(self, endpoint_id: str) -> Limits | None:
        """What the compute's cgroup enforces (None: not running, or not limited)."""
        return self._limits.get(endpoint_id)

    def set_limits(self, endpoint_id: str, limits: Limits) -> bool:
        """Resize a running compute at once (no restart; its connections stay). False when it is not
        running or not limited; raises `CgroupError` when the kernel refuses."""
        if self.cgroups is None or endpoint_id not in self._limits or endpoint_id not in self._running:
            return False
        self.cgroups.set_limits(endpoint_id, limits)
        self._limits[endpoint_id] = limits
        return True

    def usage(self, endpoint_id: str) -> Usage | None:
        if self.cgroups is None or endpoint_id not in self._limits:
            return None
        return self.cgroups.usage(endpoint_id)

    def tidy_cgroups(self) -> list[str]:
        """At start-up, after adoption: remove the cgroups no running compute owns (left by a crash of
        Argon, or by a start that failed half-way). Returns their names."""
        if self.cgroups is None:
            return []
        stale = [name for name in self.cgroups.names() if name not in self._running]
        return [name for name in stale if self.cgroups.remove(name, wait=0.2)]

    def _release(self, endpoint_id: str) -> None:
        """The compute is gone: remove its cgroup (in a thread: it may wait for a straggler)."""
        if self._limits.pop(endpoint_id, None) is None or self.cgroups is None:
            return
        cgroups = self.cgroups
        with contextlib.suppress(RuntimeError):  # no loop: argon is shutting down
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(cgroups.remove, endpoint_id))
            self._removing[endpoint_id] = task
            task.add_done_callback(lambda t: self._removing.pop(endpoint_id, None) if
                                   self._removing.get(endpoint_id) is t else None)

    def _watch(self, endpoint_id: str, pm: Postmaster) -> None:
        def exited(done: Postmaster) -> None:
            if self._running.get(endpoint_id) is done:
                del self._running[endpoint_id]
                session = self._sessions.pop(endpoint_id, None)
                if session is not None:
                    with contextlib.suppress(RuntimeError):  # no loop: argon is shutting down
                        asyncio.get_running_loop().create_task(session.close())
            if not done.stop_requested and self.on_exit is not None:
                self.on_exit(endpoint_id, done.returncode)  # before the release: it may read the OOM count
            if endpoint_id not in self._running:
                self._release(endpoint_id)

        pm.watch(exited)

    async def stop(self, endpoint_id: str, mode: str = "fast") -> None:
        """Close the compute's admin session, then stop its postmaster."""
        pm = self._running.get(endpoint_id)
        if pm is None:
            return
        session = self._sessions.pop(endpoint_id, None)
        if session is not None:
            await session.close()
        await pm.stop(mode)
        if self._running.get(endpoint_id) is pm:
            del self._running[endpoint_id]
        self._release(endpoint_id)
        removing = self._removing.get(endpoint_id)
        if removing is not None:
            await asyncio.wait([removing])

    async def stop_all(self, mode: str = "fast") -> None:
        await asyncio.gather(*(self.stop(ep, mode) for ep in list(self._running)), return_exceptions=True)

"""The running computes of this Argon process, by endpoint id.

Mechanism only: the control plane decides when a compute starts or stops; the manager renders its
config, spawns or adopts the postmaster, waits for readiness, keeps the platform's admin session
on it (closed first when it stops) and reports exits nobody asked for.
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
from argon.compute.osuser import OsUser, running_as_root
from argon.compute.pgconf import write_config
from argon.compute.postmaster import ComputeStartError, Postmaster

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


class ComputeManager:
    """Running postmasters by endpoint id, each with its admin session (`argon.compute.admin`)."""

    def __init__(self, on_exit: Callable[[str, int | None], None] | None = None) -> None:
        self.on_exit = on_exit  # called for an exit nobody asked for (crash, OOM kill, kill -9)
        self._running: dict[str, Postmaster] = {}
        self._sessions: dict[str, AdminSession] = {}

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
        pm = postmaster.start(spec.install, spec.pgdata, spec.log_file, spec.user)
        self._running[spec.endpoint_id] = pm
        self._watch(spec.endpoint_id, pm)
        try:
            await pm.wait_ready(standby=spec.standby)
        except BaseException:
            self._running.pop(spec.endpoint_id, None)
            pm.kill_group()
            raise
        self._sessions[spec.endpoint_id] = AdminSession(spec.socket_dir)
        return pm

    def adopt(self, spec: ComputeSpec) -> Postmaster | None:
        pm = postmaster.adopt(spec.pgdata, spec.log_file, spec.user)
        if pm is None:
            return None
        self._running[spec.endpoint_id] = pm
        self._sessions[spec.endpoint_id] = AdminSession(spec.socket_dir)
        self._watch(spec.endpoint_id, pm)
        log.info("adopted the running compute of %s (pid %d)", spec.endpoint_id, pm.pid)
        return pm

    def _watch(self, endpoint_id: str, pm: Postmaster) -> None:
        def exited(done: Postmaster) -> None:
            if self._running.get(endpoint_id) is done:
                del self._running[endpoint_id]
                session = self._sessions.pop(endpoint_id, None)
                if session is not None:
                    with contextlib.suppress(RuntimeError):  # no loop: argon is shutting down
                        asyncio.get_running_loop().create_task(session.close())
            if not done.stop_requested and self.on_exit is not None:
                self.on_exit(endpoint_id, done.returncode)

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

    async def stop_all(self, mode: str = "fast") -> None:
        await asyncio.gather(*(self.stop(ep, mode) for ep in list(self._running)), return_exceptions=True)

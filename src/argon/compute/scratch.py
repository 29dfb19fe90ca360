"""Throw-away postmasters: a data directory that is no endpoint's, run briefly and stopped.

Three things need one: recovery to a point in time (the rebuilt cluster replays its WAL, promotes,
stops cleanly), a read-only copy of a branch as of a point (the schema endpoint), and the scratch
cluster a schema-only branch's roles and DDL are restored into. Each gets the settings its caller
composes (the control plane's `scratch_gucs`: the smallest compute's, no archiving), its own short
socket directory under the run directory (removed afterwards), and is killed if anything goes wrong; a start that fails raises `StorageError` with
the caller's `failure` text and the postmaster's own reason.

Where computes are limited by cgroups, so is a scratch postmaster: a cgroup of its own (named after
its socket directory, removed with it; one left by a crash is tidied at the next start like a
compute's) with the `limits` its caller gives (the control plane's `scratch_limits`, one compute
unit): a tenant asking for points in time in a loop gets at most that much of the host.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from argon import safefs
from argon.compute import postmaster
from argon.compute.binaries import PgInstall
from argon.compute.cgroups import CgroupError, Cgroups, Limits
from argon.compute.manager import ComputeSpec, prepare
from argon.compute.osuser import OsUser
from argon.compute.postmaster import ComputeStartError, Postmaster
from argon.errors import StorageError


@dataclass(frozen=True)
class Scratch:
    socket_dir: Path  # the platform role connects here (peer authentication)
    postmaster: Postmaster


@asynccontextmanager
async def scratch_postmaster(install: PgInstall, pgdata: Path, *, run_dir: Path, log_file: Path,
                             user: OsUser | None, argon_os_user: str, gucs: Mapping[str, str], failure: str,
                             ready_timeout: float = postmaster.READY_TIMEOUT,
                             stop: str = "fast", cgroups: Cgroups | None = None,
                             limits: Limits | None = None) -> AsyncIterator[Scratch]:
    """Run `pgdata` with the settings `gucs` until the block ends, then stop it with `stop` ("fast":
    cleanly; "immediate": the copy is thrown away anyway); within `limits` when `cgroups` is given."""
    socket_dir = run_dir / f"sc-{secrets.token_hex(4)}"
    spec = ComputeSpec(endpoint_id=socket_dir.name, install=install, pgdata=pgdata, socket_dir=socket_dir,
                       log_file=log_file, user=user, gucs=gucs, argon_os_user=argon_os_user)
    await asyncio.to_thread(prepare, spec)
    group = socket_dir.name if cgroups is not None and limits is not None else None
    if group is not None:
        assert cgroups is not None and limits is not None
        try:
            await asyncio.to_thread(cgroups.create, group, limits)
        except CgroupError as exc:
            await asyncio.to_thread(safefs.rmtree, socket_dir)
            raise StorageError(f"{failure}: {exc}") from None
    pm = postmaster.start(install, pgdata, log_file, user)
    try:
        try:
            if group is not None:
                assert cgroups is not None
                cgroups.attach(group, pm.pid)
            await pm.wait_ready(timeout=ready_timeout)
        except ComputeStartError as exc:
            raise StorageError(f"{failure}: {exc.user_message}") from None
        except CgroupError as exc:
            raise StorageError(f"{failure}: {exc}") from None
        yield Scratch(socket_dir, pm)
        if pm.alive:
            await pm.stop(stop)
    finally:
        if pm.alive:
            pm.kill_group()
        await asyncio.to_thread(safefs.rmtree, socket_dir)
        if group is not None:
            assert cgroups is not None
            await asyncio.to_thread(cgroups.remove, group)


def last_error(log_file: Path) -> str:
    """The last FATAL or PANIC line of a Postgres log (or its last line), for an error message."""
    try:
        lines = safefs.read_tail(log_file, limit=65536).decode(errors="replace").splitlines()[-200:]
    except OSError:
        return "no log"
    found = [line for line in lines if "FATAL:" in line or "PANIC:" in line]
    return (found[-1] if found else (lines[-1] if lines else "empty log")).strip()[-300:]

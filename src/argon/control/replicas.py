"""Read replicas (`read_only` endpoints): hot standbys of their branch, fed by WAL shipping.

A replica has its own copy of the branch's cluster (`branches/<b>/replicas/<ep>/pgdata`), made at
its first start (an online backup of the running primary, or a copy of the stopped one) and started
with `standby.signal`. Its `restore_command` reads the branch's WAL from the current history
epoch's archive and, for the segment being written, from the primary's `pg_wal`, retrying twice a
second: a replica follows its primary within about a second, keeps serving (stale) reads while the
primary is suspended, and needs no replication connection, role or password. A restore or reset of
the branch (a new epoch) rebuilds the replica at its next start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import psycopg

from argon import model, safefs
from argon.compute import tenant_settings
from argon.compute.admin import connect_admin
from argon.compute.binaries import PgInstall
from argon.compute.manager import ComputeSpec
from argon.compute.osuser import OsUser, project_user
from argon.compute.params import gucs_for_cu
from argon.control.plane import ControlPlane
from argon.control.retention import branch_history, current_epoch, enabled
from argon.errors import ComputeError
from argon.storage import branching, wal

log = logging.getLogger(__name__)

SOURCE_FILE = "replica_of"  # which epoch of the branch the replica's copy comes from
PRIMARY_WAIT = 60.0  # seconds a replica's copy waits for a primary that is starting or stopping


def _epoch_id(plane: ControlPlane, project: model.Project, branch_id: str) -> str:
    current = current_epoch(plane, project.id, branch_id)
    return current.id if current else "none"


def _quote(path: Path) -> str:
    return "'" + str(path).replace("%", "%%").replace("'", "'\"'\"'") + "'"


def restore_command(plane: ControlPlane, project: model.Project, branch_id: str) -> str:
    sources = []
    history = branch_history(plane, project.id, branch_id)
    current = current_epoch(plane, project.id, branch_id) if enabled(project) else None
    if current is not None:
        sources.append(history.wal_dir(current.id))
    sources.append(plane.layout.pgdata(project.id, branch_id) / "pg_wal")
    return " || ".join(f"cp {_quote(src)}/%f %p 2>/dev/null" for src in sources)


def replica_spec(plane: ControlPlane, project: model.Project, ep: model.Endpoint, install: PgInstall,
                 user: OsUser | None) -> ComputeSpec:
    root = plane.layout.replica_dir(project.id, ep.branch_id, ep.id)
    primary = plane.primary(ep.project_id, ep.branch_id)
    # A hot standby refuses to start with fewer connections or workers than its primary.
    cu = max(ep.autoscaling_limit_max_cu, primary.autoscaling_limit_max_cu if primary else 0)
    settings = tenant_settings.for_standby(ep.pg_settings, primary.pg_settings if primary else {})
    gucs = plane.compute_gucs(project.pg_version, gucs_for_cu(cu) | settings | {
        "hot_standby": "on", "archive_mode": "off", "recovery_target_timeline": "latest",
        "restore_command": restore_command(plane, project, ep.branch_id),
        "wal_retrieve_retry_interval": "500ms",
        # Each poll restores the segment being written again and would log it: keep the log for problems.
        "log_min_messages": "warning",
    })
    return ComputeSpec(endpoint_id=ep.id, install=install, pgdata=root / "pgdata", socket_dir=plane.layout.socket_dir(ep.id),
                       log_file=root / "log" / "postgres.log", user=user, gucs=gucs, argon_os_user=plane.os_user,
                       standby=True)


async def ensure_replica_data(plane: ControlPlane, ep: model.Endpoint) -> None:
    """Make (or remake, after a restore of the branch) the replica's copy of the branch. Called with
    the replica's endpoint lock held; never takes the primary's lock (a restore holds both)."""
    project = plane.project(ep.project_id)
    user = project_user(project.os_uid)  # the replica's files are the project's: copied as its uid
    root = plane.layout.replica_dir(project.id, ep.branch_id, ep.id)
    epoch = await asyncio.to_thread(_epoch_id, plane, project, ep.branch_id)
    if await asyncio.to_thread(_current, root, epoch, user):
        return
    await asyncio.to_thread(safefs.rmtree, root)
    await asyncio.to_thread(safefs.makedirs, root, owner=user)
    source = plane.layout.pgdata(project.id, ep.branch_id)
    target = root / "pgdata"
    primary = plane.primary(ep.project_id, ep.branch_id)
    deadline = time.monotonic() + PRIMARY_WAIT
    while True:
        if primary is not None and plane.is_running(primary.id):
            try:
                conn = await connect_admin(plane.layout.socket_dir(primary.id))
                try:
                    await branching.clone_running(conn, plane.backend, source, target, user)
                finally:
                    await conn.close()
                break
            except psycopg.OperationalError as exc:
                # The primary is still starting ("the database system is starting up": a replica made
                # with its project), or it stopped between the look and the copy: copy again, online
                # or stopped, whichever it is by then.
                why = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                if time.monotonic() > deadline:
                    raise ComputeError(f"the primary of {ep.id} did not let its replica copy it: {why}") from exc
                log.debug("the primary of %s could not be copied online yet (%s); trying again", ep.id, why)
        else:
            control = await asyncio.to_thread(wal.control_data, plane.installs[project.pg_version].bindir, source, user)
            await asyncio.to_thread(branching.clone_stopped, plane.backend, source, target, control, user)
            if primary is None or not plane.is_running(primary.id):
                break  # it stayed stopped throughout the copy: a consistent copy
            log.info("the primary of %s started while it was copied; copying it again online", ep.id)
            if time.monotonic() > deadline:
                raise ComputeError("the primary kept starting and stopping while its replica was copied; try again")
        await asyncio.to_thread(safefs.rmtree, target)
        await asyncio.sleep(0.2)

    def finish() -> None:
        with safefs.Dir(target) as d:
            d.write("standby.signal", b"", owner=user)
            for name in ("recovery.signal", "backup_label.old"):
                d.unlink(name)
        safefs.write_file(root / SOURCE_FILE, epoch, owner=user)
        safefs.makedirs(root / "log", owner=user)

    await asyncio.to_thread(finish)
    log.info("replica %s copied from branch %s", ep.id, ep.branch_id)


def _current(root: Path, epoch: str, user: OsUser | None) -> bool:
    """Whether the replica's copy is of the branch's current epoch (its marker says so)."""
    try:
        marker = safefs.read_file(root / SOURCE_FILE, limit=256, owner=user).decode(errors="replace")
    except OSError:
        return False
    return marker == epoch and safefs.lexists(root / "pgdata" / "PG_VERSION")


def remove_replicas(plane: ControlPlane, project_id: str, branch_id: str) -> None:
    """After the branch's data was replaced: every replica copies it again at its next start."""
    safefs.rmtree(plane.layout.branch_dir(project_id, branch_id) / "replicas")


"""Branches: create from the parent's head (a copy-on-write or plain copy of its cluster), delete.

Policy only; the copy itself is `argon.storage.branching`. A new branch inherits the parent's roles
(same verifiers and stored passwords) and databases, because its cluster is the parent's at the
moment of the request. The parent's endpoint lock is held while its cluster is copied: a stopped
parent cannot start under the copy, a running one cannot be suspended in the middle of the backup.
Point-in-time branches (`parent_lsn`, `parent_timestamp`) need the WAL archive: not yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from argon import ids, model
from argon.compute.admin import connect_admin
from argon.compute.osuser import OsUser, chown_tree
from argon.errors import Conflict, NotFound, Precondition, UserError
from argon.storage import branching

if TYPE_CHECKING:
    from argon.control.plane import ControlPlane

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BranchRequest:
    name: str | None = None
    parent_id: str | None = None
    parent_lsn: str | None = None
    parent_timestamp: str | None = None
    protected: bool = False
    init_source: str = "parent-data"
    endpoints: list[model.EndpointSettings] = field(default_factory=list)


@dataclass(frozen=True)
class CreatedBranch:
    branch: model.Branch
    endpoints: list[model.Endpoint]
    roles: list[model.Role]
    databases: list[model.Database]
    operations: list[model.Operation]


def default_branch(plane: ControlPlane, project_id: str) -> model.Branch:
    for b in plane.branches(project_id):
        if b.default:
            return b
    raise NotFound(f"project {project_id!r} has no default branch")


@contextlib.asynccontextmanager
async def _parent_quiet(plane: ControlPlane, parent: model.Branch) -> AsyncIterator[model.Endpoint | None]:
    """Hold the lock of the parent's read-write endpoint (if any) while its cluster is copied."""
    rw = [e for e in plane.endpoints(parent.project_id, parent.id) if e.type is model.EndpointType.READ_WRITE]
    if not rw:
        yield None
        return
    async with plane.endpoint_lock(rw[0].id):
        yield rw[0]


async def _copy_parent(plane: ControlPlane, project: model.Project, parent: model.Branch, target_branch: str) -> str | None:
    source = plane.layout.pgdata(project.id, parent.id)
    target = plane.layout.pgdata(project.id, target_branch)
    await asyncio.to_thread(target.parent.mkdir, 0o700, True, True)
    if project.os_uid is not None:
        await asyncio.to_thread(os.chown, target.parent, project.os_uid, project.os_uid)
    async with _parent_quiet(plane, parent) as ep:
        if ep is not None and plane.is_running(ep.id):
            conn = await connect_admin(plane.layout.socket_dir(ep.id))
            try:
                return await branching.clone_running(conn, plane.backend, source, target)
            finally:
                await conn.close()
        await asyncio.to_thread(branching.clone_stopped, plane.backend, source, target)
        install = plane.installs.get(project.pg_version)
        return await asyncio.to_thread(branching.checkpoint_lsn, install.bindir, target) if install else None


async def create_branch(plane: ControlPlane, project_id: str, req: BranchRequest) -> CreatedBranch:
    started = time.monotonic()
    project = plane.project(project_id)
    if req.parent_lsn or req.parent_timestamp:
        raise UserError("branching from a point in time (parent_lsn / parent_timestamp) is not supported yet; "
                        "omit them to branch from the parent's head")
    if req.init_source not in ("parent-data", "schema-only"):
        raise UserError("init_source must be parent-data or schema-only")
    if req.init_source == "schema-only":
        raise UserError("schema-only branches are not supported yet")
    if len(req.endpoints) > 1:
        raise UserError("a branch can have only one read_write endpoint")
    async with plane.project_lock(project_id):
        parent = plane.branch(project_id, req.parent_id) if req.parent_id else default_branch(plane, project_id)
        bid = ids.branch_id()
        name = req.name or bid
        if any(b.name == name for b in plane.branches(project_id)):
            raise Conflict(f"branch {name!r} already exists")
        try:
            lsn = await _copy_parent(plane, project, parent, bid)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, plane.layout.branch_dir(project_id, bid), True)
            raise
        await asyncio.to_thread(plane.layout.compute_log(project_id, bid).parent.mkdir, 0o700, True, True)
        if project.os_uid is not None:
            await asyncio.to_thread(chown_tree, plane.layout.branch_dir(project_id, bid),
                                    OsUser(project.os_uid, project.os_uid))
        now = model.utcnow()
        branch = model.Branch(id=bid, project_id=project_id, name=name, created_at=now, updated_at=now,
                              parent_id=parent.id, parent_lsn=lsn, parent_timestamp=now, protected=req.protected,
                              init_source=req.init_source)
        roles = [r.replace(branch_id=bid, created_at=now) for r in await plane.db(plane.store.list_roles, parent.id)]
        parent_dbs = await plane.db(plane.store.list_databases, parent.id)
        endpoints = [model.Endpoint(id=ids.endpoint_id(), project_id=project_id, branch_id=bid, created_at=now,
                                    updated_at=now, autoscaling_limit_min_cu=s.autoscaling_limit_min_cu,
                                    autoscaling_limit_max_cu=s.autoscaling_limit_max_cu,
                                    suspend_timeout_seconds=s.suspend_timeout_seconds) for s in req.endpoints]
        ops = [model.Operation(id=ids.operation_id(), project_id=project_id,
                               action=model.OperationAction.CREATE_BRANCH, status=model.OperationStatus.FINISHED,
                               created_at=now, updated_at=now, branch_id=bid,
                               total_duration_ms=int((time.monotonic() - started) * 1000))]
        ops += [model.Operation(id=ids.operation_id(), project_id=project_id,
                                action=model.OperationAction.START_COMPUTE, status=model.OperationStatus.RUNNING,
                                created_at=now, updated_at=now, branch_id=bid, endpoint_id=e.id) for e in endpoints]

        def write() -> list[model.Database]:
            with plane.store.transaction():
                dbs = [model.Database(**{**d.__dict__, "id": plane.store.next_database_id(), "branch_id": bid,
                                         "created_at": now, "updated_at": now}) for d in parent_dbs]
                for obj in (branch, *roles, *dbs, *endpoints, *ops):
                    plane.store.put(obj)
                return dbs

        try:
            databases = await plane.db(write)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, plane.layout.branch_dir(project_id, bid), True)
            raise
        for obj in (branch, *roles, *endpoints):
            plane.remember(obj)
    log.info("branch %s (%s) of %s created from %s at %s in %.0f ms", bid, name, project_id, parent.id, lsn,
             (time.monotonic() - started) * 1000)
    from argon.control.projects import first_start

    for op in ops[1:]:
        plane.mark_needs_spec(op.endpoint_id or "")
        plane.spawn(first_start(plane, op, reason="branch created"), f"first start of {op.endpoint_id}")
    return CreatedBranch(branch, endpoints, roles, databases, ops)


async def delete_branch(plane: ControlPlane, project_id: str, branch_id: str) -> tuple[model.Branch, list[model.Operation]]:
    async with plane.project_lock(project_id):
        branch = plane.branch(project_id, branch_id)
        if branch.default:
            raise Precondition("the default branch cannot be deleted; make another branch the default first")
        if branch.protected:
            raise Precondition(f"branch {branch.name!r} is protected; unprotect it before deleting it")
        children = [b.name for b in plane.branches(project_id) if b.parent_id == branch_id]
        if children:
            raise Precondition(f"branch {branch.name!r} has child branches ({', '.join(children)}); delete them first")
        ops = []
        for ep in plane.endpoints(project_id, branch_id):
            await plane.stop_compute(ep.id, reason="branch deleted", mode="immediate", record=False)
            await plane.db(plane.store.delete, ep)
            plane.forget_endpoint(ep.id)
            await asyncio.to_thread(shutil.rmtree, plane.layout.socket_dir(ep.id), True)
        await plane.db(plane.store.delete_branch_rows, branch_id)
        plane.forget_branch(branch_id)
        await asyncio.to_thread(shutil.rmtree, plane.layout.branch_dir(project_id, branch_id), True)
        ops.append(await plane.record(project_id, model.OperationAction.DELETE_TIMELINE, branch_id=branch_id))
    log.info("branch %s of %s deleted", branch_id, project_id)
    return branch.replace(state=model.BranchState.ARCHIVED), ops

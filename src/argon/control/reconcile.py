"""Start-up reconciliation: make reality match the metadata after any stop, clean or `kill -9`.

Snapshot (what the store says, what runs, what is on disk) -> decide (pure) -> act -> one logged
sentence. Computes still running from a previous argon are adopted when their identity checks out
(`argon.compute.postmaster.adopt`), never started twice; endpoints that claim to be active but are
not are marked idle; operations interrupted mid-way are marked failed; data directories that no
project or branch owns (a crash during creation) and throw-away copies are removed; a restore
interrupted after the old data was removed is finished, one interrupted before is rolled back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from argon import model, safefs
from argon.control import branches, roles, snapshots
from argon.control.lifecycle import LeftRunning
from argon.control.plane import ControlPlane
from argon.control.services import Control

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Snapshot:
    endpoints: dict[str, model.ComputeState]  # endpoint id -> state in metadata
    adoptable: frozenset[str]  # endpoints whose postmaster is alive and verified
    unfinished_ops: tuple[str, ...]
    project_ids: frozenset[str]
    project_dirs: frozenset[str]
    branch_ids: frozenset[str] = frozenset()
    branch_dirs: frozenset[tuple[str, str]] = frozenset()  # (project, branch) directories on disk
    branch_entries: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)  # names in each


@dataclass(frozen=True)
class Plan:
    adopt: list[str] = field(default_factory=list)
    mark_idle: list[str] = field(default_factory=list)
    fail_ops: list[str] = field(default_factory=list)
    remove_dirs: list[str] = field(default_factory=list)
    remove_branch_paths: list[str] = field(default_factory=list)  # "<project>/<branch>[/<entry>]"
    finish_restores: list[str] = field(default_factory=list)  # "<project>/<branch>": swap the new data in

    def summary(self) -> str:
        return (f"adopted {len(self.adopt)} running compute(s), marked {len(self.mark_idle)} idle, "
                f"closed {len(self.fail_ops)} interrupted operation(s), removed "
                f"{len(self.remove_dirs) + len(self.remove_branch_paths)} orphan dir(s), finished "
                f"{len(self.finish_restores)} interrupted restore(s)")


def decide(snap: Snapshot) -> Plan:
    plan = Plan()
    for ep_id, state in sorted(snap.endpoints.items()):
        if ep_id in snap.adoptable:
            plan.adopt.append(ep_id)
        elif state is model.ComputeState.ACTIVE:
            plan.mark_idle.append(ep_id)
    plan.fail_ops.extend(snap.unfinished_ops)
    plan.remove_dirs.extend(sorted(snap.project_dirs - snap.project_ids))
    for project, branch in sorted(snap.branch_dirs):
        if project not in snap.project_ids:
            continue
        if branch not in snap.branch_ids:  # a crash while the branch was being created
            plan.remove_branch_paths.append(f"{project}/{branch}")
            continue
        entries = snap.branch_entries.get((project, branch), frozenset())
        for name in sorted(entries):
            if name.startswith("tmp-"):  # a throw-away point-in-time copy
                plan.remove_branch_paths.append(f"{project}/{branch}/{name}")
        if "pgdata.old" in entries and "pgdata" in entries:  # a finished restore's old data
            plan.remove_branch_paths.append(f"{project}/{branch}/pgdata.old")
        if "pgdata.restoring" in entries:
            if "pgdata" in entries:  # the restore stopped before the swap: roll back
                plan.remove_branch_paths.append(f"{project}/{branch}/pgdata.restoring")
            else:  # the old data was already gone: the new data is complete, finish the swap
                plan.finish_restores.append(f"{project}/{branch}")
    return plan


def look_on_disk(projects_dir: Path) -> tuple[frozenset[str], set[tuple[str, str]], dict[tuple[str, str], frozenset[str]]]:
    """Project directories, their branch directories and the names in each. Only real directories
    count: a link a compute's uid put in its tree is neither listed nor followed."""
    if not safefs.is_dir(projects_dir):
        return frozenset(), set(), {}
    with safefs.Dir(projects_dir) as top:
        dirs = frozenset(name for name in top.listdir() if top.is_dir(name))
    branch_dirs: set[tuple[str, str]] = set()
    entries: dict[tuple[str, str], frozenset[str]] = {}
    for project in dirs:
        root = projects_dir / project / "branches"
        if not safefs.is_dir(root):
            continue
        with safefs.Dir(root) as branches:
            for name in branches.listdir():
                if branches.is_dir(name):
                    branch_dirs.add((project, name))
                    entries[(project, name)] = frozenset(safefs.listdir(root / name))
    return dirs, branch_dirs, entries


async def settle_intents(control: Control) -> int:
    """Operations cut short mid-way (`argon.storage.intents`), before anything else looks at the disk:
    a restore is rolled back before its commit point and finished after it; a role create is
    finished and a password reset undone (the store's roles go onto the compute as a pending spec); spec intents of endpoints
    that never made it into the metadata are dropped. Returns how many intents it settled."""
    plane = control.plane
    intents = plane.intents
    settled = 0
    for key in await asyncio.to_thread(intents.keys, "restore"):
        intent = await asyncio.to_thread(intents.get, key)
        if intent is None or not plane.has_project(intent["project"]):
            await asyncio.to_thread(intents.remove, key)
            continue
        fresh = plane.layout.pgdata(intent["project"], intent["branch"]).with_name("pgdata.restoring")
        if await asyncio.to_thread(safefs.lexists, fresh):  # the commit point was not reached
            await asyncio.to_thread(branches.undo_restore, plane, intent)
            log.warning("rolled back the restore of branch %s, interrupted before its swap", intent["branch"])
        else:
            await branches.finish_restore(control, intent)
            log.warning("finished the restore of branch %s, interrupted after its swap", intent["branch"])
        settled += 1
    for key in await asyncio.to_thread(intents.keys, "roles"):
        intent = await asyncio.to_thread(intents.get, key)
        endpoint_id = key.removeprefix("roles-")
        if intent is not None and plane.find_endpoint(endpoint_id) is not None:
            role = await plane.db(roles.finish_role_intent, plane, intent)
            if role is not None:
                await plane.commit(put=[role])
            await asyncio.to_thread(control.computes.spec_pending, endpoint_id)  # the store's roles win
        await asyncio.to_thread(intents.remove, key)
        settled += 1
    for key in await asyncio.to_thread(intents.keys, "spec"):
        if plane.find_endpoint(key.removeprefix("spec-")) is None:
            await asyncio.to_thread(intents.remove, key)
    return settled


async def reconcile(control: Control) -> Plan:
    plane = control.plane
    started = time.monotonic()
    await settle_intents(control)
    # only a cluster with a postmaster.pid can be adopted: one look at each, then specs for those only
    endpoints = plane.endpoints()
    paths = {ep.id: pgdata(plane, ep) for ep in endpoints}
    left = await asyncio.to_thread(lambda: {e for e, p in paths.items() if safefs.lexists(p / "postmaster.pid")})
    found = await identify_all(control, [ep for ep in endpoints if ep.id in left])
    adoptable = {e for e, f in found.items() if control.computes.take_over(plane.endpoint(None, e), f)}
    control.computes.strays = left - adoptable
    ops = await plane.db(plane.store.unfinished_operations)
    projects_dir = plane.layout.projects_dir
    dirs, branch_dirs, entries = await asyncio.to_thread(look_on_disk, projects_dir)
    snap = Snapshot(endpoints={e.id: e.current_state for e in plane.endpoints()}, adoptable=frozenset(adoptable),
                    unfinished_ops=tuple(o.id for o in ops), project_ids=frozenset(p.id for p in plane.projects()),
                    project_dirs=dirs, branch_ids=frozenset(b.id for b in plane.all_branches()),
                    branch_dirs=frozenset(branch_dirs), branch_entries=entries)
    plan = decide(snap)

    # The metadata in one transaction (one fsync, not one per compute: 100 adopted computes took
    # 40 s one by one on a loaded machine); cut short, the next start reconciles from scratch.
    now = model.utcnow()
    by_id = {o.id: o for o in ops}
    puts: list[object] = [plane.endpoint(None, e).replace(current_state=model.ComputeState.ACTIVE, last_active=now)
                          for e in plan.adopt]  # it kept running while argon was away: its roles sync at its stop
    puts += [plane.endpoint(None, e).replace(current_state=model.ComputeState.IDLE, suspended_at=now)
             for e in plan.mark_idle]
    puts += [by_id[o].replace(status=model.OperationStatus.FAILED, failures_count=by_id[o].failures_count + 1,
                              error="interrupted: argon stopped while this operation ran") for o in plan.fail_ops]
    if puts:
        await plane.commit(put=puts)
    for ep_id in plan.adopt:
        plane.activity.touch(ep_id)
    if plan.adopt:
        await plane.add_events([model.Event(endpoint_id=e, kind=model.EventKind.ADOPTED, at=now) for e in plan.adopt])
    await bounded(ADOPT_AT_ONCE, [_apply_pending_spec(control, e) for e in plan.adopt])
    await tidy_disk(control, plan)
    await snapshots.remove_orphans(control)
    log.info("reconciled in %.0f ms: %s", (time.monotonic() - started) * 1000, plan.summary())
    return plan


ADOPT_AT_ONCE = 8  # computes identified (or given a pending spec) at once at start-up


async def bounded(limit: int, coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run `coros` with at most `limit` of them in flight; results in the order given."""
    gate = asyncio.Semaphore(limit)

    async def one(coro: Coroutine[Any, Any, T]) -> T:
        async with gate:
            return await coro

    return list(await asyncio.gather(*(one(c) for c in coros)))


async def identify_all(control: Control, endpoints: list[model.Endpoint]) -> dict[str, LeftRunning]:
    """The computes a previous argon left running for `endpoints` whose identity checks out, checked
    several at once in threads (each reads `/proc`, the pid file and the branch's history)."""
    found = await bounded(ADOPT_AT_ONCE, [asyncio.to_thread(control.computes.identify, ep) for ep in endpoints])
    return {ep.id: f for ep, f in zip(endpoints, found, strict=True) if f is not None}


def pgdata(plane: ControlPlane, ep: model.Endpoint) -> Path:
    """The data directory an endpoint's compute runs on."""
    if ep.type is model.EndpointType.READ_WRITE:
        return plane.layout.pgdata(ep.project_id, ep.branch_id)
    return plane.layout.replica_dir(ep.project_id, ep.branch_id, ep.id) / "pgdata"


async def adopt_strays(control: Control) -> list[str]:
    """Reconcile as a loop (the suspend monitor calls this every few seconds): a compute that became
    ready after start-up reconciliation (a slow crash recovery) is adopted, and gets its pending
    spec; one still starting is looked at again next time. Exits are seen by each compute's watch."""
    plane = control.plane
    adopted = []
    strays = control.computes.strays
    for gone in [e for e in strays if plane.find_endpoint(e) is None or plane.is_running(e)]:
        strays.discard(gone)
    idle = {e: pgdata(plane, plane.endpoint(None, e)) for e in strays if not plane.endpoint_lock(e).locked()}
    with_pidfile = await asyncio.to_thread(
        lambda: [ep_id for ep_id, path in idle.items() if safefs.lexists(path / "postmaster.pid")])
    strays.difference_update(set(idle) - set(with_pidfile))  # its postmaster exited: nothing to adopt
    for ep_id in with_pidfile:
        ep = plane.find_endpoint(ep_id)
        if ep is None:
            continue
        lock = plane.endpoint_lock(ep.id)
        async with lock:
            if plane.is_running(ep.id):
                continue
            found = await asyncio.to_thread(control.computes.identify, ep)
            if found is None:
                continue
            if plane.find_endpoint(ep.id) is None:  # deleted while it was being identified
                found.release()
                continue
            control.computes.take_over(ep, found)
        ep = plane.endpoint(None, ep.id)
        now = model.utcnow()
        await plane.commit(put=[ep.replace(current_state=model.ComputeState.ACTIVE, last_active=now)])
        plane.activity.touch(ep.id)
        await plane.add_events([model.Event(endpoint_id=ep.id, kind=model.EventKind.ADOPTED, at=now)])
        log.warning("adopted the compute of %s, which became ready after start-up", ep.id)
        await _apply_pending_spec(control, ep.id)
        strays.discard(ep.id)
        adopted.append(ep.id)
    return adopted


async def _apply_pending_spec(control: Control, endpoint_id: str) -> None:
    """An adopted compute that a crashed argon started without its spec (or whose password reset was
    cut short) gets it now, before its roles could be synced back into the store."""
    if not control.computes.needs_spec(endpoint_id):
        return
    try:
        await control.computes.ensure_running(endpoint_id, reason="spec pending after a restart")
    except Exception as exc:  # the next connection tries again
        log.warning("could not apply the pending spec of %s: %s", endpoint_id, getattr(exc, "user_message", exc))


async def tidy_disk(control: Control, plan: Plan) -> None:
    """The plan's directory removals and restore swaps. Below a project's directory everything is its
    compute's uid's: never through a link it put there (`argon.safefs`)."""
    plane: ControlPlane = control.plane
    projects_dir = plane.layout.projects_dir
    for name in plan.remove_dirs:
        await asyncio.to_thread(safefs.rmtree, projects_dir / name)
    for path in plan.remove_branch_paths:
        project, branch, *rest = path.split("/")
        await asyncio.to_thread(safefs.rmtree, projects_dir.joinpath(project, "branches", branch, *rest))
    for path in plan.finish_restores:
        project, branch = path.split("/")
        bdir = projects_dir / project / "branches" / branch
        await asyncio.to_thread(safefs.rename, bdir / "pgdata.restoring", bdir / "pgdata")
        for ep in plane.endpoints(project, branch):
            control.computes.mark_needs_spec(ep.id)

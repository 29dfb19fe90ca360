"""Start-up reconciliation: make reality match the metadata after any stop, clean or `kill -9`.

Snapshot (what the store says, what runs, what is on disk) -> decide (pure) -> act -> one logged
sentence. Computes still running from a previous argon are adopted when their identity checks out
(`argon.compute.postmaster.adopt`), never started twice; endpoints that claim to be active but are
not are marked idle; operations interrupted mid-way are marked failed; data directories that no
project owns (a crash during project creation) are removed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from argon import model

if TYPE_CHECKING:
    from argon.control.plane import ControlPlane

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    endpoints: dict[str, model.ComputeState]  # endpoint id -> state in metadata
    adoptable: frozenset[str]  # endpoints whose postmaster is alive and verified
    unfinished_ops: tuple[str, ...]
    project_ids: frozenset[str]
    project_dirs: frozenset[str]


@dataclass(frozen=True)
class Plan:
    adopt: list[str] = field(default_factory=list)
    mark_idle: list[str] = field(default_factory=list)
    fail_ops: list[str] = field(default_factory=list)
    remove_dirs: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"adopted {len(self.adopt)} running compute(s), marked {len(self.mark_idle)} idle, "
                f"closed {len(self.fail_ops)} interrupted operation(s), removed {len(self.remove_dirs)} orphan dir(s)")


def decide(snap: Snapshot) -> Plan:
    plan = Plan()
    for ep_id, state in sorted(snap.endpoints.items()):
        if ep_id in snap.adoptable:
            plan.adopt.append(ep_id)
        elif state is model.ComputeState.ACTIVE:
            plan.mark_idle.append(ep_id)
    plan.fail_ops.extend(snap.unfinished_ops)
    plan.remove_dirs.extend(sorted(snap.project_dirs - snap.project_ids))
    return plan


async def reconcile(plane: ControlPlane) -> Plan:
    adoptable: set[str] = set()
    for ep in plane.endpoints():
        try:
            spec = plane.compute_spec(ep)
        except Exception:
            continue
        if plane.computes.adopt(spec) is not None:
            adoptable.add(ep.id)
    ops = await plane.db(plane.store.unfinished_operations)
    projects_dir = plane.layout.projects_dir
    dirs = frozenset(p.name for p in projects_dir.iterdir() if p.is_dir()) if projects_dir.is_dir() else frozenset()
    snap = Snapshot(endpoints={e.id: e.current_state for e in plane.endpoints()}, adoptable=frozenset(adoptable),
                    unfinished_ops=tuple(o.id for o in ops), project_ids=frozenset(p.id for p in plane.projects()),
                    project_dirs=dirs)
    plan = decide(snap)

    now = model.utcnow()
    for ep_id in plan.adopt:
        ep = plane.endpoint(None, ep_id)
        # The compute kept running while argon was away: its roles may have changed, so re-sync on demand.
        await plane.save(ep.replace(current_state=model.ComputeState.ACTIVE, last_active=now))
        plane.activity.touch(ep_id)
        await plane.db(plane.store.add_event, model.Event(endpoint_id=ep_id, kind=model.EventKind.ADOPTED, at=now))
        plane._needs_spec.discard(ep_id)
    for ep_id in plan.mark_idle:
        ep = plane.endpoint(None, ep_id)
        await plane.save(ep.replace(current_state=model.ComputeState.IDLE, suspended_at=now))
    by_id = {o.id: o for o in ops}
    for op_id in plan.fail_ops:
        await plane.db(plane.store.put, by_id[op_id].replace(
            status=model.OperationStatus.FAILED, failures_count=by_id[op_id].failures_count + 1,
            error="interrupted: argon stopped while this operation ran"))
    for name in plan.remove_dirs:
        await asyncio.to_thread(shutil.rmtree, projects_dir / name, True)
    log.info("reconciled: %s", plan.summary())
    return plan

"""The control plane's services, composed once: what the use cases, the API, the console and the
platform hold.

- `plane`: the in-memory view and the store plumbing (`argon.control.plane`);
- `computes`: the lifecycle of computes, start and stop (`argon.control.lifecycle`);
- `metrics`: the sampler and the consumption figures (`argon.control.metrics`);
- `figures`: the storage figures (`argon.control.figures`);
- `api_keys`: the API's keys (`argon.control.apikeys`);
- `autoscaler`: compute units enforced and autoscaled (`argon.control.autoscale`);
- `disk`: project size limits and the platform's disk reserve (`argon.control.diskguard`);
- `backup`: continuous backup to object storage, when configured (`argon.control.backup`);
- `restorer`: the branches a lazy `argon restore` left in the bucket (`argon.control.lazyrestore`).

The use cases (`projects`, `branches`, `endpoints`, `roles`, `schema`, the suspend monitor, the
reconciler) take a `Control`; the services below them take only what they need, so calls go one
way: use cases -> services -> plane -> compute, storage, metadata.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from argon.control.apikeys import ApiKeys
from argon.control.autoscale import Autoscaler
from argon.control.diskguard import DiskGuard
from argon.control.figures import Figures
from argon.control.lifecycle import Lifecycle
from argon.control.metrics import MetricsSampler
from argon.control.plane import ControlPlane

if TYPE_CHECKING:
    from argon.control.backup import BackupService
    from argon.control.lazyrestore import LazyRestore


@dataclass(frozen=True)
class Control:
    plane: ControlPlane
    computes: Lifecycle
    metrics: MetricsSampler
    figures: Figures
    api_keys: ApiKeys
    autoscaler: Autoscaler
    disk: DiskGuard
    backup: BackupService | None = None  # continuous backup, when ARGON_BACKUP_URL is set
    restorer: LazyRestore | None = None  # branches still in the bucket after a lazy restore

    async def restored(self, *branch_ids: str, reason: str) -> None:
        """Wait until these branches' data is on the disk (a lazy restore fetches it first)."""
        if self.restorer is not None:
            for branch_id in branch_ids:
                await self.restorer.ensure(branch_id, reason=reason)

    @classmethod
    def build(cls, plane: ControlPlane) -> Control:
        metrics = MetricsSampler(plane)
        backup = None
        if plane.settings.backup_url:
            from argon.control.backup import BackupService

            backup = BackupService(plane)
        figures = Figures(plane, metrics)
        metrics.storage = figures  # storage samples are the figures, measured once (ADR 0022)
        from argon.control.lazyrestore import LazyRestore

        restorer = LazyRestore(plane)
        computes = Lifecycle(plane, backup)
        computes.restorer = restorer
        return cls(plane=plane, computes=computes, metrics=metrics, figures=figures,
                   api_keys=ApiKeys(plane), autoscaler=Autoscaler(plane), disk=DiskGuard(plane),
                   backup=backup, restorer=restorer)

    async def load(self) -> None:
        """Fill the view from the store (at start-up)."""
        await self.plane.load()
        self.computes.load()
        if self.restorer is not None:
            await asyncio.to_thread(self.restorer.load)
        await self.api_keys.load()

    async def close(self) -> None:
        if self.restorer is not None:
            await self.restorer.stop()
        await self.figures.stop()
        await self.metrics.stop()
        await self.autoscaler.stop()
        await self.disk.stop()
        await self.plane.close()

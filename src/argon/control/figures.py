"""Storage figures the API reports, measured on disk (never invented), cached for a few seconds.

- branch `logical_size`: the bytes of the branch's databases (the files under `pgdata/base`, what
  `pg_database_size` adds up), whether or not its compute runs;
- branch `written_data_bytes`: WAL the branch has written since it got its data, summed over its
  history epochs (LSN progress; the current epoch up to its latest checkpoint, or up to the WAL
  position the metrics sampler last saw on the running compute, whichever is newer);
- project `synthetic_storage_size`: the space the project's directory takes on disk (allocated
  blocks: data, history snapshots and archived WAL of every branch).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

from argon import model
from argon.compute.osuser import project_user
from argon.control import retention
from argon.control.metrics import MetricsSampler
from argon.control.plane import ControlPlane
from argon.storage import wal
from argon.storage.usage import disk_usage

TTL = 15.0


@dataclass(frozen=True)
class BranchFigures:
    logical_size: int = 0
    written_data_bytes: int = 0
    allocated_bytes: int = 0


class Figures:
    def __init__(self, plane: ControlPlane, metrics: MetricsSampler) -> None:
        self.plane = plane
        self.metrics = metrics
        self._branches: dict[str, tuple[float, BranchFigures]] = {}
        self._measuring: set[str] = set()  # branches measured again in the background right now
        self._lock = threading.Lock()

    def get(self, branch_id: str) -> BranchFigures:
        entry = self._branches.get(branch_id)
        return entry[1] if entry else BranchFigures()

    def project_bytes(self, project_id: str) -> int:
        return sum(self.get(b.id).allocated_bytes for b in self.plane.branches(project_id))

    def refresh(self, project_id: str) -> None:
        """Measure the project's branches never measured yet, now (call in a thread); those whose
        figures are older than the TTL are measured again in the background while the answer
        keeps the previous figures (a walk of a branch's files and a `pg_controldata` each, which
        every API read would otherwise wait for, once the figures are a few seconds old)."""
        plane = self.plane
        now = time.monotonic()
        project = plane.project(project_id)
        stale = []
        for branch in plane.branches(project_id):
            entry = self._branches.get(branch.id)
            if entry is None:
                self._measure(project, branch.id)
            elif now - entry[0] >= TTL:
                stale.append(branch.id)
        with self._lock:
            stale = [b for b in stale if b not in self._measuring]
            self._measuring.update(stale)
        if stale:
            threading.Thread(target=self._measure_later, args=(project, stale), name="argon-figures",
                             daemon=True).start()

    def _measure_later(self, project: model.Project, branch_ids: list[str]) -> None:
        try:
            for branch_id in branch_ids:
                with contextlib.suppress(Exception):  # deleted meanwhile (NotFound): nothing to measure
                    self.plane.branch(project.id, branch_id)
                    self._measure(project, branch_id)
        finally:
            with self._lock:
                self._measuring.difference_update(branch_ids)

    def _measure(self, project: model.Project, branch_id: str) -> None:
        plane = self.plane
        project_id = project.id
        now = time.monotonic()
        install = plane.installs.get(project.pg_version)
        pgdata = plane.layout.pgdata(project_id, branch_id)
        logical = disk_usage(pgdata / "base").size
        allocated = disk_usage(plane.layout.branch_dir(project_id, branch_id)).allocated
        written = 0
        try:
            manifest = retention.branch_history(plane, project_id, branch_id).load()
            for epoch in manifest.epochs:
                if epoch.end_lsn:
                    end = wal.parse_lsn(epoch.end_lsn)
                elif install is not None:
                    end = wal.parse_lsn(wal.control_data(install.bindir, pgdata,
                                                         project_user(project.os_uid)).checkpoint_lsn)
                    end = max([end, *self._sampled_lsns(project_id, branch_id)])
                else:
                    continue
                written += max(0, end - wal.parse_lsn(epoch.start_lsn))
        except Exception:  # a branch being rebuilt right now: measure next time
            written = self.get(branch_id).written_data_bytes
        with self._lock:
            self._branches[branch_id] = (now, BranchFigures(logical, written, allocated))

    def _sampled_lsns(self, project_id: str, branch_id: str) -> list[int]:
        """The WAL position the metrics sampler saw on the branch's running primary (newer than the
        last checkpoint the control file knows)."""
        primary = self.plane.primary(project_id, branch_id)
        lsn = self.metrics.current_lsn(primary.id) if primary is not None else None
        return [lsn] if lsn is not None else []

    def forget(self, branch_id: str) -> None:
        self._branches.pop(branch_id, None)

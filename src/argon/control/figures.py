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

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from argon import model, safefs
from argon.compute.osuser import project_user
from argon.storage import history as hs

if TYPE_CHECKING:
    from argon.control.plane import ControlPlane

TTL = 15.0


@dataclass(frozen=True)
class BranchFigures:
    logical_size: int = 0
    written_data_bytes: int = 0
    allocated_bytes: int = 0


def _files(path: Path) -> Iterator[tuple[int, list[str]]]:
    try:
        yield from safefs.walk(path)
    except (FileNotFoundError, NotADirectoryError, safefs.UnsafePath):
        return


def _walk(path: Path) -> tuple[int, int]:
    """(sum of file sizes, each inode once; allocated bytes) under `path`. A file with n hard links
    (a branch's history base linked to its parent's snapshot) counts 1/n of its blocks at each link,
    so the branches of a project add up to what the disk holds."""
    size = allocated = 0
    seen: set[tuple[int, int]] = set()
    for fd, files in _files(path):  # the compute's uid's tree: never into a link (safefs)
        for name in files:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            allocated += st.st_blocks * 512 // max(1, st.st_nlink)
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            size += st.st_size
    return size, allocated


class Figures:
    def __init__(self) -> None:
        self._branches: dict[str, tuple[float, BranchFigures]] = {}
        self._lock = threading.Lock()

    def get(self, branch_id: str) -> BranchFigures:
        entry = self._branches.get(branch_id)
        return entry[1] if entry else BranchFigures()

    def project_bytes(self, plane: ControlPlane, project_id: str) -> int:
        return sum(self.get(b.id).allocated_bytes for b in plane.branches(project_id))

    def refresh(self, plane: ControlPlane, project_id: str) -> None:
        """Measure the project's branches whose figures are older than the TTL (call in a thread)."""
        now = time.monotonic()
        project = plane.project(project_id)
        install = plane.installs.get(project.pg_version)
        for branch in plane.branches(project_id):
            entry = self._branches.get(branch.id)
            if entry and now - entry[0] < TTL:
                continue
            pgdata = plane.layout.pgdata(project_id, branch.id)
            logical, _ = _walk(pgdata / "base")
            _, allocated = _walk(plane.layout.branch_dir(project_id, branch.id))
            written = 0
            try:
                manifest = hs.BranchHistory(plane.layout.branch_dir(project_id, branch.id) / "history").load()
                for epoch in manifest.epochs:
                    if epoch.end_lsn:
                        end = hs.parse_lsn(epoch.end_lsn)
                    elif install is not None:
                        end = hs.parse_lsn(hs.control_data(install.bindir, pgdata,
                                                           project_user(project.os_uid)).checkpoint_lsn)
                        end = max([end, *self._sampled_lsns(plane, project_id, branch.id)])
                    else:
                        continue
                    written += max(0, end - hs.parse_lsn(epoch.start_lsn))
            except Exception:  # a branch being rebuilt right now: measure next time
                written = self.get(branch.id).written_data_bytes
            with self._lock:
                self._branches[branch.id] = (now, BranchFigures(logical, written, allocated))

    @staticmethod
    def _sampled_lsns(plane: ControlPlane, project_id: str, branch_id: str) -> list[int]:
        """The WAL position the metrics sampler saw on the branch's running primary (newer than the
        last checkpoint the control file knows)."""
        lsns = (plane.metrics.current_lsn(e.id) for e in plane.endpoints(project_id, branch_id)
                if e.type is model.EndpointType.READ_WRITE)
        return [lsn for lsn in lsns if lsn is not None]

    def forget(self, branch_id: str) -> None:
        self._branches.pop(branch_id, None)

"""How much disk a directory tree takes: the one measure behind the API's storage figures and the
metrics' storage samples (so the two can never disagree).

A file with n hard links (a branch's history base linked to its parent's snapshot, ADR 0010) counts
1/n of its allocated blocks at each link: the trees of a project's branches then add up to what the
disk holds, whichever branch a link is in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DiskUsage:
    size: int = 0  # the sum of file sizes, each inode once (what `pg_database_size` adds up under base/)
    allocated: int = 0  # allocated blocks (st_blocks * 512); a file with n links counts 1/n at each


def disk_usage(path: Path) -> DiskUsage:
    """Walk `path` (files removed meanwhile are skipped: WAL recycling, a branch being deleted)."""
    size = allocated = 0
    seen: set[tuple[int, int]] = set()
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            allocated += st.st_blocks * 512 // max(1, st.st_nlink)
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            size += st.st_size
    return DiskUsage(size=size, allocated=allocated)

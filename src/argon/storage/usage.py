"""How much disk a directory tree takes: the one measure behind the API's storage figures and the
metrics' storage samples (so the two can never disagree).

A file with n hard links (a branch's history base linked to its parent's snapshot, ADR 0010) counts
1/n of its allocated blocks at each link: the trees of a project's branches then add up to what the
disk holds, whichever branch a link is in.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from argon import safefs


@dataclass(frozen=True)
class DiskUsage:
    size: int = 0  # the sum of file sizes, each inode once (what `pg_database_size` adds up under base/)
    allocated: int = 0  # allocated blocks (st_blocks * 512); a file with n links counts 1/n at each


def _files(path: Path) -> Iterator[tuple[int, list[str]]]:
    try:
        yield from safefs.walk(path)
    except (FileNotFoundError, NotADirectoryError, safefs.UnsafePath):
        return


def disk_usage(path: Path) -> DiskUsage:
    """Walk `path` (files removed meanwhile are skipped: WAL recycling, a branch being deleted). The
    tree is the compute's uid's: never into a link (`argon.safefs`)."""
    size = allocated = 0
    seen: set[tuple[int, int]] = set()
    for fd, files in _files(path):
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
    return DiskUsage(size=size, allocated=allocated)

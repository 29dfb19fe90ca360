"""Copying a cluster directory: reflink (copy-on-write) where the filesystem can, a plain copy else.

Both backends shell out to coreutils `cp -a`, which preserves modes and is several times faster
than `shutil.copytree` on the thousands of small files of a cluster. `pick_backend` probes the data
directory's filesystem once with the `FICLONE` ioctl: btrfs, XFS (reflink=1) and bcachefs say yes.

A copy inside a project's tree runs as the project's uid (`owner`): `cp` resolves its paths, and
the compute's uid can put links anywhere in that tree, so as root it would copy wherever they
lead. As the project's uid it can only reach what that uid could reach anyway. Copies of the
root-owned templates run as root into a directory only root can enter (`argon.storage.spares`).
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from argon import safefs
from argon.errors import ConfigError, StorageError

FICLONE = 0x40049409
_CP_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}  # English errors: "No space left" is matched below


@dataclass(frozen=True)
class CloneBackend:
    name: Literal["reflink", "copy"]

    def clone_tree(self, source: Path, target: Path, *, tolerate_vanished: bool = False,
                   owner: safefs.Owner | None = None) -> None:
        """Copy `source` to `target` (which must not exist) preserving modes and ownership; as
        `owner` (the project's uid) when given."""
        safefs.makedirs(target.parent, owner=owner)
        self._cp([str(source), str(target)], target.parent, tolerate_vanished, owner)

    def copy_into(self, sources: list[Path], target_dir: Path, *, tolerate_vanished: bool = False,
                  owner: safefs.Owner | None = None) -> None:
        """Copy each of `sources` into the existing directory `target_dir`; as `owner` when given."""
        if sources:
            self._cp(["-t", str(target_dir), *map(str, sources)], target_dir, tolerate_vanished, owner)

    def _cp(self, args: list[str], where: Path, tolerate_vanished: bool, owner: safefs.Owner | None) -> None:
        reflink = "always" if self.name == "reflink" else "never"
        result = subprocess.run(["cp", "-a", f"--reflink={reflink}", "--", *args] if args[0] != "-t"
                                else ["cp", "-a", f"--reflink={reflink}", *args[:2], "--", *args[2:]],
                                capture_output=True, text=True, env=_CP_ENV, **safefs.run_as(owner))
        if result.returncode == 0:
            return
        errors = [line for line in result.stderr.strip().splitlines() if line]
        if tolerate_vanished and errors and all("No such file or directory" in line for line in errors):
            return  # a file deleted while we copied (a running cluster drops tables): WAL replay redoes it
        message = errors[-1] if errors else "cp failed"
        if any("No space left" in line for line in errors):
            raise StorageError(f"no space left on the device holding {where}: free some space or move "
                               "ARGON_DATA_DIR")
        raise StorageError(f"copying data failed: {message}")


CopyBackend = CloneBackend("copy")
ReflinkBackend = CloneBackend("reflink")


def supports_reflink(directory: Path) -> bool:
    """Probe with FICLONE between two temp files in `directory`."""
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(tempfile.NamedTemporaryFile(dir=directory, prefix=".reflink-probe"))
        dst = stack.enter_context(tempfile.NamedTemporaryFile(dir=directory, prefix=".reflink-probe"))
        src.write(b"argon" * 1024)
        src.flush()
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError:
            return False
        return True
    return False  # pragma: no cover


def pick_backend(data_dir: Path, choice: str = "auto") -> CloneBackend:
    reflink = supports_reflink(data_dir)
    if choice == "reflink" and not reflink:
        raise ConfigError(f"ARGON_CLONE_BACKEND=reflink but the filesystem of {data_dir} cannot reflink "
                          "(use btrfs, XFS with reflink=1 or bcachefs, or choose `copy`)")
    if choice == "copy" or not reflink:
        return CopyBackend
    return ReflinkBackend

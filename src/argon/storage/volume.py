"""A copy-on-write volume for the data directory on machines whose filesystem cannot reflink (ext4):
a sparse image file, formatted XFS with reflink (or btrfs), loop-mounted at the data directory.

Measured here (design §3): a reflink clone of 6.4 GB takes ~50 ms where ext4 copies ~2 s per GB,
and Postgres keeps 86-90 % of its ext4 throughput on loop-mounted XFS (btrfs: 40-60 %), so XFS is
the default. Pure planning (`plan`, `fstab_line`, `problems`) apart from running it (`apply`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from argon.storage.clone import supports_reflink

FILESYSTEMS = ("xfs", "btrfs")
_SIZE = re.compile(r"^\d+(\.\d+)?[KMGT]?$", re.I)


@dataclass(frozen=True)
class VolumePlan:
    image: Path
    mountpoint: Path
    size: str
    fs: str

    @property
    def commands(self) -> list[list[str]]:
        mkfs = (["mkfs.xfs", "-q", "-m", "reflink=1", str(self.image)] if self.fs == "xfs"
                else ["mkfs.btrfs", "-q", str(self.image)])
        return [["truncate", "-s", self.size, str(self.image)], mkfs,
                ["mkdir", "-p", str(self.mountpoint)], ["mount", "-o", "loop", str(self.image), str(self.mountpoint)]]

    def shell(self) -> str:
        return "\n".join("sudo " + " ".join(_quote(a) for a in cmd) for cmd in self.commands)


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./=:-]+", arg) else "'" + arg.replace("'", "'\"'\"'") + "'"


def plan(mountpoint: Path, *, image: Path | None = None, size: str = "20G", fs: str = "xfs") -> VolumePlan:
    if fs not in FILESYSTEMS:
        raise ValueError(f"--fs must be one of {', '.join(FILESYSTEMS)}")
    if not _SIZE.match(size):
        raise ValueError(f"--size takes a size like 20G or 500M, not {size!r}")
    mountpoint = mountpoint.expanduser().absolute()
    image = (image or mountpoint.with_name(mountpoint.name + ".img")).expanduser().absolute()
    return VolumePlan(image=image, mountpoint=mountpoint, size=size.upper(), fs=fs)


def fstab_line(p: VolumePlan) -> str:
    return f"{p.image} {p.mountpoint} {p.fs} loop,defaults,nofail 0 0"


def mounted_at(path: Path) -> str | None:
    """The filesystem type mounted exactly at `path`, None if it is not a mount point."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and fields[1].replace("\\040", " ") == str(path):
            return fields[2]
    return None


def filesystem_of(path: Path) -> str:
    """The filesystem type holding `path` (longest mount point prefix)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(path.absolute())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def problems(p: VolumePlan) -> list[str]:
    """Why `p` cannot run here, as sentences (empty: it can)."""
    found = []
    if os.geteuid() != 0:
        found.append("creating and mounting a volume needs root")
    tool = "mkfs.xfs" if p.fs == "xfs" else "mkfs.btrfs"
    if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
        found.append(f"{tool} is missing (apt-get install {'xfsprogs' if p.fs == 'xfs' else 'btrfs-progs'})")
    if mounted_at(p.mountpoint):
        found.append(f"{p.mountpoint} is already a mount point ({mounted_at(p.mountpoint)})")
    elif p.mountpoint.exists() and any(p.mountpoint.iterdir()):
        found.append(f"{p.mountpoint} is not empty: stop argon, move it aside, run this, then copy it back "
                     f"(e.g. mv {p.mountpoint} {p.mountpoint}.old)")
    if p.image.exists():
        found.append(f"{p.image} already exists")
    return found


def apply(p: VolumePlan) -> None:
    """Run the plan; on failure undo what was done (unmount, remove the image)."""
    done: list[str] = []
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    try:
        for cmd in p.commands:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            if out.returncode != 0:
                raise OSError(f"{' '.join(cmd)} failed: {out.stderr.strip() or out.stdout.strip()}")
            done.append(cmd[0])
    except BaseException:
        if "mount" in done:
            subprocess.run(["umount", str(p.mountpoint)], capture_output=True, env=env)
        if "truncate" in done:
            p.image.unlink(missing_ok=True)
        raise
    if not supports_reflink(p.mountpoint):  # pragma: no cover - a kernel without reflink support
        raise OSError(f"{p.mountpoint} is mounted but cannot reflink")


def status(path: Path) -> dict[str, object]:
    path = path.expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    reflink = False
    if os.access(probe, os.W_OK):
        try:
            reflink = supports_reflink(probe)
        except OSError:
            reflink = False
    return {"path": str(path), "filesystem": filesystem_of(probe), "mount_point": bool(mounted_at(path)),
            "reflink": reflink, "clone_backend": "reflink" if reflink else "copy",
            "free_bytes": usage.free, "total_bytes": usage.total}

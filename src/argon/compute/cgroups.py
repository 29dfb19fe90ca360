"""Kernel limits for computes: one cgroup per compute with a CPU quota and a memory limit.

Mechanism only: which limits a compute gets is the control plane's decision (`argon.control.autoscale`).
Both cgroup versions are driven through the same calls:

- v2 (one unified hierarchy with the `cpu` and `memory` controllers enabled): the computes of one
  Argon live in `<cgroup2 root>/argon-<tag>/<endpoint>`, limited by `cpu.max` and `memory.max`,
  measured by `cpu.stat` and `memory.current`, OOM kills counted in `memory.events`.
- v1 (separate `cpu`, `cpuacct` and `memory` hierarchies, as on hybrid hosts): the same directory
  name under Argon's own cgroup in each hierarchy; `cpu.cfs_quota_us`, `memory.limit_in_bytes`,
  `cpuacct.usage`, `memory.usage_in_bytes`, and the `oom_kill` line of `memory.oom_control`.

`<tag>` is derived from the data directory, so two Argon instances on one host never share a
parent, and a restarted `argon up` finds its computes' cgroups again (adoption reads their limits
back). The parsers (`/proc/self/mountinfo`, `/proc/self/cgroup`, the stat files) are pure functions;
`detect` and `Cgroups` do the file I/O. Only root creates cgroups, under cgroupfs, which holds no
tenant-writable file or link: nothing of a tenant's tree is ever followed (names are checked
against `_NAME` and opened with `O_NOFOLLOW`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000  # the kernel's default CFS period; quota = CPUs x period
MIN_CPU_QUOTA_US = 1_000  # the kernel refuses quotas under 1 ms
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
V1_CONTROLLERS = ("cpu", "cpuacct", "memory")


@dataclass(frozen=True)
class Limits:
    """What a compute may use: `cpus` CPUs (fractional) and `memory_bytes` of RAM."""

    cpus: float
    memory_bytes: int

    def describe(self) -> str:
        return f"{self.cpus:g} CPU, {self.memory_bytes / 2**30:.2f} GiB"


@dataclass(frozen=True)
class Usage:
    """One reading of a compute's cgroup; the `_usec` counters and `oom_kills` only grow."""

    cpu_usec: int
    throttled_usec: int
    memory_bytes: int  # everything charged to it, page cache included
    oom_kills: int
    resident_bytes: int = 0  # anonymous and shared memory: what the kernel cannot drop (there is no swap)


# Pure parsing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    fstype: str  # "cgroup" (v1) or "cgroup2"
    root: str  # the path inside the hierarchy that is mounted (usually "/")
    mountpoint: str
    controllers: frozenset[str]  # v1: from the super options ("cpu", "memory", ...); v2: empty


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup mounts listed in `/proc/self/mountinfo`."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        options = set(rest[2].split(","))
        controllers = frozenset(o for o in options if o in V1_CONTROLLERS) if rest[0] == "cgroup" else frozenset()
        mounts.append(Mount(rest[0], _unescape(fields[3]), _unescape(fields[4]), controllers))
    return mounts


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """`/proc/self/cgroup` as {controller: path}; the v2 entry (`0::/path`) under the key ""."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for name in parts[1].split(",") if parts[1] else [""]:
            out[name] = parts[2]
    return out


def parse_flat_keyed(text: str) -> dict[str, int]:
    """`key value` lines (cpu.stat, memory.events, memory.oom_control, memory.stat)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value.strip())
    return out


def cpu_max_text(cpus: float) -> str:
    """v2 `cpu.max` for `cpus` CPUs."""
    return f"{quota_us(cpus)} {CPU_PERIOD_US}"


def quota_us(cpus: float) -> int:
    return max(MIN_CPU_QUOTA_US, round(cpus * CPU_PERIOD_US))


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a v2 `cpu.max` ("max 100000" is no limit: None)."""
    quota, _, period = text.strip().partition(" ")
    if quota == "max":
        return None
    return int(quota) / int(period or CPU_PERIOD_US)


def parse_memory_max(text: str) -> int | None:
    value = text.strip()
    return None if value == "max" else int(value)


def tag_for(data_dir: Path) -> str:
    """The name of the parent cgroup of one Argon instance's computes (stable for a data directory)."""
    digest = hashlib.sha256(str(data_dir.absolute()).encode()).hexdigest()[:10]
    return f"argon-{digest}"


# The filesystem -------------------------------------------------------------------------------------


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


class CgroupError(Exception):
    """A cgroup could not be created, limited or joined; the message says which and why."""


@dataclass
class Cgroups:
    """The computes' cgroups of one Argon instance: `version` "v2" or "v1", and the parent directory
    in each hierarchy (one for v2; cpu, cpuacct and memory for v1, the same path when co-mounted)."""

    version: str
    parents: dict[str, Path]  # controller ("" for v2) -> parent directory
    _dirs_made: set[Path] = field(default_factory=set)

    def describe(self) -> str:
        where = ", ".join(sorted({str(p) for p in self.parents.values()}))
        return f"cgroup {self.version} ({where})"

    def _dirs(self, name: str) -> dict[str, Path]:
        if not _NAME.match(name):
            raise CgroupError(f"not a cgroup name Argon makes: {name!r}")
        return {ctl: parent / name for ctl, parent in self.parents.items()}

    def ensure_parents(self) -> None:
        """Create the instance's parent cgroups; on v2 enable cpu and memory for the computes below."""
        for parent in set(self.parents.values()):
            parent.mkdir(mode=0o755, exist_ok=True)
        if self.version == "v2":
            parent = self.parents[""]
            _enable_controllers(parent.parent)
            _enable_controllers(parent)

    def create(self, name: str, limits: Limits) -> None:
        """The compute's cgroup with its limits (an existing one, left by a crash, is reused)."""
        try:
            for path in set(self._dirs(name).values()):
                path.mkdir(mode=0o755, exist_ok=True)
            self.set_limits(name, limits)
        except OSError as exc:
            raise CgroupError(f"cannot create the cgroup of {name}: {exc.strerror or exc}") from exc

    def set_limits(self, name: str, limits: Limits) -> None:
        """Change the limits of a running compute at once. Lowering memory below what the compute uses
        makes the kernel reclaim its cache first; v1 refuses (EBUSY) when it cannot, and so do we."""
        dirs = self._dirs(name)
        try:
            if self.version == "v2":
                _write(dirs[""] / "cpu.max", cpu_max_text(limits.cpus))
                _write(dirs[""] / "memory.max", str(limits.memory_bytes))
                if (dirs[""] / "memory.swap.max").exists():
                    _write(dirs[""] / "memory.swap.max", "0")
            else:
                _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(dirs["cpu"] / "cpu.cfs_quota_us", str(quota_us(limits.cpus)))
                memory = dirs["memory"]
                with contextlib.suppress(OSError):  # no swap accounting: nothing to keep out of swap
                    _write(memory / "memory.swappiness", "0")
                _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise CgroupError(f"the compute {name} uses more memory than {limits.describe()} allows "
                                  "and the kernel could not reclaim enough") from exc
            raise CgroupError(f"cannot set the limits of {name}: {exc.strerror or exc}") from exc

    def limits(self, name: str) -> Limits | None:
        """The limits in force for `name` (None when it has no cgroup or no limit): adoption reads
        them back after a restart of Argon."""
        dirs = self._dirs(name)
        try:
            if self.version == "v2":
                cpus = parse_cpu_max(_read(dirs[""] / "cpu.max"))
                memory = parse_memory_max(_read(dirs[""] / "memory.max"))
            else:
                quota = int(_read(dirs["cpu"] / "cpu.cfs_quota_us"))
                period = int(_read(dirs["cpu"] / "cpu.cfs_period_us"))
                cpus = None if quota < 0 else quota / period
                memory = int(_read(dirs["memory"] / "memory.limit_in_bytes"))
                memory = None if memory >= 2**62 else memory
        except (OSError, ValueError):
            return None
        if cpus is None or memory is None:
            return None
        return Limits(cpus=cpus, memory_bytes=memory)

    def attach(self, name: str, pid: int) -> int:
        """Move `pid` and every other process of its session into the compute's cgroup; returns how
        many moved. Hazard: the postmaster is moved just after its exec, and its first fork comes
        only after it has read its config and set up shared memory; the sweep of its descendants
        catches a child forked before the move anyway. Children forked later inherit the cgroup."""
        pids = [pid, *descendants(pid)]
        moved = 0
        for path in set(self._dirs(name).values()):
            for p in pids:
                try:
                    _write(path / "cgroup.procs", str(p))
                    moved += 1
                except ProcessLookupError:
                    continue  # exited meanwhile
                except OSError as exc:
                    if exc.errno == errno.ESRCH:
                        continue
                    raise CgroupError(f"cannot move process {p} into the cgroup of {name}: "
                                      f"{exc.strerror or exc}") from exc
        return moved

    def pids(self, name: str) -> list[int]:
        out: set[int] = set()
        for path in set(self._dirs(name).values()):
            with contextlib.suppress(OSError):
                out.update(int(x) for x in _read(path / "cgroup.procs").split())
        return sorted(out)

    def usage(self, name: str) -> Usage | None:
        dirs = self._dirs(name)
        try:
            if self.version == "v2":
                cpu = parse_flat_keyed(_read(dirs[""] / "cpu.stat"))
                events = parse_flat_keyed(_read(dirs[""] / "memory.events"))
                stat = parse_flat_keyed(_read(dirs[""] / "memory.stat"))
                return Usage(cpu_usec=cpu.get("usage_usec", 0), throttled_usec=cpu.get("throttled_usec", 0),
                             memory_bytes=int(_read(dirs[""] / "memory.current")),
                             oom_kills=events.get("oom_kill", 0),
                             resident_bytes=stat.get("anon", 0) + stat.get("shmem", 0))
            cpu = parse_flat_keyed(_read(dirs["cpu"] / "cpu.stat"))
            oom = parse_flat_keyed(_read(dirs["memory"] / "memory.oom_control"))
            stat = parse_flat_keyed(_read(dirs["memory"] / "memory.stat"))
            return Usage(cpu_usec=int(_read(dirs["cpuacct"] / "cpuacct.usage")) // 1000,
                         throttled_usec=cpu.get("throttled_time", 0) // 1000,
                         memory_bytes=int(_read(dirs["memory"] / "memory.usage_in_bytes")),
                         oom_kills=oom.get("oom_kill", 0),
                         resident_bytes=stat.get("total_rss", 0) + stat.get("total_shmem", 0))
        except (OSError, ValueError):
            return None

    def remove(self, name: str, wait: float = 2.0) -> bool:
        """Remove the compute's cgroup once its processes are gone (a backend may outlive its
        postmaster's SIGKILL by a moment). False when it is still busy after `wait` seconds: the
        next start reuses it, and the reconciler retries at start-up."""
        deadline = time.monotonic() + wait
        for path in set(self._dirs(name).values()):
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        log.warning("could not remove the cgroup %s: %s", path, exc.strerror or exc)
                        return False
                    time.sleep(0.02)
        return True

    def remove_parents(self) -> None:
        """At shutdown: remove the instance's parents if no compute cgroup is left under them (a
        compute left running keeps them; the next start finds them)."""
        for parent in set(self.parents.values()):
            with contextlib.suppress(OSError):
                parent.rmdir()

    def names(self) -> list[str]:
        """The compute cgroups that exist under this instance's parent."""
        parent = next(iter(self.parents.values()))
        with contextlib.suppress(OSError):
            return sorted(p.name for p in parent.iterdir() if p.is_dir() and _NAME.match(p.name))
        return []


def _enable_controllers(path: Path) -> None:
    """v2: let the children of `path` be limited by cpu and memory (no-op when already enabled)."""
    enabled = set(_read(path / "cgroup.subtree_control").split())
    for ctl in ("cpu", "memory"):
        if ctl not in enabled:
            _write(path / "cgroup.subtree_control", f"+{ctl}")


def descendants(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """`pid`'s children, theirs, and so on, from `/proc/<pid>/task/<tid>/children` (a fraction of a
    millisecond; scanning all of `/proc` for the session took ~180 ms on a loaded host)."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 100_000:
        current = todo.pop()
        try:
            tasks = os.listdir(proc / str(current) / "task")
        except OSError:
            continue
        for tid in tasks:
            with contextlib.suppress(OSError, ValueError):
                kids = [int(x) for x in (proc / str(current) / "task" / tid / "children").read_text().split()]
                out += kids
                todo += kids
    return out


def detect(data_dir: Path, *, proc: Path = Path("/proc"), is_root: bool | None = None) -> Cgroups | str:
    """The cgroups this instance can use, or a sentence saying why it cannot (said once at start)."""
    if is_root is None:
        is_root = os.geteuid() == 0
    if not is_root:
        return "not running as root: computes run without CPU and memory limits"
    try:
        mounts = parse_mountinfo((proc / "self" / "mountinfo").read_text())
        own = parse_proc_cgroup((proc / "self" / "cgroup").read_text())
    except OSError as exc:
        return f"cannot read the cgroup mounts ({exc.strerror or exc}): computes run without limits"
    tag = tag_for(data_dir)
    available: set[str] = set()
    unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if unified is not None:
        root = Path(unified.mountpoint)
        with contextlib.suppress(OSError):
            available = set(_read(root / "cgroup.controllers").split())
        if {"cpu", "memory"} <= available:
            return Cgroups("v2", {"": root / tag})
    v1: dict[str, Path] = {}
    for ctl in V1_CONTROLLERS:
        mount = next((m for m in mounts if m.fstype == "cgroup" and ctl in m.controllers), None)
        if mount is None:
            continue
        inside = own.get(ctl, "/")
        rel = os.path.relpath(inside, mount.root) if inside.startswith(mount.root) else "."
        v1[ctl] = (Path(mount.mountpoint) / rel).resolve() / tag
    if set(v1) == set(V1_CONTROLLERS):
        return Cgroups("v1", v1)
    missing = [c for c in ("cpu", "memory") if c not in v1 and c not in available]
    return (f"no cgroup {' or '.join(missing) or 'cpuacct'} controller available: computes run without "
            "CPU and memory limits")

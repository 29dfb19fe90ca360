"""Which OS user runs a Postgres process, and the `Popen` arguments that make it so.

As root, each project's computes run under their own numeric uid (no passwd entry needed: only
`initdb` wants a named user, and it runs once per template as `nobody`). `Popen(user=...)` alone
keeps gid 0 and root's supplementary groups, so group and extra_groups are always set too.
Unprivileged, everything runs as the invoking user.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon import safefs
from argon.errors import ConfigError

NOBODY_UID = 65534


@dataclass(frozen=True)
class OsUser:
    uid: int
    gid: int


def running_as_root() -> bool:
    return os.geteuid() == 0


def project_user(os_uid: int | None) -> OsUser | None:
    """The OS user of a project's computes (gid = uid), None when it has none (unprivileged)."""
    return OsUser(os_uid, os_uid) if os_uid is not None else None


def template_user() -> OsUser | None:
    """The named user that runs `initdb` for templates when Argon runs as root (None otherwise)."""
    if not running_as_root():
        return None
    try:
        entry = pwd.getpwnam("nobody")
        return OsUser(entry.pw_uid, entry.pw_gid)
    except KeyError:
        return OsUser(NOBODY_UID, NOBODY_UID)


def popen_kwargs(user: OsUser | None) -> dict[str, Any]:
    """Arguments for `subprocess.Popen` running a Postgres binary as `user` (or as ourselves)."""
    if user is None or not running_as_root():
        return {"umask": 0o077}
    return {"user": user.uid, "group": user.gid, "extra_groups": [], "umask": 0o077}


def chown_tree(path: Path, user: OsUser) -> None:
    """Give a whole tree to `user` (root only), never following a symlink (`argon.safefs`)."""
    safefs.chown_tree(path, user)


def _uids(pid: str) -> set[int]:
    """Real, effective, saved and file-system uid of a live process (none for a zombie or a gone one)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").split()[:1] in (["Z"], ["X"]):
        return set()
    return {int(v) for v in fields.get("Uid", "").split()}


def kill_all(uid: int, rounds: int = 20) -> int:
    """SIGKILL every process with `uid` as its real, effective, saved or file-system uid: a deleted
    project's uid must run nothing (a process detached from its compute outlives the postmaster).
    Repeated until none is left, since one may fork while we look. Never for root or ourselves.
    Returns how many were killed."""
    if uid in (0, os.geteuid(), os.getuid()):
        raise ValueError(f"refusing to kill every process of uid {uid}")
    killed = 0
    for _ in range(rounds):
        found = [int(p) for p in os.listdir("/proc") if p.isdigit() and uid in _uids(p)]
        if not found:
            return killed
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.01)
    return killed


# --- The uid range of project computes -----------------------------------------------------------------

def read_subids(path: Path) -> list[tuple[str, int, int]]:
    """(owner, first id, count) of each line of /etc/subuid or /etc/subgid (none if it is missing)."""
    try:
        text = path.read_text()
    except (FileNotFoundError, PermissionError):
        return []
    out = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def uid_range_conflicts(base: int, count: int, *, users: list[tuple[str, int]] | None = None,
                        groups: list[tuple[str, int]] | None = None,
                        subuids: list[tuple[str, int, int]] | None = None,
                        subgids: list[tuple[str, int, int]] | None = None) -> list[str]:
    """Why [base, base + count) cannot be Argon's compute uids (and gids: gid = uid): a user or
    group with an id in it, or an overlapping /etc/subuid or /etc/subgid range (the ids of some
    user's containers). Empty when the range is free. Defaults read this host."""
    users = [(u.pw_name, u.pw_uid) for u in pwd.getpwall()] if users is None else users
    groups = [(g.gr_name, g.gr_gid) for g in grp.getgrall()] if groups is None else groups
    subuids = read_subids(Path("/etc/subuid")) if subuids is None else subuids
    subgids = read_subids(Path("/etc/subgid")) if subgids is None else subgids
    end = base + count - 1
    found = [f"user {name!r} has uid {uid}" for name, uid in users if base <= uid <= end]
    found += [f"group {name!r} has gid {gid}" for name, gid in groups if base <= gid <= end]
    for where, ranges in (("/etc/subuid", subuids), ("/etc/subgid", subgids)):
        found += [f"{where} gives {owner!r} {start}-{start + n - 1}" for owner, start, n in ranges
                  if n > 0 and start <= end and base <= start + n - 1]
    return found


def free_uid_base(count: int, **host: Any) -> int | None:
    """The lowest multiple of 100000 from which `count` ids conflict with nothing (see above)."""
    for base in range(100000, 2**31 - count, 100000):
        if not uid_range_conflicts(base, count, **host):
            return base
    return None


def host_ids() -> dict[str, Any]:
    """This host's users, groups and subordinate id ranges, as `uid_range_conflicts` takes them."""
    return {"users": [(u.pw_name, u.pw_uid) for u in pwd.getpwall()],
            "groups": [(g.gr_name, g.gr_gid) for g in grp.getgrall()],
            "subuids": read_subids(Path("/etc/subuid")), "subgids": read_subids(Path("/etc/subgid"))}


def check_uid_range(base: int, count: int, host: dict[str, Any] | None = None) -> str | None:
    """A sentence saying why the compute uid range is refused, or None when it is free."""
    host = host_ids() if host is None else host
    conflicts = uid_range_conflicts(base, count, **host)
    if not conflicts:
        return None
    shown = "; ".join(conflicts[:5]) + (f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
    free = free_uid_base(count, **host)
    hint = f" e.g. ARGON_COMPUTE_UID_BASE={free}" if free is not None else ""
    return (f"the compute uid range {base}-{base + count - 1} (ARGON_COMPUTE_UID_BASE, ARGON_COMPUTE_UID_COUNT) "
            f"is not Argon's alone: {shown}. Projects' computes would share ids with them; choose a free range,"
            f"{hint}")


RANGES_DIR = Path("/run/argon-uid-ranges")  # host-wide: one file per running Argon (as root), flock-held


def claim_uid_range(base: int, count: int, data_dir: Path, ranges_dir: Path = RANGES_DIR) -> int:
    """Claim [base, base + count) for this process until the returned fd is closed (or the process
    dies): two Argons on one host with overlapping ranges would give two projects the same uid,
    each able to read the other's files, and a project's deletion would kill the other's computes.
    A second one is refused with the first one's pid and data directory."""
    ranges_dir.mkdir(mode=0o700, exist_ok=True)
    guard = os.open(ranges_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        for entry in ranges_dir.iterdir():
            try:
                other_base, other_count = (int(v) for v in entry.name.split(".")[0].split("+"))
            except ValueError:
                continue
            if other_base > base + count - 1 or base > other_base + other_count - 1:
                continue
            fd = os.open(entry, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "?"
                raise ConfigError(f"the compute uid range {base}-{base + count - 1} overlaps that of another running "
                                  f"Argon ({holder}: {other_base}-{other_base + other_count - 1}); give each its own "
                                  "ARGON_COMPUTE_UID_BASE / ARGON_COMPUTE_UID_COUNT") from None
            finally:
                os.close(fd)
            entry.unlink(missing_ok=True)  # its Argon is gone
        mine = os.open(ranges_dir / f"{base}+{count}.{os.getpid()}", os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                       0o600)
        fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(mine, f"pid {os.getpid()}, data directory {data_dir}\n".encode(), 0)
        return mine
    finally:
        os.close(guard)

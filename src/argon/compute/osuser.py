"""Which OS user runs a Postgres process, and the `Popen` arguments that make it so.

As root, each project's computes run under their own numeric uid (no passwd entry needed: only
`initdb` wants a named user, and it runs once per template as `nobody`). `Popen(user=...)` alone
keeps gid 0 and root's supplementary groups, so group and extra_groups are always set too.
Unprivileged, everything runs as the invoking user.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon import safefs

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

"""Spare copies of the templates, cloned ahead of time, so creating a project is a rename.

Copying a template (~30 MB, ~1,300 files) takes 0.1-0.7 s on ext4 depending on how busy the disk
is; a project's creation should not wait for it. The pool keeps a few complete copies per template
under `<data>/spares/`: a project claims one with an atomic `rename` into its branch directory and
the pool is refilled in the background. Copies in progress carry a `.tmp-` prefix and are never
claimed; a copy made from an older template (its stamp differs) is never claimed either, and is
removed on the next refill.

Spares, like the templates, belong to root and sit in a directory only root can enter. A claim
renames the spare to a private name, gives it to the project's uid there (`safefs.chown_tree`),
and only then renames it into the project's tree, so that uid never sees a tree half given away
and never gets to change what root is about to hand it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from argon import safefs
from argon.storage.clone import CloneBackend

log = logging.getLogger(__name__)

STAMP_FILE = "ARGON_TEMPLATE"
_CLAIM = ".claim-"  # a spare being given to a project, or a fresh copy made for one
_STALE_CLAIM = 3600.0  # seconds after which a claim directory is a crash's leftover


def template_key(template: Path) -> str:
    """Which template (name and build) a spare was copied from."""
    try:
        stamp = (template / STAMP_FILE).read_bytes()
    except OSError:
        stamp = b""
    return f"{template.name}-{hashlib.sha256(stamp).hexdigest()[:12]}"


class SparePool:
    def __init__(self, root: Path, backend: CloneBackend, size: int = 2) -> None:
        self.root = root
        self.backend = backend
        self.size = size
        self._refilling = threading.Lock()

    def _ready(self, key: str) -> list[Path]:
        try:
            return sorted(p for p in self.root.iterdir() if p.name.startswith(key + "-"))
        except FileNotFoundError:
            return []

    def claim(self, template: Path, target: Path, owner: safefs.Owner | None = None) -> bool:
        """Move a ready copy of `template` to `target` (which must not exist), given to `owner`.
        False if none is ready."""
        for spare in self._ready(template_key(template)):
            mine = self.root / f"{_CLAIM}{uuid.uuid4().hex}"
            try:
                os.rename(spare, mine)
            except FileNotFoundError:  # another claim took it first
                continue
            if os.lstat(mine).st_uid != os.geteuid():  # made by an older Argon, when templates were nobody's
                safefs.rmtree(mine)
                continue
            self._place(mine, target, owner)
            return True
        return False

    def take(self, template: Path, target: Path, owner: safefs.Owner | None = None) -> None:
        """A copy of `template` at `target` (new; its directory exists), given to `owner`: a ready
        spare, or a copy made now in the pool's directory and moved into place the same way."""
        if not self.claim(template, target, owner):
            self.copy(template, target, owner)

    def copy(self, template: Path, target: Path, owner: safefs.Owner | None = None) -> None:
        """A new copy of `template` at `target`, made in the pool's directory (only root enters it),
        given to `owner` there and moved into place; the ready spares are left for projects."""
        self.root.mkdir(mode=0o700, exist_ok=True)
        work = self.root / f"{_CLAIM}{uuid.uuid4().hex}"
        try:
            self.backend.clone_tree(template, work)
        except BaseException:
            safefs.rmtree(work)
            raise
        self._place(work, target, owner)

    @staticmethod
    def _place(work: Path, target: Path, owner: safefs.Owner | None) -> None:
        try:
            if owner is not None and os.geteuid() == 0:
                safefs.chown_tree(work, owner)
            safefs.rename(work, target)
        except BaseException:
            safefs.rmtree(work)
            raise

    def refill(self, template: Path) -> None:
        """Top the pool up for `template` (blocking; run it in a thread). Drops stale copies."""
        if self.size <= 0 or not self._refilling.acquire(blocking=False):
            return  # a refill is already running; it will see what this one would have done
        try:
            self.root.mkdir(mode=0o700, exist_ok=True)
            key = template_key(template)
            prefix = template.name + "-"
            for entry in self.root.iterdir():
                st = entry.lstat()
                stale = entry.name.startswith(prefix) and (not entry.name.startswith(key + "-")
                                                           or st.st_uid != os.geteuid())
                abandoned = entry.name.startswith(_CLAIM) and time.time() - st.st_mtime > _STALE_CLAIM
                if stale or abandoned or entry.name.startswith(".tmp-"):
                    safefs.rmtree(entry)
            while len(self._ready(key)) < self.size:
                tmp = self.root / f".tmp-{uuid.uuid4().hex}"
                try:
                    self.backend.clone_tree(template, tmp)
                except Exception as exc:
                    safefs.rmtree(tmp)
                    log.warning("could not prepare a spare copy of %s: %s", template.name,
                                getattr(exc, "user_message", exc))
                    return
                os.rename(tmp, self.root / f"{key}-{uuid.uuid4().hex[:12]}")
        finally:
            self._refilling.release()

"""Spare copies of stopped branches, made ahead of time, so a branch of such a parent is a rename.

A branch of a stopped cluster costs a copy of it (tens of MB: a Django template is ~32 MB of data
plus a WAL segment), which on a busy disk takes seconds; a test run branches the same template
every time. The pool keeps ready copies per parent branch in the parent's own directory
(`tmp-spare-<nonce>`, made by the project's uid as any copy of its clusters is, so the copy sits
where only that uid and root reach, as the parent itself does), each stamped with the parent's
`global/pg_control` as it was when the copy was made, and its `pg_controldata`. A stopped cluster changes only through a start, which rewrites `pg_control` (and a
restore, which replaces it): a spare whose stamp is still the parent's is the parent's data byte
for byte. A stale one is removed when it is looked at.

The pool's index is in memory only: what a stop or `kill -9` left, half made or ready, is a `tmp-`
entry of a branch directory, which the start-up reconciler removes as it removes every throw-away
copy. Policy (which parents get spares, how many,
when) is `argon.control.branches`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from argon import safefs
from argon.storage import branching, wal
from argon.storage.clone import CloneBackend

log = logging.getLogger(__name__)

PG_CONTROL = Path("global") / "pg_control"
PREFIX = "tmp-spare-"  # in the parent's branch directory; `tmp-` entries go at the next start


@dataclass(frozen=True)
class Spare:
    path: Path  # a directory: the copy in `pgdata`, beside it what `prepare` made ahead
    stamp: bytes  # the parent's pg_control when the copy was made
    control: wal.ControlData

    @property
    def pgdata(self) -> Path:
        return self.path / "pgdata"


def stamp(pgdata: Path) -> bytes:
    """What identifies a stopped cluster's state: its `pg_control` (8 kB, rewritten by every start,
    checkpoint and stop). Never read through a link its owner put there."""
    return safefs.read_file(pgdata / PG_CONTROL, limit=8192)


class BranchSpares:
    def __init__(self, backend: CloneBackend) -> None:
        self.backend = backend
        self._ready: dict[str, list[Spare]] = {}  # parent branch id -> ready copies
        self._guard = threading.Lock()
        self.refilling: set[str] = set()  # parents whose pool a task is filling (the policy's, on the loop)

    def count(self, branch_id: str) -> int:
        with self._guard:
            return len(self._ready.get(branch_id, ()))

    def take(self, branch_id: str, current: bytes) -> Spare | None:
        """A ready copy of `branch_id` whose stamp is `current` (removed from the pool), or None;
        copies with another stamp are removed (blocking: run it in a thread)."""
        with self._guard:
            spares = self._ready.pop(branch_id, [])
            found = next((s for s in spares if s.stamp == current), None)
            keep = [s for s in spares if s.stamp == current and s is not found]
            if keep:
                self._ready[branch_id] = keep
        for stale in spares:
            if stale.stamp != current:
                safefs.rmtree(stale.path)
        return found

    def make(self, branch_id: str, source: Path, control: wal.ControlData, owner: safefs.Owner | None,
             prepare: Callable[[Path], None] | None = None) -> bool:
        """Copy the stopped cluster `source` (its `pg_controldata` is `control`) into the pool for
        `branch_id`, as `owner`, then let `prepare` add to the spare's directory (blocking). False
        (nothing kept) if `source` changed meanwhile."""
        before = stamp(source)
        path = source.parent / f"{PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            safefs.makedirs(path, owner=owner)
            branching.clone_stopped(self.backend, source, path / "pgdata", control, owner)
            if prepare is not None:
                prepare(path)
        except BaseException:
            safefs.rmtree(path)
            raise
        if stamp(source) != before:
            safefs.rmtree(path)
            return False
        with self._guard:
            self._ready.setdefault(branch_id, []).append(Spare(path, before, control))
        return True

    def drop(self, branch_id: str) -> None:
        """The branch is gone, or its data is about to change: its spares go (blocking)."""
        with self._guard:
            spares = self._ready.pop(branch_id, [])
        for spare in spares:
            safefs.rmtree(spare.path)

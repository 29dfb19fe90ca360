"""Intents: what an operation is about to do to more than one durable place, written down first.

An operation whose steps touch both the metadata store and the disk (a restore swaps data
directories, then rewrites roles and databases; a password reset changes the compute, then the
store) cannot be one transaction. So it writes an intent before its first step and removes it after
its last; whoever finds an intent at start-up (the reconciler) knows the operation was cut short and
from the intent's content, plus what it sees, whether to roll back or finish it.

An intent is a small JSON file in `<data>/intents/`, Argon's own directory (no tenant writes there):
written to a temp name, fsynced and renamed, so it is either there whole or not at all. Keys are
`<kind>-<id>` (`restore-br-…`, `spec-ep-…`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


class Intents:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad intent key {key!r}")
        return self.dir / f"{key}.json"

    def put(self, key: str, data: dict[str, Any] | None = None) -> None:
        """Record (or replace) an intent durably: it survives `kill -9` and a power cut once this returns."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, json.dumps(data or {}, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._sync_dir()

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self._path(key).read_text()))
        except FileNotFoundError:
            return None

    def has(self, key: str) -> bool:
        return self._path(key).exists()

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))
            self._sync_dir()

    def keys(self, kind: str) -> list[str]:
        """The keys of every intent of one kind (`restore`, `spec`), sorted."""
        if not self.dir.is_dir():
            return []
        return sorted(name[:-5] for name in os.listdir(self.dir)
                      if name.startswith(f"{kind}-") and name.endswith(".json"))

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

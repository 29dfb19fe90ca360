"""A branch's history: epochs of snapshots plus archived WAL, and rebuilding a cluster at any point.

Layout, under the branch directory (design §3)::

    history/manifest.json
    history/<epoch>/snapshots/<name>/   a cluster copy recovery can start from
    history/<epoch>/wal/                the WAL the compute archived during that epoch

An **epoch** is one linear stretch of a branch's history: it begins when the branch gets new data
(created, restored, reset, rebuilt at a point in time) from a *base* snapshot, and its WAL stays on
one timeline. Snapshots are either clean (a stopped cluster: replay starts at its shutdown
checkpoint) or online backups (`backup_label` plus the WAL to reach consistency, the clone protocol
of `branching.clone_running`). Rebuilding the cluster at a target = clone the newest snapshot at or
before it, lay the epoch's WAL (archive, then the live `pg_wal`, which holds the not yet archived
tail) into its `pg_wal`, and let Postgres recover to an LSN and promote.

Mechanism only (paths, the manifest, copies and links; WAL files and LSNs are `argon.storage.wal`);
which snapshot to keep, when to take one and what a user may ask for is `argon.control.retention`
and `argon.control.pitr`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from argon.storage import wal
from argon.storage.clone import CloneBackend

MANIFEST_VERSION = 1


# --- The manifest ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    name: str
    taken_at: datetime  # everything committed before this is in it, nothing committed after
    redo_lsn: str  # replay starts here: WAL from this segment on is needed
    consistent_lsn: str  # recovery must replay at least to here
    template: str | None = None  # not copied yet: a pristine template (by its key) holds the same bytes

    def to_json(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "taken_at": self.taken_at.isoformat()}

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> Snapshot:
        return cls(**{**raw, "taken_at": datetime.fromisoformat(str(raw["taken_at"]))})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Epoch:
    id: str
    started_at: datetime
    start_lsn: str
    timeline: int
    segsize: int
    reason: str = ""
    snapshots: tuple[Snapshot, ...] = ()
    ended_at: datetime | None = None
    end_lsn: str | None = None  # the last record of an ended epoch (its shutdown checkpoint)

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "started_at": self.started_at.isoformat(), "start_lsn": self.start_lsn,
                "timeline": self.timeline, "segsize": self.segsize, "reason": self.reason,
                "snapshots": [s.to_json() for s in self.snapshots],
                "ended_at": self.ended_at.isoformat() if self.ended_at else None, "end_lsn": self.end_lsn}

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> Epoch:
        ended = raw.get("ended_at")
        return cls(id=str(raw["id"]), started_at=datetime.fromisoformat(str(raw["started_at"])),
                   start_lsn=str(raw["start_lsn"]), timeline=int(raw["timeline"]),  # type: ignore[call-overload]
                   segsize=int(raw["segsize"]), reason=str(raw.get("reason", "")),  # type: ignore[call-overload]
                   snapshots=tuple(Snapshot.from_json(s) for s in raw.get("snapshots", [])),  # type: ignore[union-attr]
                   ended_at=datetime.fromisoformat(str(ended)) if ended else None,
                   end_lsn=raw.get("end_lsn"))  # type: ignore[arg-type]

    def replace(self, **changes: object) -> Epoch:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Manifest:
    epochs: tuple[Epoch, ...] = field(default_factory=tuple)

    @property
    def current(self) -> Epoch | None:
        return self.epochs[-1] if self.epochs else None

    def with_epoch(self, epoch: Epoch) -> Manifest:
        """Replace the epoch of the same id, or append a new one."""
        if any(e.id == epoch.id for e in self.epochs):
            return Manifest(tuple(epoch if e.id == epoch.id else e for e in self.epochs))
        return Manifest((*self.epochs, epoch))

    def without(self, epoch_id: str) -> Manifest:
        return Manifest(tuple(e for e in self.epochs if e.id != epoch_id))


class BranchHistory:
    """The history directory of one branch."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def load(self) -> Manifest:
        try:
            raw = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return Manifest()
        return Manifest(tuple(Epoch.from_json(e) for e in raw.get("epochs", [])))

    def save(self, manifest: Manifest) -> None:
        """Atomically (write a temp file, fsync, rename): a crash leaves the old or the new manifest."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.manifest_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"version": MANIFEST_VERSION, "epochs": [e.to_json() for e in manifest.epochs]}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.manifest_path)

    def epoch_dir(self, epoch_id: str) -> Path:
        return self.root / epoch_id

    def wal_dir(self, epoch_id: str) -> Path:
        return self.epoch_dir(epoch_id) / "wal"

    def snapshot_dir(self, epoch_id: str, name: str) -> Path:
        return self.epoch_dir(epoch_id) / "snapshots" / name


# --- Snapshots and rebuilding ------------------------------------------------------------------------------

def describe_snapshot(bindir: Path, pgdata: Path, name: str, taken_at: datetime,
                      consistent_lsn: str | None = None) -> tuple[Snapshot, wal.ControlData]:
    """A Snapshot record for the cluster copy at `pgdata` (clean, or an online backup whose stop LSN
    is `consistent_lsn`)."""
    control = wal.control_data(bindir, pgdata)
    label = wal.backup_label_fields(pgdata)
    if label is not None:
        redo = label[0]
        consistent = consistent_lsn or control.checkpoint_lsn
    else:
        redo, consistent = control.redo_lsn, control.checkpoint_lsn
    return Snapshot(name=name, taken_at=taken_at, redo_lsn=redo, consistent_lsn=consistent), control


def assemble(backend: CloneBackend, snapshot: Path, wal_sources: list[list[Path]], target: Path) -> None:
    """Copy `snapshot` to `target` (new) and lay WAL into its pg_wal: each list of `wal_sources` in
    order, later ones overwriting earlier ones (the archive first, then the live pg_wal, whose
    current segment is newer than anything archived)."""
    backend.clone_tree(snapshot, target)
    (target / "pg_wal" / "archive_status").mkdir(parents=True, exist_ok=True)
    for files in wal_sources:
        backend.copy_into(files, target / "pg_wal", tolerate_vanished=True)
    for name in ("postmaster.pid", "postmaster.opts"):
        (target / name).unlink(missing_ok=True)
    (target / "recovery.signal").write_text("")


def assemble_epoch(backend: CloneBackend, snapshot: Path, epoch: Epoch, archive: Path, live: Path | None,
                   start_lsn: int, target: Path) -> None:
    """`assemble` for one epoch: its archived WAL from `start_lsn` on, then the live `pg_wal`'s (when
    the epoch is the branch's current one); a segment archived and removed from `pg_wal` while we
    copied is taken from the archive afterwards."""
    sources = [wal.wal_files(archive, epoch.timeline, epoch.segsize, start_lsn)]
    if live is not None:
        sources.append(wal.wal_files(live, epoch.timeline, epoch.segsize, start_lsn))
    assemble(backend, snapshot, sources, target)
    have = set(os.listdir(target / "pg_wal"))
    late = [p for p in wal.wal_files(archive, epoch.timeline, epoch.segsize, start_lsn) if p.name not in have]
    backend.copy_into(late, target / "pg_wal", tolerate_vanished=True)


def copy_template(backend: CloneBackend, template: Path, path: Path) -> None:
    """A template-backed snapshot made real: `template` copied to `path` under a temporary name, then
    renamed (another copy may win the rename: then it is the one kept)."""
    tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(3)}")
    backend.clone_tree(template, tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another copy won
        shutil.rmtree(tmp, ignore_errors=True)


def link_tree(source: Path, target: Path) -> None:
    """`target` (new) as a tree of hard links to `source`'s files: free on any file system. Only for
    trees nobody writes in place again (snapshots); removing either side leaves the other whole."""
    result = subprocess.run(["cp", "-a", "--link", "--", str(source), str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        raise OSError(result.stderr.strip() or "cp --link failed")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)



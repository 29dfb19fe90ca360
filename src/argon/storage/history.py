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

All of it lies in the project's tree, which its compute's uid can write: files are read and
written through `argon.safefs`, copies and Postgres tools run as that uid (`owner`), and the
manifest is validated as it is read (names that are single path components, sane numbers), so a
tampered manifest can break only this branch's own history, never point root anywhere else.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from argon import safefs
from argon.errors import StorageError
from argon.storage import wal
from argon.storage.clone import CloneBackend

MANIFEST_VERSION = 1
MANIFEST_LIMIT = 16 * 1024 * 1024  # bytes; a real one is a few kB
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # epoch ids and snapshot names: one path component


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
        template = raw.get("template")
        snap = cls(name=_check_name(raw["name"]), taken_at=_time(raw["taken_at"]), redo_lsn=_lsn(raw["redo_lsn"]),
                   consistent_lsn=_lsn(raw["consistent_lsn"]), template=None if template is None else str(template))
        return snap


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
        ended, end_lsn, snapshots = raw.get("ended_at"), raw.get("end_lsn"), raw.get("snapshots", [])
        if not isinstance(snapshots, list):
            raise ValueError("snapshots is not a list")
        return cls(id=_check_name(raw["id"]), started_at=_time(raw["started_at"]), start_lsn=_lsn(raw["start_lsn"]),
                   timeline=_int(raw["timeline"], 1, 0xFFFFFFFF), segsize=_segsize(raw["segsize"]),
                   reason=str(raw.get("reason", ""))[:200], snapshots=tuple(Snapshot.from_json(s) for s in snapshots),
                   ended_at=_time(ended) if ended else None, end_lsn=_lsn(end_lsn) if end_lsn else None)

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


def _check_name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{value!r} is not an epoch or snapshot name")
    return value


def _time(value: object) -> datetime:
    parsed = datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone")
    return parsed


def _lsn(value: object) -> str:
    wal.parse_lsn(str(value))
    return str(value)


def _int(value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{value!r} is not an integer between {low} and {high}")
    return value


def _segsize(value: object) -> int:
    size = _int(value, 1 << 20, 1 << 30)
    if size & (size - 1):
        raise ValueError(f"{value!r} is not a WAL segment size")
    return size


class ManifestError(StorageError):
    """A manifest that is not one Argon wrote (damaged, or tampered with by the compute's uid)."""


class BranchHistory:
    """The history directory of one branch (files of the project's uid, `owner`)."""

    def __init__(self, root: Path, owner: safefs.Owner | None = None) -> None:
        self.root = root
        self.owner = owner

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def exists(self) -> bool:
        return safefs.lexists(self.manifest_path)

    def load(self) -> Manifest:
        try:
            raw = json.loads(safefs.read_file(self.manifest_path, limit=MANIFEST_LIMIT))
        except FileNotFoundError:
            return Manifest()
        except (OSError, ValueError) as exc:
            raise ManifestError(f"the history manifest {self.manifest_path} is unusable: {exc}") from None
        try:
            epochs = raw.get("epochs", [])
            if not isinstance(epochs, list):
                raise ValueError("epochs is not a list")
            return Manifest(tuple(Epoch.from_json(e) for e in epochs))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"the history manifest {self.manifest_path} is unusable: {exc!r}") from None

    def save(self, manifest: Manifest) -> None:
        """Atomically (write a temp file, fsync, rename): a crash leaves the old or the new manifest."""
        safefs.makedirs(self.root, owner=self.owner)
        text = json.dumps({"version": MANIFEST_VERSION, "epochs": [e.to_json() for e in manifest.epochs]}, indent=1)
        safefs.write_file(self.manifest_path, text, owner=self.owner, atomic=True)

    def epoch_dir(self, epoch_id: str) -> Path:
        return self.root / _check_name(epoch_id)

    def wal_dir(self, epoch_id: str) -> Path:
        return self.epoch_dir(epoch_id) / "wal"

    def snapshot_dir(self, epoch_id: str, name: str) -> Path:
        return self.epoch_dir(epoch_id) / "snapshots" / _check_name(name)


# --- Snapshots and rebuilding ------------------------------------------------------------------------------

def describe_snapshot(bindir: Path, pgdata: Path, name: str, taken_at: datetime,
                      consistent_lsn: str | None = None,
                      owner: safefs.Owner | None = None,
                      control: wal.ControlData | None = None) -> tuple[Snapshot, wal.ControlData]:
    """A Snapshot record for the cluster copy at `pgdata` (clean, or an online backup whose stop LSN
    is `consistent_lsn`). `control`: its `pg_controldata`, when the caller read it already (from
    the stopped cluster `pgdata` is a copy of; saves running it again)."""
    control = control or wal.control_data(bindir, pgdata, owner)
    label = wal.backup_label_fields(pgdata)
    if label is not None:
        redo = label[0]
        consistent = consistent_lsn or control.checkpoint_lsn
    else:
        redo, consistent = control.redo_lsn, control.checkpoint_lsn
    return Snapshot(name=name, taken_at=taken_at, redo_lsn=redo, consistent_lsn=consistent), control


def assemble(backend: CloneBackend, snapshot: Path, wal_sources: list[list[Path]], target: Path,
             owner: safefs.Owner | None = None) -> None:
    """Copy `snapshot` to `target` (new) and lay WAL into its pg_wal: each list of `wal_sources` in
    order, later ones overwriting earlier ones (the archive first, then the live pg_wal, whose
    current segment is newer than anything archived)."""
    backend.clone_tree(snapshot, target, owner=owner)
    safefs.makedirs(target / "pg_wal" / "archive_status", owner=owner)
    for files in wal_sources:
        backend.copy_into(files, target / "pg_wal", tolerate_vanished=True, owner=owner)
    with safefs.Dir(target) as d:
        for name in ("postmaster.pid", "postmaster.opts"):
            d.unlink(name)
        d.write("recovery.signal", b"", owner=owner)


def assemble_epoch(backend: CloneBackend, snapshot: Path, epoch: Epoch, archive: Path, live: Path | None,
                   start_lsn: int, target: Path, owner: safefs.Owner | None = None) -> None:
    """`assemble` for one epoch: its archived WAL from `start_lsn` on, then the live `pg_wal`'s (when
    the epoch is the branch's current one); a segment archived and removed from `pg_wal` while we
    copied is taken from the archive afterwards."""
    sources = [wal.wal_files(archive, epoch.timeline, epoch.segsize, start_lsn)]
    if live is not None:
        sources.append(wal.wal_files(live, epoch.timeline, epoch.segsize, start_lsn))
    assemble(backend, snapshot, sources, target, owner)
    have = set(safefs.listdir(target / "pg_wal"))
    late = [p for p in wal.wal_files(archive, epoch.timeline, epoch.segsize, start_lsn) if p.name not in have]
    backend.copy_into(late, target / "pg_wal", tolerate_vanished=True, owner=owner)


def copy_template(copy: Callable[[Path, Path], None], template: Path, path: Path) -> None:
    """A template-backed snapshot made real: `template` copied (by `copy(template, tmp)`: a
    root-owned template is copied where only root goes, `argon.storage.spares`) to `path` under a
    temporary name, then renamed (another copy may win the rename: then it is the one kept)."""
    tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(3)}")
    copy(template, tmp)
    try:
        safefs.rename(tmp, path)
    except OSError:  # another copy won
        safefs.rmtree(tmp)


def link_tree(source: Path, target: Path, owner: safefs.Owner | None = None) -> None:
    """`target` (new) as a tree of hard links to `source`'s files: free on any file system. Only for
    trees nobody writes in place again (snapshots); removing either side leaves the other whole."""
    result = subprocess.run(["cp", "-a", "--link", "--", str(source), str(target)], capture_output=True, text=True,
                            env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}, **safefs.run_as(owner))
    if result.returncode != 0:
        safefs.rmtree(target)
        raise OSError(result.stderr.strip() or "cp --link failed")


def remove_tree(path: Path) -> None:
    safefs.rmtree(path)



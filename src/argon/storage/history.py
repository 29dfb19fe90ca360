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

Mechanism only (paths, the manifest, WAL files, `pg_waldump`); which snapshot to keep, when to take
one and what a user may ask for is `argon.control.history`.

All of it lies in the project's tree, which its compute's uid can write: files are read and
written through `argon.safefs`, copies and Postgres tools run as that uid (`owner`), and the
manifest is validated as it is read (names that are single path components, sane numbers), so a
tampered manifest can break only this branch's own history, never point root anywhere else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from argon import safefs
from argon.errors import StorageError
from argon.storage.clone import CloneBackend

MANIFEST_VERSION = 1
MANIFEST_LIMIT = 16 * 1024 * 1024  # bytes; a real one is a few kB
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # epoch ids and snapshot names: one path component
_SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(\.partial)?$")
_HISTORY = re.compile(r"^[0-9A-F]{8}\.history$")
_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_COMMIT = re.compile(r"lsn: ([0-9A-F]+/[0-9A-F]+),.*desc: COMMIT(?:_PREPARED)? (?:\d+: )?"
                     r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


# --- LSNs and segment names -----------------------------------------------------------------------

def parse_lsn(text: str) -> int:
    """`'0/16B3748'` -> 23803720; ValueError for anything else."""
    match = _LSN.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not an LSN (expected the form 0/16B3748)")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def segment_start(name: str, segsize: int) -> tuple[int, int] | None:
    """(timeline, start LSN) of a WAL segment file name, None if it is not one."""
    match = _SEGMENT.match(name)
    if not match:
        return None
    per_id = 0x100000000 // segsize
    segno = int(match.group(2), 16) * per_id + int(match.group(3), 16)
    return int(match.group(1), 16), segno * segsize


def segment_name(tli: int, lsn: int, segsize: int) -> str:
    per_id = 0x100000000 // segsize
    segno = lsn // segsize
    return f"{tli:08X}{segno // per_id:08X}{segno % per_id:08X}"


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
    parse_lsn(str(value))
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


# --- Archiving -----------------------------------------------------------------------------------------

def archive_command(wal_dir: Path) -> str:
    """Copy a finished segment into `wal_dir` under a temporary name, then rename: the archive never
    holds a half-written segment. Re-archiving the same segment after a crash overwrites it with
    the same bytes."""
    target = _shell_quote(str(wal_dir).replace("%", "%%"))
    return f"cp %p {target}/%f.part && mv -f {target}/%f.part {target}/%f"


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


# --- Reading clusters ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ControlData:
    checkpoint_lsn: str
    redo_lsn: str
    timeline: int
    segsize: int
    state: str


def control_data(bindir: Path, pgdata: Path, owner: safefs.Owner | None = None) -> ControlData:
    """`pg_controldata` of a cluster, run as its owner (it reads the compute's files)."""
    out = subprocess.run([str(bindir / "pg_controldata"), str(pgdata)], capture_output=True, text=True,
                         timeout=30, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}, check=True,
                         **safefs.run_as(owner)).stdout

    def field(label: str) -> str:
        match = re.search(rf"^{re.escape(label)}:\s+(.+)$", out, re.M)
        if not match:
            raise ValueError(f"pg_controldata of {pgdata} has no {label!r}")
        return match.group(1).strip()

    return ControlData(checkpoint_lsn=field("Latest checkpoint location"),
                       redo_lsn=field("Latest checkpoint's REDO location"),
                       timeline=int(field("Latest checkpoint's TimeLineID")),
                       segsize=int(field("Bytes per WAL segment")), state=field("Database cluster state"))


def backup_label_fields(pgdata: Path) -> tuple[str, int] | None:
    """(start LSN, timeline) of an online backup's `backup_label`, None for a clean cluster."""
    try:
        text = safefs.read_file(pgdata / "backup_label", limit=65536).decode(errors="replace")
    except FileNotFoundError:
        return None
    start = re.search(r"^START WAL LOCATION: (\S+)", text, re.M)
    tli = re.search(r"^START TIMELINE: (\d+)", text, re.M)
    if not start:
        raise ValueError(f"unreadable backup_label in {pgdata}")
    return start.group(1), int(tli.group(1)) if tli else 1


def wal_files(directory: Path, timeline: int, segsize: int, from_lsn: int, until_lsn: int | None = None) -> list[Path]:
    """Segments of `timeline` holding WAL at or after `from_lsn` (and, with `until_lsn`, starting at
    or before it), and all timeline history files. The bound leaves out recycled segments: after a
    checkpoint Postgres renames old segments to future names (up to `max_wal_size` of them), which
    hold nothing a copy needs."""
    try:
        names = safefs.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in sorted(names):
        if _HISTORY.match(name):
            found.append(directory / name)
            continue
        seg = segment_start(name, segsize)
        if seg is not None and seg[0] == timeline and seg[1] + segsize > from_lsn and not name.endswith(".partial") \
                and (until_lsn is None or seg[1] <= until_lsn):
            found.append(directory / name)
    return found


def archived_bytes(directory: Path) -> int:
    total = 0
    with safefs.Dir(directory) as d, os.scandir(d.fd) as it:
        for entry in it:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


# --- Snapshots and rebuilding ------------------------------------------------------------------------------

def describe_snapshot(bindir: Path, pgdata: Path, name: str, taken_at: datetime,
                      consistent_lsn: str | None = None, owner: safefs.Owner | None = None) -> tuple[Snapshot, ControlData]:
    """A Snapshot record for the cluster copy at `pgdata` (clean, or an online backup whose stop LSN
    is `consistent_lsn`)."""
    control = control_data(bindir, pgdata, owner)
    label = backup_label_fields(pgdata)
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


def recovery_settings(target_lsn: str | None) -> dict[str, str]:
    """GUCs for one recovery run: to an LSN (stopping *before* the first record that starts at or
    after it), or, with None, to the end of the WAL laid out. Always promote: a new timeline."""
    settings = {"restore_command": "false",  # required with recovery.signal; the WAL is in pg_wal already
                "recovery_target_action": "promote", "recovery_target_timeline": "latest",
                "archive_mode": "off", "hot_standby": "on"}
    if target_lsn is not None:
        settings |= {"recovery_target_lsn": target_lsn, "recovery_target_inclusive": "off"}
    return settings


def tidy_after_recovery(pgdata: Path, control: ControlData) -> None:
    """After the recovery run's clean shutdown, drop the WAL it replayed: a clean cluster needs only
    the segment of its shutdown checkpoint (and the timeline history files)."""
    keep = segment_name(control.timeline, parse_lsn(control.checkpoint_lsn), control.segsize)
    with safefs.Dir(pgdata / "pg_wal") as wal:
        for name in wal.listdir():
            if segment_start(name, control.segsize) is not None and name != keep:
                wal.unlink(name)
        if wal.is_dir("archive_status"):
            with safefs.Dir(wal.path / "archive_status") as status:
                for name in status.listdir():
                    status.unlink(name)
    with safefs.Dir(pgdata) as d:
        for name in ("recovery.signal", "standby.signal", "backup_label.old", "recovery.done"):
            d.unlink(name)


def first_commit_after(bindir: Path, wal_dir: Path, start_lsn: str, timeline: int, after: datetime,
                       owner: safefs.Owner | None = None) -> str | None:
    """The LSN of the first commit record at or after `start_lsn` whose commit time is later than
    `after` (µs precision), scanning the WAL in `wal_dir` with `pg_waldump`; None if there is none."""
    after_utc = after.astimezone(UTC).replace(tzinfo=None)
    cmd = [str(bindir / "pg_waldump"), "--path", str(wal_dir), "--start", start_lsn, "--timeline", str(timeline),
           "--rmgr", "Transaction"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={"LC_ALL": "C", "TZ": "UTC", "PATH": "/usr/bin:/bin"}, **safefs.run_as(owner))
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            match = _COMMIT.search(line)
            if not match:
                continue
            committed = datetime.fromisoformat(match.group(2))
            if committed > after_utc:
                return match.group(1)
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


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


def prune_wal(wal_dir: Path, timeline: int, segsize: int, before_lsn: int) -> int:
    """Delete archived segments wholly before `before_lsn`; returns the bytes freed."""
    freed = 0
    try:
        wal = safefs.Dir(wal_dir)
    except FileNotFoundError:
        return 0
    with wal:
        for name in wal.listdir():
            if name.endswith(".part"):
                continue
            seg = segment_start(name, segsize)
            if seg is not None and seg[1] + segsize <= before_lsn:
                try:
                    freed += wal.lstat(name).st_blocks * 512
                    wal.unlink(name, missing_ok=False)
                except FileNotFoundError:
                    pass
    return freed

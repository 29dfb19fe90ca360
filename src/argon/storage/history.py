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
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from argon.storage.clone import CloneBackend

MANIFEST_VERSION = 1
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


def control_data(bindir: Path, pgdata: Path) -> ControlData:
    out = subprocess.run([str(bindir / "pg_controldata"), str(pgdata)], capture_output=True, text=True,
                         timeout=30, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}, check=True).stdout

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
        text = (pgdata / "backup_label").read_text()
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
        names = os.listdir(directory)
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
    with os.scandir(directory) as it:
        for entry in it:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


# --- Snapshots and rebuilding ------------------------------------------------------------------------------

def describe_snapshot(bindir: Path, pgdata: Path, name: str, taken_at: datetime,
                      consistent_lsn: str | None = None) -> tuple[Snapshot, ControlData]:
    """A Snapshot record for the cluster copy at `pgdata` (clean, or an online backup whose stop LSN
    is `consistent_lsn`)."""
    control = control_data(bindir, pgdata)
    label = backup_label_fields(pgdata)
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
    wal = pgdata / "pg_wal"
    for name in os.listdir(wal):
        if segment_start(name, control.segsize) is not None and name != keep:
            (wal / name).unlink(missing_ok=True)
    status = wal / "archive_status"
    if status.is_dir():
        for name in os.listdir(status):
            (status / name).unlink(missing_ok=True)
    for name in ("recovery.signal", "standby.signal", "backup_label.old", "recovery.done"):
        (pgdata / name).unlink(missing_ok=True)


def first_commit_after(bindir: Path, wal_dir: Path, start_lsn: str, timeline: int, after: datetime) -> str | None:
    """The LSN of the first commit record at or after `start_lsn` whose commit time is later than
    `after` (µs precision), scanning the WAL in `wal_dir` with `pg_waldump`; None if there is none."""
    after_utc = after.astimezone(UTC).replace(tzinfo=None)
    cmd = [str(bindir / "pg_waldump"), "--path", str(wal_dir), "--start", start_lsn, "--timeline", str(timeline),
           "--rmgr", "Transaction"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={"LC_ALL": "C", "TZ": "UTC", "PATH": "/usr/bin:/bin"})
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


def link_tree(source: Path, target: Path) -> None:
    """`target` (new) as a tree of hard links to `source`'s files: free on any file system. Only for
    trees nobody writes in place again (snapshots); removing either side leaves the other whole."""
    result = subprocess.run(["cp", "-a", "--link", "--", str(source), str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        raise OSError(result.stderr.strip() or "cp --link failed")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def prune_wal(wal_dir: Path, timeline: int, segsize: int, before_lsn: int) -> int:
    """Delete archived segments wholly before `before_lsn`; returns the bytes freed."""
    freed = 0
    try:
        names = os.listdir(wal_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        path = wal_dir / name
        if name.endswith(".part"):
            continue
        seg = segment_start(name, segsize)
        if seg is not None and seg[1] + segsize <= before_lsn:
            try:
                freed += path.stat().st_blocks * 512
                path.unlink()
            except FileNotFoundError:
                pass
    return freed

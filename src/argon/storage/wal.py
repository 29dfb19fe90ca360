"""WAL, LSNs and a cluster's control data: the helpers every use of a branch's WAL shares.

LSNs as Postgres prints them (`0/16B3748`), WAL segment names, which segments of a directory hold
what a copy needs, the archive command computes run, what `pg_controldata` and `backup_label` say
about a cluster, the settings of one recovery run and the tidying after it, and the first commit
after a time (`pg_waldump`). No policy; `argon.storage.history` (a branch's history on disk) and
`argon.control` use them.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from argon import safefs

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


def recovery_settings(target_lsn: str | None) -> dict[str, str]:
    """GUCs for one recovery run: to an LSN (stopping *before* the first record that starts at or
    after it), or, with None, to the end of the WAL laid out. Always promote: a new timeline.

    Not a hot standby: one refuses to replay WAL written with more connections, workers, prepared
    transactions or locks than it has (at start-up from pg_control, or pausing at a parameter-change
    record), and a recovery run has the smallest compute's settings while the branch's compute may
    have run at any size. Nothing connects before the promotion."""
    settings = {"restore_command": "false",  # required with recovery.signal; the WAL is in pg_wal already
                "recovery_target_action": "promote", "recovery_target_timeline": "latest",
                "archive_mode": "off", "hot_standby": "off"}
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


def ends_at_checkpoint(bindir: Path, wal_dir: Path, control: ControlData, owner: safefs.Owner | None = None) -> bool:
    """Whether the WAL in `wal_dir` holds the clean cluster's (`control`) shutdown checkpoint record
    and no record after it: recovery would replay nothing, so the cluster is usable as it is
    (`pg_waldump` of at most two records from the checkpoint)."""
    if control.state != "shut down":
        return False
    cmd = [str(bindir / "pg_waldump"), "--path", str(wal_dir), "--start", control.checkpoint_lsn, "--timeline",
           str(control.timeline), "--limit", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         env={"LC_ALL": "C", "TZ": "UTC", "PATH": "/usr/bin:/bin"}, **safefs.run_as(owner)).stdout
    records = [line for line in out.splitlines() if line.startswith("rmgr:")]
    at = re.search(r"lsn: ([0-9A-F]+/[0-9A-F]+),", records[0]) if len(records) == 1 else None
    return at is not None and parse_lsn(at.group(1)) == parse_lsn(control.checkpoint_lsn) and \
        "desc: CHECKPOINT_SHUTDOWN" in records[0]


def prune_wal(wal_dir: Path, timeline: int, segsize: int, before_lsn: int) -> int:
    """Delete archived segments wholly before `before_lsn`; returns the bytes freed."""
    freed = 0
    try:
        archive = safefs.Dir(wal_dir)
    except FileNotFoundError:
        return 0
    with archive:
        for name in archive.listdir():
            if name.endswith(".part"):
                continue
            seg = segment_start(name, segsize)
            if seg is not None and seg[1] + segsize <= before_lsn:
                try:
                    freed += archive.lstat(name).st_blocks * 512
                    archive.unlink(name, missing_ok=False)
                except FileNotFoundError:
                    pass
    return freed


def link_segments(names: list[str], archive: Path, live: Path, target: Path,
                  owner: safefs.Owner | None = None) -> None:
    """Hard-link the segments `names` from `archive` into `target` (archived segments are never
    written in place again). One not archived yet is copied from the live `pg_wal` instead
    (Postgres reuses those files), and one archived and removed from there meanwhile is linked
    after all. OSError when a segment is in neither place, or hard links are impossible here.
    All of these are the compute's files: linked without following links, copied only when they
    are regular files of the project's uid (`argon.safefs`)."""
    with safefs.Dir(target) as to, safefs.Dir(archive) as arch, safefs.Dir(live) as lv:
        for name in names:
            try:
                arch.link(name, to, name)
            except FileNotFoundError:  # not archived yet: it is still in the live pg_wal...
                try:
                    lv.copy(name, to, name, owner=owner)
                except FileNotFoundError:  # ...unless it was archived and removed just now
                    arch.link(name, to, name)

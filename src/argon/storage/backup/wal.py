"""Shipping one history epoch's WAL to the bucket, and fetching it back.

Objects, under the epoch's key prefix (`.../<epoch>/wal/`):

    <segment>            a complete segment (from the local archive, or from pg_wal once it is full)
    <segment>.partial    the valid prefix of the segment the compute is writing (overwritten each tick)
    <tli>.history        timeline history files

Order: segments go up strictly in LSN order, and a `.partial` only after every segment before it.
The valid prefix of a live segment is the run of pages whose header carries the page's own address
(`xlp_pageaddr`): a recycled file keeps an older segment's pages behind the ones written so far,
and those end it. A torn last record in the prefix is the normal end of WAL for recovery (records
have CRCs).

Reading files as root: `pg_wal` belongs to a tenant's compute uid, so files are opened with
O_NOFOLLOW and must be regular files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from argon import safefs
from argon.storage.backup.objects import Codec
from argon.storage.backup.store import MissingObject, ObjectStore
from argon.storage.wal import segment_name, segment_start

PAGE = 8192  # XLOG_BLCKSZ
_PAGE_HEADER = struct.Struct("<HHIQ")  # xlp_magic, xlp_info, xlp_tli, xlp_pageaddr
_HISTORY = re.compile(r"^[0-9A-F]{8}\.history$")


class WalGap(Exception):
    """A segment the restore needs is in neither the bucket nor anywhere else."""


def open_regular(path: Path, owner: safefs.Owner | None = None) -> int:
    """An fd of the regular file at `path`, reached without following a link a tenant could have
    planted on the way (`argon.safefs`), never a FIFO or device; with `owner`, only a file of that
    user (not a hard link to someone else's)."""
    with safefs.Dir(path.parent) as d:
        try:
            fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=d.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise safefs.UnsafePath(path, "a symlink where Argon expects a file") from None
            raise
    st = os.fstat(fd)
    problem = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
               "a file of another user" if owner is not None and st.st_uid != owner.uid else "")
    if problem:
        os.close(fd)
        raise safefs.UnsafePath(path, problem)
    return fd


def read_regular(path: Path, limit: int | None = None, owner: safefs.Owner | None = None) -> bytes:
    """The bytes of `path` (at most `limit`), as `open_regular` opens it."""
    fd = open_regular(path, owner)
    try:
        chunks = []
        remaining = limit if limit is not None else 1 << 62
        while remaining > 0:
            data = os.read(fd, min(remaining, 1 << 20))
            if not data:
                break
            chunks.append(data)
            remaining -= len(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _listdir(path: Path) -> list[str]:
    """The names in the directory `path` ([] if it is not there), reached safely."""
    try:
        return safefs.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _mtime(path: Path) -> int:
    with safefs.parent(path) as (d, name):
        return d.lstat(name).st_mtime_ns


def valid_prefix(data: bytes, seg_start: int) -> int:
    """How many leading bytes of a segment's file content are pages of this segment."""
    good = 0
    for offset in range(0, len(data) - _PAGE_HEADER.size + 1, PAGE):
        _magic, _info, _tli, pageaddr = _PAGE_HEADER.unpack_from(data, offset)
        if pageaddr != seg_start + offset:
            break
        good = min(offset + PAGE, len(data))
    return good


def live_segments(pg_wal: Path, timeline: int, segsize: int) -> list[tuple[int, str]]:
    """(start LSN, name) of the segment files of `timeline` in `pg_wal`, ascending."""
    out = []
    for name in _listdir(pg_wal):
        seg = segment_start(name, segsize)
        if seg is not None and seg[0] == timeline and not name.endswith(".partial"):
            out.append((seg[1], name))
    return sorted(out)


@dataclass
class ShipState:
    """What of one epoch is in the bucket (kept in the epoch's directory, rewritten atomically)."""

    shipped_end: int = 0  # end LSN of the last complete segment shipped (0: none yet)
    partial_name: str = ""
    partial_len: int = 0
    partial_digest: str = ""
    partial_mtime: int = 0
    history_files: tuple[str, ...] = ()
    head_name: str = ""  # the newest segment in pg_wal, when last measured (not needed after a restart)
    head_mtime: int = 0
    head_lsn: int = 0

    @classmethod
    def load(cls, path: Path) -> ShipState:
        try:
            raw = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return cls()
        raw["history_files"] = tuple(raw.get("history_files", ()))
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@dataclass
class ShipResult:
    segments: int = 0  # complete segments uploaded now
    partial: bool = False  # a .partial uploaded now
    head: int = 0  # the end of the WAL seen locally (LSN)
    shipped: int = 0  # the end of the WAL in the bucket (LSN)
    gap: str = ""  # a segment that was gone locally before it was shipped


def ship_epoch(store: ObjectStore, codec: Codec, prefix: str, archive: Path, live: Path | None, timeline: int,
               segsize: int, state: ShipState, start_lsn: int, save: Callable[[ShipState], None], *,
               owner: safefs.Owner | None = None) -> ShipResult:
    """Upload what is new in one epoch: complete segments in order (from the archive, or from `live`
    pg_wal when full there), then the valid prefix of the live segment. `start_lsn`: the epoch's WAL
    starts in this segment (nothing before it is the epoch's). Files are read as `read_regular`
    does, of `owner` (the project's user) only."""
    result = ShipResult()
    names = _listdir(archive)
    first = start_lsn // segsize * segsize
    next_lsn = max(state.shipped_end, first)

    for name in sorted(names):
        if _HISTORY.match(name) and name not in state.history_files:
            store.put(f"{prefix}wal/{name}", codec.seal(f"{prefix}wal/{name}", read_regular(archive / name, owner=owner)))
            state.history_files = (*state.history_files, name)
            save(state)

    archived = {}
    for name in names:
        seg = segment_start(name, segsize)
        if seg is not None and seg[0] == timeline and not name.endswith(".partial"):
            archived[seg[1]] = archive / name
    live_files = dict(live_segments(live, timeline, segsize)) if live is not None else {}

    while True:
        name = segment_name(timeline, next_lsn, segsize)
        data: bytes | None = None
        in_live = False
        if next_lsn in live_files:
            # pg_wal decides while it has the file: the archive may hold an older copy of a segment
            # the compute goes on writing (a branch's copied segments, ADR 0010).
            try:
                candidate = read_regular(live / live_files[next_lsn], owner=owner)  # type: ignore[operator]
                in_live = True
                # Finished once the next segment has begun: full, or ended early by a WAL switch
                # (whose rest Postgres never writes).
                if len(candidate) == segsize and _has_successor(live, timeline, segsize, next_lsn):
                    data = candidate
            except FileNotFoundError:  # archived and recycled just now: the archive has it
                pass
        if data is None and not in_live and next_lsn in archived:
            with contextlib.suppress(FileNotFoundError):
                data = read_regular(archived[next_lsn], owner=owner)
        if data is None:
            later = [lsn for lsn in archived if lsn > next_lsn]
            if later and not in_live:
                # Gone locally before it was shipped (pruned while the store was unreachable for long).
                result.gap = name
                next_lsn = min(later)
                continue
            break
        key = f"{prefix}wal/{name}"
        store.put(key, codec.seal(key, data))
        next_lsn += segsize
        state.shipped_end = next_lsn
        if state.partial_name == name:
            with contextlib.suppress(Exception):
                store.delete([f"{key}.partial"])
            state.partial_name, state.partial_len, state.partial_digest, state.partial_mtime = "", 0, "", 0
        save(state)
        result.segments += 1

    result.shipped = state.shipped_end
    result.head = state.shipped_end
    if live is None:
        return result
    result.head = max(result.head, live_head(live, timeline, segsize, state, owner))
    name = segment_name(timeline, next_lsn, segsize)
    path = live / name
    try:
        mtime = _mtime(path)
    except FileNotFoundError:
        return result
    if state.partial_name == name and state.partial_mtime == mtime:
        result.shipped = next_lsn + state.partial_len
        result.head = max(result.head, result.shipped)
        return result
    try:
        data = read_regular(path, segsize, owner)
    except FileNotFoundError:
        return result
    length = valid_prefix(data, next_lsn)
    result.head = max(result.head, next_lsn + length)
    if length == 0:
        result.shipped = state.shipped_end
        return result
    digest = hashlib.sha256(data[:length]).hexdigest()
    if state.partial_name != name or state.partial_digest != digest:
        key = f"{prefix}wal/{name}.partial"
        store.put(key, codec.seal(key, data[:length]))
        result.partial = True
    state.partial_name, state.partial_len, state.partial_digest, state.partial_mtime = name, length, digest, mtime
    save(state)
    result.shipped = next_lsn + length
    return result


def live_head(live: Path, timeline: int, segsize: int, state: ShipState, owner: safefs.Owner | None = None) -> int:
    """The end of the WAL written in `live` (the newest segment that has begun, plus its valid
    prefix), measured again only when that file changed."""
    for start, name in reversed(live_segments(live, timeline, segsize)):
        try:
            mtime = _mtime(live / name)
            if state.head_name == name and state.head_mtime == mtime:
                return state.head_lsn
            head = read_regular(live / name, PAGE, owner)
            if valid_prefix(head, start) == 0:
                continue  # a recycled file under a future name
            length = valid_prefix(read_regular(live / name, segsize, owner), start)
        except (FileNotFoundError, OSError):
            continue
        state.head_name, state.head_mtime, state.head_lsn = name, mtime, start + length
        return start + length
    return 0


def _has_successor(live: Path | None, timeline: int, segsize: int, lsn: int) -> bool:
    """A segment in pg_wal is finished once the next one has begun: Postgres writes the next
    segment only after this one is full or was switched away from."""
    if live is None:
        return False
    name = segment_name(timeline, lsn + segsize, segsize)
    try:
        head = read_regular(live / name, PAGE)
    except (FileNotFoundError, OSError):
        return False
    return valid_prefix(head, lsn + segsize) > 0


# --- Fetching back ---------------------------------------------------------------------------------------

def fetch_epoch_wal(store: ObjectStore, codec: Codec, prefix: str, target: Path, timeline: int, segsize: int,
                    from_lsn: int, *, workers: int = 8, progress: Callable[[int], None] | None = None) -> int:
    """Download the epoch's WAL from the segment holding `from_lsn` on into `target` (a pg_wal):
    consecutive complete segments, then the `.partial` that follows them (padded to a full
    segment). Returns the end LSN of the WAL laid out. A missing segment in the middle is an error
    naming it; every object is verified (`Codec.open`)."""
    listing = {o.key[len(prefix) + 4:]: o.size for o in store.list(f"{prefix}wal/")}
    first = from_lsn // segsize * segsize
    complete: dict[int, str] = {}
    partials: dict[int, str] = {}
    for name in listing:
        seg = segment_start(name, segsize)
        if seg is None or seg[0] != timeline or seg[1] + segsize <= first:
            continue
        (partials if name.endswith(".partial") else complete)[seg[1]] = name
    wanted: list[str] = []
    lsn = first
    while lsn in complete:
        wanted.append(complete[lsn])
        lsn += segsize
    missing_after = [n for at, n in complete.items() if at > lsn]
    if missing_after:
        raise WalGap(f"WAL segment {segment_name(timeline, lsn, segsize)} is missing from {store.url} "
                     f"({prefix}wal/), but later ones exist")
    partial = partials.get(lsn)
    histories = [n for n in listing if _HISTORY.match(n)]
    target.mkdir(parents=True, exist_ok=True)

    def one(name: str) -> int:
        key = f"{prefix}wal/{name}"
        data = codec.open(key, store.get(key))
        out = name
        if name.endswith(".partial"):
            data = data + bytes(segsize - len(data))
            out = name[:-len(".partial")]
        with open(target / out, "wb") as f:
            f.write(data)
        if progress is not None:
            progress(len(data))
        return len(data)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, [*histories, *wanted]))
    end = lsn
    if partial is not None:
        key = f"{prefix}wal/{partial}"
        try:
            raw = store.get(key)
        except MissingObject:  # became a complete segment meanwhile: shipping went on
            raw = None
        if raw is not None:
            data = codec.open(key, raw)
            end = lsn + len(data)
            (target / segment_name(timeline, lsn, segsize)).write_bytes(data + bytes(segsize - len(data)))
            if progress is not None:
                progress(segsize)
    if first not in complete and partial is None:
        raise WalGap(f"WAL segment {segment_name(timeline, first, segsize)} (the base backup's start) is missing "
                     f"from {store.url} ({prefix}wal/)")
    return end

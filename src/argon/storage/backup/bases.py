"""Base backups in the bucket: a snapshot directory as a manifest of files, each file a list of
content-addressed chunks shared by the whole bucket.

    chunks/<id[:2]>/<id>                 one chunk: up to CHUNK bytes of one file, or a pack of
                                         small files (cut at the same places for the same tree)
    <epoch prefix>bases/<name>.json      the manifest: directories, files (mode, size, chunk ids),
                                         and the snapshot's record (LSNs, time); written last

A chunk is uploaded only when the bucket does not have it yet, so a branch's base, a copy of its
parent, costs its manifest and the chunks that differ. The manifest is written after all its
chunks: a manifest in the bucket never names a chunk that is not there (until retention deletes
both together).
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon import safefs
from argon.storage.backup.objects import Codec, CorruptObject
from argon.storage.backup.store import ObjectStore
from argon.storage.backup.wal import open_regular, read_regular

CHUNK = 4 * 1024 * 1024
SMALL = 256 * 1024  # files up to this size are packed together into chunks
SKIP = frozenset({"postmaster.pid", "postmaster.opts"})
FORMAT = 1


def chunk_key(chunk_id: str) -> str:
    return f"chunks/{chunk_id[:2]}/{chunk_id}"


class ChunkIndex:
    """The chunk ids known to be in the bucket (one listing, then what we upload)."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._known: set[str] | None = None
        self._lock = threading.Lock()

    def _load(self) -> set[str]:
        with self._lock:
            if self._known is None:
                self._known = {o.key.rsplit("/", 1)[1] for o in self._store.list("chunks/")}
            return self._known

    def has(self, chunk_id: str) -> bool:
        return chunk_id in self._load()

    def add(self, chunk_id: str) -> None:
        self._load().add(chunk_id)

    def forget(self, ids: set[str]) -> None:
        self._load().difference_update(ids)

    def all(self) -> set[str]:
        return set(self._load())


@dataclass
class UploadStats:
    files: int = 0
    bytes: int = 0
    chunks_uploaded: int = 0
    bytes_uploaded: int = 0  # stored bytes (compressed, sealed) of the new chunks


def upload_snapshot(store: ObjectStore, codec: Codec, index: ChunkIndex, source: Path, manifest_key: str,
                    record: dict[str, Any], *, workers: int = 4, owner: safefs.Owner | None = None) -> UploadStats:
    """Upload the cluster copy at `source` as a base backup; the manifest (with `record`) goes last.
    The tree is walked and read through `argon.safefs` (a tenant's link is never followed), files of
    `owner` only."""
    stats = UploadStats()
    dirs: list[dict[str, Any]] = []
    files: list[tuple[str, Path, int, int]] = []
    for rel_dir, fd, filenames in _walk(source):
        dirs.append({"path": rel_dir.as_posix(), "mode": stat.S_IMODE(os.fstat(fd).st_mode)})
        for name in sorted(filenames):
            if rel_dir == Path(".") and name in SKIP:
                continue
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue  # sockets, symlinks: a snapshot holds none that recovery needs
            files.append(((rel_dir / name).as_posix(), source / rel_dir / name, stat.S_IMODE(st.st_mode), st.st_size))
    lock = threading.Lock()

    def one(item: tuple[str, Path, int, int]) -> dict[str, Any]:
        rel, path, mode, _size = item
        ids: list[str] = []
        size = 0
        fd = open_regular(path, owner)
        try:
            while True:
                data = os.read(fd, CHUNK)
                if not data:
                    break
                while len(data) < CHUNK:  # short reads on large files
                    more = os.read(fd, CHUNK - len(data))
                    if not more:
                        break
                    data += more
                size += len(data)
                cid = codec.chunk_id(data)
                ids.append(cid)
                if not index.has(cid):
                    key = chunk_key(cid)
                    blob = codec.seal(key, data)
                    store.put(key, blob)
                    index.add(cid)
                    with lock:
                        stats.chunks_uploaded += 1
                        stats.bytes_uploaded += len(blob)
        finally:
            os.close(fd)
        with lock:
            stats.files += 1
            stats.bytes += size
        return {"path": rel, "mode": mode, "size": size, "chunks": ids}

    def put_chunk(data: bytes) -> str:
        cid = codec.chunk_id(data)
        if not index.has(cid):
            key = chunk_key(cid)
            blob = codec.seal(key, data)
            store.put(key, blob)
            index.add(cid)
            with lock:
                stats.chunks_uploaded += 1
                stats.bytes_uploaded += len(blob)
        return cid

    def pack(group: list[tuple[str, Path, int, int]]) -> list[dict[str, Any]]:
        """Small files (most of a cluster's 1000+ files) travel together, one object per pack;
        packs are cut at the same places for the same tree, so they deduplicate too."""
        blobs = []
        for _rel, path, _mode, _size in group:
            blobs.append(read_regular(path, owner=owner))
        cid = put_chunk(b"".join(blobs))
        out, offset = [], 0
        for (rel, _path, mode, _size), data in zip(group, blobs, strict=True):
            out.append({"path": rel, "mode": mode, "size": len(data), "pack": cid, "offset": offset})
            offset += len(data)
        with lock:
            stats.files += len(group)
            stats.bytes += offset
        return out

    small = [f for f in files if f[3] <= SMALL]
    large = [f for f in files if f[3] > SMALL]
    groups: list[list[tuple[str, Path, int, int]]] = [[]]
    for item in small:
        if groups[-1] and sum(f[3] for f in groups[-1]) + item[3] > CHUNK:
            groups.append([])
        groups[-1].append(item)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        entries = list(pool.map(one, large))
        for packed in pool.map(pack, [g for g in groups if g]):
            entries += packed
    manifest = {"format": FORMAT, "record": record, "dirs": dirs, "files": entries}
    store.put(manifest_key, codec.seal(manifest_key, json.dumps(manifest, separators=(",", ":")).encode()))
    return stats


def _walk(source: Path) -> Iterator[tuple[Path, int, list[str]]]:
    """(path relative to `source`, dir fd, file names) of every directory of the tree, depth first
    and sorted, never entering a link (as `safefs.walk`, with the relative paths)."""
    with safefs.Dir(source) as top:
        yield from _walk_in(Path("."), top.fd)


def _walk_in(rel: Path, fd: int) -> Iterator[tuple[Path, int, list[str]]]:
    with os.scandir(fd) as it:
        entries = sorted(it, key=lambda e: e.name)
    yield rel, fd, [e.name for e in entries if not e.is_dir(follow_symlinks=False)]
    if len(rel.parts) >= safefs.MAX_DEPTH:
        return
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        try:
            sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                          dir_fd=fd)
        except OSError:
            continue  # swapped for a link or gone meanwhile
        try:
            yield from _walk_in(rel / entry.name, sub)
        finally:
            os.close(sub)


def read_manifest(store: ObjectStore, codec: Codec, key: str) -> dict[str, Any]:
    raw = codec.open(key, store.get(key))
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError("unknown format")
    except ValueError as exc:
        raise CorruptObject(key, f"not a base backup manifest ({exc})") from None
    return manifest


def manifest_bytes(manifest: dict[str, Any]) -> int:
    return sum(int(f["size"]) for f in manifest["files"])


def sync_tree(path: Path, *, workers: int = 4) -> None:
    """Make everything under `path` durable: an fsync of every file and directory (a few at once),
    never following a link. Not `syncfs`: that waits for every other writer on the filesystem too
    (other computes, other restores), which on a shared disk took longer than the restore's own
    data. Called after the recovery run, by when the kernel has written much of it back.
    (Starting each file's writeback as it is written, `sync_file_range`, made the download wait
    for the shared disk's queue: slower.)"""
    def one(fd: int, name: str | None) -> None:
        try:
            target = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd) if name else fd
        except FileNotFoundError:
            return
        try:
            os.fsync(target)
        finally:
            if name:
                os.close(target)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _rel, fd, names in _walk(path):
            jobs = [pool.submit(one, fd, name) for name in names
                    if stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)]
            for job in jobs:  # before `_walk` closes the directory's fd
                job.result()
            one(fd, None)


def download_snapshot(store: ObjectStore, codec: Codec, manifest: dict[str, Any], target: Path, *,
                      workers: int = 8, progress: Callable[[int], None] | None = None, fsync: bool = True) -> None:
    """Lay out the base backup described by `manifest` in `target` (new or empty): every chunk is
    verified; any failure raises (the caller removes `target`). `fsync=False`: the caller makes the
    whole tree durable later, at once (`sync_tree`), rather than one file at a time. (Fetching a
    large file's chunks in parallel, each written at its offset, was tried: slower here, 7.5 s
    against 6.3 s median for 136 MB, with more CPU.)"""
    for entry in [*manifest["dirs"], *manifest["files"]]:
        parts = Path(entry["path"]).parts
        if Path(entry["path"]).is_absolute() or ".." in parts:
            raise CorruptObject("(base manifest)", f"it names a path outside the cluster: {entry['path']!r}")
    for entry in manifest["dirs"]:
        path = target / entry["path"]
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, int(entry["mode"]))

    def fetch(cid: str) -> bytes:
        key = chunk_key(cid)
        data = codec.open_chunk(key, store.get(key), cid)
        if progress is not None:
            progress(len(data))
        return data

    def write(entry: dict[str, Any], parts: list[bytes]) -> None:
        path = target / entry["path"]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, int(entry["mode"]))
        try:
            for data in parts:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def one(entry: dict[str, Any]) -> None:
        write(entry, [fetch(cid) for cid in entry["chunks"]])

    def unpack(cid: str, members: list[dict[str, Any]]) -> None:
        data = fetch(cid)
        for entry in members:
            piece = data[int(entry["offset"]):int(entry["offset"]) + int(entry["size"])]
            if len(piece) != int(entry["size"]):
                raise CorruptObject(chunk_key(cid), f"it is shorter than {entry['path']} needs")
            write(entry, [piece])

    packs: dict[str, list[dict[str, Any]]] = {}
    for entry in manifest["files"]:
        if "pack" in entry:
            packs.setdefault(entry["pack"], []).append(entry)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = [pool.submit(one, e) for e in manifest["files"] if "pack" not in e]
        jobs += [pool.submit(unpack, cid, members) for cid, members in packs.items()]
        for job in jobs:
            job.result()

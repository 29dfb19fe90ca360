"""What retention deletes from the bucket (ARGON_BACKUP_RETENTION), decided from a listing.

Per branch epoch: an epoch that ended before the cutoff goes whole; in the others, the newest base
taken at or before the cutoff stays with everything newer (so every point in the window can be
rebuilt), older bases go, and WAL segments wholly before the oldest kept base's redo point go.
A deleted branch's objects stay for the window after its deletion (a restore to a time before it
brings the branch back), then go whole with its `deleted.json` marker. Metadata: the newest copy
at or before the cutoff and all newer ones stay. Chunks no remaining
base manifest names go last (the caller holds off base uploads meanwhile: a chunk uploaded for a
manifest not written yet would look unreferenced).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from argon.storage.wal import parse_lsn, segment_start


@dataclass
class EpochObjects:
    prefix: str
    record: dict[str, Any] | None = None  # epoch.json
    bases: dict[str, dict[str, Any]] = field(default_factory=dict)  # manifest key -> its record
    wal: list[str] = field(default_factory=list)  # keys


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def plan(epochs: list[EpochObjects], metadata: dict[str, datetime], cutoff: datetime,
         deleted: dict[str, datetime] | None = None) -> list[str]:
    """Keys to delete (chunks aside). `deleted`: branch prefix (`branches/<p>/<b>/`) -> when the
    branch was found deleted."""
    doomed: list[str] = []
    gone = {prefix for prefix, at in (deleted or {}).items() if at < cutoff}
    doomed += [f"{prefix}deleted.json" for prefix in sorted(gone)]
    for epoch in epochs:
        if epoch.prefix.rsplit("/", 2)[0] + "/" in gone:
            doomed += [*epoch.bases, *epoch.wal, f"{epoch.prefix}epoch.json"]
            continue
        record = epoch.record
        if record is None:
            continue  # an epoch whose record is not up yet: leave it alone
        keys = [*epoch.bases, *epoch.wal, f"{epoch.prefix}epoch.json"]
        ended = record.get("ended_at")
        if ended and _when(ended) < cutoff:
            doomed += keys
            continue
        bases = sorted(epoch.bases.items(), key=lambda kv: _when(kv[1]["taken_at"]))
        old = [kv for kv in bases if _when(kv[1]["taken_at"]) <= cutoff]
        if len(old) > 1:
            doomed += [k for k, _ in old[:-1]]
        kept = [kv for kv in bases if kv[0] not in doomed]
        if not kept:
            continue
        redo = min(parse_lsn(r["redo_lsn"]) for _k, r in kept)
        segsize = int(record["segsize"])
        for key in epoch.wal:
            seg = segment_start(key.rsplit("/", 1)[1], segsize)
            if seg is not None and seg[1] + segsize <= redo:
                doomed.append(key)
    times = sorted(metadata.items(), key=lambda kv: kv[1])
    old_meta = [k for k, t in times if t <= cutoff]
    doomed += old_meta[:-1]
    return doomed


def unreferenced_chunks(chunk_ids: set[str], manifests: list[dict[str, Any]]) -> set[str]:
    used: set[str] = set()
    for manifest in manifests:
        for entry in manifest["files"]:
            used.update(entry.get("chunks", ()))
            if "pack" in entry:
                used.add(entry["pack"])
    return chunk_ids - used

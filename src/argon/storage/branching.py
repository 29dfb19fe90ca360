"""Copying a branch's cluster into a new branch: the clone protocol (design §3, §8).

A stopped cluster is copied as it is (the caller holds the endpoint lock, so nothing starts it
meanwhile; a crashed one recovers on its first start like the original would). A running one is
copied as an online base backup, on one admin session kept open throughout:

1. a temporary physical replication slot reserves WAL from now on (no segment we need is
   recycled while we copy, however long that takes);
2. `pg_backup_start(label, fast => true)` (an immediate checkpoint: the backup starts now, so it
   holds everything committed before the request);
3. the data files are copied (files dropped meanwhile are fine: WAL replay recreates or removes
   them), without pg_wal, lock and runtime files;
4. `pg_backup_stop()` returns the stop LSN and the backup label;
5. pg_wal is copied *after* the stop, so it reaches past the stop LSN (copying it earlier is the
   naive bug: `WAL ends before end of online backup`); only the segments from the backup's start
   to the current insert position, not the recycled ones Postgres keeps under future names (up to
   `max_wal_size`: after a bulk load, as much as the data itself);
6. `backup_label` (and `tablespace_map`) are written into the copy; its first start replays to
   the end of the copied WAL and is consistent.
Replication slots are never inherited. A stopped cluster's copy likewise takes only the WAL its
first start reads: from its last checkpoint's redo point (to that checkpoint, after a clean
shutdown; to the end, after a crash).

Source and copy belong to the project's uid (`owner`), which can put links anywhere in them: the
copy runs as that uid, and what root does itself (directories, `backup_label`, the tidying) goes
through `argon.safefs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from pathlib import Path

import psycopg

from argon import safefs
from argon.storage import wal
from argon.storage.clone import CloneBackend

# Copied in step 3; everything else at the top level of a cluster is runtime state or WAL.
_SKIP_TOP = frozenset({"pg_wal", "postmaster.pid", "postmaster.opts", "pg_replslot", "pg_stat_tmp",
                       "backup_label", "backup_label.old", "tablespace_map", "log", "pg_dynshmem", "pg_notify",
                       "pg_serial", "pg_snapshots", "pg_subtrans"})
_EMPTY_DIRS = ("pg_wal", "pg_replslot", "pg_stat_tmp", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots",
               "pg_subtrans", "pg_wal/archive_status")
_RUNTIME_FILES = ("postmaster.pid", "postmaster.opts", "backup_label.old")


def _prepare_target(target: Path, owner: safefs.Owner | None) -> None:
    with safefs.parent(target) as (parent, name):
        parent.mkdir(name, owner=owner, exist_ok=False)
    with safefs.Dir(target) as d:
        for name in _EMPTY_DIRS:
            if "/" in name:
                with safefs.Dir(target / name.rsplit("/", 1)[0]) as sub:
                    sub.mkdir(name.rsplit("/", 1)[1], owner=owner)
            else:
                d.mkdir(name, owner=owner)


def _tidy(target: Path) -> None:
    with safefs.Dir(target) as d:
        for name in _RUNTIME_FILES:
            d.unlink(name)
    with safefs.Dir(target / "pg_replslot") as slots:
        for slot in slots.listdir():
            slots.remove(slot)


def clone_stopped(backend: CloneBackend, source: Path, target: Path, control: wal.ControlData | None = None,
                  owner: safefs.Owner | None = None) -> None:
    """Copy a stopped cluster. Given its `pg_controldata` (`wal.control_data`), pg_wal gets only the
    segments its first start needs; without, the whole tree is copied."""
    if control is None:
        backend.clone_tree(source, target, owner=owner)
        _tidy(target)
        return
    clean = control.state == "shut down"
    segments = wal.wal_files(source / "pg_wal", control.timeline, control.segsize, wal.parse_lsn(control.redo_lsn),
                             wal.parse_lsn(control.checkpoint_lsn) if clean else None)
    _copy_data(backend, source, target, owner)
    backend.copy_into(segments, target / "pg_wal", owner=owner)
    _tidy(target)


def _copy_data(backend: CloneBackend, source: Path, target: Path, owner: safefs.Owner | None) -> None:
    _prepare_target(target, owner)
    entries = [source / name for name in sorted(safefs.listdir(source)) if name not in _SKIP_TOP]
    backend.copy_into(entries, target, tolerate_vanished=True, owner=owner)


async def clone_running(conn: psycopg.AsyncConnection, backend: CloneBackend, source: Path, target: Path,
                        owner: safefs.Owner | None = None) -> str:
    """Copy the cluster served by `conn`'s compute (an admin session, autocommit); returns the stop LSN."""
    slot = f"argon_clone_{secrets.token_hex(6)}"
    await conn.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (slot,))
    failed = True
    try:
        cur = await conn.execute("SELECT b::text, (SELECT timeline_id FROM pg_control_checkpoint()), "
                                 "(SELECT bytes_per_wal_segment FROM pg_control_init()) FROM pg_backup_start(%s, true) AS b",
                                 (f"argon branch {target.parent.name}",))
        started = await cur.fetchone()
        assert started is not None
        start, timeline, segsize = wal.parse_lsn(started[0]), int(started[1]), int(started[2])
        try:
            await asyncio.to_thread(_copy_data, backend, source, target, owner)
        except BaseException:
            with contextlib.suppress(psycopg.Error):  # e.g. a full disk fails this too; the copy's error counts
                await conn.execute("SELECT pg_backup_stop(false)")
            raise
        cur = await conn.execute("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)")
        row = await cur.fetchone()
        assert row is not None
        lsn, label, spcmap = row
        cur = await conn.execute("SELECT pg_current_wal_insert_lsn()::text")
        insert = await cur.fetchone()
        assert insert is not None
        segments = wal.wal_files(source / "pg_wal", timeline, segsize, start, wal.parse_lsn(insert[0]))
        await asyncio.to_thread(backend.copy_into, segments, target / "pg_wal", tolerate_vanished=True, owner=owner)
        failed = False
    finally:
        try:
            await conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        except psycopg.Error:
            if not failed:  # after an error the session already dropped its temporary slot
                raise

    def finish() -> None:
        with safefs.Dir(target) as d:
            d.write("backup_label", label, owner=owner)
            if spcmap:
                d.write("tablespace_map", spcmap, owner=owner)
        _tidy(target)

    await asyncio.to_thread(finish)
    return str(lsn)

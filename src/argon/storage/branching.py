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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import psycopg

from argon.storage import history as hs
from argon.storage.clone import CloneBackend

# Copied in step 3; everything else at the top level of a cluster is runtime state or WAL.
_SKIP_TOP = frozenset({"pg_wal", "postmaster.pid", "postmaster.opts", "pg_replslot", "pg_stat_tmp",
                       "backup_label", "backup_label.old", "tablespace_map", "log", "pg_dynshmem", "pg_notify",
                       "pg_serial", "pg_snapshots", "pg_subtrans"})
_EMPTY_DIRS = ("pg_wal", "pg_replslot", "pg_stat_tmp", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots",
               "pg_subtrans", "pg_wal/archive_status")
_RUNTIME_FILES = ("postmaster.pid", "postmaster.opts", "backup_label.old")


def _prepare_target(source: Path, target: Path) -> None:
    target.mkdir(mode=0o700)
    st = source.stat()
    if os.geteuid() == 0:
        os.chown(target, st.st_uid, st.st_gid)
    for name in _EMPTY_DIRS:
        path = target / name
        path.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(path, st.st_uid, st.st_gid)


def _tidy(target: Path) -> None:
    for name in _RUNTIME_FILES:
        (target / name).unlink(missing_ok=True)
    for slot in (target / "pg_replslot").iterdir():
        shutil.rmtree(slot, ignore_errors=True)


def clone_stopped(backend: CloneBackend, source: Path, target: Path, bindir: Path | None = None) -> None:
    """Copy a stopped cluster. With the Postgres `bindir` (for `pg_controldata`), pg_wal gets only
    the segments its first start needs; without, the whole tree is copied."""
    if bindir is None:
        backend.clone_tree(source, target)
        _tidy(target)
        return
    control = hs.control_data(bindir, source)
    clean = control.state == "shut down"
    wal = hs.wal_files(source / "pg_wal", control.timeline, control.segsize, hs.parse_lsn(control.redo_lsn),
                       hs.parse_lsn(control.checkpoint_lsn) if clean else None)
    _copy_data(backend, source, target)
    backend.copy_into(wal, target / "pg_wal")
    _tidy(target)


def _copy_data(backend: CloneBackend, source: Path, target: Path) -> None:
    _prepare_target(source, target)
    entries = [source / name for name in sorted(os.listdir(source)) if name not in _SKIP_TOP]
    backend.copy_into(entries, target, tolerate_vanished=True)


def _copy_wal(backend: CloneBackend, source: Path, target: Path, first: str, last: str) -> None:
    """Copy the segments named `first` to `last` (pg_walfile_name; same timeline) and the history files."""
    wal = source / "pg_wal"
    tli = first[:8]
    segments = [wal / name for name in sorted(os.listdir(wal))
                if re.fullmatch(r"[0-9A-F]{8}\.history", name)
                or (re.fullmatch(r"[0-9A-F]{24}", name) and name[:8] == tli and first[8:] <= name[8:] <= last[8:])]
    backend.copy_into(segments, target / "pg_wal", tolerate_vanished=True)


async def clone_running(conn: psycopg.AsyncConnection, backend: CloneBackend, source: Path, target: Path) -> str:
    """Copy the cluster served by `conn`'s compute (an admin session, autocommit); returns the stop LSN."""
    slot = f"argon_clone_{secrets.token_hex(6)}"
    await conn.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (slot,))
    failed = True
    try:
        cur = await conn.execute("SELECT pg_walfile_name(pg_backup_start(%s, true))",
                                 (f"argon branch {target.parent.name}",))
        first_row = await cur.fetchone()
        assert first_row is not None
        first_segment = str(first_row[0])
        try:
            await asyncio.to_thread(_copy_data, backend, source, target)
        except BaseException:
            with contextlib.suppress(psycopg.Error):  # e.g. a full disk fails this too; the copy's error counts
                await conn.execute("SELECT pg_backup_stop(false)")
            raise
        cur = await conn.execute("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)")
        row = await cur.fetchone()
        assert row is not None
        lsn, label, spcmap = row
        cur = await conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        last_row = await cur.fetchone()
        assert last_row is not None
        await asyncio.to_thread(_copy_wal, backend, source, target, first_segment, str(last_row[0]))
        failed = False
    finally:
        try:
            await conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        except psycopg.Error:
            if not failed:  # after an error the session already dropped its temporary slot
                raise

    def finish() -> None:
        (target / "backup_label").write_text(label)
        if spcmap:
            (target / "tablespace_map").write_text(spcmap)
        _tidy(target)
        if os.geteuid() == 0:
            st = source.stat()
            for name in ("backup_label", "tablespace_map"):
                if (target / name).exists():
                    os.chown(target / name, st.st_uid, st.st_gid)

    await asyncio.to_thread(finish)
    return str(lsn)


def checkpoint_lsn(bindir: Path, pgdata: Path) -> str | None:
    """The latest checkpoint's LSN of a stopped cluster (`pg_controldata`), None if unreadable."""
    try:
        out = subprocess.run([str(bindir / "pg_controldata"), str(pgdata)], capture_output=True, text=True,
                             timeout=20, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^Latest checkpoint location:\s+(\S+)", out, re.M)
    return match.group(1) if match else None

"""`argon restore --from <url> [--at <time>]`: disaster recovery into an empty data directory.

The order, so that nothing half-done is ever taken for a good data directory: the directory must
be empty -> a `.restoring` marker (`argon up` refuses to start while it is there) -> the metadata
(newest at or before the target: `argon.db` with every project, branch, endpoint, role verifier,
encrypted password and API key hash, `secrets/` and `tls/`) -> per branch, its epoch and base
backup at or before the target, the epoch's WAL, one recovery run (to the target time, or to the
end of the shipped WAL) into a temporary directory renamed into place only when it worked -> a
fresh local history epoch for each branch -> the marker goes. Any error leaves the marker (and
names the object that failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from argon import model, safefs
from argon.compute import postmaster
from argon.compute.admin import connect_admin
from argon.compute.binaries import PgInstall, discover
from argon.compute.manager import ComputeSpec, prepare
from argon.compute.osuser import OsUser, chown_tree, running_as_root
from argon.compute.params import gucs_for_cu
from argon.compute.postmaster import ComputeStartError
from argon.control.backup import (
    check_bucket,
    choose,
    meta_time,
    open_bucket,
    prepare_recovery,
    ready_without_replay,
)
from argon.errors import ArgonError, ConfigError, StorageError, UserError
from argon.metadata import schema
from argon.metadata.store import Store
from argon.settings import Settings
from argon.storage import history as hs
from argon.storage import wal
from argon.storage.backup import bases as bb
from argon.storage.backup.objects import Codec
from argon.storage.backup.store import ObjectStore
from argon.storage.clone import pick_backend
from argon.storage.layout import Layout

log = logging.getLogger(__name__)

RECOVERY_TIMEOUT = 3600.0


@dataclass
class BranchRestore:
    project_id: str
    branch_id: str
    name: str
    epoch: str = ""
    base: str = ""
    reached: str = ""  # the LSN recovery ended at
    bytes: int = 0
    seconds: float = 0.0
    skipped: str = ""  # why the branch's data could not be restored
    lazy: bool = False  # left in the bucket: restored by `argon up` on first need or in the background
    replayed: bool = False  # a recovery run replayed WAL (not: a clean base whose WAL ends at its checkpoint)
    stages: dict[str, float] = field(default_factory=dict)  # seconds: download, recovery, history


@dataclass
class RestoreReport:
    metadata_at: datetime | None = None
    projects: int = 0
    branches: list[BranchRestore] = field(default_factory=list)
    seconds: float = 0.0


def newest_metadata(store: ObjectStore, at: datetime | None) -> str:
    keys = [(t, o.key) for o in store.list("meta/") if (t := meta_time(o.key)) is not None]
    usable = [kt for kt in keys if at is None or kt[0] <= at]
    if not usable:
        raise UserError(f"the backup at {store.url} has no metadata" + (f" from before {at.isoformat()}" if at else ""))
    return max(usable)[1]


def next_metadata(store: ObjectStore, at: datetime) -> str | None:
    """The first metadata copy taken after `at`, if any."""
    later = [(t, o.key) for o in store.list("meta/") if (t := meta_time(o.key)) is not None and t > at]
    return min(later)[1] if later else None


# What a later metadata copy adds to an earlier one (`as_of`): rows created by the target time, never
# the operations, events or samples. Compute uids come over whatever their age: a uid once given is
# never given again (ADR 0016).
_MERGED = ("projects", "branches", "snapshots", "endpoints", "roles", "databases", "api_keys")


def metadata_as_of(db: Path, later: Path | None, at: datetime) -> None:
    """Make the metadata database `db` (the newest copy taken at or before `at`) say what existed at
    `at`. Copies are taken every couple of seconds, so it can lack what was created just before `at`
    (the first copy after `at` has that) and hold what was created just after (the copy is taken a
    moment after the time it is named by): both are put right, by each row's `created_at`. What was
    deleted between the two copies stays, as the earlier copy has it."""
    stamp = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # the store's sortable text form
    conn = sqlite3.connect(db)
    try:
        with conn:
            if later is not None:
                conn.execute("ATTACH DATABASE ? AS later", (str(later),))
                for name in _MERGED:
                    table = schema.metadata.tables[name]
                    # Integer ids are the store's own: matched (and given anew) by the natural key.
                    natural = {"databases": ["branch_id", "name"], "api_keys": ["key_hash"]}.get(name)
                    keys = natural or [c.name for c in table.primary_key.columns]
                    cols = [c.name for c in table.columns if not (natural and c.name == "id")]
                    match = " AND ".join(f'm."{k}" = l."{k}"' for k in keys)
                    into = ", ".join(f'"{c}"' for c in cols)
                    values = ", ".join(f'l."{c}"' for c in cols)
                    # OR IGNORE: a row that clashes on another unique column (an endpoint address a
                    # deleted endpoint of the earlier copy still holds) is left out, not the restore.
                    conn.execute(f'INSERT OR IGNORE INTO main."{name}" ({into}) SELECT {values} FROM later."{name}" l '
                                 f'WHERE l.created_at <= ? AND NOT EXISTS '
                                 f'(SELECT 1 FROM main."{name}" m WHERE {match})', (stamp,))
                conn.execute("INSERT OR IGNORE INTO main.compute_uids SELECT * FROM later.compute_uids")
    finally:
        conn.close()
    meta = Store.sqlite(db)
    try:
        for project in meta.list_projects():
            if project.created_at > at:
                meta.delete_project_rows(project.id)
                continue
            for branch in meta.list_branches(project.id):
                if branch.created_at > at:
                    meta.delete_branch_rows(branch.id)
    finally:
        meta.close()


def unpack_metadata(blob: bytes, layout: Layout) -> None:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if not member.isfile() or ".." in parts or member.name.startswith("/") or \
                    not (member.name == "argon.db" or (len(parts) == 2 and parts[0] in ("secrets", "tls"))):
                continue
            source = tar.extractfile(member)
            assert source is not None
            target = layout.data_dir / member.name
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(source, f)
                f.flush()
                os.fsync(f.fileno())


def _as_of(store: ObjectStore, codec: Codec, layout: Layout, at: datetime) -> None:
    later_key = next_metadata(store, at)
    if later_key is None:
        metadata_as_of(layout.metadata_db, None, at)
        return
    with tempfile.TemporaryDirectory(prefix="argon-meta-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(codec.open(later_key, store.get(later_key))), mode="r") as tar:
            source = tar.extractfile("argon.db")
            assert source is not None
            later = Path(tmp) / "argon.db"
            later.write_bytes(source.read())
        copy = Store.sqlite(later)
        try:
            copy.migrate()
        finally:
            copy.close()
        metadata_as_of(layout.metadata_db, later, at)


async def restore(settings: Settings, url: str, at: datetime | str | None, *,
                  say: Callable[[str], None] = lambda m: None,
                  sample: Callable[[list[model.Branch]], set[str]] | None = None,
                  eager: bool = False) -> RestoreReport:
    """Fill the empty data directory of `settings` from the backup at `url` (as of `at`: a time, or
    an LSN, which every branch's recovery stops at; the newest metadata then). `sample` picks the
    branch ids to restore (`argon backup verify`, always eager); default: all. Lazy (the default,
    ADR 0032): only the metadata now, and per branch an intent that `argon up` fulfils on the
    branch's first need or in the background (`argon.control.lazyrestore`); `eager`: every
    branch's data now."""
    started = time.monotonic()
    lsn = wal.parse_lsn(at) if isinstance(at, str) else None
    at = at if isinstance(at, datetime) else None
    report = RestoreReport()
    layout = Layout(settings.data_dir, settings.run_dir)
    if layout.data_dir.exists() and any(layout.data_dir.iterdir()):
        raise ConfigError(f"{layout.data_dir} is not empty: `argon restore` fills an empty data directory "
                          "(choose another with --data-dir / ARGON_DATA_DIR)")
    store, codec = open_bucket(settings.model_copy(update={"backup_url": url}))
    if not await asyncio.to_thread(check_bucket, store, codec, create=False):
        raise UserError(f"there is no Argon backup at {url} (no argon-backup.json)")
    layout.init()
    lazy = not eager and sample is None
    # Eager: the root-owned runtime copy computes run from (seconds of copying) is made beside the
    # metadata and the first download; recovery waits for it. Lazy: `argon up` makes it.
    runtime = None if lazy else asyncio.create_task(asyncio.to_thread(discover, settings.pg_bindirs,
                                                                       layout.runtime_dir))
    try:
        await _restore(settings, url, at, lsn, layout, store, codec, report, started, say, sample, lazy, runtime)
        return report
    finally:
        if runtime is not None and not runtime.done():
            runtime.cancel()
            with contextlib.suppress(BaseException):
                await runtime


async def _restore(settings: Settings, url: str, at: datetime | None, lsn: int | None, layout: Layout,
                   store: ObjectStore, codec: Codec, report: RestoreReport, started: float,
                   say: Callable[[str], None], sample: Callable[[list[model.Branch]], set[str]] | None, lazy: bool,
                   runtime: asyncio.Task[dict[int, PgInstall]] | None) -> None:
    layout.restore_marker.write_text(json.dumps({"from": url, "at": at.isoformat() if at else None,
                                                 "started_at": model.utcnow().isoformat()}))
    key = await asyncio.to_thread(newest_metadata, store, at)
    report.metadata_at = meta_time(key)
    say(f"Metadata of {report.metadata_at.isoformat(timespec='seconds') if report.metadata_at else '?'} ({key})")
    blob = codec.open(key, await asyncio.to_thread(store.get, key))
    await asyncio.to_thread(unpack_metadata, blob, layout)
    layout.protect_metadata()
    meta = Store.sqlite(layout.metadata_db)
    try:
        await asyncio.to_thread(meta.migrate)
        if at is not None:
            await asyncio.to_thread(_as_of, store, codec, layout, at)
        projects = await asyncio.to_thread(meta.list_projects)
        branches = {p.id: await asyncio.to_thread(meta.list_branches, p.id) for p in projects}
    finally:
        meta.close()
    report.projects = len(projects)
    only = sample([b for bs in branches.values() for b in bs]) if sample is not None else None
    # Which versions are here (a look: the runtime copy, if any, is still being made).
    installs = await asyncio.to_thread(discover, settings.pg_bindirs, None)
    backend = pick_backend(layout.data_dir, settings.clone_backend)
    total = sum(len(b) for b in branches.values())
    done = 0
    for project in projects:
        install = installs.get(project.pg_version)
        for branch in branches[project.id]:
            done += 1
            item = BranchRestore(project.id, branch.id, branch.name)
            report.branches.append(item)
            if only is not None and branch.id not in only:
                item.skipped = "not in the sample"
                continue
            if install is None:
                item.skipped = f"PostgreSQL {project.pg_version} is not installed here"
            elif project.history_retention_seconds <= 0:
                item.skipped = "the project keeps no history, so no WAL or base backups were shipped"
            if item.skipped:
                say(f"[{done}/{total}] {project.name}/{branch.name}: skipped ({item.skipped})")
                continue
            assert install is not None
            if lazy:
                await asyncio.to_thread(_leave_in_bucket, layout, project, branch, url, settings.backup_s3_endpoint,
                                        at, wal.format_lsn(lsn) if lsn is not None else None)
                item.lazy = True
                say(f"[{done}/{total}] {project.name}/{branch.name}: its data stays in the bucket until `argon up` "
                    "needs it or restores it in the background")
                continue
            assert runtime is not None
            t0 = time.monotonic()
            await _restore_branch(store, codec, layout, backend, install, runtime, project, branch, at, item, say,
                                  f"[{done}/{total}] {project.name}/{branch.name}", lsn)
            item.seconds = time.monotonic() - t0
    if runtime is not None:
        await runtime  # made even when no branch needed it: `argon up` would make it anyway
    layout.restore_marker.unlink()
    report.seconds = time.monotonic() - started


def _leave_in_bucket(layout: Layout, project: model.Project, branch: model.Branch, url: str, s3_endpoint: str | None,
                     at: datetime | None, lsn: str | None) -> None:
    """A lazy restore's branch: its directory (the project's uid's, like an eager restore's) and the
    intent `argon up` restores it by (`argon.control.lazyrestore`)."""
    from argon.control import lazyrestore
    from argon.storage.intents import Intents

    branch_dir = layout.branch_dir(project.id, branch.id)
    (branch_dir / "log").mkdir(mode=0o700, parents=True, exist_ok=True)
    user = OsUser(project.os_uid, project.os_uid) if project.os_uid is not None and running_as_root() else None
    if user is not None:  # nothing of a tenant's is in the tree yet: a plain chown is safe
        chown_tree(layout.project_dir(project.id), user)
    Intents(layout.intents_dir).put(lazyrestore.intent_key(branch.id),
                                    lazyrestore.intent(project.id, branch.id, url, s3_endpoint, at, lsn))


async def _restore_branch(store: ObjectStore, codec: Codec, layout: Layout, backend: Any, probed: PgInstall,
                          runtime: asyncio.Task[dict[int, PgInstall]], project: model.Project, branch: model.Branch,
                          at: datetime | None, item: BranchRestore, say: Callable[[str], None], label: str,
                          lsn: int | None = None) -> None:
    """One branch, eagerly: download (reading WAL with `probed`'s tools, as root), then recovery
    by the runtime copy's postmaster (`runtime`, awaited only then)."""
    candidate = await asyncio.to_thread(choose, store, codec, project.id, branch.id, at, lsn)
    if candidate is None:
        item.skipped = "no base backup in the bucket" + (f" from before {at.isoformat()}" if at else "") + (
            f" consistent by {wal.format_lsn(lsn)}" if lsn is not None else "")
        say(f"{label}: skipped ({item.skipped})")
        return
    epoch, record = candidate.epoch, candidate.base
    item.epoch, item.base = epoch["id"], record["name"]
    manifest = candidate.manifest
    size = bb.manifest_bytes(manifest)
    branch_dir = layout.branch_dir(project.id, branch.id)
    branch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = branch_dir / f"pgdata.restoring-{secrets.token_hex(3)}"
    moved = [0]
    last = [0.0]

    def progress(n: int) -> None:
        moved[0] += n
        now = time.monotonic()
        if now - last[0] > 2:
            last[0] = now
            say(f"{label}: {moved[0] / 1e6:.0f} MB of base backup and WAL downloaded")

    stages: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        say(f"{label}: base backup {epoch['id']}/{record['name']} ({size / 1e6:.1f} MB)")
        settings, target_lsn, end = await asyncio.to_thread(prepare_recovery, store, codec, candidate, manifest,
                                                            project.id, branch.id, tmp, probed.bindir, at, progress,
                                                            lsn)
        item.bytes = moved[0]
        stages["download"], t0 = time.monotonic() - t0, time.monotonic()
        # A clean base whose WAL ends at its checkpoint needs no recovery run (ADR 0032, amended).
        control = await asyncio.to_thread(ready_without_replay, probed.bindir, tmp)
        user = OsUser(project.os_uid, project.os_uid) if project.os_uid is not None and running_as_root() else None
        if user is not None:
            await asyncio.to_thread(chown_tree, layout.project_dir(project.id), user)
        install = probed
        if control is None:
            say(f"{label}: replaying WAL up to {target_lsn or wal.format_lsn(end)}")
            install = (await runtime)[probed.major]
            control = await recover(install, layout, tmp, settings, user, branch_dir / "log" / "recovery.log")
            item.replayed = True
        else:
            say(f"{label}: no WAL to replay after the base backup's shutdown checkpoint {control.checkpoint_lsn}")
        item.reached = control.checkpoint_lsn
        stages["recovery"], t0 = time.monotonic() - t0, time.monotonic()
        # Durable before the rename (written back meanwhile), while the local history copies the
        # same, now final, tree: the two overlap (a failure leaves the `.restoring` marker).
        await _both(asyncio.to_thread(bb.sync_tree, tmp),
                    asyncio.to_thread(_begin_history, install, backend, branch_dir, tmp, user))
        pgdata = layout.pgdata(project.id, branch.id)
        os.rename(tmp, pgdata)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
        raise
    stages["sync and history"] = time.monotonic() - t0
    item.stages = {k: round(v, 2) for k, v in stages.items()}
    say(f"{label}: restored to {item.reached} (" + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()) + ")")


async def _both(*steps: Any) -> None:
    """Run `steps` at once and wait for all of them (none is left running behind an error); raise the
    first error."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _begin_history(install: PgInstall, backend: Any, branch_dir: Path, pgdata: Path, user: OsUser | None) -> None:
    """A fresh local history for the restored branch: one epoch whose base is a copy of the restored
    cluster at `pgdata` (final, possibly not renamed into place yet; the older history stays in the
    bucket)."""
    history = hs.BranchHistory(branch_dir / "history")
    now = model.utcnow()
    snap, control = hs.describe_snapshot(install.bindir, pgdata, "base", now)
    epoch = hs.Epoch(id=f"e{int(time.time() * 1000):x}{secrets.token_hex(2)}", started_at=now,
                     start_lsn=snap.consistent_lsn, timeline=control.timeline, segsize=control.segsize,
                     reason="restored from backup", snapshots=(snap,))
    history.wal_dir(epoch.id).mkdir(mode=0o700, parents=True, exist_ok=True)
    history.snapshot_dir(epoch.id, "base").parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    backend.clone_tree(pgdata, history.snapshot_dir(epoch.id, "base"))
    history.save(hs.Manifest((epoch,)))
    if user is not None:
        chown_tree(history.root, user)


async def recover(install: PgInstall, layout: Layout, target: Path, settings: dict[str, str], user: OsUser | None,
                  log_file: Path) -> wal.ControlData:
    """One recovery run of an assembled cluster: start it, wait until it promoted, stop it cleanly."""
    from argon.control.plane import argon_os_user

    socket_dir = layout.run_dir / f"rs-{secrets.token_hex(4)}"
    spec = ComputeSpec(endpoint_id=socket_dir.name, install=install, pgdata=target, socket_dir=socket_dir,
                       log_file=log_file, user=user, gucs=gucs_for_cu(0.25) | settings, argon_os_user=argon_os_user())
    await asyncio.to_thread(prepare, spec)
    pm = postmaster.start(install, target, log_file, user)
    try:
        try:
            await pm.wait_ready(timeout=RECOVERY_TIMEOUT)
        except ComputeStartError as exc:
            raise StorageError(f"recovery of the restored branch failed: {exc.user_message}") from None
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while True:
            row = None
            try:
                conn = await connect_admin(socket_dir)
            except psycopg.OperationalError:
                if not pm.alive:
                    raise StorageError(f"recovery of the restored branch stopped; see {log_file}") from None
            else:
                try:
                    cur = await conn.execute("SELECT pg_is_in_recovery()")
                    row = await cur.fetchone()
                finally:
                    await conn.close()
            if row and not row[0]:
                break
            if time.monotonic() > deadline:
                raise StorageError("recovery of the restored branch timed out")
            await asyncio.sleep(0.05)
        await pm.stop("fast")
    finally:
        if pm.alive:
            pm.kill_group()
        await asyncio.to_thread(shutil.rmtree, socket_dir, True)
    # The cluster ran as the project's uid: read and write it as safefs does (ADR 0016).
    control = await asyncio.to_thread(wal.control_data, install.bindir, target, user)
    await asyncio.to_thread(wal.tidy_after_recovery, target, control)
    await asyncio.to_thread(safefs.write_file, target / "postgresql.auto.conf", "", owner=user, atomic=True)
    return control


async def verify(settings: Settings, url: str, *, sample: int = 1, say: Callable[[str], None] = lambda m: None,
                 ) -> RestoreReport:
    """`argon backup verify`: restore the metadata and `sample` random branches (0: all) into a
    scratch directory, start each restored cluster and read every database; remove it all."""
    import random
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="argon-verify-", dir="/tmp"))
    os.chmod(scratch, 0o755)  # compute uids must reach their data inside
    try:
        store, codec = open_bucket(settings.model_copy(update={"backup_url": url}))
        if not await asyncio.to_thread(check_bucket, store, codec, create=False):
            raise UserError(f"there is no Argon backup at {url} (no argon-backup.json)")
        def pick(branches: list[model.Branch]) -> set[str]:
            ids = sorted(b.id for b in branches)
            return set(ids if sample <= 0 else random.sample(ids, min(sample, len(ids))))

        target = settings.model_copy(update={"data_dir": scratch / "data", "run_dir": scratch / "run"})
        report = await restore(target, url, None, say=say, sample=pick)
        layout = Layout(target.data_dir, target.run_dir)
        meta = Store.sqlite(layout.metadata_db)
        try:
            projects = {p.id: p for p in await asyncio.to_thread(meta.list_projects)}
            databases = {b.branch_id: [d.name for d in await asyncio.to_thread(meta.list_databases, b.branch_id)]
                         for b in report.branches if not b.skipped}
        finally:
            meta.close()
        installs = await asyncio.to_thread(discover, settings.pg_bindirs, layout.runtime_dir)
        for item in report.branches:
            if item.skipped:
                continue
            project = projects[item.project_id]
            user = OsUser(project.os_uid, project.os_uid) if project.os_uid is not None and running_as_root() else None
            counted = await _read_every_database(installs[project.pg_version], layout,
                                                 layout.pgdata(item.project_id, item.branch_id), user,
                                                 databases.get(item.branch_id, []))
            say(f"{item.project_id}/{item.name}: {counted} database(s) read after recovery to {item.reached}")
        return report
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)


async def _read_every_database(install: PgInstall, layout: Layout, pgdata: Path, user: OsUser | None,
                               names: list[str]) -> int:
    """Start the restored cluster, read the catalogs and every table's size in each database."""
    from argon.control.plane import argon_os_user

    socket_dir = layout.run_dir / f"rv-{secrets.token_hex(4)}"
    log_file = pgdata.parent / "log" / "verify.log"
    spec = ComputeSpec(endpoint_id=socket_dir.name, install=install, pgdata=pgdata, socket_dir=socket_dir,
                       log_file=log_file, user=user, gucs=gucs_for_cu(0.25) | {"archive_mode": "off"},
                       argon_os_user=argon_os_user())
    await asyncio.to_thread(prepare, spec)
    pm = postmaster.start(install, pgdata, log_file, user)
    try:
        try:
            await pm.wait_ready(timeout=RECOVERY_TIMEOUT)
        except ComputeStartError as exc:
            raise StorageError(f"the restored branch does not start: {exc.user_message}") from None
        for name in names:
            conn = await connect_admin(socket_dir, name)
            try:
                await conn.execute("SELECT count(*), sum(pg_relation_size(oid)) FROM pg_class")
            finally:
                await conn.close()
        await pm.stop("fast")
    finally:
        if pm.alive:
            pm.kill_group()
        await asyncio.to_thread(shutil.rmtree, socket_dir, True)
    return len(names)


_LSN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


def parse_at(text: str | None) -> datetime | str | None:
    """`--at`: an RFC 3339 time, or an LSN (returned as text, e.g. `0/16B3748`)."""
    if text is None:
        return None
    if _LSN.match(text.strip()):
        return text.strip().upper()
    try:
        value = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise UserError(f"--at {text!r} is neither a time nor an LSN; use RFC 3339 (e.g. 2026-11-24T13:00:00Z) or "
                        "an LSN (e.g. 0/16B3748)") from None
    if value.tzinfo is None:
        raise UserError("--at needs a time zone (RFC 3339, e.g. 2026-11-24T13:00:00Z)")
    return value.astimezone(UTC)


__all__ = ["ArgonError", "RestoreReport", "parse_at", "restore"]

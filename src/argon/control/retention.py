"""History retention: when a branch's history epochs begin and end, when snapshots are taken, and
what is pruned once it falls out of the project's `history_retention_seconds`.

Every branch's compute archives its WAL into the current *epoch* of its history (ADR 0008); an
epoch starts whenever the branch gets new data and begins with a base snapshot. More snapshots are
taken at a clean stop when one is due (`snapshot_due`), or online for computes that never suspend
(`maintain`, every minute); pruning keeps, per epoch, the newest snapshot older than the window and
everything newer (`plan_pruning`). The decisions are pure functions; the mechanism (manifest,
copies, links, WAL files) is `argon.storage.history` and `argon.storage.wal`. A point in time is
rebuilt from what is kept here by `argon.control.pitr`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from argon import model, safefs
from argon.compute.admin import connect_admin
from argon.compute.osuser import OsUser, project_user
from argon.compute.template import retired_path
from argon.control.plane import ControlPlane
from argon.errors import NotFound, StorageError
from argon.failpoints import failpoint
from argon.storage import branching, wal
from argon.storage import history as hs
from argon.storage.backup.wal import ShipState
from argon.storage.spares import template_key
from argon.storage.usage import disk_usage

log = logging.getLogger(__name__)

WAL_SNAPSHOT_TRIGGER = 256 * 1024 * 1024  # this much WAL since the newest snapshot: take one at the next stop
PRUNE_BUDGET = 50  # idle branches pruned per `maintain` call (a minute) at most: 1,000 of them in 20 minutes


def branch_history(plane: ControlPlane, project_id: str, branch_id: str) -> hs.BranchHistory:
    try:
        owner = project_user(plane.project(project_id).os_uid)
    except NotFound:
        owner = None
    return hs.BranchHistory(plane.layout.branch_dir(project_id, branch_id) / "history", owner)


def project_owner(project: model.Project) -> OsUser | None:
    return project_user(project.os_uid)


def enabled(project: model.Project) -> bool:
    return project.history_retention_seconds > 0


def _epoch_id() -> str:
    return f"e{int(time.time() * 1000):x}{secrets.token_hex(2)}"


def _make_wal_dir(history: hs.BranchHistory, project: model.Project, epoch_id: str) -> None:
    safefs.makedirs(history.wal_dir(epoch_id), owner=project_owner(project))


def current_epoch(plane: ControlPlane, project_id: str, branch_id: str) -> hs.Epoch | None:
    """The branch's current epoch; None without history, or when its manifest is unusable (the
    compute's uid can write it: the branch then runs without point in time, and says so in the log)."""
    try:
        return branch_history(plane, project_id, branch_id).load().current
    except hs.ManifestError as exc:
        log.warning("branch %s runs without history: %s", branch_id, exc.user_message)
        return None


def archive_settings(plane: ControlPlane, project: model.Project, branch_id: str) -> dict[str, str]:
    """The compute's archiving GUCs: its WAL goes to the current epoch's archive, or nowhere."""
    if not enabled(project):
        return {"archive_mode": "off"}
    current = current_epoch(plane, project.id, branch_id)
    if current is None:
        return {"archive_mode": "off"}
    archive_dir = branch_history(plane, project.id, branch_id).wal_dir(current.id)
    return {"archive_mode": "on", "archive_command": wal.archive_command(archive_dir), "archive_timeout": "0"}


# --- Epochs ---------------------------------------------------------------------------------------------

def start_from_template(plane: ControlPlane, project: model.Project, branch_id: str, template: Path) -> None:
    """A new project's first epoch: its cluster is a byte copy of the pristine template, so the
    template is the base snapshot: never copied into the history until a restore needs it as a
    directory of its own (`template_snapshot`); projects share it, and the template is kept when
    rebuilt (`template_of`)."""
    if not enabled(project):
        return
    install = plane.installs[project.pg_version]
    snap, control = hs.describe_snapshot(install.bindir, template, "base", project.created_at)
    snap = hs.Snapshot(name=snap.name, taken_at=snap.taken_at, redo_lsn=snap.redo_lsn,
                       consistent_lsn=snap.consistent_lsn, template=template_key(template))
    epoch = hs.Epoch(id=_epoch_id(), started_at=project.created_at, start_lsn=control.checkpoint_lsn,
                     timeline=control.timeline, segsize=control.segsize, reason="project created", snapshots=(snap,))
    history = branch_history(plane, project.id, branch_id)
    history.save(hs.Manifest((epoch,)))
    _make_wal_dir(history, project, epoch.id)


def materialize_base(plane: ControlPlane, project: model.Project, branch_id: str) -> None:
    """Copy template-backed snapshots into the history (idempotent; a copy in progress is a temp dir).
    Nothing calls it on its own: a restore that needs the base copies it (`template_snapshot`)."""
    history = branch_history(plane, project.id, branch_id)
    for epoch in history.load().epochs:
        for snap in epoch.snapshots:
            if snap.template is not None:
                template_snapshot(plane, project, history, epoch, snap)


def template_of(plane: ControlPlane, pg_version: int, key: str) -> Path | None:
    """The template a template-backed snapshot stands for: the current one, or one since rebuilt and
    kept (`argon.compute.template`: a new project's history base is never copied, ADR 0022)."""
    current = plane.templates.get(pg_version)
    if current is not None and template_key(current) == key:
        return current
    name, _, digest = key.rpartition("-")
    kept = retired_path(plane.layout.templates_dir, name, digest)
    return kept if safefs.is_dir(kept) and template_key(kept) == key else None


def template_snapshot(plane: ControlPlane, project: model.Project, history: hs.BranchHistory, epoch: hs.Epoch,
                      snap: hs.Snapshot) -> Path:
    """The directory of a snapshot, copying the template it stands for into the history first if
    it is template-backed (a new project's base) and not copied yet."""
    path = history.snapshot_dir(epoch.id, snap.name)
    if safefs.lexists(path):
        return path
    template = template_of(plane, project.pg_version, snap.template) if snap.template else None
    if template is None:
        raise StorageError("the base of this branch's history was a template that has since been rebuilt; "
                           "history before the branch's first suspend is not available")
    user = project_owner(project)
    safefs.makedirs(path.parent, owner=user)
    # a root-owned template: copied where only root goes, then handed over (argon.storage.spares)
    hs.copy_template(lambda source, tmp: plane.spares.copy(source, tmp, user), template, path)
    return path


def begin_epoch(plane: ControlPlane, project: model.Project, branch_id: str, pgdata: Path, *, reason: str,
                consistent_lsn: str | None = None, fresh: bool = False,
                control: wal.ControlData | None = None) -> None:
    """The branch's data was just replaced by the (not yet started) cluster at `pgdata`: end the
    current epoch, if any, and start a new one whose base is a copy of `pgdata`. `fresh`: forget
    the older epochs (the branch is new, or its old history moved to a preserved branch).
    `control`: `pgdata`'s `pg_controldata` when already read (a copy of a stopped cluster)."""
    if not enabled(project):
        return
    history = branch_history(plane, project.id, branch_id)
    manifest = hs.Manifest() if fresh else history.load()
    install = plane.installs[project.pg_version]
    now = plane.clock()
    snap, control = hs.describe_snapshot(install.bindir, pgdata, "base", now, consistent_lsn, project_owner(project),
                                         control)
    label = wal.backup_label_fields(pgdata)
    epoch = hs.Epoch(id=_epoch_id(), started_at=now, start_lsn=snap.consistent_lsn,
                     timeline=label[1] if label else control.timeline, segsize=control.segsize, reason=reason,
                     snapshots=(snap,))
    base = history.snapshot_dir(epoch.id, "base")
    _make_wal_dir(history, project, epoch.id)
    plane.backend.clone_tree(pgdata, base, owner=project_owner(project))
    failpoint("history.epoch_begin.after_base")
    history.save(manifest.with_epoch(epoch))  # the commit point


@dataclass(frozen=True)
class _ParentBase:
    """What a copy of a parent's data starts its history from (begin_epoch_from_parent)."""

    epoch: hs.Epoch  # the parent's current epoch
    snap: hs.Snapshot  # its newest snapshot before the copy
    source: Path  # that snapshot's directory
    timeline: int
    own: list[tuple[int, str]]  # the copy's own WAL segments (start LSN, name)


def _parent_base(plane: ControlPlane, project: model.Project, pgdata: Path, parent_id: str,
                 control: wal.ControlData | None) -> _ParentBase | None:
    parent = branch_history(plane, project.id, parent_id)
    pe = parent.load().current
    if pe is None or not pe.snapshots:
        return None
    install = plane.installs[project.pg_version]
    control = control or wal.control_data(install.bindir, pgdata, project_owner(project))
    label = wal.backup_label_fields(pgdata)
    if label is not None:
        start, timeline = wal.parse_lsn(label[0]), label[1]
    elif control.state == "shut down":
        start, timeline = wal.parse_lsn(control.redo_lsn), control.timeline
    else:
        return None  # a crashed parent's copy: its WAL's end is unknown here
    if timeline != pe.timeline or control.segsize != pe.segsize:
        return None
    usable = [s for s in pe.snapshots if wal.parse_lsn(s.consistent_lsn) <= start]
    if not usable:
        return None
    snap = usable[-1]
    source = template_snapshot(plane, project, parent, pe, snap) if snap.template else \
        parent.snapshot_dir(pe.id, snap.name)
    if not safefs.is_dir(source):
        return None
    own = sorted((seg[1], name) for name in safefs.listdir(pgdata / "pg_wal")
                 if (seg := wal.segment_start(name, pe.segsize)) is not None and seg[0] == timeline)
    if not own:
        return None
    return _ParentBase(pe, snap, source, timeline, own)


PREPARED_FOR = "prepared-for"  # in a spare copy's directory: the parent snapshot its `base` links


def prepare_epoch_from_parent(plane: ControlPlane, project: model.Project, parent_id: str, spare: Path,
                              control: wal.ControlData) -> None:
    """For a spare copy of a stopped parent (`spare`/pgdata, `argon.storage.branch_spares`): what
    `begin_epoch_from_parent` would link and copy for a branch made from it, made ahead in `spare`
    (`base`, the parent's snapshot hard-linked; `wal`, copies of the copy's own segments), so that a
    branch taking the spare renames them into its history instead. Nothing when history is off."""
    if not enabled(project):
        return
    pgdata = spare / "pgdata"
    found = _parent_base(plane, project, pgdata, parent_id, control)
    if found is None:
        return
    user = project_owner(project)
    safefs.makedirs(spare / "wal", owner=user)
    with safefs.Dir(spare / "wal") as to, safefs.Dir(pgdata / "pg_wal") as mine:
        for _lsn, name in found.own:
            mine.copy(name, to, name, owner=user)
    hs.link_tree(found.source, spare / "base", user)
    safefs.write_file(spare / PREPARED_FOR, f"{found.epoch.id}/{found.snap.name}", owner=user)


def begin_epoch_from_parent(plane: ControlPlane, project: model.Project, branch_id: str, pgdata: Path,
                            parent_id: str, *, consistent_lsn: str | None,
                            control: wal.ControlData | None = None, prepared: Path | None = None) -> bool:
    """A new branch's first epoch without a second copy of its data (ADR 0010; on both backends: a
    reflink clone shares the extents but still costs a pass over every file, about as long as the
    branch's own copy): the new cluster at `pgdata` is the parent's data at the copy, i.e. the
    parent's newest snapshot before it plus the parent's WAL since. So the base is that snapshot,
    hard-linked (snapshots and archived segments are never written in place), and the parent's
    archived segments up to the first one the copy holds are hard-linked into the new epoch's
    archive (segments still in the parent's live pg_wal are copied: Postgres reuses those files),
    followed by copies of the copy's own. Recovery from the base then replays the parent's WAL into
    the branch's own, which continues on the same timeline. `control`: `pgdata`'s `pg_controldata`
    when the caller read it already (a copy of a stopped cluster). `prepared`: a spare copy's
    directory whose base and segment copies were made ahead (`prepare_epoch_from_parent`), used
    when they are of the same parent snapshot. Returns False, having made nothing, when the
    parent's history cannot serve (the caller then copies a base)."""
    if not enabled(project):
        return False
    found = _parent_base(plane, project, pgdata, parent_id, control)
    if found is None:
        return False
    pe, snap, source, timeline, own = found.epoch, found.snap, found.source, found.timeline, found.own
    user = project_owner(project)
    control = control or wal.control_data(plane.installs[project.pg_version].bindir, pgdata, user)
    first_own = own[0][0]
    needed = [wal.segment_name(timeline, lsn, pe.segsize)
              for lsn in range(wal.parse_lsn(snap.redo_lsn) // pe.segsize * pe.segsize, first_own, pe.segsize)]
    ready = prepared is not None and safefs.lexists(prepared / PREPARED_FOR) and \
        safefs.read_file(prepared / PREPARED_FOR, limit=256, owner=user).decode() == f"{pe.id}/{snap.name}"
    history = branch_history(plane, project.id, branch_id)
    now = plane.clock()
    epoch = hs.Epoch(id=_epoch_id(), started_at=now, start_lsn=consistent_lsn or control.checkpoint_lsn,
                     timeline=timeline, segsize=pe.segsize, reason="branch created",
                     snapshots=(hs.Snapshot(name="base", taken_at=now, redo_lsn=snap.redo_lsn,
                                            consistent_lsn=snap.consistent_lsn),))
    _make_wal_dir(history, project, epoch.id)
    archive_dir = history.wal_dir(epoch.id)
    archive, live = branch_history(plane, project.id, parent_id).wal_dir(pe.id), \
        plane.layout.pgdata(project.id, parent_id) / "pg_wal"
    try:
        wal.link_segments(needed, archive, live, archive_dir, user)
        # The copy's own segments, as copied: its first start replays them and may recycle them
        # without archiving (they were not written there); the one it goes on writing is archived
        # again, whole, when it is full. Copied only when they are regular files of the uid (safefs).
        base = history.snapshot_dir(epoch.id, "base")
        safefs.makedirs(base.parent, owner=user)
        if ready:
            assert prepared is not None
            for _lsn, name in own:
                safefs.rename(prepared / "wal" / name, archive_dir / name)
            safefs.rename(prepared / "base", base)
        else:
            with safefs.Dir(archive_dir) as to, safefs.Dir(pgdata / "pg_wal") as mine:
                for _lsn, name in own:
                    mine.copy(name, to, name, owner=user)
            hs.link_tree(source, base, user)
    except OSError as exc:  # a segment gone from both places, or no hard links here
        log.info("branch %s: copying a history base (the parent's history could not be linked: %s)", branch_id, exc)
        hs.remove_tree(history.root)
        return False
    history.save(hs.Manifest((epoch,)))
    log.debug("branch %s: history base linked to %s/%s of %s, %d segment(s) of its WAL%s", branch_id, pe.id,
              snap.name, parent_id, len(needed), " (made ahead)" if ready else "")
    return True


def end_epoch(plane: ControlPlane, project: model.Project, branch_id: str, old_pgdata: Path) -> None:
    """Before a branch's stopped cluster is replaced: keep its not yet archived WAL tail in the
    epoch's archive and record where the epoch ended."""
    if not enabled(project):
        return
    history = branch_history(plane, project.id, branch_id)
    manifest = history.load()
    epoch = manifest.current
    if epoch is None or not safefs.is_dir(old_pgdata):
        return
    install = plane.installs[project.pg_version]
    control = wal.control_data(install.bindir, old_pgdata, project_owner(project))
    newest = epoch.snapshots[-1] if epoch.snapshots else None
    start = wal.parse_lsn(newest.redo_lsn) if newest else 0
    archive_dir = history.wal_dir(epoch.id)
    safefs.makedirs(archive_dir, owner=project_owner(project))
    plane.backend.copy_into(wal.wal_files(old_pgdata / "pg_wal", epoch.timeline, epoch.segsize, start), archive_dir,
                            tolerate_vanished=True, owner=project_owner(project))
    failpoint("history.epoch_end.after_wal")
    history.save(manifest.with_epoch(epoch.replace(ended_at=plane.clock(), end_lsn=control.checkpoint_lsn)))


def reopen_epoch(plane: ControlPlane, project: model.Project, branch_id: str) -> None:
    """A restore that ended the branch's epoch was rolled back (the reconciler): the old data is in
    place again and goes on writing into that epoch."""
    history = branch_history(plane, project.id, branch_id)
    if not enabled(project) or not history.exists():
        return
    manifest = history.load()
    epoch = manifest.current
    if epoch is not None and epoch.ended_at is not None:
        history.save(manifest.with_epoch(epoch.replace(ended_at=None, end_lsn=None)))


# --- Decisions (pure) ------------------------------------------------------------------------------------

def snapshot_due(epoch: hs.Epoch, wal_since: int, *, now: datetime, retention_seconds: int, cheap: bool,
                 data_bytes: int = 0) -> bool:
    """Whether a snapshot should be taken now, `wal_since` bytes of WAL after the epoch's newest.
    `cheap`: snapshots are reflinks (next to free) rather than copies of the cluster. `data_bytes`:
    the size of the cluster's databases, when known (at a clean stop): WAL of half that size makes
    a snapshot due, so a restore from the bucket or a point in time never replays more WAL than
    about half the data it could have copied instead (a bulk load's WAL is as large as the data),
    and a snapshot costs at most twice the WAL it saves replaying."""
    if wal_since < epoch.segsize:
        return False  # (almost) nothing written since the newest snapshot
    if wal_since >= WAL_SNAPSHOT_TRIGGER or (data_bytes and wal_since >= max(data_bytes // 2, 4 * epoch.segsize)):
        return True
    age = (now - epoch.snapshots[-1].taken_at).total_seconds() if epoch.snapshots else float("inf")
    # A reflink snapshot costs next to nothing: take one every 1/24 of the window (hourly for a
    # day). A plain copy costs the cluster's size: every half window, so about three are kept.
    interval = retention_seconds / (24 if cheap else 2)
    return age >= max(60.0, interval)


@dataclass(frozen=True)
class Pruning:
    """What `plan_pruning` keeps and drops."""

    manifest: hs.Manifest  # the history that remains
    epochs: tuple[str, ...] = ()  # epochs removed whole
    snapshots: tuple[tuple[str, str], ...] = ()  # (epoch, snapshot) removed
    wal: tuple[tuple[hs.Epoch, int], ...] = ()  # (kept epoch, LSN): its archived segments wholly before go

    @property
    def empty(self) -> bool:
        return not (self.epochs or self.snapshots)


def plan_pruning(manifest: hs.Manifest, window: datetime, shipped: Mapping[str, int] | None = None) -> Pruning:
    """What no target inside the retention window (from `window` on) needs. An older epoch that ended
    before the window goes whole; in every epoch the newest snapshot taken before the window stays
    (a target right at the window's start replays from it) and older ones go, with the archived WAL
    before the first snapshot kept. `shipped` (with continuous backup, ADR 0018): per epoch, the end
    of its WAL in the bucket; no WAL the bucket does not have yet is planned away (an epoch goes only
    once its WAL is shipped past its end, a kept epoch's archive is cut no later than that)."""
    epochs: list[str] = []
    snapshots: list[tuple[str, str]] = []
    cuts: list[tuple[hs.Epoch, int]] = []

    def shipped_to(epoch: hs.Epoch, lsn: int) -> bool:
        return shipped is None or shipped.get(epoch.id, 0) > lsn

    for epoch in manifest.epochs[:-1]:
        if epoch.ended_at is not None and epoch.ended_at < window and \
                shipped_to(epoch, wal.parse_lsn(epoch.end_lsn or epoch.start_lsn)):
            epochs.append(epoch.id)
            manifest = manifest.without(epoch.id)
    for epoch in manifest.epochs:
        drop = [s for s in epoch.snapshots if s.taken_at < window][:-1]
        if drop:
            epoch = epoch.replace(snapshots=tuple(s for s in epoch.snapshots if s not in drop))
            manifest = manifest.with_epoch(epoch)
            snapshots += [(epoch.id, s.name) for s in drop]
        if epoch.snapshots:
            cut = wal.parse_lsn(epoch.snapshots[0].redo_lsn)
            cuts.append((epoch, cut if shipped is None else min(cut, shipped.get(epoch.id, 0))))
    return Pruning(manifest, tuple(epochs), tuple(snapshots), tuple(cuts))


# --- Snapshots at suspend, pruning ----------------------------------------------------------------------

def _due(plane: ControlPlane, project: model.Project, epoch: hs.Epoch, wal_since: int, data_bytes: int = 0) -> bool:
    return snapshot_due(epoch, wal_since, now=plane.clock(), retention_seconds=project.history_retention_seconds,
                        cheap=plane.backend.name == "reflink", data_bytes=data_bytes)


def after_stop(plane: ControlPlane, project: model.Project, branch_id: str) -> None:
    """Called with the endpoint lock held, right after a clean stop: take a snapshot when one is due,
    then prune what fell out of the retention window."""
    if not enabled(project):
        return
    history = branch_history(plane, project.id, branch_id)
    manifest = history.load()
    epoch = manifest.current
    if epoch is None:
        return
    pgdata = plane.layout.pgdata(project.id, branch_id)
    install = plane.installs[project.pg_version]
    control = wal.control_data(install.bindir, pgdata, project_owner(project))
    newest = epoch.snapshots[-1] if epoch.snapshots else None
    wal_since = wal.parse_lsn(control.checkpoint_lsn) - (wal.parse_lsn(newest.consistent_lsn) if newest else 0)
    if control.state == "shut down" and control.timeline == epoch.timeline and \
            _due(plane, project, epoch, wal_since, disk_usage(pgdata / "base").size if wal_since >= epoch.segsize else 0):
        name = f"s{int(time.time() * 1000):x}"
        target = history.snapshot_dir(epoch.id, name)
        safefs.makedirs(target.parent, owner=project_owner(project))
        branching.clone_stopped(plane.backend, pgdata, target, control, project_owner(project))  # without recycled WAL
        snap, _ = hs.describe_snapshot(install.bindir, target, name, plane.clock(), owner=project_owner(project))
        failpoint("history.snapshot.after_copy")
        epoch = epoch.replace(snapshots=(*epoch.snapshots, snap))
        manifest = manifest.with_epoch(epoch)
        history.save(manifest)
        log.info("snapshot %s of branch %s taken at %s", name, branch_id, snap.consistent_lsn)
    prune(plane, project, branch_id)


def next_prune_at(manifest: hs.Manifest, retention: timedelta) -> datetime | None:
    """Pure: when time alone next gives `plan_pruning` something to drop in this history, as it
    stands after a pruning (an idle branch's: no new WAL, no new snapshot): an older epoch's end
    leaving the window, or an epoch's second-oldest snapshot doing so (the oldest then goes). None:
    never, until the history changes."""
    times = [e.ended_at for e in manifest.epochs[:-1] if e.ended_at is not None]
    for epoch in manifest.epochs:
        taken = sorted(s.taken_at for s in epoch.snapshots)
        if len(taken) > 1:
            times.append(taken[1])
    return min(times) + retention if times else None


def prune(plane: ControlPlane, project: model.Project, branch_id: str) -> int:
    """Drop epochs, snapshots and archived WAL no target inside the retention window needs
    (`plan_pruning`): the manifest first, then the files. Returns the bytes freed."""
    return prune_history(plane, project, branch_id)[0]


def prune_history(plane: ControlPlane, project: model.Project, branch_id: str) -> tuple[int, datetime | None]:
    """`prune`, and when this history has something to prune again if no WAL comes (`next_prune_at`;
    now, when backup's shipping held something back)."""
    history = branch_history(plane, project.id, branch_id)
    manifest = history.load()
    if not manifest.epochs:
        return 0, None
    shipped = None
    if plane.settings.backup_url:  # never delete WAL the bucket does not have yet
        state = plane.layout.branch_backup_state(project.id, branch_id)
        shipped = {e.id: ShipState.load(state / e.id / "wal.json").shipped_end for e in manifest.epochs}
    now = plane.clock()
    retention = timedelta(seconds=project.history_retention_seconds)
    plan = plan_pruning(manifest, now - retention, shipped)
    again = next_prune_at(plan.manifest, retention)
    if shipped is not None and plan_pruning(manifest, now - retention) != plan:
        again = now  # the bucket lags: look again at the next round
    freed = 0
    if not plan.empty:
        gone = [history.epoch_dir(e) for e in plan.epochs] + [history.snapshot_dir(e, s) for e, s in plan.snapshots]
        freed += sum(disk_usage(path).allocated for path in gone)
        history.save(plan.manifest)  # the commit point: the files go after the manifest stops naming them
        failpoint("retention.prune.after_manifest")
        for path in gone:
            hs.remove_tree(path)
    for epoch, before in plan.wal:
        freed += wal.prune_wal(history.wal_dir(epoch.id), epoch.timeline, epoch.segsize, before)
    if freed:
        log.info("pruned %.1f MB of history of branch %s", freed / 1e6, branch_id)
    return freed, again


@dataclass(frozen=True)
class Maintained:
    cursor: str  # the last never-visited idle branch pruned: the next call goes on after it
    pruned: tuple[str, ...]  # branches whose history lost files (their storage figures changed)


class PruneSchedule:
    """When each idle branch's history next needs pruning, as learnt from its last visit: an idle
    branch's history changes only as time passes its retention, at moments its manifest tells
    (`next_prune_at`). A branch the view says changed (a start, a suspend, a restore) is forgotten
    here and visited again. What `maintain` reads so that a minute's work follows the changes and
    the running computes, not the number of branches (it visited 50 idle ones a minute, round robin)."""

    def __init__(self) -> None:
        self.due: dict[str, datetime | None] = {}  # branch -> when (None: not until it changes)

    def forget(self, branch_id: str) -> None:
        self.due.pop(branch_id, None)


def maintenance_round(idle: list[str], running: list[str], after: str, budget: int,
                      due: Mapping[str, datetime | None] | None = None,
                      now: datetime | None = None) -> tuple[list[str], str]:
    """Pure: the branches one call of `maintain` visits: every running one; the idle ones whose
    `due` time has come, soonest first; then idle ones never visited (not in `due`) after `after` in id
    order (round robin), `budget` idle ones in all; and the cursor for the next call."""
    due = due or {}
    ripe = sorted((t, b) for b in idle if b in due and (t := due[b]) is not None and now is not None and t <= now)
    picked = [b for _, b in ripe[:budget]]
    unknown = sorted(b for b in idle if b not in due)
    start = next((i for i, b in enumerate(unknown) if b > after), 0)
    fresh = (unknown[start:] + unknown[:start])[:budget - len(picked)]
    return running + picked + fresh, (fresh[-1] if fresh else after)


async def maintain(plane: ControlPlane, after: str = "", budget: int = PRUNE_BUDGET,
                   schedule: PruneSchedule | None = None) -> Maintained:
    """Every minute (the monitor): computes that never suspend get their snapshots online and their
    history pruned; idle branches, whose history changes only with time, are pruned when `schedule`
    says their time has come, and those it knows nothing of `budget` at a time, round robin (so a
    call's work grows with the running computes and the changes, not with the projects). Under the
    project lock, so no restore changes epochs meanwhile."""
    schedule = schedule or PruneSchedule()
    running_ids = {ep.branch_id for ep in plane.running_endpoints() if ep.type is model.EndpointType.READ_WRITE}
    idle, running = [], []
    for branch in plane.all_branches():
        project = plane.find_project(branch.project_id)
        if project is None or not enabled(project):
            continue
        (running if branch.id in running_ids else idle).append(branch.id)
    visit, cursor = maintenance_round(idle, running, after, budget, schedule.due, plane.clock())
    pruned = []
    for branch_id in visit:
        branch = plane.find_branch(branch_id)
        if branch is None:
            continue
        try:
            async with plane.project_lock(branch.project_id):
                project = plane.find_project(branch.project_id)
                if project is None or plane.find_branch(branch_id) is None:
                    continue
                if plane.creating.children_of(branch_id):  # a new branch links its history: next round
                    continue
                await _snapshot_running(plane, project, branch_id)
                freed, again = await asyncio.to_thread(prune_history, plane, project, branch_id)
                if freed:
                    pruned.append(branch_id)
                if branch_id in running_ids:
                    schedule.forget(branch_id)  # it writes: looked at every round while it runs
                else:
                    schedule.due[branch_id] = again
        except Exception as exc:
            log.warning("history maintenance of branch %s failed: %s", branch_id, getattr(exc, "user_message", exc))
    return Maintained(cursor, tuple(pruned))


async def _snapshot_running(plane: ControlPlane, project: model.Project, branch_id: str) -> None:
    """An online snapshot (the clone protocol) of a running compute, when one is due. The compute
    keeps serving; if it stops meanwhile, the backup is aborted and nothing is recorded."""
    ep = plane.primary(project.id, branch_id)
    if ep is None or not plane.is_running(ep.id):
        return
    history = branch_history(plane, project.id, branch_id)
    epoch = (await asyncio.to_thread(history.load)).current
    if epoch is None or not epoch.snapshots:
        return
    conn = await connect_admin(plane.layout.socket_dir(ep.id))
    try:
        cur = await conn.execute("SELECT pg_current_wal_lsn()::text")
        row = await cur.fetchone()
        wal_since = wal.parse_lsn(row[0] if row else "0/0") - wal.parse_lsn(epoch.snapshots[-1].consistent_lsn)
        if not _due(plane, project, epoch, wal_since):
            return
        name = f"s{int(time.time() * 1000):x}"
        target = history.snapshot_dir(epoch.id, name)
        await asyncio.to_thread(safefs.makedirs, target.parent, owner=project_owner(project))
        try:
            stop_lsn = await branching.clone_running(conn, plane.backend, plane.layout.pgdata(project.id, branch_id),
                                                     target, project_owner(project))
        except BaseException:
            await asyncio.to_thread(safefs.rmtree, target)
            raise
    finally:
        await conn.close()
    install = plane.installs[project.pg_version]

    def record() -> None:
        snap, _ = hs.describe_snapshot(install.bindir, target, name, plane.clock(), stop_lsn, project_owner(project))
        manifest = history.load()  # re-read: a stop may have added a snapshot meanwhile
        current = manifest.current
        if current is None or current.id != epoch.id:
            safefs.rmtree(target)
            return
        history.save(manifest.with_epoch(current.replace(snapshots=(*current.snapshots, snap))))
        log.info("online snapshot %s of branch %s taken at %s", name, branch_id, stop_lsn)

    await asyncio.to_thread(record)

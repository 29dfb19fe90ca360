"""Host isolation as root: code running as a project's compute uid (what per-project uids exist to
contain) plants links, FIFOs and forged files wherever root works in its tree, then the platform
starts, stops, branches, restores, prunes, reconciles and deletes. Root's files outside stay as
they were, and no other project is touched (docs/security.md, section 9). Root only (CI runs as root)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest

from argon.compute.admin import connect_admin
from argon.compute.osuser import OsUser
from argon.control import reconcile as rc
from argon.control import retention, schema
from argon.storage.history import ManifestError
from tests.fixtures.platform import RunningPlatform
from tests.integration.test_branches import branch, scalar, uri_of

pytestmark = [pytest.mark.pg,
              pytest.mark.skipif(os.geteuid() != 0, reason="per-project uids exist only when argon runs as root")]


class Secret:
    """A root-owned 0600 file outside every project: what a compute uid wants to read or change."""

    def __init__(self, root: Path) -> None:
        root.mkdir(mode=0o700, exist_ok=True)
        self.path = root / f"secret-{secrets.token_hex(4)}"
        self.text = f"root's secret {secrets.token_hex(8)}\n"
        self.path.write_text(self.text)
        os.chmod(self.path, 0o600)

    def intact(self) -> bool:
        st = self.path.lstat()
        return (self.path.read_text(), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == \
            (self.text, 0, 0, 0o600, 1)


@pytest.fixture
def secret(platform: RunningPlatform) -> Secret:
    return Secret(platform.root / "outside")


def as_uid(uid: int, *cmd: str, stdin: str | None = None) -> None:
    """Run a command as the compute uid: what code execution inside a compute can do."""
    subprocess.run(list(cmd), input=stdin, text=True, check=True, user=uid, group=uid, extra_groups=[], cwd="/",
                   capture_output=True)


def plant_link(uid: int, target: Path, path: Path) -> None:
    as_uid(uid, "ln", "-sfn", str(target), str(path))


def ids(created: dict[str, Any]) -> tuple[str, str, str]:
    return created["project"]["id"], created["branch"]["id"], created["endpoints"][0]["id"]


def uid_of(platform: RunningPlatform, project_id: str) -> int:
    uid = platform.plane.project(project_id).os_uid
    assert uid is not None
    return int(uid)


def suspend(platform: RunningPlatform, project_id: str, endpoint_id: str) -> None:
    resp = platform.api.post(f"/projects/{project_id}/endpoints/{endpoint_id}/suspend")
    assert resp.status_code == 200, resp.text
    assert not platform.plane.is_running(endpoint_id)


def regular_of(path: Path, uid: int) -> bool:
    st = path.lstat()
    return stat.S_ISREG(st.st_mode) and st.st_uid == uid and st.st_nlink == 1


def test_compute_start_writes_no_file_through_a_link(platform: RunningPlatform, secret: Secret) -> None:
    """The reported attack: config files and the log replaced by links to root's files."""
    created = platform.create_project(name="links")
    pid, bid, ep = ids(created)
    try:
        uid = uid_of(platform, pid)
        suspend(platform, pid, ep)
        pgdata, log = platform.plane.layout.pgdata(pid, bid), platform.plane.layout.compute_log(pid, bid)
        targets = {name: Secret(platform.root / "outside") for name in
                   ("postgresql.conf", "postgresql.auto.conf", "pg_hba.conf", "pg_ident.conf")}
        for name, target in targets.items():
            plant_link(uid, target.path, pgdata / name)
        plant_link(uid, secret.path, log)
        as_uid(uid, "mkfifo", str(pgdata / "postmaster.pid"))  # read by root at every start: must not hang it
        assert scalar(platform.dsn(created), "SELECT 1") == 1  # wakes the compute
        assert secret.intact() and all(t.intact() for t in targets.values())
        assert all(regular_of(pgdata / name, uid) for name in targets) and regular_of(log, uid)
    finally:
        platform.delete_project(pid)


def test_a_replicas_start_writes_no_file_through_a_link(platform: RunningPlatform, secret: Secret) -> None:
    created = platform.create_project(name="replica-links")
    pid, bid, _ = ids(created)
    try:
        uid = uid_of(platform, pid)
        resp = platform.api.post(f"/projects/{pid}/endpoints", json={"endpoint": {"branch_id": bid,
                                                                                  "type": "read_only"}})
        assert resp.status_code == 201, resp.text
        ro = resp.json()["endpoint"]["id"]
        replica = platform.dsn(created).replace(created["endpoints"][0]["id"], ro)
        assert scalar(replica, "SELECT pg_is_in_recovery()") is True
        suspend(platform, pid, ro)
        root = platform.plane.layout.replica_dir(pid, bid, ro)
        plant_link(uid, secret.path, root / "pgdata" / "standby.signal")
        plant_link(uid, secret.path, root / "log" / "postgres.log")
        assert scalar(replica, "SELECT pg_is_in_recovery()") is True
        assert secret.intact() and regular_of(root / "pgdata" / "standby.signal", uid)
        # The marker saying which epoch the copy is of: a link to root's file is not read as one.
        plant_link(uid, secret.path, root / "replica_of")
        suspend(platform, pid, ro)
        assert scalar(replica, "SELECT pg_is_in_recovery()") is True  # copied again, not confused
        assert secret.intact()
    finally:
        platform.delete_project(pid)


def test_branch_creation_copies_no_file_of_roots(platform: RunningPlatform, secret: Secret) -> None:
    """A child's history takes its parent's WAL from the archive or, where the archive lacks a
    segment, from the parent's pg_wal: the compute's uid empties the archive and puts links to a root
    file under those names in pg_wal. Root must not copy what they point to into the child's tree."""
    if platform.plane.backend.name != "copy":
        pytest.skip("only the copy backend builds a child's history from its parent's")
    created = platform.create_project(name="branch-links")
    pid, bid, ep = ids(created)
    try:
        uid = uid_of(platform, pid)
        with psycopg.connect(platform.dsn(created), autocommit=True) as conn:  # a few archived WAL segments
            conn.execute("CREATE TABLE pad AS SELECT g, repeat('x', 400) AS p FROM generate_series(1, 10000) g")
        suspend(platform, pid, ep)
        platform.call(asyncio.to_thread(retention.materialize_base, platform.plane, platform.plane.project(pid), bid))
        layout = platform.plane.layout
        epoch = json.loads((layout.branch_dir(pid, bid) / "history" / "manifest.json").read_text())["epochs"][-1]
        archived = sorted((layout.branch_dir(pid, bid) / "history" / epoch["id"] / "wal").iterdir())
        assert archived
        for segment in archived:
            as_uid(uid, "rm", str(segment))
            plant_link(uid, secret.path, layout.pgdata(pid, bid) / "pg_wal" / segment.name)
        child = branch(platform, pid, name="child")
        assert scalar(uri_of(child), "SELECT count(*) FROM pad") == 10000
        assert secret.intact()
        copies = [p for p in layout.branch_dir(pid, child["branch"]["id"]).rglob("*")
                  if p.is_file() and not p.is_symlink() and p.stat().st_size == len(secret.text)
                  and p.read_text(errors="replace") == secret.text]
        assert copies == []
    finally:
        platform.delete_project(pid)


def test_restore_to_a_point_writes_no_file_through_a_link(platform: RunningPlatform, secret: Secret) -> None:
    """Links in the history (a snapshot's files, the manifest's temp file) and in the branch dir."""
    created = platform.create_project(name="restore-links")
    pid, bid, ep = ids(created)
    try:
        uid = uid_of(platform, pid)
        uri = platform.dsn(created)
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (v int)")
            conn.execute("INSERT INTO t VALUES (1)")
            lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]  # type: ignore[index]
            conn.execute("INSERT INTO t VALUES (2)")
        suspend(platform, pid, ep)
        # The base snapshot is the template, copied into the history only when needed: now.
        platform.call(asyncio.to_thread(retention.materialize_base, platform.plane, platform.plane.project(pid), bid))
        hist = platform.plane.layout.branch_dir(pid, bid) / "history"
        snapshots = [d for d in hist.glob("*/snapshots/*") if d.is_dir()]
        assert snapshots
        for snap in snapshots:
            for name in ("recovery.signal", "postgresql.auto.conf", "pg_ident.conf"):
                plant_link(uid, secret.path, snap / name)
        plant_link(uid, secret.path, hist / "manifest.tmp")
        plant_link(uid, secret.path, hist / ".manifest.json.argon-0000")
        outside = sorted(os.listdir(secret.path.parent))
        plant_link(uid, secret.path.parent, platform.plane.layout.branch_dir(pid, bid) / "pgdata.restoring")
        resp = platform.api.post(f"/projects/{pid}/branches/{bid}/restore",
                                 json={"source_branch_id": bid, "source_lsn": lsn})
        assert resp.status_code == 200, resp.text
        assert scalar(uri, "SELECT string_agg(v::text, ',') FROM t") == "1"
        assert secret.intact() and sorted(os.listdir(secret.path.parent)) == outside
    finally:
        platform.delete_project(pid)


def test_a_forged_history_manifest_points_root_nowhere(platform: RunningPlatform) -> None:
    """An epoch named `../../../../<another project>` ended long ago: pruning would remove it."""
    victim, attacker = platform.create_project(name="victim"), platform.create_project(name="forger")
    pid, bid, _ = ids(attacker)
    try:
        uid = uid_of(platform, pid)
        path = platform.plane.layout.branch_dir(pid, bid) / "history" / "manifest.json"
        manifest = json.loads(path.read_text())
        forged = {**manifest["epochs"][0], "id": f"../../../../{victim['project']['id']}",
                  "started_at": "2000-01-01T00:00:00+00:00", "ended_at": "2000-01-02T00:00:00+00:00",
                  "end_lsn": "0/1", "snapshots": []}
        as_uid(uid, "tee", str(path), stdin=json.dumps({"version": 1, "epochs": [forged, *manifest["epochs"]]}))
        project = platform.plane.project(pid)
        with pytest.raises(ManifestError):
            platform.call(asyncio.to_thread(retention.prune, platform.plane, project, bid))
        assert scalar(platform.dsn(victim), "SELECT 1") == 1
        assert platform.plane.layout.pgdata(victim["project"]["id"], victim["branch"]["id"]).is_dir()
    finally:
        platform.delete_project(pid)
        platform.delete_project(victim["project"]["id"])


def test_reconcile_and_delete_never_follow_a_projects_links(platform: RunningPlatform, secret: Secret) -> None:
    """A project's `branches` made a link to another project's: the start-up clean-up would take that
    project's branches for this one's orphans; a branch deletion would follow it."""
    victim, attacker = platform.create_project(name="victim"), platform.create_project(name="linker")
    pid, _, _ = ids(attacker)
    layout = platform.plane.layout
    other = branch(platform, pid, name="doomed")
    platform.call(platform.plane.drain(), timeout=120)  # first starts and history bases: done before the moves
    try:
        uid = uid_of(platform, pid)
        branches = layout.project_dir(pid) / "branches"
        as_uid(uid, "mv", str(branches), str(branches.with_name("branches.real")))
        plant_link(uid, layout.project_dir(victim["project"]["id"]) / "branches", branches)
        # An outside directory named like the branch about to be deleted, behind a second link.
        decoy = platform.root / "outside" / "decoy"
        (decoy / other["branch"]["id"]).mkdir(parents=True)
        (decoy / other["branch"]["id"] / "keep").write_text("keep")
        snap = rc.look_on_disk(layout.projects_dir)
        plane = platform.plane
        plan = rc.decide(rc.Snapshot(
            endpoints={}, adoptable=frozenset(), unfinished_ops=(), project_ids=frozenset(p.id for p in plane.projects()),
            project_dirs=snap[0], branch_ids=frozenset(b.id for p in plane.projects() for b in plane.branches(p.id)),
            branch_dirs=frozenset(snap[1]), branch_entries=snap[2]))
        platform.call(rc.tidy_disk(platform.control, plan))
        assert scalar(platform.dsn(victim), "SELECT 1") == 1
        assert layout.pgdata(victim["project"]["id"], victim["branch"]["id"]).is_dir()
        os.unlink(branches)
        plant_link(uid, decoy, branches)
        resp = platform.api.delete(f"/projects/{pid}/branches/{other['branch']['id']}")
        assert resp.status_code == 200, resp.text
        assert (decoy / other["branch"]["id"] / "keep").read_text() == "keep"
        # Links inside the project's tree when the whole project goes.
        os.unlink(branches)
        as_uid(uid, "mv", str(branches.with_name("branches.real")), str(branches))
        plant_link(uid, secret.path.parent, branches / "to-outside")
        plant_link(uid, secret.path, layout.pgdata(pid, attacker["branch"]["id"]) / "to-secret")
    finally:
        platform.delete_project(pid)
        platform.delete_project(victim["project"]["id"])
    assert secret.intact() and not layout.project_dir(pid).exists()


def test_an_admin_connection_refuses_another_projects_compute(platform: RunningPlatform) -> None:
    """The socket in a compute's directory replaced by a link to another project's socket: root's
    peer-authenticated admin session would be that project's superuser."""
    victim, attacker = platform.create_project(name="victim"), platform.create_project(name="redirect")
    pid, _, ep = ids(attacker)
    try:
        uid = uid_of(platform, pid)
        assert scalar(platform.dsn(victim), "SELECT 1") == 1 and scalar(platform.dsn(attacker), "SELECT 1") == 1
        layout = platform.plane.layout
        plant_link(uid, layout.socket_path(victim["endpoints"][0]["id"]), layout.socket_path(ep))
        with pytest.raises(psycopg.OperationalError, match="not the compute's uid"):
            platform.call(connect_admin(layout.socket_dir(ep)))
    finally:
        platform.delete_project(pid)
        platform.delete_project(victim["project"]["id"])


def test_psql_obeys_a_dumps_meta_commands_only_as_the_projects_uid(platform: RunningPlatform) -> None:
    """A schema-only branch replays the parent's dump with psql, which runs `\\!` commands: a dump is
    the tenant's text. They must run as the project's uid, with nothing of root's environment."""
    created = platform.create_project(name="dump")
    pid, _, ep = ids(created)
    drop = Path(tempfile.mkdtemp(prefix="argon-drop-"))
    os.chmod(drop, 0o1777)
    try:
        uid = uid_of(platform, pid)
        assert scalar(platform.dsn(created), "SELECT 1") == 1
        hostile = f"\\! id -u > {drop}/uid\n\\! env > {drop}/env\nCOMMENT ON DATABASE neondb IS 'x';\n"
        plane = platform.plane
        install = plane.installs[plane.project(pid).pg_version]
        problems = platform.call(asyncio.to_thread(
            schema._restore, install, plane.layout.socket_dir(ep), {"neondb_owner"}, "", {"neondb": hostile},
            plane.layout.run_dir, OsUser(uid, uid)))
        assert problems == []
        assert (drop / "uid").read_text().strip() == str(uid)
        env = (drop / "env").read_text()
        assert "HOME=/nonexistent" in env and "/root" not in env
        assert scalar(platform.dsn(created), "SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                                              "WHERE datname = 'neondb'") == "x"  # the SQL itself ran
    finally:
        platform.delete_project(pid)
        subprocess.run(["rm", "-rf", str(drop)], check=False)


def test_the_log_api_reads_no_file_through_a_link(platform: RunningPlatform, secret: Secret) -> None:
    created = platform.create_project(name="log-link")
    pid, bid, ep = ids(created)
    try:
        uid = uid_of(platform, pid)
        assert scalar(platform.dsn(created), "SELECT 1") == 1
        plant_link(uid, secret.path, platform.plane.layout.compute_log(pid, bid))
        resp = platform.api.get(f"/projects/{pid}/endpoints/{ep}/logs")
        assert resp.status_code == 400 and secret.text.strip() not in resp.text
    finally:
        platform.delete_project(pid)


def test_templates_are_roots_and_uids_are_never_reused(platform: RunningPlatform) -> None:
    plane = platform.plane
    for template in plane.templates.values():
        for path in [template, *template.rglob("*")]:
            st = path.lstat()
            assert (st.st_uid, st.st_gid) == (0, 0), path
        assert stat.S_IMODE(template.stat().st_mode) == 0o700
    for spare in plane.layout.spares_dir.iterdir():
        assert spare.lstat().st_uid == 0
    created = platform.create_project(name="gone")
    pid = created["project"]["id"]
    uid = uid_of(platform, pid)
    for path in [plane.layout.project_dir(pid), *plane.layout.project_dir(pid).rglob("*")]:
        with contextlib.suppress(FileNotFoundError):  # the compute runs: its pgstat and WAL files come and go
            assert path.lstat().st_uid == uid, path
    # Code of the project that left its compute behind: deleting the project ends it.
    stray = subprocess.Popen(["sleep", "300"], user=uid, group=uid, extra_groups=[], start_new_session=True)
    platform.delete_project(pid)
    assert stray.wait(10) == -9
    again = platform.create_project(name="next")
    try:
        assert uid_of(platform, again["project"]["id"]) > uid
    finally:
        platform.delete_project(again["project"]["id"])


def test_config_check_refuses_a_uid_range_that_is_not_argons_alone(tmp_path: Path) -> None:
    env = {**os.environ, "ARGON_DATA_DIR": str(tmp_path / "data"), "ARGON_CONFIG_FILE": str(tmp_path / "none.toml"),
           "ARGON_COMPUTE_UID_BASE": "60000", "ARGON_COMPUTE_UID_COUNT": "10000"}
    out = subprocess.run([sys.executable, "-m", "argon", "config", "check"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "has uid 65534" in out.stderr and "ARGON_COMPUTE_UID_BASE=" in out.stderr
    assert "Traceback" not in out.stderr


from datetime import timedelta
from pathlib import Path

import pytest

from argon import model
from argon.metadata import schema
from argon.metadata.store import Store, newest_revision


def _store(tmp_path: Path) -> Store:
    store = Store.sqlite(tmp_path / "argon.db")
    store.migrate()
    return store


HEAD_REVISION = "0007"  # the newest migration


def test_migrations_are_idempotent_and_versioned(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.migrate()
    assert store.schema_revision() == HEAD_REVISION


def test_newest_revision_read_without_alembic_is_alembics_head() -> None:
    """`migrate` skips Alembic when the store is at `newest_revision()`: it must be Alembic's head."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    import argon.metadata.store as store_module

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store_module.__file__).parent / "migrations"))
    assert newest_revision() == ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION


def test_a_store_one_revision_behind_is_upgraded(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0006'")
    assert store.schema_revision() == "0006"
    store.migrate()
    assert store.schema_revision() == HEAD_REVISION


def test_round_trip_keeps_types(tmp_path: Path) -> None:
    store = _store(tmp_path)
    now = model.utcnow()
    ep = model.Endpoint(id="ep-a-b-c", project_id="p", branch_id="br-a-b-c", created_at=now, updated_at=now,
                        current_state=model.ComputeState.IDLE, suspended_at=now, pg_settings={"work_mem": "8MB"})
    store.put(ep)
    assert store.get_endpoint(ep.id) == ep
    p = model.Project(id="p", name="n", region_id="local", pg_version=15, created_at=now, updated_at=now,
                      default_endpoint_settings=model.EndpointSettings(0.5, 2, 60))
    store.put(p)
    assert store.get_project("p") == p


def test_transaction_is_atomic(tmp_path: Path) -> None:
    store = _store(tmp_path)
    now = model.utcnow()
    p = model.Project(id="p", name="n", region_id="local", pg_version=15, created_at=now, updated_at=now)
    try:
        with store.transaction():
            store.put(p)
            raise RuntimeError("crash mid-way")
    except RuntimeError:
        pass
    assert store.get_project("p") is None


def test_operations_page_newest_first(tmp_path: Path) -> None:
    store = _store(tmp_path)
    base = model.utcnow()
    for i in range(5):
        t = base + timedelta(seconds=i)
        store.put(model.Operation(id=f"op{i}", project_id="p", action=model.OperationAction.START_COMPUTE,
                                  status=model.OperationStatus.FINISHED, created_at=t, updated_at=t))
    first = store.list_operations("p", limit=2)
    assert [o.id for o in first] == ["op4", "op3"]
    second = store.list_operations("p", limit=2, before=(first[-1].created_at, first[-1].id))
    assert [o.id for o in second] == ["op2", "op1"]
    last = store.list_operations("p", limit=2, before=(base, "op0"))
    assert last == []


def test_api_keys_are_stored_hashed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.add_api_key("ci", "argon_secret_value")
    assert store.find_api_key("argon_secret_value") is not None
    assert store.find_api_key("other") is None
    raw = (tmp_path / "argon.db").read_bytes()
    assert b"argon_secret_value" not in raw


def test_compute_uids_are_never_given_twice(tmp_path: Path) -> None:
    """A deleted project's uid stays taken (ADR 0016); the range ends where it says."""
    store = _store(tmp_path)
    now = model.utcnow()
    first = store.allocate_uid(5000, 3, "p1", now)
    p1 = model.Project(id="p1", name="a", region_id="local", pg_version=15, created_at=now, updated_at=now,
                       os_uid=first)
    store.put(p1)
    second = store.allocate_uid(5000, 3, "p2", now)
    store.delete_project_rows("p1")
    store.release_uid(first, now)
    third = store.allocate_uid(5000, 3, "p3", now)
    assert (first, second, third) == (5000, 5001, 5002)
    assert store.allocate_uid(5000, 3, "p4", now) is None  # used up: never back to 5000
    assert store.allocate_uid(9000, 10, "p4", now) == 9000  # a range moved elsewhere starts at its base


def test_migration_0003_records_the_uids_projects_hold(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    store = Store.sqlite(tmp_path / "argon.db")
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(schema.__file__).parent / "migrations"))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    now = model.utcnow()
    store.put(model.Project(id="old", name="a", region_id="local", pg_version=15, created_at=now, updated_at=now,
                            os_uid=200007))
    store.migrate()
    assert store.allocate_uid(200000, 100, "new", now) == 200008  # above what an older Argon gave out


def test_migration_0004_adds_project_settings_and_key_scopes(tmp_path: Path) -> None:
    """A store an older Argon wrote (no `projects.settings`, no `api_keys.project_id`) gets both;
    its projects read back with the default settings."""
    import sqlite3

    store = Store.sqlite(tmp_path / "argon.db")
    store.migrate()
    now = model.utcnow()
    store.put(model.Project(id="old", name="a", region_id="local", pg_version=15, created_at=now, updated_at=now))
    store.close()
    db = sqlite3.connect(tmp_path / "argon.db")
    db.execute("ALTER TABLE projects DROP COLUMN settings")
    db.execute("ALTER TABLE api_keys DROP COLUMN project_id")
    db.execute("UPDATE alembic_version SET version_num = '0003'")
    db.commit()
    db.close()
    store = Store.sqlite(tmp_path / "argon.db")
    store.migrate()
    assert store.schema_revision() == HEAD_REVISION
    project = store.get_project("old")
    assert project is not None and project.settings == model.ProjectSettings()
    assert store.add_api_key("ci", "argon_k", project_id="old").project_id == "old"


def test_migration_0005_adds_snapshots_and_branch_restore_fields(tmp_path: Path) -> None:
    """A store an older Argon wrote (no `snapshots` table, no restore fields on branches) gets them;
    its branches read back without a restore, and snapshots can be stored."""
    import sqlite3

    store = Store.sqlite(tmp_path / "argon.db")
    store.migrate()
    now = model.utcnow()
    store.put(model.Project(id="p", name="a", region_id="local", pg_version=15, created_at=now, updated_at=now))
    store.put(model.Branch(id="b", project_id="p", name="main", created_at=now, updated_at=now))
    store.close()
    db = sqlite3.connect(tmp_path / "argon.db")
    db.execute("DROP TABLE snapshots")
    for column in ("restored_from", "restore_status", "restore_target"):
        db.execute(f"ALTER TABLE branches DROP COLUMN {column}")
    db.execute("UPDATE alembic_version SET version_num = '0004'")
    db.commit()
    db.close()
    store = Store.sqlite(tmp_path / "argon.db")
    store.migrate()
    assert store.schema_revision() == HEAD_REVISION
    branch = store.list_branches("p")[0]
    assert branch.restored_from is None and branch.restore_status is None
    snap = model.Snapshot(id="snap-1", project_id="p", name="s", created_at=now, updated_at=now, source_branch_id="b",
                          lsn="0/1000000", timestamp=now, expires_at=None)
    store.put(snap)
    assert store.list_snapshots("p") == [snap] and store.get_snapshot("snap-1") == snap
    store.delete_project_rows("p")
    assert store.list_all_snapshots() == []


def test_migration_0006_gives_every_endpoint_its_own_address(tmp_path: Path) -> None:
    """A store an older Argon wrote (no `address` on endpoints) gives each endpoint there one, oldest
    first, all different; the index keeps two endpoints from ever holding the same one."""
    import sqlite3

    import sqlalchemy

    store = Store.sqlite(tmp_path / "argon.db")
    store.migrate()
    now = model.utcnow()
    store.put(model.Project(id="p", name="a", region_id="local", pg_version=15, created_at=now, updated_at=now))
    for i, eid in enumerate(("ep-c", "ep-a", "ep-b")):
        at = now + timedelta(seconds=i)
        store.put(model.Endpoint(id=eid, project_id="p", branch_id="b", created_at=at, updated_at=at))
    store.close()
    db = sqlite3.connect(tmp_path / "argon.db")
    db.execute("DROP INDEX ix_endpoints_address")
    db.execute("ALTER TABLE endpoints DROP COLUMN address")
    db.execute("UPDATE alembic_version SET version_num = '0005'")
    db.commit()
    db.close()
    store = Store.sqlite(tmp_path / "argon.db")
    store.migrate()
    assert store.schema_revision() == HEAD_REVISION
    got = {e.id: e.address for e in store.list_endpoints("p")}
    assert got == {"ep-c": "127.1.0.1", "ep-a": "127.1.0.2", "ep-b": "127.1.0.3"}
    store.migrate()  # again: nothing changes
    assert {e.id: e.address for e in store.list_endpoints("p")} == got
    taken = store.get_endpoint("ep-a")
    assert taken is not None
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        store.put(model.Endpoint(id="ep-d", project_id="p", branch_id="b", created_at=now, updated_at=now,
                                 address=taken.address))

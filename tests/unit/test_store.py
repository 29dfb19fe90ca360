from datetime import timedelta
from pathlib import Path

from argon import model
from argon.metadata.store import Store


def _store(tmp_path: Path) -> Store:
    store = Store.sqlite(tmp_path / "argon.db")
    store.migrate()
    return store


def test_migrations_are_idempotent_and_versioned(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.migrate()
    assert store.schema_revision() == "0002"


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

"""`argon restore --at`: an RFC 3339 time or an LSN; anything else is a clear error."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from argon import model
from argon.control.restore import metadata_as_of, parse_at
from argon.errors import UserError
from argon.metadata.store import Store


def test_at_takes_a_time_or_an_lsn() -> None:
    assert parse_at("2026-11-24T13:00:00Z") == datetime(2026, 11, 24, 13, tzinfo=UTC)
    assert parse_at(" 0/16b3748 ") == "0/16B3748"
    assert parse_at(None) is None
    with pytest.raises(UserError, match="neither a time nor an LSN"):
        parse_at("yesterday")
    with pytest.raises(UserError, match="time zone"):
        parse_at("2026-11-24T13:00:00")


def test_metadata_as_of_takes_what_existed_at_the_target(tmp_path: Path) -> None:
    """The copy before the target lacks what was created just before it (the copy after has it) and
    can hold what was created just after it; what was deleted after the target stays."""
    at = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC)
    before, after = at - timedelta(seconds=1), at + timedelta(seconds=1)

    def project(store: Store, pid: str, when: datetime) -> None:
        store.put(model.Project(id=pid, name=pid, region_id="local", pg_version=15, created_at=when, updated_at=when))
        store.put(model.Branch(id=f"br-{pid}", project_id=pid, name="main", created_at=when, updated_at=when))
        store.put(model.Role(branch_id=f"br-{pid}", name="owner", created_at=when, updated_at=when, verifier="v"))
        store.put(model.Database(id=1 if pid == "old" else 7, branch_id=f"br-{pid}", name="neondb",
                                 owner_name="owner", created_at=when, updated_at=when))

    early, late = Store.sqlite(tmp_path / "early.db"), Store.sqlite(tmp_path / "late.db")
    for store in (early, late):
        store.migrate()
        project(store, "old", before - timedelta(hours=1))
    project(early, "deleted-after", before)  # in the earlier copy only: deleted after the target
    project(early, "too-new", after)  # the earlier copy was taken a moment after its name
    project(late, "too-new", after)
    project(late, "just-before", at - timedelta(milliseconds=5))  # only the later copy has it
    late.put(model.Branch(id="br-dev", project_id="old", name="dev", created_at=before, updated_at=before))
    late.put(model.Branch(id="br-later", project_id="old", name="later", created_at=after, updated_at=after))
    late.add_api_key("made-before", "secret-key")
    early.close()
    late.close()

    metadata_as_of(tmp_path / "early.db", tmp_path / "late.db", at)

    result = Store.sqlite(tmp_path / "early.db")
    try:
        assert sorted(p.id for p in result.list_projects()) == ["deleted-after", "just-before", "old"]
        assert sorted(b.name for b in result.list_branches("old")) == ["dev", "main"]
        assert [r.verifier for r in result.list_roles("br-just-before")] == ["v"]
        assert [d.name for d in result.list_databases("br-just-before")] == ["neondb"]
        assert [d.name for d in result.list_databases("br-old")] == ["neondb"]  # not twice
        assert [k.name for k in result.list_api_keys()] == []  # made after the target (now)
    finally:
        result.close()

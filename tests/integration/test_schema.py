"""Schemas: schema-only branches (the parent's roles and DDL, no rows), the schema endpoint at head
and at a point in time, and `argon branches schema-diff`."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.fixtures.platform import RunningPlatform
from tests.integration.test_branches import branch, scalar, uri_of
from tests.integration.test_cli import argon

pytestmark = pytest.mark.pg

HOSTILE = 'we"ird; DROP TABLE x;--'


def _make_schema(uri: str) -> str:
    with psycopg.connect(uri, autocommit=True) as conn:
        before = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
        conn.execute("CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL)")
        conn.execute("CREATE INDEX items_name ON items (name)")
        conn.execute("CREATE VIEW item_names AS SELECT name FROM items")
        conn.execute("CREATE FUNCTION double(i int) RETURNS int LANGUAGE sql AS 'SELECT i * 2'")
        conn.execute(f'CREATE TABLE "{HOSTILE.replace(chr(34), chr(34) * 2)}" (v int)')
        conn.execute("INSERT INTO items (name) SELECT 'n' || g FROM generate_series(1, 500) g")
    return str(before)


@pytest.mark.parametrize("version", [15, 18])
def test_schema_only_branch(platform: RunningPlatform, version: int) -> None:
    if version not in platform.plane.installs:
        pytest.skip(f"PostgreSQL {version} is not installed here")
    created = platform.create_project(name=f"schema-{version}", pg_version=version)
    pid = created["project"]["id"]
    try:
        uri = platform.dsn(created)
        _make_schema(uri)
        made = platform.api.post(f"/projects/{pid}/branches/{created['branch']['id']}/roles",
                                 json={"role": {"name": "reader"}})
        assert made.status_code == 201, made.text
        reader_password = made.json()["role"]["password"]
        child = branch(platform, pid, name="schema", init_source="schema-only")
        assert child["branch"]["init_source"] == "schema-only"
        child_uri = uri_of(child)  # the parent's role and password
        assert scalar(child_uri, "SELECT count(*) FROM items") == 0
        assert scalar(child_uri, "SELECT double(21)") == 21 * 2
        assert scalar(child_uri, "SELECT count(*) FROM item_names") == 0
        assert scalar(child_uri, f"SELECT count(*) FROM \"{HOSTILE.replace(chr(34), chr(34) * 2)}\"") == 0
        assert scalar(child_uri, "SELECT indexname FROM pg_indexes WHERE indexname = 'items_name'") == "items_name"
        assert scalar(child_uri, "SELECT nextval('items_id_seq')") == 1  # sequences start over: no data
        with psycopg.connect(child_uri, autocommit=True) as conn:  # it is a normal, writable branch
            conn.execute("INSERT INTO items (name) VALUES ('new')")
        assert scalar(uri, "SELECT count(*) FROM items") == 500  # the parent is untouched
        params = platform.params(child) | {"user": "reader", "password": reader_password}
        with psycopg.connect(**params) as conn:  # another role of the parent, same password
            assert conn.execute("SELECT current_user").fetchone() == ("reader",)
        resp = platform.api.post(f"/projects/{pid}/branches",
                                 json={"branch": {"init_source": "schema-only", "parent_lsn": "0/1"}})
        assert resp.status_code == 400
    finally:
        platform.delete_project(pid)


def test_schema_endpoint_and_schema_diff(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, bid = project["project"]["id"], project["branch"]["id"]
    before = _make_schema(platform.dsn(project))
    sql = platform.api.get(f"/projects/{pid}/branches/{bid}/schema", params={"db_name": "neondb"}).json()["sql"]
    assert "CREATE TABLE public.items" in sql and "CREATE VIEW public.item_names" in sql
    assert "\\restrict" not in sql and "Dumped by" not in sql
    past = platform.api.get(f"/projects/{pid}/branches/{bid}/schema", params={"db_name": "neondb", "lsn": before})
    assert past.status_code == 200, past.text
    assert "items" not in past.json()["sql"]  # before the tables existed
    assert platform.api.get(f"/projects/{pid}/branches/{bid}/schema", params={"db_name": "nope"}).status_code == 404
    assert platform.api.get(f"/projects/{pid}/branches/{bid}/schema").status_code == 400

    child = branch(platform, pid, name="feature")
    with psycopg.connect(uri_of(child), autocommit=True) as conn:
        conn.execute("ALTER TABLE items ADD COLUMN extra integer")
    out = argon(platform, "branches", "schema-diff", "feature", "--project-id", pid).stdout
    assert "+    extra integer" in out and "--- main/neondb" in out and "+++ feature/neondb" in out
    same = argon(platform, "branches", "schema-diff", "main", "feature", "--project-id", pid).stdout
    assert "-    extra integer" in same
    since = argon(platform, "branches", "schema-diff", "main", f"^self@{before}", "--project-id", pid).stdout
    assert "+CREATE TABLE public.items" in since
    none = argon(platform, "branches", "schema-diff", "main", "main", "--project-id", pid).stdout
    assert "No differences" in none

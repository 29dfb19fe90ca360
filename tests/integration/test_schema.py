"""Schemas: schema-only branches (the parent's roles and DDL, no rows), the schema endpoint at head
and at a point in time, and `argon branches schema-diff` (neonctl's argument order and direction)."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from tests.fixtures.platform import RunningPlatform
from tests.integration.test_branches import branch, scalar, uri_of
from tests.integration.test_cli import argon

pytestmark = pytest.mark.pg

HOSTILE = 'we"ird; DROP TABLE x;--'
# A database name that libpq would read as connection parameters if it were ever passed unquoted.
HOSTILE_DB = "host=/tmp dbname=postgres 'x\\\"=y"
# A role name holding the platform role's name: dumps of it must not be mistaken for the platform role.
HOSTILE_ROLE = 'o"wner cloud_admin'


def q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _make_schema(uri: str) -> str:
    with psycopg.connect(uri, autocommit=True) as conn:
        before = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
        conn.execute("CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL)")
        conn.execute("CREATE INDEX items_name ON items (name)")
        conn.execute("CREATE VIEW item_names AS SELECT name FROM items")
        conn.execute("CREATE FUNCTION double(i int) RETURNS int LANGUAGE sql AS 'SELECT i * 2'")
        conn.execute(f"CREATE TABLE {q(HOSTILE)} (v int)")
        conn.execute("COMMENT ON TABLE items IS 'the things we sell'")
        conn.execute("INSERT INTO items (name) SELECT 'n' || g FROM generate_series(1, 500) g")
    return str(before)


def _add_hostile_database(platform: RunningPlatform, created: dict[str, Any]) -> str:
    """A role and a database with hostile names, holding a table; returns the role's password."""
    pid, bid = created["project"]["id"], created["branch"]["id"]
    made = platform.api.post(f"/projects/{pid}/branches/{bid}/roles", json={"role": {"name": HOSTILE_ROLE}})
    assert made.status_code == 201, made.text
    password = str(made.json()["role"]["password"])
    made = platform.api.post(f"/projects/{pid}/branches/{bid}/databases",
                             json={"database": {"name": HOSTILE_DB, "owner_name": HOSTILE_ROLE}})
    assert made.status_code == 201, made.text
    params = platform.params(created) | {"user": HOSTILE_ROLE, "password": password, "dbname": HOSTILE_DB}
    with psycopg.connect(**params, autocommit=True) as conn:
        conn.execute("CREATE TABLE odd_place (v int)")
        conn.execute("INSERT INTO odd_place VALUES (1)")
    return password


@pytest.mark.parametrize("version", [15, 18])
def test_schema_only_branch(platform: RunningPlatform, version: int) -> None:
    if version not in platform.plane.installs:
        pytest.skip(f"PostgreSQL {version} is not installed here")
    created = platform.create_project(name=f"schema-{version}", pg_version=version,
                                      branch={"database_name": "appdb", "role_name": "app"})
    pid = created["project"]["id"]
    try:
        uri = platform.dsn(created)
        _make_schema(uri)
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION hstore")
            conn.execute("CREATE TABLE tagged (id int, tags hstore)")
            conn.execute("ALTER DATABASE appdb SET work_mem = '7MB'")
            if version >= 16:  # the owner made this role, so it administers it (GRANT ... GRANTED BY cloud_admin)
                conn.execute("CREATE ROLE app_sql LOGIN PASSWORD 'sql-made-Pw1'")
        made = platform.api.post(f"/projects/{pid}/branches/{created['branch']['id']}/roles",
                                 json={"role": {"name": "reader"}})
        assert made.status_code == 201, made.text
        reader_password = made.json()["role"]["password"]
        hostile_password = _add_hostile_database(platform, created)
        ep = created["endpoints"][0]["id"]
        assert platform.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200  # woken to be read

        child = branch(platform, pid, name="schema", init_source="schema-only")
        assert child["branch"]["init_source"] == "schema-only"
        child_uri = uri_of(child)  # the parent's role and password
        assert scalar(child_uri, "SELECT current_user") == "app"
        assert scalar(child_uri, "SELECT count(*) FROM items") == 0
        assert scalar(child_uri, "SELECT double(21)") == 21 * 2
        assert scalar(child_uri, "SELECT count(*) FROM item_names") == 0
        assert scalar(child_uri, f"SELECT count(*) FROM {q(HOSTILE)}") == 0
        assert scalar(child_uri, "SELECT indexname FROM pg_indexes WHERE indexname = 'items_name'") == "items_name"
        assert scalar(child_uri, "SELECT nextval('items_id_seq')") == 1  # sequences start over: no data
        assert scalar(child_uri, "SELECT obj_description('items'::regclass)") == "the things we sell"
        assert scalar(child_uri, "SELECT ('a=>1'::hstore) -> 'a'") == "1"
        assert scalar(child_uri, "SHOW work_mem") == "7MB"  # ALTER DATABASE ... SET comes along
        for catalog in ("SELECT array_agg(datname ORDER BY datname) FROM pg_database",
                        "SELECT array_agg(rolname ORDER BY rolname) FROM pg_roles"):
            assert scalar(child_uri, catalog) == scalar(uri, catalog)  # no more, no less (the template has neondb)
        if version >= 16:
            assert scalar(child_uri, "SELECT pg_has_role('app', 'app_sql', 'USAGE WITH ADMIN OPTION')") is True
            sql_made = platform.params(child) | {"user": "app_sql", "password": "sql-made-Pw1"}
            with psycopg.connect(**sql_made) as conn:
                assert conn.execute("SELECT current_user").fetchone() == ("app_sql",)
        with psycopg.connect(child_uri, autocommit=True) as conn:  # it is a normal, writable branch
            conn.execute("INSERT INTO items (name) VALUES ('new')")
        assert scalar(uri, "SELECT count(*) FROM items") == 500  # the parent is untouched
        params = platform.params(child) | {"user": "reader", "password": reader_password}
        with psycopg.connect(**params) as conn:  # another role of the parent, same password
            assert conn.execute("SELECT current_user").fetchone() == ("reader",)
        odd = platform.params(child) | {"user": HOSTILE_ROLE, "password": hostile_password, "dbname": HOSTILE_DB}
        with psycopg.connect(**odd) as conn:
            assert conn.execute("SELECT count(*) FROM odd_place").fetchone() == (0,)
            assert conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
                                ).fetchone() == (HOSTILE_ROLE,)
        resp = platform.api.post(f"/projects/{pid}/branches",
                                 json={"branch": {"init_source": "schema-only", "parent_lsn": "0/1"}})
        assert resp.status_code == 400
    finally:
        platform.delete_project(pid)


@pytest.mark.parametrize("version", [15, 18])
def test_branch_without_compute(platform: RunningPlatform, version: int) -> None:
    """A branch with no compute still has a schema, and can be the parent of a schema-only branch."""
    if version not in platform.plane.installs:
        pytest.skip(f"PostgreSQL {version} is not installed here")
    project = platform.create_project(name=f"bare-{version}", pg_version=version)
    try:
        _from_bare_branch(platform, project)
    finally:
        platform.delete_project(project["project"]["id"])


def _from_bare_branch(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid = project["project"]["id"]
    _make_schema(platform.dsn(project))
    _add_hostile_database(platform, project)
    bare = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "bare"}})
    assert bare.status_code == 201 and bare.json()["endpoints"] == [], bare.text
    bare_id = bare.json()["branch"]["id"]
    resp = platform.api.get(f"/projects/{pid}/branches/{bare_id}/schema", params={"db_name": "neondb"})
    assert resp.status_code == 200, resp.text
    sql = resp.json()["sql"]
    assert "CREATE TABLE public.items" in sql and "COMMENT ON TABLE public.items IS 'the things we sell'" in sql
    odd = platform.api.get(f"/projects/{pid}/branches/{bare_id}/schema", params={"db_name": HOSTILE_DB})
    assert odd.status_code == 200 and "CREATE TABLE public.odd_place" in odd.json()["sql"], odd.text
    assert "items" not in odd.json()["sql"]
    child = branch(platform, pid, name="from-bare", parent_id=bare_id, init_source="schema-only")
    owner = {k: v for k, v in platform.params(project).items() if k in ("user", "password", "dbname")}
    with psycopg.connect(**platform.params(child) | owner) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
    assert not any(p.name.startswith("tmp-") for p in
                   platform.plane.layout.branch_dir(pid, bare_id).iterdir())  # the throw-away copy is gone


def test_schema_endpoint_and_schema_diff(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid, bid = project["project"]["id"], project["branch"]["id"]
    before = _make_schema(platform.dsn(project))
    made = platform.api.post(f"/projects/{pid}/branches/{bid}/databases",
                             json={"database": {"name": "other", "owner_name": "neondb_owner"}})
    assert made.status_code == 201, made.text
    sql = platform.api.get(f"/projects/{pid}/branches/{bid}/schema", params={"db_name": "neondb"}).json()["sql"]
    assert "CREATE TABLE public.items" in sql and "CREATE VIEW public.item_names" in sql
    assert "ALTER TABLE public.items OWNER TO neondb_owner;" in sql  # owners kept, like Neon's
    assert "\\restrict" not in sql and "Dumped by" not in sql
    past = platform.api.get(f"/projects/{pid}/branches/{bid}/schema", params={"db_name": "neondb", "lsn": before})
    assert past.status_code == 200, past.text
    assert "items" not in past.json()["sql"]  # before the tables existed
    missing = platform.api.get(f"/projects/{pid}/branches/{bid}/schema", params={"db_name": "nope"})
    assert missing.status_code == 404 and "nope" in missing.json()["message"]
    assert platform.api.get(f"/projects/{pid}/branches/{bid}/schema").status_code == 400
    both = {"db_name": "neondb", "lsn": before, "timestamp": "2026-01-01T00:00:00Z"}
    assert platform.api.get(f"/projects/{pid}/branches/{bid}/schema", params=both).status_code == 400

    child = branch(platform, pid, name="feature")
    with psycopg.connect(uri_of(child), autocommit=True) as conn:
        conn.execute("ALTER TABLE items ADD COLUMN extra integer")
        conn.execute("COMMENT ON COLUMN items.name IS 'what it is called'")

    def diff(*args: str, check: bool = True) -> Any:
        return argon(platform, "branches", "schema-diff", *args, "--project-id", pid, check=check)

    one = diff("feature").stdout  # one argument: the compare source; the base is the default branch
    assert "--- Database: neondb\t(Branch: main)" in one and "+++ Database: neondb\t(Branch: feature)" in one
    assert "+    extra integer" in one and "+COMMENT ON COLUMN public.items.name IS 'what it is called';" in one
    assert "--- Database: other\t(Branch: main)" in one  # every database of the base branch
    assert "+    extra integer" in diff("main", "feature").stdout
    assert "+    extra integer" in diff("feature", "^parent").stdout  # the parent is the old side
    assert "-    extra integer" in diff("feature", "main", "--database", "neondb").stdout
    since = diff("main", f"^self@{before}", "--db", "neondb").stdout  # main now (old) against main then (new)
    assert f"+++ Database: neondb\t(Branch: main at {before})" in since and "-CREATE TABLE public.items" in since
    same = diff("main", "main", "--database", "neondb")
    assert "@@" not in same.stdout and "No differences in neondb" in same.stderr
    nothing = diff(check=False)  # the default branch has no parent
    assert nothing.returncode != 0 and "no parent" in nothing.stderr
    unknown = diff("feature", "--database", "nope", check=False)
    assert unknown.returncode != 0 and "does not exist in base branch" in unknown.stderr

    made = argon(platform, "--output", "json", "branches", "create", "--name", "empty", "--schema-only",
                 "--parent", "feature", "--project-id", pid).stdout
    empty = json.loads(made)
    assert empty["branch"]["init_source"] == "schema-only"
    with psycopg.connect(**platform.params(empty) | {"dbname": "neondb"}) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
    assert "No differences in neondb" in diff("feature", "empty", "--db", "neondb").stderr

"""Roles and databases through the API are real in Postgres, and passwords change at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.fixtures.platform import RunningPlatform

pytestmark = pytest.mark.pg


def _base(project: dict[str, Any]) -> str:
    return f"/projects/{project['project']['id']}/branches/{project['branch']['id']}"


def _connect(platform: RunningPlatform, project: dict[str, Any], **override: str) -> psycopg.Connection[Any]:
    return psycopg.connect(**{**platform.params(project), **override}, connect_timeout=15)


def test_role_and_database_lifecycle(platform: RunningPlatform, project: dict[str, Any]) -> None:
    api, base = platform.api, _base(project)
    resp = api.post(f"{base}/roles", json={"role": {"name": "app"}})
    assert resp.status_code == 201, resp.text
    app_pw = resp.json()["role"]["password"]
    assert resp.json()["operations"][0]["action"] == "apply_config"
    assert api.post(f"{base}/roles", json={"role": {"name": "app"}}).status_code == 409
    resp = api.post(f"{base}/databases", json={"database": {"name": "appdb", "owner_name": "app"}})
    assert resp.status_code == 201, resp.text
    with _connect(platform, project, user="app", password=app_pw, dbname="appdb") as conn:
        row = conn.execute("select current_user, current_database(), rolcreatedb, rolsuper from pg_roles "
                           "where rolname = current_user").fetchone()
        assert row == ("app", "appdb", True, False)
        conn.execute("create table owned_by_app (x int)")
    names = {r["name"] for r in api.get(f"{base}/roles").json()["roles"]}
    assert names == {"neondb_owner", "app"}
    resp = api.patch(f"{base}/databases/appdb", json={"database": {"name": "renamed"}})
    assert resp.status_code == 200 and resp.json()["database"]["name"] == "renamed"
    assert api.delete(f"{base}/roles/app").status_code == 409  # owns a database
    assert api.delete(f"{base}/databases/renamed").status_code == 200
    assert api.delete(f"{base}/roles/app").status_code == 200
    with _connect(platform, project) as conn:
        assert conn.execute("select count(*) from pg_roles where rolname = 'app'").fetchone() == (0,)
        assert conn.execute("select count(*) from pg_database where datname = 'renamed'").fetchone() == (0,)


def test_reset_password_takes_effect_at_once(platform: RunningPlatform, project: dict[str, Any]) -> None:
    api, base = platform.api, _base(project)
    old = project["roles"][0]["password"]
    with _connect(platform, project) as conn:
        conn.execute("select 1")
    resp = api.post(f"{base}/roles/neondb_owner/reset_password")
    assert resp.status_code == 200, resp.text
    new = resp.json()["role"]["password"]
    assert new != old
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _connect(platform, project, password=old)
    with _connect(platform, project, password=new) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert api.get(f"{base}/roles/neondb_owner/reveal_password").json()["password"] == new


def test_changes_while_suspended_are_true_when_answered(platform: RunningPlatform, project: dict[str, Any]) -> None:
    api, base = platform.api, _base(project)
    pid, eid = project["project"]["id"], project["endpoints"][0]["id"]
    api.post(f"/projects/{pid}/endpoints/{eid}/suspend")
    resp = api.post(f"{base}/roles", json={"role": {"name": "late"}})
    assert resp.status_code == 201
    with _connect(platform, project, user="late", password=resp.json()["role"]["password"], dbname="neondb") as c:
        assert c.execute("select current_user").fetchone() == ("late",)


def test_hostile_names_stay_names(platform: RunningPlatform, project: dict[str, Any]) -> None:
    api, base = platform.api, _base(project)
    evil = 'x"; DROP DATABASE neondb; --'
    resp = api.post(f"{base}/roles", json={"role": {"name": evil}})
    assert resp.status_code == 201, resp.text
    resp = api.post(f"{base}/databases", json={"database": {"name": evil, "owner_name": evil}})
    assert resp.status_code == 201, resp.text
    with _connect(platform, project) as conn:
        assert conn.execute("select count(*) from pg_database where datname in ('neondb', %s)", (evil,)).fetchone() == (2,)
    for bad in ({"name": ""}, {"name": "pg_monitor"}, {"name": "cloud_admin"}, {"name": "x" * 64}, {}):
        assert api.post(f"{base}/roles", json={"role": bad}).status_code == 400, bad
    assert api.post(f"{base}/databases", json={"database": {"name": "d", "owner_name": "ghost"}}).status_code == 404


def test_sql_made_roles_and_databases_show_up(platform: RunningPlatform, project: dict[str, Any]) -> None:
    """The compute is a source of truth too: what SQL creates, changes or drops reaches the API."""
    base = _base(project)
    with _connect(platform, project, autocommit="1") as conn:  # type: ignore[arg-type]
        conn.execute("CREATE ROLE sqlrole LOGIN PASSWORD 'sql-pass-1'")
        conn.execute("CREATE DATABASE sqldb")
    roles = {r["name"] for r in platform.api.get(f"{base}/roles").json()["roles"]}
    assert roles == {"neondb_owner", "sqlrole"}  # never cloud_admin or pg_* roles
    dbs = {d["name"]: d["owner_name"] for d in platform.api.get(f"{base}/databases").json()["databases"]}
    assert dbs == {"neondb": "neondb_owner", "sqldb": "neondb_owner"}
    # A password set through SQL works through the proxy at once; its plaintext is unknown: 412.
    with _connect(platform, project, user="sqlrole", password="sql-pass-1") as conn:
        assert conn.execute("select current_user").fetchone() == ("sqlrole",)
    with _connect(platform, project, autocommit="1") as conn:  # type: ignore[arg-type]
        conn.execute("ALTER ROLE sqlrole PASSWORD 'sql-pass-2'")
    with _connect(platform, project, user="sqlrole", password="sql-pass-2") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _connect(platform, project, user="sqlrole", password="sql-pass-1")
    assert platform.api.get(f"{base}/roles/sqlrole/reveal_password").status_code == 412
    with _connect(platform, project, autocommit="1") as conn:  # type: ignore[arg-type]
        conn.execute("DROP DATABASE sqldb")
        conn.execute("DROP ROLE sqlrole")
    assert {r["name"] for r in platform.api.get(f"{base}/roles").json()["roles"]} == {"neondb_owner"}
    assert {d["name"] for d in platform.api.get(f"{base}/databases").json()["databases"]} == {"neondb"}
    ops = platform.api.get(f"/projects/{project['project']['id']}/operations").json()["operations"]
    assert any(o["action"] == "sync_dbs_and_roles_from_compute" for o in ops)


def test_sql_made_database_is_kept_when_the_endpoint_is_deleted(platform: RunningPlatform,
                                                                 project: dict[str, Any]) -> None:
    """Deleting the endpoint holds the project lock through the compute's stop: that stop still takes
    in what SQL made (the branch keeps its data, so its metadata must say so). Nothing reads the
    databases through the API before the delete (a read from a running compute syncs by itself)."""
    pid, eid = project["project"]["id"], project["endpoints"][0]["id"]
    with _connect(platform, project, autocommit="1") as conn:  # type: ignore[arg-type]
        conn.execute("CREATE DATABASE made_by_sql")
        conn.execute("CREATE ROLE role_by_sql")
    assert platform.api.delete(f"/projects/{pid}/endpoints/{eid}").status_code == 200
    base = _base(project)
    assert {d["name"] for d in platform.api.get(f"{base}/databases").json()["databases"]} == {"neondb", "made_by_sql"}
    assert {r["name"] for r in platform.api.get(f"{base}/roles").json()["roles"]} == {"neondb_owner", "role_by_sql"}


def test_sql_password_change_and_drop_count_at_once_on_the_pooled_host(platform: RunningPlatform,
                                                                       project: dict[str, Any]) -> None:
    """The `-pooler` host checks every login against the verifier read after it arrived (logins that
    arrive together share a lookup, never an older one): a password changed or a role dropped
    through SQL counts for the very next login, and the failure reads as Postgres' own."""
    pooled = {"options": f"endpoint={project['endpoints'][0]['id']}-pooler"}
    with _connect(platform, project, autocommit="1") as conn:  # type: ignore[arg-type]
        conn.execute("CREATE ROLE poolrole LOGIN PASSWORD 'pool-pass-1'")
    with _connect(platform, project, user="poolrole", password="pool-pass-1", **pooled) as conn:
        assert conn.execute("select current_user").fetchone() == ("poolrole",)
    with _connect(platform, project, autocommit="1") as conn:  # type: ignore[arg-type]
        conn.execute("ALTER ROLE poolrole PASSWORD 'pool-pass-2'")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed for user 'poolrole'"):
        _connect(platform, project, user="poolrole", password="pool-pass-1", **pooled)
    with _connect(platform, project, user="poolrole", password="pool-pass-2", **pooled) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with _connect(platform, project, autocommit="1") as conn:  # type: ignore[arg-type]
        conn.execute("DROP ROLE poolrole")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed for user 'poolrole'"):
        _connect(platform, project, user="poolrole", password="pool-pass-2", **pooled)


def test_logins_together_share_one_verifier_lookup_not_yet_sent(platform: RunningPlatform,
                                                                 project: dict[str, Any]) -> None:
    """Verifier lookups of logins that arrive together: those that come while one waits for its turn
    on the compute's admin session share it (one statement for all); one that comes after it was
    sent makes its own (what it gets was read after it arrived)."""
    eid = project["endpoints"][0]["id"]
    user = platform.params(project)["user"]
    with _connect(platform, project) as conn:  # the compute runs settled: lookups are live
        expected = conn.execute("select rolpassword from pg_authid where rolname = current_user").fetchone()[0]
    service = platform.platform.proxy.ctx.control
    session = platform.plane.computes.admin(eid)
    assert session is not None
    real = session.fetchone

    async def scenario() -> tuple[list[str], list[str], list[str], list[str]]:
        turn = asyncio.Event()  # the first lookup's turn on the session comes when this is set
        answer = asyncio.Event()  # a sent lookup's answer is held until this is set
        sent = asyncio.Event()
        statements: list[str] = []

        async def fetchone(query: str, params: Any = None, *, timeout: float,
                           sending: Callable[[], None] | None = None) -> Any:
            statements.append(query)
            if len(statements) == 1:
                await turn.wait()  # waiting for its turn: not sent yet

            def on_send() -> None:
                if sending is not None:
                    sending()
                sent.set()

            row = await real(query, params, timeout=timeout, sending=on_send)
            if len(statements) == 2:
                await answer.wait()
            return row

        session.fetchone = fetchone
        try:
            together = [asyncio.ensure_future(service.get_role_secret(eid, user)) for _ in range(10)]
            await asyncio.sleep(0.05)
            turn.set()
            shared = list(await asyncio.gather(*together))
            shared_statements = list(statements)
            sent.clear()
            first = asyncio.ensure_future(service.get_role_secret(eid, user))
            await asyncio.wait_for(sent.wait(), 10)
            after = asyncio.ensure_future(service.get_role_secret(eid, user))  # arrives after `first` was sent
            await asyncio.sleep(0.05)
            answer.set()
            return shared, shared_statements, list(await asyncio.gather(first, after)), statements
        finally:
            del session.fetchone

    shared, shared_statements, later, statements = platform.call(scenario())
    assert shared == [expected] * 10 and len(shared_statements) == 1
    assert later == [expected] * 2 and len(statements) == 3

"""`sql_scan.changes_session`: which statements make the pooler reset a server connection."""

from __future__ import annotations

from typing import Any

import pytest

from argon.wire import sql_scan

try:
    from argon.proxy import _pooler
except ImportError:  # built without a C compiler
    _pooler = None

IMPLEMENTATIONS = [pytest.param(sql_scan.changes_session, id="python")]
if _pooler is not None:
    IMPLEMENTATIONS.append(pytest.param(_pooler.changes_session, id="c"))


@pytest.fixture(params=IMPLEMENTATIONS)
def changes_session(request: pytest.FixtureRequest) -> object:
    """The Python lexer and its C port (the C pooler's) must agree on every case."""
    return request.param

STATEFUL = [
    "SET search_path = foo",
    "set statement_timeout to 5000",
    "SET SESSION search_path TO a",
    "SET ROLE other",
    "SET SESSION AUTHORIZATION other",
    "select 1; SET work_mem = '64MB'",
    "LISTEN chan",
    "PREPARE q AS SELECT 1",
    "DEALLOCATE q",
    "DEALLOCATE PREPARE q",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "CREATE TEMP TABLE t (a int)",
    "create temporary table t as select 1",
    "CREATE GLOBAL TEMPORARY TABLE t (a int)",
    "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
    "SELECT 1 INTO TEMP t",
    "LOAD 'auto_explain'",
    "SELECT pg_advisory_lock(1)",
    "select pg_try_advisory_lock_shared(1, 2)",
    "SELECT set_config('search_path', 'x', false)",
    "SELECT set_config($1, $2, false)",
    "SELECT pg_catalog.set_config('work_mem', '1MB', false)",
    "(SET search_path = a)",
    "/* comment */ SET search_path = a",
    "-- line\nSET search_path = a",
    "SET LOCAL a = 'unterminated",
    "SELECT 1; SET LOCAL a = $$ unterminated",
    "SET LOCAL a = 1 /* unterminated",
]

STATELESS = [
    "SELECT 1",
    "UPDATE t SET a = 1",
    "INSERT INTO t VALUES (1) ON CONFLICT (a) DO UPDATE SET a = 2",
    "SET LOCAL search_path = a",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET CONSTRAINTS ALL DEFERRED",
    "SET TimeZone = 'UTC'",
    "SET TIME ZONE 'UTC'",
    "set application_name = 'x'",
    "SET client_encoding TO 'UTF8'",
    "SET datestyle = ISO",
    "SELECT set_config('TimeZone', $1, false)",
    "SELECT set_config('application_name', 'x', false)",
    "RESET ALL",
    "DISCARD ALL",
    "UNLISTEN *",
    "DEALLOCATE ALL",
    "DEALLOCATE PREPARE ALL",
    "DECLARE c CURSOR FOR SELECT 1",
    "CREATE TEMP TABLE t (a int) ON COMMIT DROP",
    "CREATE TABLE t (temp int)",
    "SELECT 'SET search_path = x; LISTEN y'",
    "SELECT E'it\\'s; LISTEN y'",
    "SELECT $body$ LISTEN y; SET a = b $body$",
    "SELECT \"pg_advisory_lock\" FROM t",
    "SELECT pg_advisory_xact_lock(1)",
    "SELECT $1::int, $2",
    "COMMENT ON TABLE t IS 'SET x = y'",
    "BEGIN; SELECT 1; COMMIT",
    "",
    "   ;;  ",
]


@pytest.mark.parametrize("sql", STATEFUL)
def test_statements_that_leave_session_state(sql: str, changes_session: Any) -> None:
    assert changes_session(sql.encode())


@pytest.mark.parametrize("sql", STATELESS)
def test_statements_that_do_not(sql: str, changes_session: Any) -> None:
    assert not changes_session(sql.encode())


def test_a_very_long_statement_is_judged_stateful_past_the_token_limit(changes_session: Any) -> None:
    sql = "SELECT " + ", ".join(["1"] * 5000) + "; SET LOCAL a = b"
    assert changes_session(sql.encode())
    assert not changes_session(("SELECT " + ", ".join(["1"] * 100) + "; SET LOCAL a = b").encode())


def test_non_utf8_bytes_do_not_break_the_lexer(changes_session: Any) -> None:
    assert not changes_session(b"SELECT '\xff\xfe'")
    assert changes_session(b"SET search_path = \xff")


@pytest.mark.parametrize("sql", [
    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 2",
    "INSERT INTO t (a) VALUES ('SET x'); UPDATE t SET a = 2",
    "SELECT settings FROM configs",
])
def test_set_in_the_middle_of_a_statement_needs_no_lexing(sql: str) -> None:
    assert not sql_scan._needs_lexing(sql.encode())


@pytest.mark.parametrize("sql", ["SET x = 1", "  (set x = 1)", "SELECT 1;\n set x = 1", "/* c */ UPDATE t SET a = 1",
                                 "-- c\nSET x = 1", "SELECT set_config('a', 'b', false)"])
def test_text_that_may_set_something_is_lexed(sql: str) -> None:
    assert sql_scan._needs_lexing(sql.encode())

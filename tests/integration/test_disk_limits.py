"""Project size limits (ADR 0025): a branch at its project's `quota.logical_size_bytes` refuses
writes, another project keeps writing, and the tenant gets back under by dropping data.

On the session's platform (its disk guard looks every second): real Postgres, the real proxy.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from tests.fixtures.platform import RunningPlatform

pytestmark = [pytest.mark.pg, pytest.mark.slow]

CHUNK = "INSERT INTO t SELECT repeat(md5(g::text), 32) FROM generate_series(1, 500) g"  # ~1 MB a time


def _size(conn: psycopg.Connection[Any]) -> int:
    return conn.execute("SELECT sum(pg_database_size(oid))::bigint FROM pg_database").fetchone()[0]  # type: ignore[index]


def _fill_until_refused(conn: psycopg.Connection[Any], deadline: float) -> psycopg.Error:
    while time.monotonic() < deadline:
        try:
            conn.execute(CHUNK)
        except psycopg.Error as exc:
            return exc
        time.sleep(0.02)  # an application's pace, not a disk benchmark
    raise AssertionError("writes were never refused")


def _set_limit(platform: RunningPlatform, pid: str, limit: int) -> Any:
    resp = platform.api.patch(f"/projects/{pid}",
                              json={"project": {"settings": {"quota": {"logical_size_bytes": limit}}}})
    assert resp.status_code == 200, resp.text
    return resp


def _refused(conn: psycopg.Connection[Any]) -> bool:
    try:  # refused by a read-only transaction whether or not the (empty) table exists
        conn.execute("CREATE TABLE IF NOT EXISTS probe (v int)")
    except psycopg.errors.ReadOnlySqlTransaction:
        return True
    return False


def _wait_until(check: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.2)


def _events(platform: RunningPlatform, created: dict[str, Any]) -> list[str]:
    pid, eid = created["project"]["id"], created["endpoints"][0]["id"]
    return [e["kind"] for e in platform.api.get(f"/projects/{pid}/endpoints/{eid}/events").json()["events"]]


def test_a_branch_at_its_size_limit_refuses_writes_and_gets_back_under(platform: RunningPlatform) -> None:
    full, neighbour = platform.create_project(name="sized"), platform.create_project(name="neighbour")
    pid = full["project"]["id"]
    try:
        # Refused values: a limit under 1 MiB, and the consumption quotas Argon does not act on.
        for quota in ({"logical_size_bytes": 5}, {"active_time_seconds": 100}):
            resp = platform.api.patch(f"/projects/{pid}", json={"project": {"settings": {"quota": quota}}})
            assert resp.status_code == 400, resp.text
            assert next(iter(quota)) in resp.json()["message"]

        with psycopg.connect(platform.dsn(full), autocommit=True, connect_timeout=30) as conn, \
                psycopg.connect(platform.dsn(neighbour), autocommit=True, connect_timeout=30) as other:
            conn.execute("CREATE TABLE t (v text)")
            other.execute("CREATE TABLE t (v text)")
            limit = (_size(conn) // 2**20 + 4) * 2**20
            resp = platform.api.patch(f"/projects/{pid}",
                                      json={"project": {"settings": {"quota": {"logical_size_bytes": limit}}}})
            assert resp.status_code == 200, resp.text
            shown = platform.api.get(f"/projects/{pid}").json()["project"]
            assert shown["settings"]["quota"] == {"logical_size_bytes": limit}
            assert shown["branch_logical_size_limit_bytes"] == limit
            assert shown["branch_logical_size_limit"] == limit // 2**20

            refused = _fill_until_refused(conn, time.monotonic() + 60)
            assert isinstance(refused, psycopg.errors.ReadOnlySqlTransaction | psycopg.errors.QueryCanceled), refused
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute(CHUNK)
            assert _size(conn) < limit + 16 * 2**20  # stopped near the limit, not far past it
            assert conn.execute("SELECT count(*) > 0 FROM t").fetchone() == (True,)  # reads go on
            other.execute(CHUNK)  # the neighbour keeps writing
            other.execute(CHUNK)

        # A session that lifts read-only and keeps adding data: past the grace, the branch's sessions end.
        with psycopg.connect(platform.dsn(full), autocommit=True, connect_timeout=30) as bypass:
            bypass.execute("SET default_transaction_read_only = off")
            with pytest.raises(psycopg.OperationalError):  # terminated (or the socket closed under it)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    bypass.execute(CHUNK)
                    time.sleep(0.02)

        # The way back, as on Neon: drop data in a session that asks to write.
        with psycopg.connect(platform.dsn(full), autocommit=True, connect_timeout=30) as back:
            back.execute("SET default_transaction_read_only = off")
            back.execute("TRUNCATE t")
            back.execute("RESET default_transaction_read_only")
            deadline = time.monotonic() + 30
            while True:
                try:
                    back.execute(CHUNK)
                    break
                except psycopg.errors.ReadOnlySqlTransaction:
                    assert time.monotonic() < deadline, "writes never came back under the limit"
                    time.sleep(0.2)
        kinds = _events(platform, full)
        assert "writes_refused" in kinds and "writes_allowed" in kinds, kinds
        assert "writes_refused" not in _events(platform, neighbour)

        # A limit under the branch's size refuses at once; the limit removed while the compute is
        # suspended, it wakes writing.
        eid = full["endpoints"][0]["id"]
        _set_limit(platform, pid, 2**20)
        with psycopg.connect(platform.dsn(full), autocommit=True, connect_timeout=30) as conn:
            _wait_until(lambda: _refused(conn), "the lowered limit refused writes")
        assert platform.api.post(f"/projects/{pid}/endpoints/{eid}/suspend").status_code == 200
        assert _set_limit(platform, pid, 0).json()["project"]["settings"]["quota"] == {}
        with psycopg.connect(platform.dsn(full), autocommit=True, connect_timeout=30) as conn:
            time.sleep(2.5)  # two looks of the guard at the woken compute
            _wait_until(lambda: not _refused(conn), "writes came back with no limit")
    finally:
        platform.delete_project(pid)
        platform.delete_project(neighbour["project"]["id"])

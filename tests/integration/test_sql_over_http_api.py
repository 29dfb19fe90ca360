"""`POST /sql` with httpx against a live Argon: Neon's exact shapes, errors, limits, pool and suspend.

The serverless driver itself is exercised in `test_serverless_driver.py`; here every byte the driver
does not look at is pinned down too (key order, non-raw conversions, error keys and statuses).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import websockets

from argon.proxy.routing import NO_ENDPOINT
from argon.proxy.serverless.sql_over_http import ERROR_KEYS
from argon.wire import codec
from tests.fixtures.platform import RunningPlatform

pytestmark = [pytest.mark.pg, pytest.mark.slow]

FAILED = "password authentication failed for user 'neondb_owner'"
RESULT_KEYS = ["fields", "rows", "command", "rowCount", "rowAsArray"]
INSECURE = "connection is insecure (try using `sslmode=require`)"


@pytest.fixture(scope="module")
def created(platform: RunningPlatform) -> Iterator[dict[str, Any]]:
    project = platform.create_project(name="sql-over-http")
    yield project
    platform.delete_project(project["project"]["id"])


@pytest.fixture(scope="module")
def http(platform: RunningPlatform) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=platform.api_url, timeout=60) as client:
        yield client


def post(http: httpx.Client, dsn: str | None, body: Any, **headers: str) -> httpx.Response:
    if dsn is not None:
        headers["Neon-Connection-String"] = dsn
    return http.post("/sql", json=body, headers=headers)


def one(http: httpx.Client, dsn: str, query: str, *params: Any, **headers: str) -> dict[str, Any]:
    resp = post(http, dsn, {"query": query, "params": list(params)}, **headers)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def error(resp: httpx.Response, status: int, message: str, code: str = "") -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert list(body) == [key for key, _ in ERROR_KEYS]
    assert body["message"] == message and body["code"] == code
    assert resp.headers["access-control-allow-origin"] == "*"
    return body  # type: ignore[no-any-return]


def test_result_shape_and_command_tags(http: httpx.Client, platform: RunningPlatform, created: Any) -> None:
    dsn = platform.dsn(created)
    created_table = one(http, dsn, "CREATE TABLE shapes (id int8 PRIMARY KEY, name varchar(20))")
    assert list(created_table) == RESULT_KEYS
    assert created_table == {"fields": [], "rows": [], "command": "CREATE", "rowCount": None, "rowAsArray": False}
    inserted = one(http, dsn, "INSERT INTO shapes VALUES ($1, $2), (2, 'b')", "1", "a")
    assert (inserted["command"], inserted["rowCount"]) == ("INSERT", 2)
    selected = one(http, dsn, "SELECT id, name FROM shapes ORDER BY id")
    assert (selected["command"], selected["rowCount"]) == ("SELECT", 2)
    assert selected["rows"] == [{"id": "1", "name": "a"}, {"id": "2", "name": "b"}]
    table_oid = one(http, dsn, "SELECT 'shapes'::regclass::oid AS o")["rows"][0]["o"]
    assert selected["fields"][1] == {"name": "name", "dataTypeID": 1043, "tableID": int(table_oid), "columnID": 2,
                                     "dataTypeSize": -1, "dataTypeModifier": 24, "format": "text"}
    assert list(selected["fields"][0]) == ["name", "dataTypeID", "tableID", "columnID", "dataTypeSize",
                                           "dataTypeModifier", "format"]
    assert one(http, dsn, "SELECT 1 WHERE false")["rowCount"] == 0
    assert one(http, dsn, "UPDATE shapes SET name = 'c' WHERE id = 0")[("rowCount")] == 0
    empty = one(http, dsn, "")
    assert (empty["command"], empty["rowCount"], empty["fields"]) == ("", None, [])
    arrays = one(http, dsn, "SELECT 1 AS a, 2 AS a", **{"Neon-Array-Mode": "true"})
    assert arrays["rows"] == [[1, 2]] and arrays["rowAsArray"] is True
    per_query = post(http, dsn, {"query": "SELECT 1 AS a", "arrayMode": False}, **{"Neon-Array-Mode": "true"}).json()
    assert per_query["rows"] == [{"a": 1}] and per_query["rowAsArray"] is False


def test_value_conversion(http: httpx.Client, platform: RunningPlatform, created: Any) -> None:
    dsn = platform.dsn(created)
    query = ("SELECT true AS b, 2::int2 AS s, 4::int4 AS i, 8::int8 AS l, 1.5::float8 AS f, 'NaN'::float4 AS nan, "
             "'-Infinity'::float8 AS ninf, 1.10::numeric AS n, '{\"a\": [1, null]}'::json AS j, '[1]'::jsonb AS jb, "
             "ARRAY[1, NULL, 3] AS ia, ARRAY['x\"y', 'a,b', NULL, 'NULL'] AS ta, ARRAY[[true], [false]] AS nested, "
             "'[0:1]={7,8}'::int[] AS bounds, '\\x01ff'::bytea AS by, NULL::int AS nul, '2024-01-02'::date AS d, "
             "ARRAY['{}'::jsonb] AS ja")
    row = one(http, dsn, query)["rows"][0]
    assert row == {"b": True, "s": 2, "i": 4, "l": "8", "f": 1.5, "nan": "NaN", "ninf": "-Infinity", "n": "1.10",
                   "j": {"a": [1, None]}, "jb": [1], "ia": [1, None, 3], "ta": ['x"y', "a,b", None, "NULL"],
                   "nested": [[True], [False]], "bounds": [7, 8], "by": "\\x01ff", "nul": None, "d": "2024-01-02",
                   "ja": [{}]}
    raw = one(http, dsn, query, **{"Neon-Raw-Text-Output": "true"})["rows"][0]
    assert raw["b"] == "t" and raw["i"] == "4" and raw["ia"] == "{1,NULL,3}" and raw["nul"] is None
    params = one(http, dsn, "SELECT $1::int[] AS a, $2::text[] AS t, $3::jsonb AS j, $4::bool AS b, $5::int AS n",
                 [1, None], ["q\"uote", "x"], {"k": "v"}, True, 5)["rows"][0]
    assert params == {"a": [1, None], "t": ['q"uote', "x"], "j": {"k": "v"}, "b": True, "n": 5}


def test_errors(http: httpx.Client, platform: RunningPlatform, created: Any) -> None:
    dsn = platform.dsn(created)
    body = error(post(http, dsn, {"query": "SELECT nope FROM pg_class"}), 400, 'column "nope" does not exist', "42703")
    assert body["position"] == "8" and body["severity"] == "ERROR" and body["file"] and body["line"].isdigit()
    constraint = error(post(http, dsn, {"query": "SELECT 1::int2 + 40000::int2"}), 400, "smallint out of range", "22003")
    assert constraint["detail"] is None
    error(post(http, None, {"query": "SELECT 1"}), 400, "invalid header: neon-connection-string")
    error(post(http, "mysql://u:p@h/db", {"query": "SELECT 1"}), 400, "incorrect scheme")
    error(post(http, "postgres://u:p@h:99999/db", {"query": "SELECT 1"}), 400,
          "invalid connection string: Port out of range 0-65535")
    error(post(http, "postgres://u:p@h/", {"query": "SELECT 1"}), 400, "missing database name")
    error(post(http, "postgres://h/db", {"query": "SELECT 1"}), 400, "missing username")
    error(post(http, "postgres://u@h/db", {"query": "SELECT 1"}), 400,
          "missing authentication credentials: required password")
    error(post(http, "postgres://u:p@127.0.0.1/db", {"query": "SELECT 1"}), 400, NO_ENDPOINT)
    resp = http.post("/sql", content=b"{nope", headers={"Neon-Connection-String": dsn})
    assert error(resp, 400, resp.json()["message"])["message"].startswith("could not parse the HTTP request body: ")
    error(post(http, dsn, {"queries": [{"query": "SELECT 1"}]}, **{"Neon-Batch-Isolation-Level": "serializable"}),
          400, "invalid isolation level")
    password = platform.params(created)["password"]
    error(post(http, dsn.replace(quote(password, safe=""), "wrong"), {"query": "SELECT 1"}), 400, FAILED)
    error(post(http, dsn.replace("/neondb?", "/nodb?"), {"query": "SELECT 1"}), 400,
          'database "nodb" does not exist')
    # Only the password check knows the endpoint: an unknown one is a wrong password.
    error(post(http, dsn.replace(created["endpoints"][0]["id"], "ep-none-such-0000"), {"query": "SELECT 1"}), 400,
          "password authentication failed for user 'neondb_owner'")
    # Over plain HTTP from a non-loopback client: refused (uvicorn takes the client from X-Forwarded-For on loopback).
    error(post(http, dsn, {"query": "SELECT 1"}, **{"X-Forwarded-For": "203.0.113.9"}), 400, INSECURE)
    ok = post(http, dsn, {"query": "SELECT 1"}, **{"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})
    assert ok.status_code == 200


def test_endpoint_from_host_and_password_hack(http: httpx.Client, platform: RunningPlatform, created: Any) -> None:
    p = platform.params(created)
    eid = created["endpoints"][0]["id"]
    user, password = quote(p["user"], safe=""), quote(p["password"], safe="")
    by_host = f"postgresql://{user}:{password}@{eid}.argon.localhost/neondb?sslmode=require"
    assert one(http, by_host, "SELECT 1 AS one")["rows"] == [{"one": 1}]
    hack = f"postgresql://{user}:{quote('endpoint=' + eid + ';', safe='')}{password}@127.0.0.1/neondb"
    assert one(http, hack, "SELECT 2 AS two")["rows"] == [{"two": 2}]


def test_cors_methods_and_limits(http: httpx.Client, platform: RunningPlatform, created: Any) -> None:
    resp = http.options("/sql")
    assert resp.status_code == 200 and resp.content == b""
    assert resp.headers["allow"] == "OPTIONS, POST"
    assert resp.headers["access-control-allow-origin"] == "*"
    assert resp.headers["access-control-max-age"] == "86400"
    assert resp.headers["access-control-allow-headers"] == (
        "Authorization, Neon-Connection-String, Neon-Raw-Text-Output, Neon-Array-Mode, Neon-Pool-Opt-In, "
        "Neon-Batch-Read-Only, Neon-Batch-Isolation-Level")
    got = http.get("/sql")
    assert got.status_code == 400 and got.json() == "query is not supported"
    dsn = platform.dsn(created)
    big = http.post("/sql", content=b" " * (10 * 1024 * 1024 + 1), headers={"Neon-Connection-String": dsn})
    error(big, 413, "request is too large (max is 10485760 bytes)")
    huge = post(http, dsn, {"query": "SELECT repeat('x', 1048576) FROM generate_series(1, 11)"})
    error(huge, 507, "response is too large (max is 10485760 bytes)")
    assert one(http, dsn, "SELECT 'after' AS s")["rows"] == [{"s": "after"}]
    ok = post(http, dsn, {"query": "SELECT 1"})
    assert ok.headers["neon-request-id"] and ok.headers["content-type"] == "application/json"


def test_batch(http: httpx.Client, platform: RunningPlatform, created: Any) -> None:
    dsn = platform.dsn(created)
    one(http, dsn, "CREATE TABLE batch_t (v int)")
    batch = {"queries": [{"query": "INSERT INTO batch_t VALUES (1)"}, {"query": "SELECT count(*) AS n FROM batch_t"}]}
    resp = post(http, dsn, batch, **{"Neon-Batch-Isolation-Level": "RepeatableRead", "Neon-Batch-Read-Only": "false",
                                      "Neon-Batch-Deferrable": "true"})
    assert resp.status_code == 200, resp.text
    assert list(resp.json()) == ["results"] and resp.json()["results"][1]["rows"] == [{"n": "1"}]
    assert resp.headers["neon-batch-isolation-level"] == "RepeatableRead"
    assert resp.headers["neon-batch-deferrable"] == "true" and "neon-batch-read-only" not in resp.headers
    failing = {"queries": [{"query": "INSERT INTO batch_t VALUES (2)"}, {"query": "SELECT 1/0"}]}
    error(post(http, dsn, failing), 400, "division by zero", "22012")
    read_only = post(http, dsn, {"queries": [{"query": "INSERT INTO batch_t VALUES (3)"}]},
                     **{"Neon-Batch-Read-Only": "true"})
    error(read_only, 400, "cannot execute INSERT in a read-only transaction", "25006")
    assert one(http, dsn, "SELECT count(*)::int AS n FROM batch_t")["rows"] == [{"n": 1}]  # nothing else committed


def pooled(pool: Any, timeout: float = 10) -> None:
    """Until the last request's connection is back in the pool: its reset runs in a task after the
    response was sent, and on a busy CI machine that can take longer than any fixed sleep."""
    deadline = time.monotonic() + timeout
    while pool._tasks or pool.idle < 1:
        assert time.monotonic() < deadline, "the connection did not go back to the pool"
        time.sleep(0.01)


def test_pool_reuses_a_clean_connection(http: httpx.Client, platform: RunningPlatform, created: Any) -> None:
    dsn = platform.dsn(created)
    pool = platform.platform.serverless.http_sql.pool
    first = one(http, dsn, "SELECT pg_backend_pid() AS pid, set_config('search_path', 'leaked', false) AS s")
    pooled(pool)  # the reset runs after the response
    hits = pool.hits
    second = one(http, dsn, "SELECT pg_backend_pid() AS pid, current_setting('search_path') AS s")
    assert second["rows"][0]["pid"] == first["rows"][0]["pid"] and pool.hits == hits + 1
    assert second["rows"][0]["s"] == '"$user", public'  # the session SET did not leak
    # After an error in a single query the backend is dropped, not pooled.
    error(post(http, dsn, {"query": "SELECT 1/0"}), 400, "division by zero", "22012")


def test_pooled_connections_survive_a_suspend(http: httpx.Client, platform: RunningPlatform, created: Any) -> None:
    pid, eid = created["project"]["id"], created["endpoints"][0]["id"]
    dsn = platform.dsn(created)
    before = one(http, dsn, "SELECT pg_backend_pid() AS pid")["rows"][0]["pid"]
    pooled(platform.platform.serverless.http_sql.pool)
    assert platform.api.post(f"/projects/{pid}/endpoints/{eid}/suspend").json()["endpoint"]["current_state"] == "idle"
    after = one(http, dsn, "SELECT pg_backend_pid() AS pid")["rows"][0]["pid"]  # wakes; the dead backend is skipped
    assert after != before


def test_idle_pool_does_not_keep_the_compute_awake(http: httpx.Client, platform: RunningPlatform,
                                                   created: Any) -> None:
    pid, eid = created["project"]["id"], created["endpoints"][0]["id"]
    dsn = platform.dsn(created)
    before = platform.endpoint(pid, eid)["suspend_timeout_seconds"]
    patch = {"endpoint": {"suspend_timeout_seconds": 1}}
    assert platform.api.patch(f"/projects/{pid}/endpoints/{eid}", json=patch).status_code == 200
    try:
        one(http, dsn, "SELECT 1")
        time.sleep(0.2)
        assert platform.platform.serverless.http_sql.pool.idle >= 1
        deadline = time.monotonic() + 15
        while platform.endpoint(pid, eid)["current_state"] != "idle":
            assert time.monotonic() < deadline, "the compute was not suspended"
            time.sleep(0.2)
        assert one(http, dsn, "SELECT 'woken' AS s")["rows"] == [{"s": "woken"}]
    finally:
        platform.api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": {"suspend_timeout_seconds": before}})


def test_client_gone_cancels_the_query(http: httpx.Client, platform: RunningPlatform, created: Any) -> None:
    dsn = platform.dsn(created)
    probe = "SELECT count(*)::int AS n FROM pg_stat_activity WHERE query LIKE '%cancel-me%' AND pid <> pg_backend_pid()"
    one(http, dsn, "SELECT 1")  # awake

    def leave_early() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(platform.api_url + "/sql", json={"query": "SELECT pg_sleep(30), 'cancel-me'"},
                       headers={"Neon-Connection-String": dsn}, timeout=1.5)

    client = threading.Thread(target=leave_early)
    client.start()
    for expected in (1, 0):  # running while the client waits, gone soon after it left
        deadline = time.monotonic() + 10
        while one(http, dsn, probe)["rows"] != [{"n": expected}]:
            assert time.monotonic() < deadline, f"expected {expected} running copies of the query"
            time.sleep(0.1)
        if expected == 1:
            client.join(10)


def test_websocket_handshake_and_plaintext_policy(platform: RunningPlatform, created: Any) -> None:
    """Inside the WebSocket: SSLRequest gets 'N', then a cleartext password request; over plain HTTP
    from a non-loopback client the proxy's insecure-connection error instead (Postgres framing)."""
    url = f"ws://127.0.0.1:{platform.platform.http_port}/v2"
    startup = codec.startup_message({"user": "neondb_owner", "database": "neondb",
                                     "options": f"endpoint={created['endpoints'][0]['id']}"})

    async def exchange(headers: dict[str, str]) -> tuple[bytes, bytes]:
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send(codec.ssl_request())
            answer = await ws.recv()
            await ws.send(startup)
            return bytes(answer), bytes(await ws.recv())

    assert asyncio.run(exchange({})) == (b"N", codec.auth_cleartext_password())
    answer, refused = asyncio.run(exchange({"X-Forwarded-For": "203.0.113.9"}))
    assert answer == b"N" and refused == codec.error_response(INSECURE)

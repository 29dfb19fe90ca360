"""SQL over HTTP, the pure half: connection strings, params, values, arrays, tags, errors; WebSocket routing."""

from __future__ import annotations

import json

import pytest

from argon.proxy.routing import NO_ENDPOINT, endpoint_from_host, resolve
from argon.proxy.serverless import sql_over_http as sql
from argon.proxy.serverless.http_sql import _proxy_message
from argon.proxy.serverless.websocket import tunnel_endpoint

EP = "ep-cool-darkness-123456"


def test_connection_string_endpoint_sources() -> None:
    local = sql.parse_connection_string(f"postgresql://al%40ice:p%3Aw@127.0.0.1:5432/my%20db?sslmode=require&"
                                        f"options=endpoint%3D{EP}")
    assert local == sql.ConnInfo("al@ice", "p:w", "my db", EP, "127.0.0.1")
    assert sql.parse_connection_string(f"postgres://u:p@{EP}.us-east-2.aws.neon.tech/db").endpoint_id == EP
    assert sql.parse_connection_string(f"postgres://u:p@{EP}-pooler.x.y/db").endpoint_id == EP + "-pooler"
    assert sql.parse_connection_string("postgres://u:p@db1.argon.test/db", "argon.test").endpoint_id == "db1"
    hack = sql.parse_connection_string(f"postgres://u:endpoint%3D{EP}%3Bsecret%3Bmore@localhost/db")
    assert (hack.endpoint_id, hack.password) == (EP, "secret;more")


@pytest.mark.parametrize(("text", "message"), [
    (None, "invalid header: neon-connection-string"),
    ("http://u:p@h/db", "incorrect scheme"),
    ("postgres://u:p@h:70000/db", "invalid connection string: Port out of range 0-65535"),
    ("postgres://u:p@h", "missing database name"),
    ("postgres://:p@h/db", "missing username"),
    ("postgres://u:p@/db", "missing hostname"),
    ("postgres://u@h/db", "missing authentication credentials: required password"),
    ("postgres://u:p@127.0.0.1/db", NO_ENDPOINT),
    ("postgres://u:p@[::1]/db", NO_ENDPOINT),
    (f"postgres://u:p@{EP}.h/db?options=endpoint%3Dep-other", f"Inconsistent project name inferred from SNI "
                                                               f"('{EP}') and project option ('ep-other')."),
    ("postgres://u:endpoint%3Dbad_id%3Bpw@h/db", "Project name ('bad_id') must contain only alphanumeric "
                                                 "characters and hyphen."),
])
def test_connection_string_errors(text: str | None, message: str) -> None:
    with pytest.raises(sql.HttpSqlError) as err:
        sql.parse_connection_string(text)
    assert err.value.user_message == message and err.value.status == 400


def test_body() -> None:
    single = sql.parse_body(b'{"query": "SELECT $1", "params": [1], "arrayMode": true, "extra": 0}')
    assert single == sql.SqlRequest((sql.Query("SELECT $1", ("1",), True),), batch=False)
    batch = sql.parse_body(b'{"queries": [{"query": "a"}, {"query": "b", "params": null}]}')
    assert batch.batch and [q.text for q in batch.queries] == ["a", "b"]
    for bad in (b"{", b"[]", b'{"nope": 1}', b'{"query": 1}', b'{"query": "x", "params": 1}', b"\xff"):
        with pytest.raises(sql.HttpSqlError, match=r"^could not parse the HTTP request body: "):
            sql.parse_body(bad)


@pytest.mark.parametrize(("value", "text"), [
    (None, None), ("x", "x"), (True, "true"), (1, "1"), (1.5, "1.5"), ({"a": [1, "é"]}, '{"a":[1,"é"]}'),
    ([1, None, "a\"b", [2, 3], {"k": 1}, False], '{1,NULL,"a\\"b",{2,3},"{\\"k\\":1}",false}'), ([], "{}"),
])
def test_param_text(value: object, text: str | None) -> None:
    assert sql.param_text(value) == text


def test_batch_options() -> None:
    assert sql.batch_options({}).begin() == "START TRANSACTION"
    opts = sql.batch_options({sql.BATCH_ISOLATION_LEVEL: "ReadCommitted", sql.BATCH_READ_ONLY: "true",
                              sql.BATCH_DEFERRABLE: "True"})
    assert opts.begin() == "START TRANSACTION ISOLATION LEVEL READ COMMITTED, READ ONLY"
    assert opts.response_headers() == {sql.BATCH_ISOLATION_LEVEL: "ReadCommitted", sql.BATCH_READ_ONLY: "true"}
    with pytest.raises(sql.HttpSqlError, match=r"^invalid isolation level$"):
        sql.batch_options({sql.BATCH_ISOLATION_LEVEL: "SERIALIZABLE"})


@pytest.mark.parametrize(("tag", "expected"), [
    ("SELECT 3", ("SELECT", 3)), ("INSERT 0 2", ("INSERT", 2)), ("CREATE TABLE", ("CREATE", None)),
    ("", ("", None)), ("UPDATE 0", ("UPDATE", 0)), ("DISCARD ALL", ("DISCARD", None)),
])
def test_command_and_count(tag: str, expected: tuple[str, int | None]) -> None:
    assert sql.command_and_count(tag) == expected


def test_arrays() -> None:
    assert sql.parse_array("{}") == []
    assert sql.parse_array('{1,NULL,"NULL","a\\"b\\\\c"," x ",{}}') == ["1", None, "NULL", 'a"b\\c', " x ", []]
    assert sql.parse_array("[0:1][1:1]={{1},{2}}") == [["1"], ["2"]]
    for bad in ("", "{", "{1", '{"a', "{1}x", "[1:2"):
        with pytest.raises(ValueError):
            sql.parse_array(bad)


def test_convert() -> None:
    c = sql.convert
    assert [c("t", 16, raw=False), c("f", 16, raw=False)] == [True, False]
    assert c("-5", 21, raw=False) == -5 and c("7", 23, raw=False) == 7 and c("8", 20, raw=False) == "8"
    assert c("1.25", 701, raw=False) == 1.25
    assert [c(v, 700, raw=False) for v in ("NaN", "Infinity", "-Infinity")] == ["NaN", "Infinity", "-Infinity"]
    assert c('{"a": [1, 2.5]}', 3802, raw=False) == {"a": [1, 2.5]}
    assert c("{t,NULL}", 1000, raw=False) == [True, None]
    assert c('{"{\\"a\\": 1}",null}', 3807, raw=False) == [{"a": 1}, None]
    assert c("{NaN,1.5}", 1022, raw=False) == ["NaN", 1.5]
    assert c("{1,2}", 1016, raw=False) == ["1", "2"]  # int8 elements stay strings
    assert c("(1,2),(0,0)", 603, raw=False) == "(1,2),(0,0)"  # box: not an array we parse
    assert c("{1,2}", 1007, raw=True) == "{1,2}" and c(None, 23, raw=False) is None
    with pytest.raises(sql.HttpSqlError) as err:
        c("{1", 1007, raw=False)
    assert err.value.status == 500 and err.value.user_message == "could not parse postgres response"


def test_result_and_error_json() -> None:
    field = sql.Field("a", 23, 0, 0, 4, -1)
    out = sql.result_json([field], [[1]], "SELECT 1", array_mode=False)
    assert list(out) == ["fields", "rows", "command", "rowCount", "rowAsArray"]
    assert sql.encode(out) == (b'{"fields":[{"name":"a","dataTypeID":23,"tableID":0,"columnID":0,"dataTypeSize":4,'
                               b'"dataTypeModifier":-1,"format":"text"}],"rows":[{"a":1}],"command":"SELECT",'
                               b'"rowCount":1,"rowAsArray":false}')
    pg = sql.postgres_error_json({"S": "ERROR", "C": "42P01", "M": "relation \"x\" does not exist", "P": "15",
                                  "F": "parse_relation.c", "L": "1392", "R": "parserOpenTable"})
    assert list(pg) == [k for k, _ in sql.ERROR_KEYS] and len(pg) == 17
    assert pg["position"] == "15" and pg["line"] == "1392" and pg["detail"] is None and pg["code"] == "42P01"
    proxy = sql.proxy_error_json("boom")
    assert json.loads(sql.encode(proxy)) == {**dict.fromkeys(pg, None), "message": "boom", "code": "", "severity": ""}


def test_websocket_and_host_routing() -> None:
    assert endpoint_from_host(f"{EP}.anything.example", None) == EP
    assert endpoint_from_host("db.argon.test", "argon.test") == "db"
    assert endpoint_from_host("api.argon.test", "argon.test") is None
    assert endpoint_from_host("127.0.0.1", "argon.test") is None and endpoint_from_host("localhost", None) is None
    assert tunnel_endpoint(f"{EP}.region.example:443", "127.0.0.1:4444", None) == EP
    assert tunnel_endpoint(None, f"{EP}.argon.test:4444", "argon.test") == EP
    assert tunnel_endpoint("127.0.0.1:5432", "localhost:4444", "argon.test") is None
    route = resolve({"user": "u", "options": f"endpoint={EP}"}, None, None, host_endpoint=EP)
    assert route.endpoint_id == EP


def test_libpq_messages() -> None:
    libpq = ('connection failed: connection to server at "127.0.0.1", port 5432 failed: '
             "ERROR:  password authentication failed for user 'u'\n")
    assert _proxy_message(libpq) == "password authentication failed for user 'u'"
    assert _proxy_message("") == "Couldn't connect to compute node"


def test_an_endpoint_address_names_its_endpoint_after_the_options() -> None:
    """ADR 0031 on the HTTP paths: a connection string whose host is an endpoint's own address (as
    neonctl prints it where names do not resolve) routes to that endpoint; `options` still win."""
    routes = {"127.1.0.7": EP, "127.2.0.7": EP + "-pooler"}
    assert sql.parse_connection_string("postgres://u:p@127.1.0.7/db", None, routes).endpoint_id == EP
    assert sql.parse_connection_string("postgres://u:p@127.2.0.7/db", None, routes).endpoint_id == EP + "-pooler"
    other = sql.parse_connection_string("postgres://u:p@127.1.0.7/db?options=endpoint%3Dep-other", None, routes)
    assert other.endpoint_id == "ep-other"
    with pytest.raises(sql.HttpSqlError):  # an address nobody holds names nothing: the password hack is next
        sql.parse_connection_string("postgres://u:p@127.1.0.8/db", None, routes)
    assert endpoint_from_host("127.1.0.7", None, routes) == EP and endpoint_from_host("127.1.0.7", None) is None
    assert tunnel_endpoint("127.1.0.7:5432", "127.0.0.1:4444", None, routes) == EP
    assert tunnel_endpoint(f"{EP}.x.y:5432", "127.0.0.1:4444", None, routes) is None  # names: the other call

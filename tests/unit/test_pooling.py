"""`wire.pooling.PoolCore` message by message: linking, the request queue (forward, skip, fake),
prepared statements, tracked parameters, resets, COPY, waiting, quiescing and cancels."""

from __future__ import annotations

import struct
from collections import defaultdict

import pytest

from argon.wire import codec
from argon.wire.pooling import Client, Pool, PoolCore, Server

TZ, APP = 2, 4  # tracked parameter indexes (pool_params.TRACKED)


def msg(tag: bytes, body: bytes = b"") -> bytes:
    return codec.frame(tag, body)


def parse(name: str, sql: str) -> bytes:
    return msg(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + b"\0\0")


def bind(name: str) -> bytes:
    return msg(b"B", b"\0" + name.encode() + b"\0" + b"\0\0" + b"\0\0" + b"\0\0")


def describe(name: str) -> bytes:
    return msg(b"D", b"S" + name.encode() + b"\0")


def close(name: str) -> bytes:
    return msg(b"C", b"S" + name.encode() + b"\0")


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


EXECUTE, SYNC, FLUSH = msg(b"E", b"\0\0\0\0\0"), msg(b"S"), msg(b"H")
PARSE_OK, BIND_OK, CLOSE_OK, NO_DATA = msg(b"1"), msg(b"2"), msg(b"3"), msg(b"n")


def ready(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


def complete(tag: str) -> bytes:
    return msg(b"C", tag.encode() + b"\0")


def param(name: str, value: str) -> bytes:
    return msg(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def error(text: str = "boom") -> bytes:
    return codec.error_response(text, "42000")


def frames(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = struct.unpack_from("!I", data, i + 1)[0]
        out.append(data[i:i + 1 + n])
        i += 1 + n
    return out


def tags(data: bytes) -> str:
    return "".join(chr(f[0]) for f in frames(data))


class Script(PoolCore):
    """Records what the core sends; time is set by the test."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.to_client: dict[int, bytearray] = defaultdict(bytearray)
        self.to_server: dict[int, bytearray] = defaultdict(bytearray)
        self.closed_clients: dict[int, bytes | None] = {}
        self.closed_servers: list[int] = []
        self.wants: list[int] = []
        self.clock = 0.0
        self.ids = 0

    def send_client(self, client: Client, data: bytes) -> None:
        self.to_client[client.id] += data

    def send_server(self, server: Server, data: bytes) -> None:
        self.to_server[server.id] += data

    def close_client(self, client: Client, error: bytes | None) -> None:
        self.closed_clients[client.id] = error

    def close_server(self, server: Server) -> None:
        self.closed_servers.append(server.id)

    def want_server(self, pool: Pool) -> None:
        self.wants.append(pool.id)

    def now(self) -> float:
        return self.clock

    # helpers
    def client(self, pool: Pool, params: dict[int, str] | None = None) -> Client:
        self.ids += 1
        return self.add_client(pool, self.ids, dict(params or {TZ: "UTC"}))

    def server(self, pool: Pool, params: dict[int, str] | None = None) -> Server:
        self.ids += 1
        return self.add_server(pool, self.ids, dict(params or {TZ: "UTC"}))

    def out_client(self, client: Client) -> bytes:
        data = bytes(self.to_client[client.id])
        self.to_client[client.id].clear()
        return data

    def out_server(self, server: Server) -> bytes:
        data = bytes(self.to_server[server.id])
        self.to_server[server.id].clear()
        return data


@pytest.fixture
def core() -> Script:
    return Script()


def test_a_query_waits_for_a_server_and_the_server_returns_at_ready_for_query(core: Script) -> None:
    pool = core.add_pool(1, 2)
    c = core.client(pool)
    core.client_data(c, query("SELECT 1"))
    assert core.wants == [1] and list(pool.waiting) == [c]
    s = core.server(pool)
    assert c.server is s and core.out_server(s) == query("SELECT 1")
    core.server_data(s, msg(b"T", b"\0\0") + complete("SELECT 1") + ready())
    assert tags(core.out_client(c)) == "TCZ"
    assert c.server is None and pool.idle == [s] and pool.xact_count == 1


def test_a_transaction_keeps_its_server_until_idle(core: Script) -> None:
    pool = core.add_pool(1, 1)
    s = core.server(pool)
    a, b = core.client(pool), core.client(pool)
    core.client_data(a, query("BEGIN"))
    core.server_data(s, complete("BEGIN") + ready(b"T"))
    core.client_data(b, query("SELECT 2"))
    assert b.waiting_since is not None and a.server is s
    core.client_data(a, query("COMMIT"))
    core.server_data(s, complete("COMMIT") + ready())
    assert a.server is None and b.server is s and core.out_server(s).endswith(query("SELECT 2"))


def test_pipelined_requests_keep_the_server_until_the_last_answer(core: Script) -> None:
    pool = core.add_pool(1, 1)
    s = core.server(pool)
    c = core.client(pool)
    core.client_data(c, query("SELECT 1") + query("SELECT 2"))
    core.server_data(s, complete("SELECT 1") + ready())
    assert c.server is s  # the second query is still unanswered
    core.server_data(s, complete("SELECT 2") + ready())
    assert c.server is None


def test_prepared_statements_are_shared_faked_and_injected(core: Script) -> None:
    pool = core.add_pool(1, 2)
    s1 = core.server(pool)
    a = core.client(pool)
    core.client_data(a, parse("a1", "SELECT $1") + SYNC)
    sent = frames(core.out_server(s1))
    assert sent[0] == parse("argon_1", "SELECT $1") and sent[1] == SYNC
    core.server_data(s1, PARSE_OK + ready())
    assert core.out_client(a) == PARSE_OK + ready()
    # b prepares the same text under its own name on the same server: answered by the pooler
    b = core.client(pool)
    core.client_data(b, parse("b7", "SELECT $1") + bind("b7") + EXECUTE + SYNC)
    assert frames(core.out_server(s1)) == [bind("argon_1"), EXECUTE, SYNC]
    core.server_data(s1, BIND_OK + complete("SELECT 1") + ready())
    assert core.out_client(b) == PARSE_OK + BIND_OK + complete("SELECT 1") + ready()
    # a on another server: the statement is prepared there first, its ParseComplete dropped
    core.client_data(b, query("BEGIN"))  # b holds s1
    s2 = core.server(pool)
    core.client_data(a, bind("a1") + EXECUTE + SYNC)
    assert a.server is s2
    assert frames(core.out_server(s2)) == [parse("argon_1", "SELECT $1"), bind("argon_1"), EXECUTE, SYNC]
    core.server_data(s2, PARSE_OK + BIND_OK + complete("SELECT 1") + ready())
    assert core.out_client(a) == BIND_OK + complete("SELECT 1") + ready()
    assert len(core.registry) == 1


def test_a_parse_the_server_holds_is_answered_in_its_place_in_the_pipeline(core: Script) -> None:
    pool = core.add_pool(1, 1)
    s = core.server(pool)
    c = core.client(pool)
    core.client_data(c, parse("x", "SELECT 1") + SYNC)
    core.server_data(s, PARSE_OK + ready())
    core.out_client(c)
    core.out_server(s)
    core.client_data(c, close("x") + SYNC)
    assert core.out_client(c) == CLOSE_OK + ready()  # nothing outstanding: answered at once, locally
    core.client_data(c, query("SELECT 0") + parse("y", "SELECT 1") + bind("y") + EXECUTE + SYNC)
    assert frames(core.out_server(s)) == [query("SELECT 0"), bind("argon_1"), EXECUTE, SYNC]
    core.server_data(s, complete("SELECT 1") + ready())
    assert core.out_client(c) == complete("SELECT 1") + ready() + PARSE_OK  # after the query's answers
    core.server_data(s, BIND_OK + complete("SELECT 1") + ready())
    assert core.out_client(c) == BIND_OK + complete("SELECT 1") + ready()


def test_after_an_error_the_queue_skips_to_the_sync_and_failed_parses_are_forgotten(core: Script) -> None:
    pool = core.add_pool(1, 1)
    s = core.server(pool)
    c = core.client(pool)
    core.client_data(c, parse("bad", "SELECT nope") + bind("bad") + EXECUTE + close("bad") + SYNC)
    assert frames(core.out_server(s)) == [parse("argon_1", "SELECT nope"), bind("argon_1"), EXECUTE, SYNC]
    core.server_data(s, error() + ready())
    assert tags(core.out_client(c)) == "EZ"  # no CloseComplete: Postgres would have skipped the Close
    assert not s.prepared and c.server is None
    core.client_data(c, parse("bad", "SELECT nope") + SYNC)  # the name was closed: it may be reused
    assert frames(core.out_server(s))[0] == parse("argon_2", "SELECT nope")


def test_the_server_lru_closes_the_oldest_statement(core: Script) -> None:
    core.max_prepared = 2
    pool = core.add_pool(1, 1)
    s = core.server(pool)
    c = core.client(pool)
    core.client_data(c, parse("a", "SELECT 1") + parse("b", "SELECT 2") + parse("c", "SELECT 3") + SYNC)
    sent = frames(core.out_server(s))
    assert sent[-2:] == [msg(b"C", b"Sargon_1\0"), SYNC]
    core.server_data(s, PARSE_OK * 3 + CLOSE_OK + ready())
    assert core.out_client(c) == PARSE_OK * 3 + ready()
    assert list(s.prepared) == [2, 3]
    core.client_data(c, bind("a") + EXECUTE + SYNC)  # evicted: prepared again first
    assert frames(core.out_server(s))[0] == parse("argon_1", "SELECT 1")


def test_deallocate_all_clears_the_clients_names_and_the_servers_statements(core: Script) -> None:
    pool = core.add_pool(1, 1)
    s = core.server(pool)
    c = core.client(pool)
    core.client_data(c, parse("a", "SELECT 1") + SYNC)
    core.server_data(s, PARSE_OK + ready())
    core.client_data(c, query("DEALLOCATE ALL"))
    core.server_data(s, complete("DEALLOCATE ALL") + ready())
    assert not c.prepared and not s.prepared and len(core.registry) == 0


def test_a_name_prepared_twice_closes_the_client(core: Script) -> None:
    pool = core.add_pool(1, 1)
    s = core.server(pool)
    c = core.client(pool)
    core.client_data(c, parse("a", "SELECT 1") + parse("a", "SELECT 2") + SYNC)
    err = core.closed_clients[c.id]
    assert err is not None and b"42P05" in err and b'prepared statement "a" already exists' in err
    assert s.id in core.closed_servers  # it was mid-request


def test_tracked_parameters_are_set_before_the_clients_first_message(core: Script) -> None:
    pool = core.add_pool(1, 1)
    s = core.server(pool, {TZ: "UTC", APP: ""})
    c = core.client(pool, {TZ: "utc", APP: "app"})
    core.client_data(c, query("SHOW TimeZone"))
    sent = core.out_server(s)
    assert sent.startswith(b"Q") and b"SET TimeZone TO E'utc'" in sent and b"SET application_name TO E'app'" in sent
    assert sent.endswith(query("SHOW TimeZone"))
    core.server_data(s, complete("SET") + param("TimeZone", "UTC") + complete("SET") + param("application_name", "app")
                     + ready())
    assert core.out_client(c) == b""  # the client never sees the pooler's SET
    assert c.params[TZ] == "UTC"  # Postgres' spelling, so the next server is not SET again for nothing
    core.server_data(s, msg(b"T", b"\0\0") + complete("SHOW") + ready())
    assert tags(core.out_client(c)) == "TCZ"
    core.client_data(c, query("SET TimeZone = 'Asia/Tokyo'"))
    core.server_data(s, complete("SET") + param("TimeZone", "Asia/Tokyo") + ready())
    assert c.params[TZ] == "Asia/Tokyo" and s.params[TZ] == "Asia/Tokyo" and not s.dirty


def test_a_transaction_that_leaves_session_state_resets_its_server(core: Script) -> None:
    pool = core.add_pool(1, 1)
    s = core.server(pool)
    c = core.client(pool)
    core.client_data(c, parse("a", "SELECT 1") + SYNC)
    core.server_data(s, PARSE_OK + ready())
    core.client_data(c, query("SET search_path = x"))
    core.server_data(s, complete("SET") + ready())
    assert core.out_server(s).endswith(query("DISCARD ALL")) and s.state == "resetting" and not s.prepared
    other = core.client(pool)
    core.client_data(other, query("SELECT 1"))
    assert other.waiting_since is not None  # not before the reset is done
    core.server_data(s, complete("DISCARD ALL") + ready())
    assert other.server is s and core.out_server(s) == query("SELECT 1")


def test_a_copy_the_server_failed_keeps_the_server_until_the_client_ends_it(core: Script) -> None:
    pool = core.add_pool(1, 1)
    s = core.server(pool)
    c = core.client(pool)
    core.client_data(c, query("COPY t FROM STDIN"))
    core.server_data(s, msg(b"G", b"\0\0\0"))
    core.client_data(c, msg(b"d", b"1\n"))
    core.server_data(s, error() + ready())
    assert c.server is s  # Postgres still drains the client's COPY data
    core.client_data(c, msg(b"d", b"2\n") + msg(b"c"))
    assert c.server is None and pool.idle == [s]
    assert core.out_server(s).endswith(msg(b"d", b"2\n") + msg(b"c"))


def test_sync_and_flush_without_a_server_are_answered_locally(core: Script) -> None:
    pool = core.add_pool(1, 1)
    c = core.client(pool)
    core.client_data(c, FLUSH + SYNC + close("never") + SYNC)
    assert core.out_client(c) == ready() + CLOSE_OK + ready() and not core.wants


def test_waiting_clients_are_served_in_order_and_time_out(core: Script) -> None:
    core.wait_timeout = 5
    pool = core.add_pool(1, 1)
    s = core.server(pool)
    holder = core.client(pool)
    core.client_data(holder, query("BEGIN"))
    core.server_data(s, complete("BEGIN") + ready(b"T"))
    first, second = core.client(pool), core.client(pool)
    core.client_data(first, query("SELECT 1"))
    core.clock = 3
    core.client_data(second, query("SELECT 2"))
    core.clock = 6
    core.tick()
    assert first.closed and b"query_wait_timeout" in (core.closed_clients[first.id] or b"")
    assert not second.closed
    core.client_data(holder, query("COMMIT"))
    core.server_data(s, complete("COMMIT") + ready())
    assert second.server is s and pool.wait_count == 1 and pool.wait_time == pytest.approx(3)


def test_quiescing_closes_idle_servers_only_when_none_is_in_use(core: Script) -> None:
    pool = core.add_pool(1, 2)
    s1, s2 = core.server(pool), core.server(pool)
    c = core.client(pool)
    core.client_data(c, query("BEGIN"))
    assert core.pause(pool) is True and not pool.paused  # busy: nothing changed
    core.server_data(c.server or s2, complete("BEGIN") + ready(b"T"))
    core.client_data(c, query("COMMIT"))
    core.server_data(c.server or s2, complete("COMMIT") + ready())
    assert core.pause(pool) is False and pool.paused and not pool.servers
    assert sorted(core.closed_servers) == sorted([s1.id, s2.id])
    core.client_data(c, query("SELECT 1"))
    assert c.waiting_since is not None and not core.wants[1:]  # paused: nothing is opened meanwhile
    core.resume(pool)
    assert core.wants[-1] == 1
    s3 = core.server(pool)
    assert c.server is s3


def test_a_held_server_serves_nobody_until_its_cancel_is_delivered(core: Script) -> None:
    pool = core.add_pool(1, 1)
    s = core.server(pool)
    a, b = core.client(pool), core.client(pool)
    core.client_data(a, query("SELECT pg_sleep(10)"))
    assert core.cancel_target(a) is s and core.cancel_target(b) is None
    core.client_data(b, query("SELECT 1"))
    core.server_data(s, error("canceling statement due to user request") + ready())
    assert s.state == "held" and b.server is None
    core.unhold(s)
    assert b.server is s


def test_a_client_that_leaves_mid_transaction_takes_its_server_with_it(core: Script) -> None:
    pool = core.add_pool(1, 1)
    s = core.server(pool)
    c = core.client(pool)
    core.client_data(c, query("BEGIN"))
    core.server_data(s, complete("BEGIN") + ready(b"T"))
    core.client_data(c, msg(b"X"))
    assert c.closed and s.id in core.closed_servers and not pool.servers


def test_a_lost_server_closes_its_client_and_is_replaced_for_waiters(core: Script) -> None:
    pool = core.add_pool(1, 1)
    s = core.server(pool)
    a, b = core.client(pool), core.client(pool)
    core.client_data(a, query("SELECT 1"))
    core.client_data(b, query("SELECT 2"))
    core.server_lost(s)
    assert a.closed and not b.closed and core.wants == [1]


def test_a_failed_open_fails_waiting_clients_only_when_the_pool_has_no_server(core: Script) -> None:
    pool = core.add_pool(1, 2)
    c = core.client(pool)
    core.client_data(c, query("SELECT 1"))
    core.server_failed(pool, codec.error_response("database does not exist"))
    assert c.closed and b"database does not exist" in (core.closed_clients[c.id] or b"")


def test_malformed_client_messages_close_the_client(core: Script) -> None:
    pool = core.add_pool(1, 1)
    c = core.client(pool)
    core.client_data(c, b"\x01\0\0\0\x04")
    assert c.closed and b"invalid frontend message type" in (core.closed_clients[c.id] or b"")
    d = core.client(pool)
    core.client_data(d, b"Q\0\0\0\x02")
    assert d.closed

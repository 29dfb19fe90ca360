"""The same pooling scenarios against both engines, observed only through bytes: the pure core
(`wire.pooling`, driven directly) and the C engine (`_pooler`, over socketpairs). The C engine is a
port of the core; these tests are how the two are kept the same."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from argon.wire import codec
from tests.unit.test_pooling import (
    BIND_OK,
    CLOSE_OK,
    EXECUTE,
    FLUSH,
    PARSE_OK,
    SYNC,
    Script,
    bind,
    close,
    complete,
    error,
    frames,
    msg,
    param,
    parse,
    query,
    ready,
    tags,
)

try:
    from argon.proxy import _pooler
except ImportError:
    _pooler = None

TZ, APP = 2, 4


class PyDriver:
    """The pure core; objects are the core's own."""

    def __init__(self, max_prepared: int = 1000, wait_timeout: float = 120, statement_budget: int = 32 << 20) -> None:
        self.core = Script(max_prepared=max_prepared, wait_timeout=wait_timeout, statement_budget=statement_budget)
        self.pools: dict[int, Any] = {}

    def pool(self, pool_id: int, size: int) -> int:
        self.pools[pool_id] = self.core.add_pool(pool_id, size)
        return pool_id

    def client(self, pool_id: int, params: dict[int, str] | None = None) -> Any:
        return self.core.client(self.pools[pool_id], params)

    def server(self, pool_id: int, params: dict[int, str] | None = None, requested: bool = True) -> Any:
        return self.core.server(self.pools[pool_id], params)

    def send(self, client: Any, data: bytes) -> None:
        self.core.client_data(client, data)

    def reply(self, server: Any, data: bytes) -> None:
        self.core.server_data(server, data)

    def got(self, client: Any, expect: bytes | None = None) -> bytes:
        return self.core.out_client(client)

    def sent(self, server: Any, expect: bytes | None = None) -> bytes:
        return self.core.out_server(server)

    def wants(self) -> list[int]:
        wants, self.core.wants = self.core.wants, []
        return wants

    def client_closed(self, client: Any) -> bool:
        return bool(client.closed)

    def server_closed(self, server: Any) -> bool:
        return server.id in self.core.closed_servers

    def error_of(self, client: Any) -> bytes:
        return self.core.closed_clients.get(client.id) or b""

    def advance(self, seconds: float) -> None:
        self.core.clock += seconds
        self.core.tick()

    def pause(self, pool_id: int) -> bool:
        return self.core.pause(self.pools[pool_id])

    def resume(self, pool_id: int) -> None:
        self.core.resume(self.pools[pool_id])

    def cancel(self, client: Any) -> int:
        server = self.core.cancel_target(client)
        return server.id if server is not None else 0

    def unhold(self, server_id: int) -> None:
        server = next(s for p in self.pools.values() for s in p.servers if s.id == server_id)
        self.core.unhold(server)

    def close(self) -> None:
        pass


class _Conn:
    def __init__(self, object_id: int, sock: socket.socket) -> None:
        self.id = object_id
        self.sock = sock
        self.eof = False
        self.data = bytearray()


class CDriver:
    """The C engine on its thread; each client and server is the far end of a socketpair."""

    QUIET = 0.05

    def __init__(self, max_prepared: int = 1000, wait_timeout: float = 120, statement_budget: int = 32 << 20) -> None:
        assert _pooler is not None
        self.engine = _pooler.Engine()
        self.engine.limits(wait_timeout, 600.0, max_prepared, statement_budget)
        self.ids = 0
        self.conns: list[_Conn] = []
        self.events: list[tuple[int, int, int, int, int]] = []

    def _pair(self) -> tuple[socket.socket, int]:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        fd = theirs.detach()
        return ours, fd

    def pool(self, pool_id: int, size: int) -> int:
        self.engine.add_pool(pool_id, size)
        return pool_id

    def client(self, pool_id: int, params: dict[int, str] | None = None) -> _Conn:
        self.ids += 1
        values = params or {TZ: "UTC"}
        ours, fd = self._pair()
        self.engine.add_client(pool_id, self.ids, fd, b"", b"", tuple(values.get(i) for i in range(5)))
        conn = _Conn(self.ids, ours)
        self.conns.append(conn)
        return conn

    def server(self, pool_id: int, params: dict[int, str] | None = None, requested: bool = True) -> _Conn:
        self.ids += 1
        values = params or {TZ: "UTC"}
        ours, fd = self._pair()
        self.engine.add_server(pool_id, self.ids, fd, b"", tuple(values.get(i) for i in range(5)), requested)
        conn = _Conn(self.ids, ours)
        self.conns.append(conn)
        return conn

    def send(self, client: _Conn, data: bytes) -> None:
        client.sock.sendall(data)

    def reply(self, server: _Conn, data: bytes) -> None:
        server.sock.sendall(data)

    def _read(self, conn: _Conn, expect: bytes | None) -> bytes:
        deadline = time.monotonic() + 3
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            try:
                chunk = conn.sock.recv(65536)
            except BlockingIOError:
                chunk = None
            if chunk:
                conn.data += chunk
                quiet_since = time.monotonic()
                continue
            if chunk == b"":
                conn.eof = True
            done = expect is None or len(conn.data) >= len(expect)
            if (done and time.monotonic() - quiet_since > self.QUIET) or conn.eof:
                break
            time.sleep(0.002)
        data = bytes(conn.data)
        conn.data.clear()
        return data

    def got(self, client: _Conn, expect: bytes | None = None) -> bytes:
        return self._read(client, expect)

    def sent(self, server: _Conn, expect: bytes | None = None) -> bytes:
        return self._read(server, expect)

    def _poll_events(self) -> None:
        time.sleep(self.QUIET)
        self.events += self.engine.events()

    def wants(self) -> list[int]:
        self._poll_events()
        wants = [e[1] for e in self.events if e[0] == _pooler.EV_WANT]  # type: ignore[union-attr]
        self.events = [e for e in self.events if e[0] != _pooler.EV_WANT]  # type: ignore[union-attr]
        return wants

    def client_closed(self, client: _Conn) -> bool:
        client.data += self._read(client, None)
        return client.eof

    def server_closed(self, server: _Conn) -> bool:
        self._read(server, None)
        return server.eof

    def error_of(self, client: _Conn) -> bytes:
        data = self._read(client, None)
        return data

    def advance(self, seconds: float) -> None:
        time.sleep(seconds + 1.2)  # the thread's timer runs every second

    def _answer(self, call: Any, object_id: int, kind: int) -> int:
        token = 1000 + len(self.events)
        call(object_id, token)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            self.events += self.engine.events()
            for event in self.events:
                if event[0] == kind and event[1] == token:
                    self.events.remove(event)
                    return event[2]
            time.sleep(0.005)
        raise AssertionError("no answer from the engine")

    def pause(self, pool_id: int) -> bool:
        return bool(self._answer(self.engine.pause, pool_id, _pooler.EV_PAUSED))  # type: ignore[union-attr]

    def resume(self, pool_id: int) -> None:
        self.engine.resume(pool_id)

    def cancel(self, client: _Conn) -> int:
        return self._answer(self.engine.cancel, client.id, _pooler.EV_CANCEL)  # type: ignore[union-attr]

    def unhold(self, server_id: int) -> None:
        self.engine.unhold(server_id)

    def close(self) -> None:
        self.engine.shutdown()
        for conn in self.conns:
            conn.sock.close()


DRIVERS = [pytest.param(PyDriver, id="python")]
if _pooler is not None:
    DRIVERS.append(pytest.param(CDriver, id="c"))


@pytest.fixture(params=DRIVERS)
def make(request: pytest.FixtureRequest) -> Iterator[Any]:
    drivers: list[Any] = []

    def build(**kw: Any) -> Any:
        driver = request.param(**kw)
        drivers.append(driver)
        return driver

    yield build
    for driver in drivers:
        driver.close()


def test_waiting_then_served_then_released(make: Any) -> None:
    d = make()
    d.pool(1, 2)
    a, b = d.client(1), d.client(1)
    d.send(a, query("SELECT 1"))
    assert d.wants() == [1]
    s = d.server(1)
    assert d.sent(s, query("SELECT 1")) == query("SELECT 1")
    d.reply(s, complete("SELECT 1") + ready())
    assert d.got(a, complete("SELECT 1") + ready()) == complete("SELECT 1") + ready()
    d.send(b, query("SELECT 2"))  # the released server serves the next client
    assert d.sent(s, query("SELECT 2")) == query("SELECT 2")


def test_prepared_statements_shared_faked_and_injected(make: Any) -> None:
    d = make()
    d.pool(1, 2)
    s1 = d.server(1, requested=False)
    a, b = d.client(1), d.client(1)
    d.send(a, parse("a1", "SELECT $1") + SYNC)
    assert frames(d.sent(s1, parse("argon_1", "SELECT $1") + SYNC)) == [parse("argon_1", "SELECT $1"), SYNC]
    d.reply(s1, PARSE_OK + ready())
    assert d.got(a, PARSE_OK + ready()) == PARSE_OK + ready()
    d.send(b, parse("b7", "SELECT $1") + bind("b7") + EXECUTE + SYNC)
    assert frames(d.sent(s1, bind("argon_1") + EXECUTE + SYNC)) == [bind("argon_1"), EXECUTE, SYNC]
    d.reply(s1, BIND_OK + complete("SELECT 1") + ready())
    want = PARSE_OK + BIND_OK + complete("SELECT 1") + ready()
    assert d.got(b, want) == want
    d.send(b, query("BEGIN"))  # b holds s1
    assert d.sent(s1, query("BEGIN")) == query("BEGIN")
    s2 = d.server(1, requested=False)
    d.send(a, bind("a1") + EXECUTE + SYNC)
    want = parse("argon_1", "SELECT $1") + bind("argon_1") + EXECUTE + SYNC
    assert d.sent(s2, want) == want
    d.reply(s2, PARSE_OK + BIND_OK + complete("SELECT 1") + ready())
    want = BIND_OK + complete("SELECT 1") + ready()
    assert d.got(a, want) == want


def test_a_fake_is_answered_in_its_place(make: Any) -> None:
    d = make()
    d.pool(1, 1)
    s = d.server(1, requested=False)
    c = d.client(1)
    d.send(c, parse("x", "SELECT 1") + SYNC)
    d.sent(s, parse("argon_1", "SELECT 1") + SYNC)
    d.reply(s, PARSE_OK + ready())
    d.got(c, PARSE_OK + ready())
    d.send(c, close("x") + SYNC)
    assert d.got(c, CLOSE_OK + ready()) == CLOSE_OK + ready()
    d.send(c, query("SELECT 0") + parse("y", "SELECT 1") + bind("y") + EXECUTE + SYNC)
    want = query("SELECT 0") + bind("argon_1") + EXECUTE + SYNC
    assert d.sent(s, want) == want
    d.reply(s, complete("SELECT 1") + ready())
    want = complete("SELECT 1") + ready() + PARSE_OK
    assert d.got(c, want) == want


def test_an_error_skips_to_the_sync(make: Any) -> None:
    d = make()
    d.pool(1, 1)
    s = d.server(1, requested=False)
    c = d.client(1)
    d.send(c, parse("bad", "SELECT nope") + bind("bad") + EXECUTE + close("bad") + SYNC)
    want = parse("argon_1", "SELECT nope") + bind("argon_1") + EXECUTE + SYNC
    assert d.sent(s, want) == want
    d.reply(s, error() + ready())
    assert tags(d.got(c, error() + ready())) == "EZ"
    d.send(c, parse("bad", "SELECT nope") + SYNC)  # the failed statement is gone everywhere: a new one
    assert frames(d.sent(s, parse("argon_2", "SELECT nope") + SYNC))[0] == parse("argon_2", "SELECT nope")


def test_the_lru_closes_the_oldest_statement(make: Any) -> None:
    d = make(max_prepared=2)
    d.pool(1, 1)
    s = d.server(1, requested=False)
    c = d.client(1)
    d.send(c, parse("a", "SELECT 1") + parse("b", "SELECT 2") + parse("c", "SELECT 3") + SYNC)
    sent = frames(d.sent(s, b"x" * 90))
    assert sent[-2:] == [msg(b"C", b"Sargon_1\0"), SYNC]
    d.reply(s, PARSE_OK * 3 + CLOSE_OK + ready())
    assert d.got(c, PARSE_OK * 3 + ready()) == PARSE_OK * 3 + ready()
    d.send(c, bind("a") + EXECUTE + SYNC)
    assert frames(d.sent(s, parse("argon_1", "SELECT 1") + bind("argon_1") + EXECUTE + SYNC))[0] == \
        parse("argon_1", "SELECT 1")


def test_deallocate_all_forgets_the_clients_names(make: Any) -> None:
    d = make()
    d.pool(1, 1)
    s = d.server(1, requested=False)
    c = d.client(1)
    d.send(c, parse("a", "SELECT 1") + SYNC)
    d.sent(s, parse("argon_1", "SELECT 1") + SYNC)
    d.reply(s, PARSE_OK + ready())
    d.got(c, PARSE_OK + ready())
    d.send(c, query("DEALLOCATE ALL"))
    d.sent(s, query("DEALLOCATE ALL"))
    d.reply(s, complete("DEALLOCATE ALL") + ready())
    d.got(c, complete("DEALLOCATE ALL") + ready())
    d.send(c, bind("a") + EXECUTE + SYNC)  # the name is gone: passed on as is, Postgres will say so
    assert d.sent(s, bind("a") + EXECUTE + SYNC) == bind("a") + EXECUTE + SYNC


def test_a_name_prepared_twice_closes_the_client(make: Any) -> None:
    d = make()
    d.pool(1, 1)
    d.server(1, requested=False)
    c = d.client(1)
    d.send(c, parse("a", "SELECT 1") + parse("a", "SELECT 2") + SYNC)
    err = d.error_of(c)
    assert b"42P05" in err and b'prepared statement "a" already exists' in err
    assert d.client_closed(c)


def test_each_pool_has_a_statement_budget_of_its_own(make: Any) -> None:
    """A pool (one tenant's database and role) that spends its prepared statement budget fails its own
    client; another pool's clients still prepare (the registry is shared, its budget is not)."""
    d = make(statement_budget=1500)
    d.pool(1, 1)
    d.pool(2, 1)
    s1, s2 = d.server(1, requested=False), d.server(2, requested=False)
    a, b = d.client(1), d.client(2)
    big = "SELECT 1 -- " + "x" * 900
    d.send(a, parse("p1", big) + SYNC)
    assert frames(d.sent(s1, parse("argon_1", big) + SYNC)) == [parse("argon_1", big), SYNC]
    d.reply(s1, PARSE_OK + ready())
    assert d.got(a, PARSE_OK + ready()) == PARSE_OK + ready()
    d.send(a, parse("p2", big.replace("1", "2", 1)) + SYNC)  # two texts do not fit pool 1's 1,500 bytes
    err = d.error_of(a)
    assert b"53200" in err and b"prepared statement memory is full" in err
    assert d.client_closed(a)
    d.send(b, parse("p1", big) + SYNC)  # pool 2 has its own budget (and its own statement)
    assert frames(d.sent(s2, parse("argon_2", big) + SYNC)) == [parse("argon_2", big), SYNC]
    d.reply(s2, PARSE_OK + ready())
    assert d.got(b, PARSE_OK + ready()) == PARSE_OK + ready()


def test_tracked_parameters_are_set_first_and_hidden(make: Any) -> None:
    d = make()
    d.pool(1, 1)
    s = d.server(1, {TZ: "UTC", APP: ""}, requested=False)
    c = d.client(1, {TZ: "utc", APP: "app"})
    d.send(c, query("SHOW TimeZone"))
    sent = d.sent(s, b"x" * 80)
    assert b"SET TimeZone TO E'utc'" in sent and b"SET application_name TO E'app'" in sent
    assert sent.endswith(query("SHOW TimeZone"))
    d.reply(s, complete("SET") + param("TimeZone", "UTC") + complete("SET") + param("application_name", "app")
            + ready() + msg(b"T", b"\0\0") + complete("SHOW") + ready())
    assert tags(d.got(c, msg(b"T", b"\0\0") + complete("SHOW") + ready())) == "TCZ"
    d.send(c, query("SELECT 1"))  # the canonical value was taken: no second SET
    assert d.sent(s, query("SELECT 1")) == query("SELECT 1")


def test_session_state_resets_the_server_before_anyone_else_gets_it(make: Any) -> None:
    d = make()
    d.pool(1, 1)
    s = d.server(1, requested=False)
    a, b = d.client(1), d.client(1)
    d.send(a, query("SET search_path = x"))
    d.sent(s, query("SET search_path = x"))
    d.reply(s, complete("SET") + ready())
    assert d.sent(s, query("DISCARD ALL")) == query("DISCARD ALL")
    d.send(b, query("SELECT 1"))
    assert d.sent(s, None) == b""  # not before the reset is done
    d.reply(s, complete("DISCARD ALL") + ready())
    assert d.sent(s, query("SELECT 1")) == query("SELECT 1")
    assert d.got(a, complete("SET") + ready()) == complete("SET") + ready()


def test_a_failed_copy_in_keeps_the_server_until_the_client_ends_it(make: Any) -> None:
    d = make()
    d.pool(1, 1)
    s = d.server(1, requested=False)
    c, other = d.client(1), d.client(1)
    d.send(c, query("COPY t FROM STDIN"))
    d.sent(s, query("COPY t FROM STDIN"))
    d.reply(s, msg(b"G", b"\0\0\0"))
    d.send(c, msg(b"d", b"1\n"))
    d.reply(s, error() + ready())
    d.send(other, query("SELECT 1"))
    assert d.sent(s, msg(b"d", b"1\n")) == msg(b"d", b"1\n")  # other waits: Postgres drains c's COPY
    d.send(c, msg(b"d", b"2\n") + msg(b"c"))
    want = msg(b"d", b"2\n") + msg(b"c") + query("SELECT 1")
    assert d.sent(s, want) == want


def test_sync_and_flush_without_a_server(make: Any) -> None:
    d = make()
    d.pool(1, 1)
    c = d.client(1)
    d.send(c, FLUSH + SYNC + close("never") + SYNC)
    want = ready() + CLOSE_OK + ready()
    assert d.got(c, want) == want and d.wants() == []


def test_a_waiting_client_times_out(make: Any) -> None:
    d = make(wait_timeout=0.5)
    d.pool(1, 1)
    s = d.server(1, requested=False)
    holder, waiter = d.client(1), d.client(1)
    d.send(holder, query("BEGIN"))
    d.sent(s, query("BEGIN"))
    d.reply(s, complete("BEGIN") + ready(b"T"))
    d.send(waiter, query("SELECT 1"))
    d.advance(0.6)
    err = d.error_of(waiter)
    assert b"query_wait_timeout" in err and b"08P01" in err


def test_quiescing(make: Any) -> None:
    d = make()
    d.pool(1, 2)
    s = d.server(1, requested=False)
    c = d.client(1)
    d.send(c, query("BEGIN"))
    d.sent(s, query("BEGIN"))
    assert d.pause(1) is True  # in use
    d.reply(s, complete("BEGIN") + ready(b"T"))
    d.send(c, query("COMMIT"))
    d.sent(s, query("COMMIT"))
    d.reply(s, complete("COMMIT") + ready())
    d.got(c, complete("BEGIN") + ready(b"T") + complete("COMMIT") + ready())
    assert d.pause(1) is False and d.server_closed(s)
    d.send(c, query("SELECT 1"))
    assert d.wants() == []  # paused: nothing is opened
    d.resume(1)
    assert d.wants() == [1]
    s2 = d.server(1)
    assert d.sent(s2, query("SELECT 1")) == query("SELECT 1")


def test_a_held_server_waits_for_its_cancel(make: Any) -> None:
    d = make()
    d.pool(1, 1)
    s = d.server(1, requested=False)
    a, b = d.client(1), d.client(1)
    d.send(a, query("SELECT pg_sleep(10)"))
    d.sent(s, query("SELECT pg_sleep(10)"))
    assert d.cancel(a) == s.id and d.cancel(b) == 0
    d.send(b, query("SELECT 1"))
    d.reply(s, error("canceling statement due to user request") + ready())
    assert d.sent(s, None) == b""  # held
    d.unhold(s.id)
    assert d.sent(s, query("SELECT 1")) == query("SELECT 1")


def test_terminate_mid_transaction_closes_the_server(make: Any) -> None:
    d = make()
    d.pool(1, 1)
    s = d.server(1, requested=False)
    c = d.client(1)
    d.send(c, query("BEGIN"))
    d.sent(s, query("BEGIN"))
    d.reply(s, complete("BEGIN") + ready(b"T"))
    d.send(c, msg(b"X"))
    assert d.server_closed(s) and d.client_closed(c)


def test_malformed_messages_close_the_client(make: Any) -> None:
    d = make()
    d.pool(1, 1)
    c = d.client(1)
    d.send(c, b"\x01\0\0\0\x04")
    assert b"invalid frontend message type" in d.error_of(c)
    c2 = d.client(1)
    d.send(c2, msg(b"C", b"S"))
    assert b"invalid message format" in d.error_of(c2)
    assert codec.error_response  # (the texts are the core's)

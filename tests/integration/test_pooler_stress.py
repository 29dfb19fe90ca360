"""Pooled clients of every shape at once through the C engine, onto a pool of four server
connections: short and prepared (psycopg), pipelined and extended-protocol (raw), hung up early or
late (FIN or reset) and mid-transaction, cut in the middle of a result, cancelled, ended by the
compute, garbage, COPY, session state, KeyUpdates. Each checks its own outcome; at the end the
engine and the proxy hold no client, no cancel key, and no server in use.

The normal suite runs a couple of hundred. `make test-asan` (scripts/test-asan) runs thousands
against the engine built with AddressSanitizer and UBSan: ARGON_POOLER_STRESS sets the count,
ARGON_RELAY_ASAN names the directory of that build (checked to be the one loaded).
"""

from __future__ import annotations

import itertools
import os
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors

from argon.proxy.pooler import native as native_pooler
from argon.proxy.tls import TlsConfig, TlsFiles, ensure_certificates
from argon.wire import codec
from tests.fixtures.fake_control import FakeControl, ProxyHarness
from tests.fixtures.raw_client import KeyUpdates, RawClient, backend_key, error_code, login, query
from tests.fixtures.scratch_pg import ScratchPostgres, scratch_pg  # noqa: F401 - fixture

pytestmark = [pytest.mark.pg, pytest.mark.skipif(not native_pooler.AVAILABLE, reason="the native pooler is not built")]

SESSIONS = int(os.environ.get("ARGON_POOLER_STRESS", "200"))
ASAN_BUILD = os.environ.get("ARGON_RELAY_ASAN")
if ASAN_BUILD:  # the sanitizer runtime is for this process only, not for the Postgres it starts
    os.environ.pop("LD_PRELOAD", None)

EP = "ep-pstress"
POOLED = EP + "-pooler"
USER, PASSWORD = "pat", "pat-pw-1"


@pytest.fixture(scope="module")
def proxy(scratch_pg: ScratchPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHarness]:  # noqa: F811
    certs: TlsFiles = ensure_certificates(tmp_path_factory.mktemp("tls"), "argon.test")
    control = FakeControl()
    control.add_endpoint(EP, scratch_pg.socket_path)
    control.set_secret(EP, USER, scratch_pg.create_role(USER, PASSWORD))
    harness = ProxyHarness(control, tls=TlsConfig(certs.cert, certs.key), relay="native", pooler={"pool_size": 4})
    yield harness
    harness.stop()


def test_the_sanitized_engine_is_the_one_loaded() -> None:
    if not ASAN_BUILD:
        pytest.skip("not a sanitizer run")
    from argon.proxy import _pooler

    assert os.path.realpath(_pooler.__file__).startswith(os.path.realpath(ASAN_BUILD)), _pooler.__file__
    assert native_pooler.TLS_AVAILABLE, "TLS clients must be driven by the sanitized C code too"


def connect(proxy: ProxyHarness, tls: bool, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(host="127.0.0.1", port=proxy.port, user=USER, dbname=USER, password=PASSWORD,
                           sslmode="require" if tls else "disable", options=f"endpoint={POOLED}", connect_timeout=20,
                           **kw)


def short_and_prepared(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with connect(proxy, tls, autocommit=True) as conn:
        for i in range(3):
            assert conn.execute("SELECT %s::int + %s", (n, i), prepare=True).fetchone() == (n + i,)
        with conn.transaction():
            assert conn.execute("SELECT count(*) FROM generate_series(1, %s)", (n % 50 + 1,)).fetchone() == \
                (n % 50 + 1,)


def pipelined(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, POOLED) + query(f"SELECT {n}") + query("SELECT 2") + codec.terminate())
        messages = c.until_eof()
    rows = [p for t, p in messages if t == b"D"]
    assert len(rows) == 2 and rows[0].endswith(str(n).encode()), messages
    assert [t for t, _ in messages].count(b"Z") == 3


def extended_with_an_error(proxy: ProxyHarness, tls: bool, n: int) -> None:
    name = f"s{n % 7}".encode()
    parse = codec.frame(b"P", name + b"\0SELECT 1 / $1::int\0\0\0")

    def bind(value: int) -> bytes:
        return codec.frame(b"B", b"\0" + name + b"\0\0\0\0\x01\0\0\0\x01" + str(value).encode() + b"\0\0")

    execute, sync = codec.frame(b"E", b"\0\0\0\0\0"), codec.frame(b"S")
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, POOLED))
        c.until_ready()
        c.send(parse + bind(n % 2) + execute + sync)
        messages = c.until_ready()
        assert (error_code(messages) == "22012") == (n % 2 == 0), messages  # 1 / 0
        c.send(bind(1) + execute + sync)
        assert error_code(c.until_ready()) is None
        c.send(codec.terminate())
        c.until_eof()


def hang_up(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, POOLED) + query("SELECT 1") + (query("BEGIN") if n % 3 == 0 else b""))
        if n % 4 < 2:
            c.until_ready()
            c.until_ready()
        c.reset() if n % 2 else c.close()


def cut_in_a_result(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls, rcvbuf=8192) as c:
        c.send(login(USER, PASSWORD, POOLED) + query("SELECT repeat('x', 1000) FROM generate_series(1, 5000)"))
        c.until_ready()
        for _ in range(20 + n % 50):
            assert c.message() is not None
        c.reset() if n % 2 else c.close()


def cancelled(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, POOLED))
        pid, secret = backend_key(c.until_ready())
        c.send(query("SELECT pg_sleep(30)"))
        c.sock.settimeout(0.1)
        for _ in range(200):  # until the query runs: a cancel that comes first cancels nothing
            with RawClient(proxy.port, tls=n % 3 == 0) as canceller:
                canceller.send(codec.cancel_request(pid, secret))
                canceller.until_eof()
            try:
                messages = c.until_ready()
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("the query was never cancelled")
        assert error_code(messages) == "57014", messages
        c.sock.settimeout(20)
        c.send(codec.terminate())
        c.until_eof()


def ended_by_the_compute(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, POOLED) + query("SELECT pg_terminate_backend(pg_backend_pid())"))
        assert error_code(c.until_eof()) == "57P01"


def garbage(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, POOLED))
        c.until_ready()
        junk = b"\x17\x03\x03\x00\x20" + b"garbage!" * 4 if tls else b"?\x00\x00\x00\x08junk"
        os.write(c.sock.fileno(), junk)  # under TLS: a record that does not decrypt
        c.until_eof()


def copy_and_session_state(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with connect(proxy, tls) as conn:
        conn.execute("CREATE TEMP TABLE t (v int) ON COMMIT DROP")
        with conn.cursor() as cur, cur.copy("COPY t FROM STDIN") as copy:
            for i in range(200):
                copy.write_row((i,))
        assert conn.execute("SELECT sum(v) FROM t").fetchone() == (19900,)
        conn.commit()
        conn.autocommit = True
        conn.execute("SET search_path = nowhere")
        assert conn.execute("SHOW search_path").fetchone() == ('"$user", public',)
        with pytest.raises(errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")


def key_updates_or_a_large_result(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, POOLED))
        c.until_ready()
        if tls:
            c.sock.settimeout(None)
            KeyUpdates(c.sock).request(1 + n % 40)  # type: ignore[arg-type]
            c.sock.settimeout(20)
        c.send(query("SELECT repeat('y', 100) FROM generate_series(1, 3000)"))
        rows = [m for m in c.until_ready() if m[0] == b"D"]
        assert len(rows) == 3000
        c.send(codec.terminate())
        c.until_eof()


KINDS: list[Callable[[ProxyHarness, bool, int], None]] = [
    short_and_prepared, pipelined, extended_with_an_error, hang_up, cut_in_a_result, cancelled,
    ended_by_the_compute, garbage, copy_and_session_state, key_updates_or_a_large_result,
]


def held(proxy: ProxyHarness) -> dict[str, Any]:
    async def look() -> dict[str, Any]:
        pooler = proxy.server.ctx.pooler
        assert pooler is not None
        stats = [v.stats for v in pooler.pools(EP)]
        return {"tasks": proxy.server.sessions, "pooled clients": pooler.clients,
                "engine clients": pooler.engine.clients, "cancel keys": len(proxy.server.cancels),
                "servers in use": sum(s.sv_active + s.sv_used for s in stats),
                "waiting": sum(s.cl_waiting for s in stats)}

    return proxy.call(look())


def test_pooled_clients_of_every_shape(proxy: ProxyHarness, caplog: pytest.LogCaptureFixture) -> None:
    numbers = itertools.count()
    lock = threading.Lock()
    ran: Counter[str] = Counter()
    failures: list[str] = []

    def worker() -> None:
        while (n := next(numbers)) < SESSIONS and len(failures) < 5:
            kind = KINDS[n % len(KINDS)]
            tls = (n // len(KINDS)) % 2 == 1
            try:
                kind(proxy, tls, n)
            except (Exception, ssl.SSLError) as exc:
                with lock:
                    failures.append(f"{kind.__name__} (tls={tls}, #{n}): {exc!r}")
            with lock:
                ran[kind.__name__] += 1

    started = time.monotonic()
    with caplog.at_level("ERROR"):
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures
        idle = {"tasks": 0, "pooled clients": 0, "engine clients": 0, "cancel keys": 0, "servers in use": 0,
                "waiting": 0}
        deadline = time.monotonic() + 20
        while (state := held(proxy)) != idle and time.monotonic() < deadline:
            time.sleep(0.05)
    assert state == idle, state
    assert sum(ran.values()) == SESSIONS and set(ran) == {k.__name__ for k in KINDS}, ran
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text[-3000:]
    print(f"\n{SESSIONS} pooled sessions in {time.monotonic() - started:.1f} s: {dict(ran)}")

"""Sessions of every shape through the C relay at once: short, pipelined, plaintext and TLS, hung up
early or late (FIN or reset), cut in the middle of a result, cancelled, closed by the proxy, ended
by the compute, garbage, KeyUpdates. Each checks its own outcome; at the end the proxy and the relay
thread must hold nothing (tasks, sessions, cancel keys, activity, buffered bytes).

The normal suite runs a few hundred. `make test-asan` (scripts/test-asan) runs thousands against
the relay built with AddressSanitizer and UBSan: ARGON_RELAY_STRESS sets the count,
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

from argon.proxy import native
from argon.proxy.tls import TlsConfig, TlsFiles, ensure_certificates
from argon.wire import codec
from tests.fixtures.fake_control import FakeControl, ProxyHarness
from tests.fixtures.raw_client import KeyUpdates, RawClient, backend_key, error_code, login, query
from tests.fixtures.scratch_pg import ScratchPostgres, scratch_pg  # noqa: F401 - fixture

pytestmark = [pytest.mark.pg, pytest.mark.skipif(not native.AVAILABLE, reason="the native relay is not built")]

SESSIONS = int(os.environ.get("ARGON_RELAY_STRESS", "240"))
ASAN_BUILD = os.environ.get("ARGON_RELAY_ASAN")
if ASAN_BUILD:  # the sanitizer runtime is for this process only, not for the Postgres it starts
    os.environ.pop("LD_PRELOAD", None)

EP, EP_CLOSED = "ep-stress", "ep-stress-closed"  # the proxy closes the second one's sessions
USER, PASSWORD = "sam", "sam-pw-1"


@pytest.fixture(scope="module")
def proxy(scratch_pg: ScratchPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHarness]:  # noqa: F811
    certs: TlsFiles = ensure_certificates(tmp_path_factory.mktemp("tls"), "argon.test")
    control = FakeControl()
    verifier = scratch_pg.create_role(USER, PASSWORD)
    for endpoint in (EP, EP_CLOSED):
        control.add_endpoint(endpoint, scratch_pg.socket_path)
        control.set_secret(endpoint, USER, verifier)
    harness = ProxyHarness(control, tls=TlsConfig(certs.cert, certs.key), relay="native")
    yield harness
    harness.stop()


def test_the_sanitized_relay_is_the_one_loaded() -> None:
    if not ASAN_BUILD:
        pytest.skip("not a sanitizer run")
    from argon.proxy import _relay

    assert os.path.realpath(_relay.__file__).startswith(os.path.realpath(ASAN_BUILD)), _relay.__file__
    with open("/proc/self/maps") as maps:
        assert "libasan" in maps.read()
    assert native.TLS_AVAILABLE, "TLS sessions must be relayed by the sanitized C code too"


# One session each: (proxy, tls, n) -> None, raising when the session did not go as it should.

def short(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with psycopg.connect(host="127.0.0.1", port=proxy.port, user=USER, dbname=USER, password=PASSWORD,
                         sslmode="require" if tls else "disable", options=f"endpoint={EP}", connect_timeout=20,
                         autocommit=True) as conn:
        assert conn.execute("SELECT %s::int", [n]).fetchone() == (n,)


def pipelined(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, EP) + query(f"SELECT {n}") + query("SELECT 2") + codec.terminate())
        messages = c.until_eof()
    rows = [p for t, p in messages if t == b"D"]
    assert len(rows) == 2 and rows[0].endswith(str(n).encode()), messages
    assert [t for t, _ in messages].count(b"Z") == 3


def hang_up_at_once(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, EP) + query("SELECT 1") + codec.terminate())
        if n % 2:
            c.reset()


def hang_up_once_answered(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, EP) + codec.terminate())
        c.until_ready()
        if n % 2:
            c.reset()


def cut_in_a_result(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls, rcvbuf=8192) as c:
        c.send(login(USER, PASSWORD, EP) + query("SELECT repeat('x', 1000) FROM generate_series(1, 5000)"))
        c.until_ready()
        for _ in range(20 + n % 50):
            assert c.message() is not None
        c.reset() if n % 2 else c.close()


def cancelled(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, EP))
        pid, secret = backend_key(c.until_ready())
        c.send(query("SELECT pg_sleep(30)"))
        c.sock.settimeout(0.1)
        for _ in range(100):  # until the query runs: a cancel that comes first cancels nothing
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


def closed_by_the_proxy(proxy: ProxyHarness, tls: bool, n: int) -> None:
    """Every session of EP_CLOSED is closed through the relay's close() by whoever gets here: the
    others' may be anywhere (logging in, just handed over), so only the end is checked."""
    async def close_them() -> None:
        relays = proxy.server.ctx.relays
        assert relays is not None
        for session in list(relays._sessions.values()):
            if session.activity.endpoint_id == EP_CLOSED:
                session.close()

    with RawClient(proxy.port, tls=tls) as c:
        try:
            c.send(login(USER, PASSWORD, EP_CLOSED) + query("SELECT 1"))
            c.until_ready()
            c.until_ready()
        except (ConnectionError, ssl.SSLError):
            pass
        proxy.call(close_them())
        c.until_eof()


def ended_by_the_compute(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, EP) + query("SELECT pg_terminate_backend(pg_backend_pid())"))
        assert error_code(c.until_eof()) == "57P01"


def garbage(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, EP))
        c.until_ready()
        junk = b"\x17\x03\x03\x00\x20" + b"garbage!" * 4 if tls else b"?\x00\x00\x00\x08junk"
        os.write(c.sock.fileno(), junk)  # under TLS: a record that does not decrypt
        c.until_eof()


def key_updates_or_a_large_result(proxy: ProxyHarness, tls: bool, n: int) -> None:
    with RawClient(proxy.port, tls=tls) as c:
        c.send(login(USER, PASSWORD, EP))
        c.until_ready()
        if tls:
            c.sock.settimeout(None)  # SSL_do_handshake below writes on the socket itself
            KeyUpdates(c.sock).request(1 + n % 40)  # type: ignore[arg-type]
            c.sock.settimeout(20)
        c.send(query("SELECT repeat('y', 100) FROM generate_series(1, 3000)"))
        rows = [m for m in c.until_ready() if m[0] == b"D"]
        assert len(rows) == 3000
        c.send(codec.terminate())
        c.until_eof()


KINDS: list[Callable[[ProxyHarness, bool, int], None]] = [
    short, pipelined, hang_up_at_once, hang_up_once_answered, cut_in_a_result, cancelled, closed_by_the_proxy,
    ended_by_the_compute, garbage, key_updates_or_a_large_result,
]


def held(proxy: ProxyHarness) -> dict[str, Any]:
    async def look() -> dict[str, Any]:
        relays = proxy.server.ctx.relays
        assert relays is not None
        return {"tasks": proxy.server.sessions, "native": relays.sessions, "cancel keys": len(proxy.server.cancels),
                "activity": sum(proxy.activity.snapshot(e).sessions for e in (EP, EP_CLOSED)),
                "relay (sessions, buffered)": relays.core.stats()[:2]}  # [2:]: bytes relayed in all

    return proxy.call(look())


def test_sessions_of_every_shape(proxy: ProxyHarness, caplog: pytest.LogCaptureFixture) -> None:
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
            except Exception as exc:
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
        idle = {"tasks": 0, "native": 0, "cancel keys": 0, "activity": 0, "relay (sessions, buffered)": (0, 0)}
        deadline = time.monotonic() + 20
        while (state := held(proxy)) != idle and time.monotonic() < deadline:
            time.sleep(0.05)
    assert state == idle, state
    assert sum(ran.values()) == SESSIONS and set(ran) == {k.__name__ for k in KINDS}, ran
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text[-3000:]
    print(f"\n{SESSIONS} sessions in {time.monotonic() - started:.1f} s: {dict(ran)}")

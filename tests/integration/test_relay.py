"""The relay after login, both implementations (the C thread and the Python protocols), each with
plaintext and TLS clients, through a real proxy to a real Postgres: bytes both ways under
backpressure, pipelining, the activity the suspend policy reads, every way a session ends.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import sysconfig
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from argon.proxy import native, pipe
from argon.proxy.handshake import MessageStream
from argon.proxy.tls import TlsConfig, TlsFiles, ensure_certificates
from argon.wire import codec
from tests.fixtures.fake_control import FakeControl, ProxyHarness
from tests.fixtures.raw_client import KeyUpdates, RawClient, login
from tests.fixtures.scratch_pg import ScratchPostgres, scratch_pg  # noqa: F401 - fixture

pytestmark = pytest.mark.pg

EP = "ep-relay"
ROLES = {"rita": "rita-pw-1", "rob": "rob-pw-1"}


def test_the_native_relay_is_built_where_a_compiler_is() -> None:
    """CI installs with gcc and the Python headers present: the C relay must then exist."""
    headers = sysconfig.get_paths()["include"] + "/Python.h"
    if shutil.which("cc") is None or not os.path.exists(headers):
        pytest.skip("no C compiler or Python headers: the proxy relays in Python")
    assert native.AVAILABLE, "argon.proxy._relay was not built; see the pip install output"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_certificates(tmp_path_factory.mktemp("tls"), "argon.test")


@pytest.fixture(scope="module")
def control(scratch_pg: ScratchPostgres) -> FakeControl:  # noqa: F811
    control = FakeControl()
    control.add_endpoint(EP, scratch_pg.socket_path)
    for role, password in ROLES.items():
        control.set_secret(EP, role, scratch_pg.create_role(role, password))
    return control


SSLMODES: dict[int, str] = {}  # id(harness) -> the sslmode its tests connect with


@pytest.fixture(scope="module", params=["native-plain", "native-tls", "python-plain", "python-tls"])
def proxy(request: pytest.FixtureRequest, control: FakeControl, certs: TlsFiles) -> Iterator[ProxyHarness]:
    relay, transport = request.param.split("-")
    if relay == "native" and not native.AVAILABLE:
        pytest.skip("the native relay is not built")
    harness = ProxyHarness(control, tls=TlsConfig(certs.cert, certs.key), relay=relay)
    assert harness.server.relay_name == relay
    SSLMODES[id(harness)] = "require" if transport == "tls" else "disable"
    yield harness
    harness.stop()


def native_expected(proxy: ProxyHarness) -> bool:
    if proxy.server.relay_name != "native":
        return False
    return SSLMODES.get(id(proxy)) == "disable" or native.TLS_AVAILABLE


def connect(proxy: ProxyHarness, user: str = "rita", **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(host="127.0.0.1", port=proxy.port, user=user, dbname=user, password=ROLES[user],
                           sslmode=SSLMODES.get(id(proxy), "disable"), options=f"endpoint={EP}", connect_timeout=10,
                           **kw)


def wait_for(predicate: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def relayed_natively(proxy: ProxyHarness) -> int:
    async def count() -> int:
        relays = proxy.server.ctx.relays
        return relays.sessions if relays is not None else 0

    return proxy.call(count())


def test_queries_and_a_large_result(proxy: ProxyHarness) -> None:
    with connect(proxy, autocommit=True) as conn:
        assert relayed_natively(proxy) == (1 if native_expected(proxy) else 0)
        if SSLMODES[id(proxy)] == "require":
            assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
        rows = conn.execute("SELECT g, repeat('x', 1000) FROM generate_series(1, 20000) g").fetchall()
        assert len(rows) == 20000 and rows[-1][0] == 20000 and rows[-1][1] == "x" * 1000


def test_copy_in_and_out_under_backpressure(proxy: ProxyHarness) -> None:
    """20 MB each way: the writer outruns the reader on both sides, nothing is lost or reordered."""
    line = ("y" * 990 + "\n").encode()
    with connect(proxy, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE t (v text)")
        with conn.cursor() as cur, cur.copy("COPY t FROM STDIN") as copy:
            for _ in range(20000):
                copy.write(line)
        assert conn.execute("SELECT count(*), sum(length(v)) FROM t").fetchone() == (20000, 20000 * 990)
        received = bytearray()
        with conn.cursor() as cur, cur.copy("COPY t TO STDOUT") as copy:
            for chunk in copy:
                received += chunk
        assert len(received) == 20000 * len(line) and received.count(b"\n") == 20000


def test_a_slow_reader_holds_the_compute_back(proxy: ProxyHarness, scratch_pg: ScratchPostgres) -> None:  # noqa: F811
    """A client that stops reading a 200 MB result: the relay buffers at most one read, so the
    backend ends up blocked sending (ClientWrite) instead of the proxy holding the result."""
    slow = connect(proxy, user="rob", autocommit=True)
    try:
        slow.pgconn.send_query(b"SELECT repeat('z', 1000000) FROM generate_series(1, 200)")

        def blocked() -> bool:
            rows = scratch_pg.execute("SELECT wait_event FROM pg_stat_activity WHERE usename = 'rob'")
            return [tuple(r) for r in rows] == [("ClientWrite",)]

        wait_for(blocked, timeout=20)
        time.sleep(0.3)
        assert blocked()
        scratch_pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'rob'")
    finally:
        slow.close()
    wait_for(lambda: proxy.activity.snapshot(EP).sessions == 0)


def test_the_native_relay_drives_tls_where_python_links_openssl() -> None:
    """Debian's and python.org's CPython link _ssl to a shared libssl: TLS must go native there."""
    import _ssl

    if native.AVAILABLE and getattr(_ssl, "__file__", None):
        assert native.TLS_AVAILABLE


def test_pipelined_query_after_the_password(proxy: ProxyHarness) -> None:
    burst = (codec.startup_message({"user": "rita", "database": "rita"})
             + codec.password_message(f"endpoint={EP};{ROLES['rita']}")
             + b"Q" + (len(b"SELECT 4242\0") + 4).to_bytes(4, "big") + b"SELECT 4242\0" + codec.terminate())
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(burst)
        data = b""
        sock.settimeout(10)
        while chunk := sock.recv(65536):
            data += chunk
    assert b"4242" in data and data.count(b"Z\x00\x00\x00\x05I") == 2


def test_activity_tracks_queries_and_transactions(proxy: ProxyHarness) -> None:
    with connect(proxy, autocommit=True) as conn:
        assert proxy.activity.snapshot(EP).busy == 0
        done = threading.Event()
        worker = threading.Thread(target=lambda: (conn.execute("SELECT pg_sleep(0.5)"), done.set()))
        worker.start()
        wait_for(lambda: proxy.activity.snapshot(EP).busy == 1 or done.is_set())
        assert not done.is_set()
        worker.join()
        assert proxy.activity.snapshot(EP).busy == 0
        conn.execute("BEGIN")
        assert proxy.activity.snapshot(EP).busy == 1  # idle in transaction keeps the compute awake
        before = proxy.activity.snapshot(EP).last_activity
        time.sleep(0.05)
        conn.execute("COMMIT")
        snap = proxy.activity.snapshot(EP)
        assert snap.busy == 0 and snap.sessions == 1
        assert snap.last_activity is not None and before is not None and snap.last_activity > before
        assert abs(snap.last_activity - time.monotonic()) < 1  # the clock of time.monotonic()
    wait_for(lambda: proxy.activity.snapshot(EP).sessions == 0)


def test_terminate_ends_the_backend_at_once(proxy: ProxyHarness, scratch_pg: ScratchPostgres) -> None:  # noqa: F811
    conn = connect(proxy, user="rob")
    assert conn.execute("SELECT 1").fetchone() == (1,)
    wait_for(lambda: scratch_pg.backends("rob") == 1)
    conn.close()
    start = time.monotonic()
    wait_for(lambda: scratch_pg.backends("rob") == 0)
    assert time.monotonic() - start < 0.5
    wait_for(lambda: relayed_natively(proxy) == 0)


def test_a_killed_backend_reaches_the_client_as_its_fatal_error(proxy: ProxyHarness) -> None:
    with connect(proxy, autocommit=True) as victim, connect(proxy, autocommit=True) as admin:
        pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(psycopg.OperationalError, match="terminating connection due to administrator command"):
            victim.execute("SELECT 1")
    wait_for(lambda: proxy.activity.snapshot(EP).sessions == 0)


def test_a_vanished_client_ends_its_backend(proxy: ProxyHarness, scratch_pg: ScratchPostgres) -> None:  # noqa: F811
    conn = connect(proxy, user="rob")
    conn.execute("SELECT 1")
    wait_for(lambda: scratch_pg.backends("rob") == 1)
    os.close(conn.pgconn.socket)  # the client's socket goes away without a Terminate
    wait_for(lambda: scratch_pg.backends("rob") == 0)
    wait_for(lambda: proxy.activity.snapshot(EP).sessions == 0)


def test_a_broken_stream_ends_only_its_own_session(proxy: ProxyHarness) -> None:
    """Garbage inside one client's stream (not a TLS record, or not a Postgres message) ends that
    session; the others on the same relay thread go on (with TLS: one session's OpenSSL error must
    not leak into the next one's)."""
    with connect(proxy, autocommit=True) as good, connect(proxy, autocommit=True) as bad:
        assert good.execute("SELECT 1").fetchone() == (1,)
        os.write(bad.pgconn.socket, b"\x17\x03\x03\x00\x20" + b"garbage!" * 8)
        with pytest.raises(psycopg.OperationalError):
            bad.execute("SELECT 1")
        for _ in range(5):
            assert good.execute("SELECT 2").fetchone() == (2,)
        with connect(proxy, autocommit=True) as later:
            assert later.execute("SELECT 3").fetchone() == (3,)


def in_threads(work: Any, n: int, timeout: float) -> list[BaseException]:
    """Run work(0) .. work(n - 1) on n threads at once; what they raised."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # pragma: no cover - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


def test_many_concurrent_sessions(proxy: ProxyHarness) -> None:
    def work(i: int) -> None:
        with connect(proxy, autocommit=True) as conn:
            for j in range(20):
                assert conn.execute("SELECT %s::int * %s::int", [i, j]).fetchone() == (i * j,)

    errors = in_threads(work, 40, 60)
    assert not errors, errors[0]
    wait_for(lambda: proxy.activity.snapshot(EP).sessions == 0)


def test_a_stream_of_short_sessions(proxy: ProxyHarness, caplog: pytest.LogCaptureFixture) -> None:
    """Hundreds of connect-query-close cycles from four threads: every hand-over to the relay and
    every end of a session races with the next. With TLS this caught the C thread and uvloop's
    SSL protocol using one BIO at once (heap corruption, "bad record type", a crashed proxy)."""
    def work(i: int) -> None:
        for j in range(100):
            with connect(proxy, autocommit=True) as conn:
                assert conn.execute("SELECT %s::int + %s::int", [i, j]).fetchone() == (i + j,)

    with caplog.at_level("ERROR"):
        errors = in_threads(work, 4, 120)
    assert not errors, errors[0]
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text[-2000:]
    wait_for(lambda: proxy.activity.snapshot(EP).sessions == 0)


def test_tls_reaches_the_c_thread_only_after_python_let_go(proxy: ProxyHarness,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop's SSLProtocol.connection_lost still reads the outgoing BIO after the abort, and the app
    protocol's connection_lost is scheduled after that read: a TLS session may be added to the C
    thread only once the client stream saw its connection_lost."""
    if not native_expected(proxy) or SSLMODES[id(proxy)] != "require":
        pytest.skip("native TLS sessions only")
    events: list[tuple[str, bool]] = []
    lost = MessageStream.connection_lost

    def record_lost(stream: MessageStream, exc: Exception | None) -> None:
        tls = stream.transport is not None and stream.transport.get_extra_info("ssl_object") is not None
        events.append(("lost", tls))
        lost(stream, exc)

    class Recorder:
        def __init__(self, core: Any) -> None:
            self.core = core

        def add(self, *args: Any) -> int:
            events.append(("add", args[4] is not None))
            return self.core.add(*args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.core, name)

    relays = proxy.server.ctx.relays
    assert relays is not None
    monkeypatch.setattr(MessageStream, "connection_lost", record_lost)
    monkeypatch.setattr(relays, "core", Recorder(relays.core))
    for _ in range(3):
        events.clear()
        with connect(proxy, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert ("add", True) in events
        assert ("lost", True) in events[:events.index(("add", True))], events


def test_stopping_the_proxy_closes_relayed_sessions(control: FakeControl, certs: TlsFiles) -> None:
    for mode in ("native", "python") if native.AVAILABLE else ("python",):
        harness = ProxyHarness(control, tls=TlsConfig(certs.cert, certs.key), relay=mode)
        try:
            conn = connect(harness)
            conn.execute("SELECT 1")
        finally:
            harness.stop()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        conn.close()


def everything_ended(proxy: ProxyHarness) -> tuple[int, int, int, int]:
    """What the proxy still holds for sessions: session tasks, native sessions, cancel keys, activity."""
    async def count() -> tuple[int, int, int, int]:
        relays = proxy.server.ctx.relays
        return (proxy.server.sessions, relays.sessions if relays is not None else 0, len(proxy.server.cancels),
                proxy.activity.snapshot(EP).sessions)

    return proxy.call(count())


def test_sessions_that_end_at_once_all_end(proxy: ProxyHarness, caplog: pytest.LogCaptureFixture) -> None:
    """Logins that pipeline Terminate and hang up once answered (half of them with a reset), beside
    short ordinary sessions: each one ends in the proxy too. The C relay once read a session's id
    after the relay thread could have freed it, and a session filed under a garbage id never ended:
    its task, cancel key, activity entry and buffers stayed for good (~1-2% of them)."""
    tls = SSLMODES[id(proxy)] == "require"

    def hang_up(i: int) -> None:
        for j in range(75):
            with RawClient(proxy.port, tls=tls) as client:
                client.send(login("rita", ROLES["rita"], EP) + codec.terminate())
                client.until_ready()
                if j % 2:
                    client.reset()

    def work(i: int) -> None:
        if i < 3:
            return hang_up(i)
        for j in range(50):
            with connect(proxy, autocommit=True) as conn:
                assert conn.execute("SELECT %s::int", [j]).fetchone() == (j,)

    with caplog.at_level("ERROR"):
        errors = in_threads(work, 4, 120)
        assert not errors, errors[0]
        deadline = time.monotonic() + 15
        while (held := everything_ended(proxy)) != (0, 0, 0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert held == (0, 0, 0, 0), f"(tasks, native sessions, cancel keys, activity) still held: {held}"
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text[-2000:]

def held_by_relays(proxy: ProxyHarness) -> int:
    """Bytes the proxy holds in relayed sessions' buffers: the C thread's, or the Python relay's
    transports' (uvloop's SSL transport counts its BIOs; the socket transport under it is added)."""
    async def held() -> int:
        relays = proxy.server.ctx.relays
        total = relays.buffered if relays is not None else 0
        for obj in gc.get_objects():
            # `type`, not `isinstance`: a weak proxy to a dead object raises on `isinstance` (CI)
            if type(obj) is pipe.Relay and not obj.done.done():
                for half in (obj.client, obj.compute):
                    transport: Any = half.transport
                    total += transport.get_write_buffer_size()
                    inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
                    total += inner.get_write_buffer_size() if inner is not None else 0
        return total

    return proxy.call(held())


@pytest.mark.slow
def test_a_tls_client_that_never_reads_cannot_grow_the_proxy(proxy: ProxyHarness) -> None:
    """A TLS 1.3 client floods KeyUpdate requests and never reads the answers: the relay stops
    reading it once answers wait for it, instead of buffering them without bound (both relays
    once held most of what was sent: ~6 and ~10 MB of 12.6 MB). The kernel's socket buffers take
    the first few MB (at most tcp_wmem's maximum, 4 MB by default), hence the 8 MB sent."""
    if SSLMODES[id(proxy)] != "require":
        pytest.skip("TLS only")
    with RawClient(proxy.port, tls=True, rcvbuf=4096) as client:  # a small window: the client's kernel takes little
        client.send(login("rob", ROLES["rob"], EP))
        client.until_ready()
        wait_for(lambda: relayed_natively(proxy) == (1 if native_expected(proxy) else 0))
        sent = KeyUpdates(client.sock).flood(8 << 20, stall=1.0)  # type: ignore[arg-type]
        held = held_by_relays(proxy)
    assert held < 1536 << 10, f"the proxy holds {held} bytes for a client that sent {sent} and read none"
    wait_for(lambda: everything_ended(proxy) == (0, 0, 0, 0), timeout=10)

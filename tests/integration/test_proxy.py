"""The proxy with real clients (psql/libpq 15, psycopg/libpq 18, asyncpg) in front of a real Postgres.

`FakeControl` stands in for the control plane; everything else is real: TLS with generated
certificates, SCRAM(-PLUS) at the proxy, ClientKey pass-through to Postgres, cancel keys, relay.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from argon.errors import ArgonError
from argon.proxy.session import plaintext_allowed
from argon.proxy.throttle import Throttle
from argon.proxy.tls import TlsConfig, TlsFiles, ensure_certificates
from argon.wire import codec
from argon.wire.scram import ScramSecret
from tests.fixtures.fake_control import FakeControl, ProxyHarness
from tests.fixtures.scratch_pg import ScratchPostgres, scratch_pg  # noqa: F401 - fixture

pytestmark = pytest.mark.pg

EP = "ep-one"
DOMAIN = "argon.test"
ROLES = {"alice": "alice-pw-1", "term": "term-pw-1", "carol": "carol-pw-1", "dave": "dave-pw-1"}
FAILED = "password authentication failed for user '{}'"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_certificates(tmp_path_factory.mktemp("tls"), DOMAIN)


@pytest.fixture(scope="module")
def control(scratch_pg: ScratchPostgres) -> FakeControl:  # noqa: F811
    control = FakeControl()
    control.add_endpoint(EP, scratch_pg.socket_path)
    for role, password in ROLES.items():
        control.set_secret(EP, role, scratch_pg.create_role(role, password))
    control.add_endpoint("ep-gone", "/tmp/argon-no-such-dir/.s.PGSQL.5432")
    control.set_secret("ep-gone", "alice", control.secrets[(EP, "alice")])
    return control


@pytest.fixture(scope="module")
def proxy(control: FakeControl, certs: TlsFiles) -> Iterator[ProxyHarness]:
    harness = ProxyHarness(control, tls=TlsConfig(certs.cert, certs.key), domain=DOMAIN)
    yield harness
    harness.stop()


def connect(proxy: ProxyHarness, user: str = "alice", password: str | None = None, **kw: Any) -> psycopg.Connection[Any]:
    params: dict[str, Any] = {"host": "127.0.0.1", "port": proxy.port, "user": user, "dbname": user,
                              "password": ROLES.get(user, "x") if password is None else password,
                              "sslmode": "require", "options": f"endpoint={EP}", "connect_timeout": 10}
    params.update(kw)
    return psycopg.connect(**{k: v for k, v in params.items() if v is not None})


def fails_with(message: str, **kw: Any) -> None:
    with pytest.raises(psycopg.OperationalError) as err:
        connect(**kw).close()
    assert message in str(err.value), str(err.value)


def scalar(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


# libpq 15 (psql) ---------------------------------------------------------------------------------

def psql(proxy: ProxyHarness, conninfo: str, sql: str, sslmode: str = "require") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGPASSWORD": ROLES["alice"], "PGSSLMODE": sslmode, "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql,
                           f"host=127.0.0.1 port={proxy.port} user=alice dbname=alice {conninfo}"],
                          env=env, capture_output=True, text=True, timeout=30)


def test_psql_tls_with_options(proxy: ProxyHarness) -> None:
    out = psql(proxy, f"options=endpoint={EP}", "SELECT current_user || ' ' || ssl FROM pg_stat_ssl "
               "JOIN pg_stat_activity USING (pid) WHERE pid = pg_backend_pid()")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "alice false"  # TLS ends at the proxy; the compute hop is a Unix socket


def test_psql_plaintext_from_loopback(proxy: ProxyHarness) -> None:
    out = psql(proxy, f"options=endpoint={EP}", "SELECT 7", sslmode="disable")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "7"


def test_psql_channel_binding_required(proxy: ProxyHarness) -> None:
    out = psql(proxy, f"options=endpoint={EP} channel_binding=require", "SELECT 8")
    assert out.returncode == 0, out.stderr


# libpq 18 (psycopg) ------------------------------------------------------------------------------

def test_scram_plus_required(proxy: ProxyHarness) -> None:
    with connect(proxy, channel_binding="require") as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, "SELECT current_user") == "alice"


def test_direct_ssl(proxy: ProxyHarness) -> None:
    with connect(proxy, sslnegotiation="direct", channel_binding="require") as conn:
        assert scalar(conn, "SELECT 1") == 1


def test_sni_routing_with_verify_full(proxy: ProxyHarness, certs: TlsFiles) -> None:
    with connect(proxy, host=f"{EP}.{DOMAIN}", hostaddr="127.0.0.1", options=None, sslmode="verify-full",
                 sslrootcert=str(certs.ca_cert), channel_binding="require") as conn:
        assert scalar(conn, "SELECT current_database()") == "alice"
    with connect(proxy, host=f"{EP}-pooler.{DOMAIN}", hostaddr="127.0.0.1", options=None,
                 sslmode="verify-full", sslrootcert=str(certs.ca_cert)) as conn:
        assert scalar(conn, "SELECT 1") == 1
    # The pooled host is the same compute: the control plane is asked about its id, never `-pooler`.
    assert not [ep for ep in proxy.control.wakes if ep.endswith("-pooler")]


def test_sni_and_option_must_agree(proxy: ProxyHarness, certs: TlsFiles) -> None:
    fails_with("Inconsistent project name inferred from SNI ('ep-one') and project option ('ep-two').",
               proxy=proxy, host=f"{EP}.{DOMAIN}", hostaddr="127.0.0.1", options="endpoint=ep-two",
               sslmode="verify-full", sslrootcert=str(certs.ca_cert))


def test_protocol_3_2_is_negotiated_down(proxy: ProxyHarness) -> None:
    with connect(proxy, max_protocol_version="3.2") as conn:
        assert conn.pgconn.full_protocol_version == 30000
        assert scalar(conn, "SELECT 2") == 2


def test_filtered_and_forwarded_startup_parameters(proxy: ProxyHarness) -> None:
    with connect(proxy, application_name="argon-test", options=f"endpoint={EP} -c search_path=xyz") as conn:
        assert scalar(conn, "SHOW application_name") == "argon-test"
        assert scalar(conn, "SHOW search_path") == "xyz"


def test_an_endpoint_address_routes_and_only_loopback_is_bound(proxy: ProxyHarness) -> None:
    """ADR 0031: a connection to an endpoint's own address, naming no endpoint, reaches it; an option
    still wins; the listener goes when the endpoint does; nothing beyond loopback is ever bound."""
    async def serve(routes: dict[str, str] | None) -> None:
        proxy.server.serve_addresses(EP, routes)

    with pytest.raises(ValueError, match="loopback"):
        proxy.call(serve({"192.0.2.1": EP}))
    proxy.call(serve({"127.1.0.200": EP, "127.2.0.200": EP + "-pooler"}))
    assert proxy.server.address_listeners == 2
    with connect(proxy, host="127.1.0.200", options=None) as conn:
        assert scalar(conn, "SELECT current_user") == "alice"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):  # the option wins
        connect(proxy, host="127.1.0.200", options="endpoint=ep-nobody")
    proxy.call(serve(None))
    assert proxy.server.address_listeners == 0 and not proxy.server.address_routes

    def refused() -> bool:  # the listener closes once its accept is unregistered (the loop's next turn)
        try:
            socket.create_connection(("127.1.0.200", proxy.port), timeout=5).close()
            return False
        except ConnectionRefusedError:
            return True

    deadline = time.monotonic() + 30
    while not refused():
        assert time.monotonic() < deadline, "the endpoint's address still accepts connections"


def test_password_hack(proxy: ProxyHarness) -> None:
    with connect(proxy, password=f"endpoint={EP};{ROLES['alice']}", options=None) as conn:
        assert scalar(conn, "SELECT current_user") == "alice"
    with connect(proxy, password=f"project={EP}${ROLES['alice']}", options=None, sslmode="disable") as conn:
        assert scalar(conn, "SELECT 1") == 1


def test_password_hack_without_endpoint(proxy: ProxyHarness) -> None:
    fails_with("Endpoint ID is not specified. Either please upgrade the postgres client library (libpq) for SNI",
               proxy=proxy, options=None)


def test_wrong_password_unknown_role_and_endpoint_look_the_same(proxy: ProxyHarness, control: FakeControl,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    wakes = sum(control.wakes.values())
    fails_with(FAILED.format("alice"), proxy=proxy, password="wrong")
    fails_with(FAILED.format("mallory"), proxy=proxy, user="mallory", password="whatever")
    with caplog.at_level("INFO", logger="argon.proxy"):
        fails_with(FAILED.format("alice"), proxy=proxy, options="endpoint=ep-nowhere")
    fails_with(FAILED.format("alice"), proxy=proxy, password="endpoint=ep-nowhere;x", options=None)
    fails_with(FAILED.format("alice"), proxy=proxy, password=f"endpoint={EP};wrong", options=None)
    assert sum(control.wakes.values()) == wakes  # nothing woken for a failed login
    # the operator's log tells the two apart, the client cannot
    assert "on ep-nowhere (no such endpoint) from" in caplog.text, caplog.text


def test_missing_user_and_bad_endpoint_id(proxy: ProxyHarness) -> None:
    reply = raw_startup(proxy, {"database": "x", "options": f"endpoint={EP}"})
    assert b"Parameter 'user' is missing in startup packet." in reply
    assert b"C" + b"XX000\0" in reply and b"SERROR\0" in reply
    reply = raw_startup(proxy, {"user": "alice", "options": "endpoint=ep_bad"})
    assert b"Project name ('ep_bad') must contain only alphanumeric characters and hyphen." in reply


def test_asyncpg_filters_channel_binding(proxy: ProxyHarness) -> None:
    async def run() -> Any:
        conn = await asyncpg.connect(f"postgresql://alice:{ROLES['alice']}@127.0.0.1:{proxy.port}/alice"
                                     f"?sslmode=require&options=endpoint%3D{EP}&channel_binding=require")
        try:
            return await conn.fetchval("SELECT current_user")
        finally:
            await conn.close()

    assert asyncio.run(run()) == "alice"


def test_activity_follows_ready_for_query(proxy: ProxyHarness) -> None:
    with connect(proxy) as conn:
        assert scalar(conn, "SELECT 1") == 1  # psycopg opened a transaction
        assert proxy.activity.snapshot(EP).busy == 1
        conn.commit()
        assert proxy.activity.snapshot(EP).busy == 0
    deadline = time.monotonic() + 5
    while proxy.activity.snapshot(EP).sessions and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.activity.snapshot(EP).sessions == 0


def test_terminate_closes_the_compute_backend_at_once(proxy: ProxyHarness, scratch_pg: ScratchPostgres) -> None:  # noqa: F811
    conn = connect(proxy, user="term")
    assert scalar(conn, "SELECT 1") == 1
    assert scratch_pg.backends("term") == 1
    conn.close()
    start = time.monotonic()
    while scratch_pg.backends("term") and time.monotonic() - start < 5:
        time.sleep(0.005)
    assert scratch_pg.backends("term") == 0
    assert time.monotonic() - start < 0.5


def test_cancel_inside_tls(proxy: ProxyHarness) -> None:
    """libpq 17+'s cancel API (psycopg's cancel_safe) sends the CancelRequest inside TLS."""
    with connect(proxy, autocommit=True) as conn:
        errors: list[BaseException] = []

        def sleep() -> None:
            try:
                conn.execute("SELECT pg_sleep(20)")
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=sleep)
        start = time.monotonic()
        worker.start()
        time.sleep(0.3)
        conn.cancel_safe()
        worker.join(10)
        assert errors and isinstance(errors[0], psycopg.errors.QueryCanceled), errors
        assert time.monotonic() - start < 5
        assert scalar(conn, "SELECT 3") == 3


def test_cancel_in_plaintext_from_psql(proxy: ProxyHarness) -> None:
    """psql 15 cancels on Ctrl-C with the legacy PQcancel: a plaintext CancelRequest on a new socket.
    (In a subprocess: psycopg's legacy cancel() holds the GIL and would freeze the in-process proxy.)"""
    env = {**os.environ, "PGPASSWORD": ROLES["alice"], "PGSSLMODE": "require", "PGCONNECT_TIMEOUT": "10"}
    start = time.monotonic()
    proc = subprocess.Popen(["psql", "-X", "-At", "-c", "SELECT pg_sleep(20)",
                             f"host=127.0.0.1 port={proxy.port} user=alice dbname=alice options=endpoint={EP}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while proxy.activity.snapshot(EP).busy == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "canceling statement due to user request" in err, err
    assert time.monotonic() - start < 8


def test_unknown_cancel_key_is_ignored(proxy: ProxyHarness) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(codec.cancel_request(12345, 67890))
        assert sock.recv(100) == b""


def test_gssenc_is_declined(proxy: ProxyHarness) -> None:
    gssenc = struct.pack("!II", 8, codec.GSSENC_REQUEST_CODE)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(gssenc)
        assert sock.recv(1) == b"N"
        sock.sendall(codec.ssl_request())
        assert sock.recv(1) == b"S"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(sock) as tls_sock:
            tls_sock.sendall(codec.startup_message({"user": "alice", "options": "endpoint=ep_bad"}))
            assert b"must contain only alphanumeric" in recv_all(tls_sock)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(gssenc)
        assert sock.recv(1) == b"N"
        sock.sendall(gssenc)  # only once
        assert recv_all(sock).startswith(b"E")


def test_pipelined_startup_password_and_query(proxy: ProxyHarness) -> None:
    burst = (codec.startup_message({"user": "alice", "database": "alice"})
             + codec.password_message(f"endpoint={EP};{ROLES['alice']}")
             + query_message("SELECT 42") + codec.terminate())
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(burst)
        messages = parse_messages(recv_all(sock))
    types = [t for t, _ in messages]
    assert types[:2] == ["R", "R"] and messages[0][1] == struct.pack("!I", 3) and messages[1][1] == b"\0" * 4
    assert types.count("K") == 1 and types.count("Z") == 2
    assert ("D", struct.pack("!HI", 1, 2) + b"42") in messages


def test_wake_errors_reach_the_client(proxy: ProxyHarness, control: FakeControl) -> None:
    control.wake_errors.append(ArgonError("Control plane request failed: endpoint is disabled"))
    fails_with("Control plane request failed: endpoint is disabled", proxy=proxy)


def test_unreachable_compute_is_retried_then_reported(proxy: ProxyHarness, control: FakeControl) -> None:
    before = control.wakes["ep-gone"]
    fails_with("Couldn't connect to compute node", proxy=proxy, options="endpoint=ep-gone")
    assert control.wakes["ep-gone"] - before == 5


def test_slow_wake_holds_the_client(proxy: ProxyHarness, control: FakeControl) -> None:
    control.wake_delay = 1.0
    try:
        start = time.monotonic()
        with connect(proxy) as conn:
            assert scalar(conn, "SELECT 1") == 1
        assert time.monotonic() - start >= 1.0
    finally:
        control.wake_delay = 0.0


def test_compute_rejection_refreshes_the_verifier(proxy: ProxyHarness, control: FakeControl) -> None:
    key = (EP, "carol")
    in_postgres = control.secrets[key]
    stale = ScramSecret.from_password(ROLES["carol"]).to_string()  # same password, another salt
    control.secrets[key] = stale
    control.refreshed[key] = in_postgres
    # SCRAM: the proxy accepted the stale verifier, Postgres refused; SCRAM cannot be replayed
    fails_with('password authentication failed for user "carol"', proxy=proxy, user="carol")
    assert control.secrets[key] == in_postgres
    with connect(proxy, user="carol") as conn:  # the next attempt uses the refreshed verifier
        assert scalar(conn, "SELECT current_user") == "carol"
    # cleartext: the proxy knows the password, re-checks it against the refreshed verifier and retries
    control.secrets[key] = stale
    control.refreshed[key] = in_postgres
    with connect(proxy, user="carol", password=f"endpoint={EP};{ROLES['carol']}", options=None) as conn:
        assert scalar(conn, "SELECT current_user") == "carol"


def test_plaintext_policy() -> None:
    assert plaintext_allowed("loopback", "127.0.0.1")
    assert plaintext_allowed("loopback", "::1")
    assert plaintext_allowed("loopback", "::ffff:127.0.0.1")
    assert not plaintext_allowed("loopback", "10.1.2.3")
    assert plaintext_allowed("always", "10.1.2.3")
    assert not plaintext_allowed("never", "127.0.0.1")


def test_never_plaintext_and_stop_closes_sessions(control: FakeControl, certs: TlsFiles) -> None:
    harness = ProxyHarness(control, tls=TlsConfig(certs.cert, certs.key), plaintext="never")
    try:
        fails_with("connection is insecure (try using `sslmode=require`)", proxy=harness, sslmode="disable")
        conn = connect(harness)
        assert scalar(conn, "SELECT 1") == 1
        assert harness.sessions() == 1
    finally:
        harness.stop()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()


def test_throttling_bounds_a_wrong_password_loop(control: FakeControl) -> None:
    throttle = Throttle(free_per_ip=1000, free_per_role=2, base_delay=0.1, max_delay=0.4, half_life=600)
    harness = ProxyHarness(control, tls=None, throttle=throttle)
    try:
        took = []
        for _ in range(6):
            start = time.monotonic()
            fails_with(FAILED.format("dave"), proxy=harness, user="dave", password="nope", sslmode="disable")
            took.append(time.monotonic() - start)
        assert max(took[:2]) < 0.2  # a typo or two costs nothing
        assert all(t >= 0.35 for t in took[-3:])  # then every attempt waits...
        assert all(t < 1.0 for t in took)  # ...a bounded time
        with connect(harness, user="dave", sslmode="disable") as conn:  # the right password still works
            assert scalar(conn, "SELECT 1") == 1
    finally:
        harness.stop()


# raw protocol helpers ----------------------------------------------------------------------------

def query_message(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def recv_all(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def parse_messages(data: bytes) -> list[tuple[str, bytes]]:
    out, pos = [], 0
    while pos + 5 <= len(data):
        length = struct.unpack_from("!I", data, pos + 1)[0]
        out.append((chr(data[pos]), data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def raw_startup(proxy: ProxyHarness, params: dict[str, str]) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(codec.startup_message(params))
        return recv_all(sock)


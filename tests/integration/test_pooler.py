"""The transaction pooler on `-pooler` hosts (ADR 0017), each engine (C and Python), plaintext and
TLS, with real clients through a real proxy to a real Postgres: psql, psycopg 3 (auto-prepare),
asyncpg (prepares everything), pgbench in every query mode, and PgBouncer's transaction-mode
caveats. Pools here have two server connections (`pool_size=2`) so clients really share them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors

from argon.proxy.pooler import MAX_CLIENT_CONN
from argon.proxy.pooler import native as native_pooler
from argon.proxy.tls import TlsConfig, TlsFiles, ensure_certificates
from tests.fixtures.fake_control import FakeControl, ProxyHarness
from tests.fixtures.scratch_pg import PG_BIN, ScratchPostgres, scratch_pg  # noqa: F401 - fixture

pytestmark = pytest.mark.pg

EP = "ep-pool"
POOLED = EP + "-pooler"
ROLES = {f"u{i}": f"u{i}-pw" for i in range(1, 13)}


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


SSLMODES: dict[int, str] = {}


@pytest.fixture(scope="module", params=["native-plain", "native-tls", "python-plain", "python-tls"])
def proxy(request: pytest.FixtureRequest, control: FakeControl, certs: TlsFiles) -> Iterator[ProxyHarness]:
    engine, transport = request.param.split("-")
    if engine == "native" and not native_pooler.AVAILABLE:
        pytest.skip("the native pooler is not built")
    harness = ProxyHarness(control, tls=TlsConfig(certs.cert, certs.key), relay=engine, pooler={"pool_size": 2})
    assert harness.server.ctx.pooler is not None and harness.server.ctx.pooler.engine_name == engine
    SSLMODES[id(harness)] = "require" if transport == "tls" else "disable"
    yield harness
    harness.stop()


def dsn(proxy: ProxyHarness, user: str = "u1", endpoint: str = POOLED, **extra: str) -> str:
    parts = {"host": "127.0.0.1", "port": str(proxy.port), "user": user, "dbname": user, "password": ROLES[user],
             "sslmode": SSLMODES.get(id(proxy), "disable"), "options": f"endpoint={endpoint}", "connect_timeout": "10"}
    parts.update(extra)
    return " ".join(f"{k}='{v}'" for k, v in parts.items())


def connect(proxy: ProxyHarness, user: str = "u1", **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn(proxy, user), **kw)


def backends(pg: ScratchPostgres, user: str) -> int:
    return pg.backends(user)


def pool_stats(proxy: ProxyHarness, user: str) -> Any:
    async def get() -> Any:
        assert proxy.server.ctx.pooler is not None
        views = [v for v in proxy.server.ctx.pooler.pools(EP) if v.role == user]
        return views[0].stats if views else None

    return proxy.call(get())


def sessions(proxy: ProxyHarness) -> int:
    """The endpoint's client connections as the suspend policy sees them."""
    async def get() -> int:
        return proxy.activity.snapshot(EP).sessions

    return proxy.call(get())


def wait_for(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_many_clients_share_two_server_connections(proxy: ProxyHarness, scratch_pg: ScratchPostgres) -> None:  # noqa: F811
    conns = [connect(proxy, autocommit=True) for _ in range(12)]
    try:
        if SSLMODES[id(proxy)] == "require":
            assert conns[0].pgconn.ssl_in_use
        pids = set()
        for i, conn in enumerate(conns):
            assert conn.execute("SELECT %s::int * 2", (i,)).fetchone() == (2 * i,)
            pids.add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        assert len(pids) <= 2 and backends(scratch_pg, "u1") <= 2
        stats = pool_stats(proxy, "u1")
        assert stats.cl_idle == 12 and stats.cl_active == 0 and stats.sv_active == 0 and stats.size == 2
        assert stats.xact_count >= 24
    finally:
        for conn in conns:
            conn.close()


def test_psycopg_auto_prepare_follows_clients_across_server_connections(proxy: ProxyHarness) -> None:
    """psycopg prepares a query on the server after 5 executions (prepare_threshold) and then only
    binds it; with two clients taking turns the statement must exist on whichever server comes."""
    a, b = connect(proxy, "u2", autocommit=True), connect(proxy, "u2", autocommit=True)
    try:
        assert a.prepare_threshold == 5
        with b.transaction():  # b holds a server: a's next statements run on the other one
            b.execute("SELECT 1")
            for i in range(8):
                assert a.execute("SELECT %s::int + 100", (i,)).fetchone() == (i + 100,)
        assert a._prepared._names, "psycopg did prepare"
        with a.transaction():  # now a holds the first server, b runs its prepared query on the second
            a.execute("SELECT 1")
            for i in range(8):
                assert b.execute("SELECT %s::int + 100", (i,)).fetchone() == (i + 100,)
        for i in range(8):  # and both, alternating, on whatever is free
            assert a.execute("SELECT %s::int + 100", (i,)).fetchone() == (i + 100,)
            assert b.execute("SELECT %s::int + 100", (i,)).fetchone() == (i + 100,)
        a.execute("DEALLOCATE ALL")  # psycopg's own reset (after ROLLBACK, DROP, ALTER) is honoured
        a._prepared.clear()
        for i in range(8):
            assert a.execute("SELECT %s::int + 100", (i,)).fetchone() == (i + 100,)
    finally:
        a.close()
        b.close()


def test_asyncpg_prepares_everything(proxy: ProxyHarness) -> None:
    url = (f"postgresql://u3:{ROLES['u3']}@127.0.0.1:{proxy.port}/u3?sslmode={SSLMODES[id(proxy)]}"
           f"&options=endpoint%3D{POOLED}")

    async def main() -> None:
        conns = [await asyncpg.connect(url) for _ in range(6)]

        async def work(conn: asyncpg.Connection, n: int) -> None:
            for i in range(30):
                assert await conn.fetchval("SELECT $1::int + $2::int", n, i) == n + i
                async with conn.transaction():
                    await conn.execute("SELECT 1")
                    rows = await conn.fetch("SELECT g FROM generate_series(1, $1::int) g", 3)
                    assert [r["g"] for r in rows] == [1, 2, 3]
            stmt = await conn.prepare("SELECT $1::text || 'x'")
            assert await stmt.fetchval("a") == "ax"

        try:
            await asyncio.gather(*(work(c, n) for n, c in enumerate(conns)))
        finally:
            for conn in conns:
                await conn.close()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench(proxy: ProxyHarness, mode: str) -> None:
    env = dict(os.environ, PGPASSWORD=ROLES["u4"], PGOPTIONS=f"endpoint={POOLED}",
               PGSSLMODE=SSLMODES[id(proxy)])
    base = [str(PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "u4"]
    if mode == "simple":
        init = subprocess.run([*base, "-i", "-s", "1", "-q", "u4"], env=env, capture_output=True, text=True, timeout=120)
        assert init.returncode == 0, init.stderr
    # -j = -c: PG15's pgbench prepares synchronously, one blocked client would stall its thread's others
    out = subprocess.run([*base, "-n", "-c", "4", "-j", "4", "-t", "40", "-M", mode, "u4"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "number of failed transactions: 0" in out.stdout and "number of transactions actually processed: 160" in out.stdout


def test_psql(proxy: ProxyHarness) -> None:
    env = dict(os.environ, PGPASSWORD=ROLES["u5"])
    script = ("CREATE TABLE IF NOT EXISTS notes (id int primary key, body text);\n"
              "BEGIN;\nINSERT INTO notes VALUES (1, 'one') ON CONFLICT DO NOTHING;\nSELECT body FROM notes;\nCOMMIT;\n"
              "\\d notes\n")
    out = subprocess.run([str(PG_BIN / "psql"), dsn(proxy, "u5"), "-X", "-v", "ON_ERROR_STOP=1"], input=script,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "one" in out.stdout and 'Table "public.notes"' in out.stdout


def test_transactions_set_local_and_tracked_parameters(proxy: ProxyHarness) -> None:
    a, b = connect(proxy, "u6"), connect(proxy, "u6", autocommit=True)
    try:
        a.execute("SET LOCAL statement_timeout = '1234ms'")  # psycopg opened a transaction: it holds a server
        assert a.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
        assert b.execute("SHOW statement_timeout").fetchone() == ("0",)  # b got the other server
        a.execute("CREATE TEMP TABLE t (v int) ON COMMIT DROP")
        a.execute("INSERT INTO t VALUES (1), (2)")
        assert a.execute("SELECT sum(v) FROM t").fetchone() == (3,)
        a.commit()
        a.autocommit = True
        assert a.execute("SHOW statement_timeout").fetchone() == ("0",)
        # tracked parameters follow their client to whichever server it gets, and only that client
        a.execute("SET TimeZone = 'Asia/Tokyo'")
        a.execute("SET application_name = 'client-a'")
        for _ in range(4):
            with b.transaction():
                b.execute("SELECT 1")  # b holds one server while a uses the other, then they swap
                assert a.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
            assert b.execute("SHOW TimeZone").fetchone() != ("Asia/Tokyo",)
            assert b.execute("SHOW application_name").fetchone() != ("client-a",)
            assert a.execute("SELECT current_setting('application_name')").fetchone() == ("client-a",)
        assert a.info.parameter_status("TimeZone") == "Asia/Tokyo"
    finally:
        a.close()
        b.close()


def test_session_state_does_not_outlive_its_transaction(proxy: ProxyHarness, scratch_pg: ScratchPostgres) -> None:  # noqa: F811
    """PgBouncer's caveats: session SET, LISTEN, SQL PREPARE, WITH HOLD cursors, session advisory
    locks and temporary tables do not work across transactions; unlike PgBouncer, they do not leak to
    the next client of that server either (DISCARD ALL after the transaction that made them)."""
    a, b = connect(proxy, "u7", autocommit=True), connect(proxy, "u7", autocommit=True)
    try:
        a.execute("SET search_path = nowhere")
        a.execute("SELECT pg_advisory_lock(42)")
        a.execute("CREATE TEMP TABLE scratch (v int)")
        a.execute("PREPARE q AS SELECT 1")
        a.execute("DECLARE c CURSOR WITH HOLD FOR SELECT 1")
        for conn in (a, b):
            assert conn.execute("SHOW search_path").fetchone() == ('"$user", public',)
            assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM pg_prepared_statements WHERE from_sql").fetchone() == (0,)
            with pytest.raises(errors.UndefinedTable):
                conn.execute("SELECT * FROM scratch")
            with pytest.raises(errors.InvalidCursorName):
                conn.execute("FETCH c")
        listener = connect(proxy, "u7", autocommit=True)
        listener.execute("LISTEN chan")
        b.execute("NOTIFY chan, 'hello'")
        time.sleep(0.2)
        assert list(listener.notifies(timeout=0.3, stop_after=1)) == []  # the listener holds no server
        listener.close()
        stats = pool_stats(proxy, "u7")
        assert stats.sv_idle + stats.sv_used <= 2
    finally:
        a.close()
        b.close()


def test_pipelining_and_errors_inside_a_pipeline(proxy: ProxyHarness) -> None:
    with connect(proxy, "u8", autocommit=True) as conn:
        for i in range(6):  # prepared from the 6th execution
            conn.execute("SELECT %s::int", (i,))
        with conn.pipeline():
            c1 = conn.execute("SELECT %s::int", (1,))
            c2 = conn.execute("SELECT %s::int + 1", (2,))
            c3 = conn.execute("SELECT 'x' || %s", ("y",))
        assert (c1.fetchone(), c2.fetchone(), c3.fetchone()) == ((1,), (3,), ("xy",))
        with pytest.raises(errors.DivisionByZero), conn.pipeline():
            conn.execute("SELECT %s::int", (5,))
            conn.execute("SELECT 1 / %s::int", (0,))
            conn.execute("SELECT %s::int", (6,))
        assert conn.execute("SELECT %s::int", (7,)).fetchone() == (7,)


def test_copy_in_and_out(proxy: ProxyHarness) -> None:
    line = ("y" * 990 + "\n").encode()
    with connect(proxy, "u9") as conn:
        conn.execute("CREATE TEMP TABLE t (v text) ON COMMIT DROP")
        with conn.cursor() as cur, cur.copy("COPY t FROM STDIN") as copy:
            for _ in range(5000):
                copy.write(line)
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (5000,)
        received = bytearray()
        with conn.cursor() as cur, cur.copy("COPY t TO STDOUT") as copy:
            for chunk in copy:
                received += chunk
        assert len(received) == 5000 * len(line)
        conn.commit()
    with connect(proxy, "u9", autocommit=True) as conn:  # a COPY IN the server fails half-way
        conn.execute("CREATE TABLE IF NOT EXISTS ints (v int)")
        with pytest.raises(errors.InvalidTextRepresentation), conn.cursor() as cur, cur.copy(
                "COPY ints FROM STDIN") as copy:
            for _ in range(200):
                copy.write(b"not a number\n")
        assert conn.execute("SELECT 42").fetchone() == (42,)


def test_cancel_reaches_the_right_query(proxy: ProxyHarness) -> None:
    victim, bystander = connect(proxy, "u10", autocommit=True), connect(proxy, "u10", autocommit=True)
    try:
        result: dict[str, Any] = {}

        def sleep(conn: psycopg.Connection[Any], key: str, seconds: float) -> None:
            try:
                conn.execute("SELECT pg_sleep(%s)", (seconds,))
                result[key] = "done"
            except errors.QueryCanceled:
                result[key] = "cancelled"

        threads = [threading.Thread(target=sleep, args=(victim, "victim", 10)),
                   threading.Thread(target=sleep, args=(bystander, "bystander", 1.5))]
        for t in threads:
            t.start()
        wait_for(lambda: pool_stats(proxy, "u10").sv_active == 2)
        started = time.monotonic()
        victim.cancel_safe()
        threads[0].join(5)
        assert result.get("victim") == "cancelled" and time.monotonic() - started < 3
        threads[1].join(5)
        assert result.get("bystander") == "done"
        victim.cancel_safe()  # a cancel for a client that holds no server does nothing
        assert victim.execute("SELECT 1").fetchone() == (1,)
    finally:
        victim.close()
        bystander.close()


def test_clients_wait_for_a_free_server_and_a_vanished_client_frees_its_own(
        proxy: ProxyHarness, scratch_pg: ScratchPostgres) -> None:  # noqa: F811
    holders = [connect(proxy, "u11") for _ in range(2)]
    for conn in holders:
        conn.execute("SELECT 1")  # each holds a server in an open transaction
    waiter = connect(proxy, "u11", autocommit=True)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (waiter.execute("SELECT 1"), done.set()))
    worker.start()
    wait_for(lambda: pool_stats(proxy, "u11").cl_waiting == 1)
    assert not done.is_set()
    holders[0].pgconn.finish()  # gone mid-transaction: its server is closed (the transaction rolls back)
    worker.join(10)
    assert done.is_set()
    holders[1].rollback()
    wait_for(lambda: pool_stats(proxy, "u11").sv_active == 0)
    assert backends(scratch_pg, "u11") <= 2
    holders[1].close()
    waiter.close()


def test_startup_parameters_and_the_client_limit(proxy: ProxyHarness) -> None:
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter in options: search_path"):
        psycopg.connect(dsn(proxy, "u12", options=f"endpoint={POOLED} -c search_path=x"))
    url = (f"postgresql://u12:{ROLES['u12']}@127.0.0.1:{proxy.port}/u12?sslmode={SSLMODES[id(proxy)]}"
           f"&options=endpoint%3D{POOLED}")

    async def with_setting() -> None:
        await asyncpg.connect(url, server_settings={"statement_timeout": "5s"})

    with pytest.raises(asyncpg.PostgresError, match="unsupported startup parameter: statement_timeout") as info:
        asyncio.run(with_setting())
    assert "Please use unpooled connection" in str(info.value)
    with psycopg.connect(dsn(proxy, "u12", options=f"endpoint={POOLED} -c TimeZone=Europe/Paris"),
                         application_name="app", autocommit=True) as conn:
        assert conn.info.parameter_status("application_name") == "app"
        assert conn.execute("SHOW TimeZone").fetchone() == ("Europe/Paris",)

    pooler = proxy.server.ctx.pooler
    assert pooler is not None
    limit = pooler.max_clients
    kept = [connect(proxy, "u12") for _ in range(3)]
    try:
        pooler.max_clients = 3
        with pytest.raises(psycopg.OperationalError, match=MAX_CLIENT_CONN.replace("(", r"\(").replace(")", r"\)")):
            connect(proxy, "u12")
    finally:
        pooler.max_clients = limit
        for conn in kept:
            conn.close()


def test_login_needs_no_server_once_the_pool_knows_the_compute(proxy: ProxyHarness, control: FakeControl,
                                                               scratch_pg: ScratchPostgres) -> None:  # noqa: F811
    with connect(proxy, "u1", autocommit=True) as first:
        first.execute("SELECT 1")
    wakes = control.wakes[EP]
    idle = [connect(proxy, "u1") for _ in range(20)]
    try:
        assert control.wakes[EP] == wakes  # answered from the kept greeting
        assert backends(scratch_pg, "u1") <= 2
        assert pool_stats(proxy, "u1").cl_idle >= 20
        assert sessions(proxy) >= 20  # a pool stands for its clients
    finally:
        for conn in idle:
            conn.close()
    wait_for(lambda: sessions(proxy) == 0)  # the pools live on, with no client


def test_the_password_hack_names_the_pooled_host(proxy: ProxyHarness) -> None:
    """A client that can send neither SNI nor options (`endpoint=<id>-pooler;<password>`) is pooled."""
    before = pool_stats(proxy, "u2")
    parts = {k: v for k, v in (p.split("=", 1) for p in dsn(proxy, "u2").split(" ")) if k != "options"}
    parts["password"] = f"'endpoint={POOLED};{ROLES['u2']}'"
    with psycopg.connect(" ".join(f"{k}={v}" for k, v in parts.items()), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        after = pool_stats(proxy, "u2")
        assert after.cl_idle + after.cl_active == (before.cl_idle + before.cl_active if before else 0) + 1


@pytest.mark.slow
def test_a_thousand_idle_clients_hold_no_server(proxy: ProxyHarness, scratch_pg: ScratchPostgres) -> None:  # noqa: F811
    """The suite's small version of the benchmark's 10,000: idle pooled clients cost the compute
    nothing (the pool's two server connections at most) and each stays usable."""
    from tests.fixtures.idle_clients import open_clients

    async def main() -> tuple[int, list[bytes], int]:
        clients, failures = await open_clients({
            "host": "127.0.0.1", "port": proxy.port, "user": "u3", "password": ROLES["u3"], "dbname": "u3",
            "options": f"endpoint={POOLED}", "tls": SSLMODES[id(proxy)] == "require", "n": 1000})
        assert not failures, failures[:3]
        held = await asyncio.get_running_loop().run_in_executor(None, lambda: backends(scratch_pg, "u3"))
        answers = await asyncio.gather(*(c.ping() for c in clients[::50]))
        for c in clients:
            c.close()
        await asyncio.sleep(0.2)
        return len(clients), answers, held

    opened, answers, held = asyncio.run(main())
    assert opened == 1000 and held <= 2
    assert all(a == b"TDCZ" for a in answers), answers
    wait_for(lambda: pool_stats(proxy, "u3").cl_idle + pool_stats(proxy, "u3").cl_active == 0, timeout=20)

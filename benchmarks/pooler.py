"""The transaction pooler on `-pooler` hosts against PgBouncer 1.18 in transaction mode (issue 16).

Run from the repository root, as root or as a user that can run Postgres itself:

    .venv/bin/python -m benchmarks.pooler [--quick] [--json PATH] [--rounds N] [--clients 8,64]
        [--scripts tpcb,select] [--transports tls,plaintext] [--idle-clients 0]

One run starts a whole platform in this process (as the test fixture does), one project (Debian's
PostgreSQL 15), and two PgBouncers (plaintext and TLS, Argon's own certificate) in transaction mode
in front of **the same compute** the proxy pools for, with the same pool size. Then:

1. throughput: `pgbench` TPC-B and `-S` at 8, 64, 512 and 2,000 clients through the pooled host
   and through PgBouncer, TLS and plaintext, in interleaved rounds (which of the two goes first
   alternates), with each one's CPU per transaction and the machine's load during each run;
2. memory per idle client: 10,000 idle client connections (plaintext, then TLS) held open by a
   separate process, through the pooled host and through PgBouncer: the growth of the proxy's
   (this process's) and of PgBouncer's resident memory, divided by 10,000; the compute's backends
   meanwhile (the pool's, not one per client);
3. first query after a suspend: a pooled connection opened before the suspend runs `SELECT 1`
   (the pooler wakes the compute and logs a server in meanwhile), against a normal cold start
   (connect with TLS + SCRAM + `SELECT 1` on the direct host of the same suspended endpoint),
   interleaved.

Clients that time things run in a separate process (`--worker`), so they never compete with the
in-process platform for the GIL. The descriptor limit is raised to the hard limit first (the proxy
holds 10,000 clients; the client process raises its own). Everything started here is stopped by
PID in `finally` blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import resource
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from benchmarks.core.common import (
    NCPU,
    PGBENCH,
    PGBOUNCER,
    REPO_ROOT,
    BenchError,
    as_user,
    free_port,
    own_dir,
    short_tmpdir,
    stop_on_sigterm,
    summarize,
)
from benchmarks.core.procfs import (
    kb_field,
    own_cpu_seconds,
    self_cpu_seconds,
    stop_pid,
    system_cpu_ticks,
    thread_cpu_seconds,
)
from benchmarks.core.targets import Project, start_platform, tls_session, tool_version, with_sslmode

CLIENT_COUNTS = (8, 64, 512, 2000)
SCRIPTS = ("tpcb", "select")  # pgbench's built-in TPC-B-like script, and -S
TRANSPORTS = ("tls", "plaintext")
POOL_SIZE = 20  # both poolers: small enough that two of them fit the compute's max_connections (104)
SCALE = 10
# The compute gets the whole machine (1 CU = 1 CPU, ADR 0019): at the default 0.25 CU its cgroup throttles
# it in nearly every period and both poolers measure that cap instead of themselves.
COMPUTE_CU = float(NCPU)
IDLE_CLIENTS = 10_000
COLD_REPS = 10


class LoginsTooSlow(BenchError):
    """pgbench's -T ran out while its clients were still logging in."""


LOGIN_ALLOWANCE = 0.02  # s per client: TLS + SCRAM logins, one by one in PgBouncer, on a busy 2-core machine


def seconds_for(clients: int, quick: bool) -> int:
    """pgbench -T: its clock includes connecting (2,000 TLS + SCRAM logins through PgBouncer took
    15-35 s here, depending on the load), so a run gets an allowance for its logins and then the
    measured window (4 s quick, 8 s otherwise); quick runs shorten only the window. A login is a
    handful of round trips, each a scheduling delay on a busy machine: the allowance grows with
    the load average per CPU (up to 5x; at a load of 20 on 2 cores, 2,000 logins took over 48 s)."""
    load = min(5.0, max(1.0, os.getloadavg()[0] / NCPU))
    return math.ceil(clients * LOGIN_ALLOWANCE * load) + (4 if quick else 8)


# The client process --------------------------------------------------------------------------------


def worker_main() -> None:
    """`--worker`: JSON commands on stdin, one JSON line each. `hold_idle` is a process of its own."""
    import psycopg

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held: dict[str, Any] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        t0 = time.perf_counter()
        try:
            op = cmd["op"]
            if op == "hold_idle":
                from tests.fixtures.idle_clients import hold_idle

                asyncio.run(hold_idle(cmd))
                return
            if op == "open":  # a connection kept for later
                held[cmd["name"]] = psycopg.connect(cmd["dsn"], autocommit=True, connect_timeout=60)
            elif op == "query":  # SELECT 1 on a kept connection
                conn = held[cmd["name"]]
                if conn.execute("SELECT 1").fetchone() != (1,) or conn.closed:
                    raise BenchError("SELECT 1 did not return 1")
            elif op == "connect_query":
                with psycopg.connect(cmd["dsn"], autocommit=True, connect_timeout=60) as conn:
                    conn.execute("SELECT 1")
            elif op == "close":
                held.pop(cmd["name"]).close()
            else:
                raise BenchError(f"unknown op {op!r}")
            out: dict[str, Any] = {"ok": True, "ms": (time.perf_counter() - t0) * 1000}
        except Exception as exc:
            out = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip()}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


class Worker:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.pooler", "--worker"], cwd=REPO_ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     start_new_session=True)

    def send(self, cmd: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise BenchError(f"the client process did not answer {cmd['op']} in {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError("the client process died")
        resp = json.loads(line)
        if not resp["ok"]:
            raise BenchError(f"{cmd['op']} failed: {resp['error']}")
        return dict(resp)

    def release(self) -> None:
        """Tell a `hold_idle` worker to close its clients."""
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# PgBouncer in transaction mode ------------------------------------------------------------------------


class TxBouncer:
    """PgBouncer 1.18 in transaction mode in front of the compute's Unix socket, as the compute's OS
    user. Clients authenticate with SCRAM against the role's verifier (what the proxy checks too,
    so neither side runs PBKDF2; pgbench's libpq does, for both), and PgBouncer logs into the
    compute with the client's keys, as Neon's does; TLS required when `tls` = (certificate, key)."""

    def __init__(self, root: Path, socket_dir: Path, user: str, verifier: str, uid: int, gid: int,
                 tls: tuple[Path, Path] | None) -> None:
        self.dir = own_dir(root, uid, gid)
        self.uid, self.gid, self.user, self.tls = uid, gid, user, tls is not None
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        owned = ["userlist.txt", "pgbouncer.ini"]
        tls_conf = ""
        if tls is not None:
            shutil.copyfile(tls[0], self.dir / "server.crt")
            shutil.copyfile(tls[1], self.dir / "server.key")
            os.chmod(self.dir / "server.key", 0o600)
            owned += ["server.crt", "server.key"]
            tls_conf = (f"client_tls_sslmode = require\nclient_tls_cert_file = {self.dir / 'server.crt'}\n"
                        f"client_tls_key_file = {self.dir / 'server.key'}\n")
        (self.dir / "userlist.txt").write_text(f'"{user}" "{verifier}"\n')
        os.chmod(self.dir / "userlist.txt", 0o600)
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={socket_dir} port=5432\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = scram-sha-256\nauth_file = {self.dir / 'userlist.txt'}\n"
            f"pool_mode = transaction\nmax_client_conn = {IDLE_CLIENTS + 500}\ndefault_pool_size = {POOL_SIZE}\n"
            "server_idle_timeout = 2\nignore_startup_parameters = extra_float_digits\n"
            f"{tls_conf}logfile = {self.dir / 'pgbouncer.log'}\n")
        if os.geteuid() == 0:
            for name in owned:
                os.chown(self.dir / name, uid, gid)

    def dsn(self, dbname: str) -> str:
        """libpq takes the password from PGPASSWORD (set by the run)."""
        return (f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname} "
                f"sslmode={'require' if self.tls else 'disable'}")

    @property
    def pid(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError("pgbouncer is not running")
        return self.proc.pid

    def start(self, dbname: str) -> None:
        with open(self.dir / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen([PGBOUNCER, str(self.dir / "pgbouncer.ini")], cwd=self.dir,
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
                                         **as_user(self.uid, self.gid))
        deadline = time.monotonic() + 20
        import psycopg

        while True:
            try:
                with psycopg.connect(self.dsn(dbname), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    log = (self.dir / "pgbouncer.log").read_text()[-600:] if (self.dir / "pgbouncer.log").exists() else ""
                    raise BenchError(f"pgbouncer did not answer: {exc}; {log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        stop_pid(self.proc, signal.SIGTERM)
        self.proc = None


# pgbench -----------------------------------------------------------------------------------------------


def rss_mb(pid: int | str = "self") -> float:
    return kb_field(f"/proc/{pid}/status", "VmRSS") / 1024


def established(port: int) -> int:
    """TCP connections to `port` on this machine that are established (/proc/net/tcp, IPv4)."""
    hexport = f":{port:04X} "
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1].endswith(hexport[:-1]) and fields[3] == "01":
                count += 1
    return count


def pgbench(target: str, port: int, script: str, clients: int, seconds: int,
            cpu: Callable[[], tuple[float, float]], env: dict[str, str]) -> dict[str, Any]:
    """One pgbench run in a session of its own (a CPU-share group of its own, as each server has):
    TPS, the pooler's CPU per transaction (`cpu` gives the whole process's and the pooling engine's
    own: Argon's C thread; all of PgBouncer), and how busy the rest of the machine was. The CPU is
    counted from the moment all clients are connected (pgbench's TPS leaves the connecting out too:
    2,000 TLS + SCRAM logins would otherwise weigh on a few thousand transactions)."""
    args = [PGBENCH, "-n", "-c", str(clients), "-j", "2", "-T", str(seconds), "-M", "simple"]
    if script == "select":
        args.append("-S")
    args.append(target)
    time.sleep(0.3)
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)
    connected: list[tuple[float, tuple[float, float], tuple[int, int]]] = []

    def watch() -> None:  # the moment the last client is connected
        while proc.poll() is None:
            if established(port) >= clients:
                connected.append((time.perf_counter(), cpu(), system_cpu_ticks()))
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, _ = proc.communicate(timeout=seconds + 180)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise BenchError(f"pgbench did not finish: {out[-500:]}") from None
    t_end, cpu_end, sys_after = time.perf_counter(), cpu(), system_cpu_ticks()
    watcher.join()
    wall = t_end - t0
    if not connected:
        raise LoginsTooSlow(f"pgbench never had its {clients} clients connected: {out.strip()[-500:]}")
    t_conn, cpu_conn, sys_before = connected[0]
    window = max(t_end - t_conn, 0.001)
    used, engine_used = cpu_end[0] - cpu_conn[0], cpu_end[1] - cpu_conn[1]
    if proc.returncode != 0:
        raise BenchError(f"pgbench exited with {proc.returncode}: {out.strip()[-800:]}")
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    txns = re.search(r"number of transactions actually processed: (\d+)", out)
    conn = re.search(r"initial connection time = ([\d.]+) ms", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if txns is not None and int(txns.group(1)) == 0:  # -T ran out during the logins
        raise LoginsTooSlow(f"no transactions in pgbench's output: {out.strip()[-800:]}")
    if tps is None or txns is None or int(txns.group(1)) == 0:
        raise BenchError(f"no transactions in pgbench's output: {out.strip()[-800:]}")
    busy, total = sys_after[0] - sys_before[0], sys_after[1] - sys_before[1]
    rate = float(tps.group(1))
    return {"tps": round(rate, 1), "transactions": int(txns.group(1)),
            "failed": int(failed.group(1)) if failed else 0,
            "connect_ms": float(conn.group(1)) if conn else None, "seconds": round(wall, 1),
            "measured_seconds": round(window, 1), "login_seconds": round(t_conn - t0, 1),
            "pooler_cpu_us_per_txn": round(used / (rate * window) * 1e6, 1) if rate else None,
            "engine_cpu_us_per_txn": round(engine_used / (rate * window) * 1e6, 1) if rate else None,
            "machine_busy_percent": round(busy / total * 100, 1) if total else None}


# The run -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    quick: bool
    rounds: int
    counts: tuple[int, ...] = CLIENT_COUNTS
    idle_clients: int = IDLE_CLIENTS
    scripts: tuple[str, ...] = SCRIPTS
    transports: tuple[str, ...] = TRANSPORTS
    root: Path = field(default_factory=lambda: short_tmpdir("ap"))
    rp: Any = None
    project: Project | None = None
    bouncers: dict[str, TxBouncer] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    logins: dict[int, float] = field(default_factory=dict)  # the slowest logins seen, seconds, by client count

    def say(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        self.say(f"{name} ...")
        try:
            yield
        except Exception as exc:  # one failed measurement must not hide the others
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            self.say(f"{name} FAILED: {exc}")
        else:
            self.say(f"{name} done in {time.monotonic() - t0:.0f} s")

    # set-up ----------------------------------------------------------------------------------------

    def uri(self, pooled: bool, tls: bool) -> str:
        assert self.project is not None
        uri = with_sslmode(self.project.uri, "require" if tls else "disable")
        if pooled:
            eid = self.project.endpoint_id
            uri = uri.replace(f"endpoint%3D{eid}", f"endpoint%3D{eid}-pooler")
        return uri

    def start(self) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        (self.root / "argon").mkdir(mode=0o755, exist_ok=True)
        self.rp = start_platform(self.root / "argon")
        proxy = self.rp.platform.proxy
        pooler = proxy.ctx.pooler
        pooler.pool_size = POOL_SIZE  # PgBouncer's default_pool_size below: the same pool on both
        self.project = Project.create(self.rp, "bench-pooler", 15)
        pid, eid = self.project.id, self.project.endpoint_id
        body = {"suspend_timeout_seconds": -1, "autoscaling_limit_min_cu": COMPUTE_CU,
                "autoscaling_limit_max_cu": COMPUTE_CU}
        resp = self.rp.api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": body})
        if resp.status_code != 200:
            raise BenchError(f"PATCH endpoint answered {resp.status_code}: {resp.text[:300]}")
        t0 = time.monotonic()
        init = subprocess.run([PGBENCH, "-i", "-q", "-s", str(SCALE), self.uri(False, True)], capture_output=True,
                              text=True, timeout=600)
        if init.returncode != 0:
            raise BenchError(f"pgbench -i failed: {init.stderr[-500:]}")
        self.say(f"pgbench -i -s {SCALE} in {time.monotonic() - t0:.0f} s")
        socket = Path(self.rp.plane.layout.socket_path(eid))
        owner = socket.stat()
        parts = urlsplit(self.project.uri)
        user = unquote(parts.username or "")
        os.environ["PGPASSWORD"] = unquote(parts.password or "")  # pgbench's password, for both poolers
        verifier = self.rp.call(self.rp.platform.proxy.ctx.control.get_role_secret(eid, user))  # the proxy's seam
        if not verifier:
            raise BenchError(f"no verifier for {user}")
        tls_dir = Path(self.rp.plane.layout.tls_dir)
        for mode, tls in (("plaintext", None), ("tls", (tls_dir / "server.crt", tls_dir / "server.key"))):
            bouncer = TxBouncer(self.root / f"pgb-{mode}", socket.parent, user, verifier, owner.st_uid,
                                owner.st_gid, tls)
            bouncer.start(self.dbname)
            self.bouncers[mode] = bouncer
        import psycopg

        env: dict[str, Any] = {
            "cpus": NCPU, "kernel": os.uname().release, "python": sys.version.split()[0],
            "psycopg": psycopg.__version__, "pgbench": tool_version(PGBENCH), "pgbouncer": tool_version(PGBOUNCER),
            "pooler_engine": pooler.engine_name, "pool_size": POOL_SIZE, "pgbench_scale": SCALE,
            "compute_cu": COMPUTE_CU, "compute_cpu_limit": self.compute_cpu_limit(eid),
            "rounds": self.rounds, "client_counts": list(self.counts), "idle_clients": self.idle_clients,
            "fd_limit": hard, "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "compute_max_connections": self.max_connections(),
            "tls": {"proxy": tls_session(proxy.port), "pgbouncer": tls_session(self.bouncers["tls"].port)},
        }
        self.results["environment"] = env
        self.say(f"environment: {json.dumps(env)}")

    def compute_cpu_limit(self, endpoint_id: str) -> float | str:
        """The CPUs the compute's cgroup allows now, to show the compute is not the cap."""
        assert self.rp is not None
        cgroups = self.rp.plane.computes.cgroups
        limits = cgroups.limits(endpoint_id) if cgroups is not None else None
        return limits.cpus if limits is not None else "not enforced"

    @property
    def dbname(self) -> str:
        assert self.project is not None
        return urlsplit(self.project.uri).path.lstrip("/")

    def max_connections(self) -> int:
        import psycopg

        with psycopg.connect(self.uri(False, True)) as conn:
            return int(conn.execute("SHOW max_connections").fetchone()[0])

    def stop(self) -> None:
        for bouncer in self.bouncers.values():
            bouncer.stop()
        if self.rp is not None:
            self.rp.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # 1. throughput ---------------------------------------------------------------------------------

    def throughput(self) -> None:
        env = dict(os.environ)
        out = self.results.setdefault("throughput", {})
        # Uncounted warm-up through each: the pools open their server connections, the compute's
        # pages and its backends' caches fill (the first runs were 20-30% slower than the later ones).
        for transport in TRANSPORTS:
            tls = transport == "tls"
            bouncer = self.bouncers[transport]
            targets = ((self.uri(True, tls), self.rp.platform.proxy.port), (bouncer.dsn(self.dbname), bouncer.port))
            for target, port in targets:
                pgbench(target, port, "tpcb", 8, 4 if self.quick else 8, lambda: (0.0, 0.0), env)
        for clients in self.counts:
            seconds = seconds_for(clients, self.quick)
            for script in self.scripts:
                for transport in self.transports:
                    key = f"{script} c={clients} {transport}"
                    with self.section(f"pgbench {key}"):
                        out[key] = self.pair(script, clients, transport, seconds, env)

    def pair(self, script: str, clients: int, transport: str, seconds: int, env: dict[str, str]) -> dict[str, Any]:
        """`seconds`: the first run's -T, logins included (`seconds_for`), unless a run at this client
        count was measured; then each run's allows half as much again as the slowest logins so far
        (the load average, which the benchmark's own clients raise, made 2,000-client runs last
        210 s for 20 s of logins)."""
        tls = transport == "tls"
        window = 4 if self.quick else 8
        slowest_logins = self.logins.get(clients, 0.0)  # an earlier row's, at this client count
        if slowest_logins:
            seconds = math.ceil(slowest_logins * 1.5) + window
        bouncer = self.bouncers[transport]
        def bouncer_cpu() -> tuple[float, float]:
            used = own_cpu_seconds(bouncer.pid)
            return used, used

        sides: dict[str, tuple[str, int, Callable[[], tuple[float, float]]]] = {
            "argon": (self.uri(True, tls), self.rp.platform.proxy.port,
                      lambda: (self_cpu_seconds(), thread_cpu_seconds("argon-pooler"))),
            "pgbouncer": (bouncer.dsn(self.dbname), bouncer.port, bouncer_cpu),
        }
        runs: dict[str, list[dict[str, Any]]] = {"argon": [], "pgbouncer": []}
        for round_ in range(self.rounds):
            order = ["argon", "pgbouncer"] if round_ % 2 == 0 else ["pgbouncer", "argon"]
            for name in order:
                target, port, cpu = sides[name]
                try:
                    run = pgbench(target, port, script, clients, seconds, cpu, env)
                except LoginsTooSlow:  # the login allowance is a guess from the load: once more, with twice it
                    self.say(f"  {name:9} round {round_ + 1}: logins outlasted -T {seconds}, again with -T {seconds * 2}")
                    run = pgbench(target, port, script, clients, seconds * 2, cpu, env)
                    run["retried_with_seconds"] = seconds * 2
                runs[name].append(run)
                slowest_logins = max(slowest_logins, run["login_seconds"])
                seconds = math.ceil(slowest_logins * 1.5) + window
                self.logins[clients] = slowest_logins
                self.say(f"  {name:9} round {round_ + 1}: {runs[name][-1]['tps']:.0f} TPS, "
                         f"{runs[name][-1]['pooler_cpu_us_per_txn']} us CPU/txn "
                         f"({runs[name][-1]['engine_cpu_us_per_txn']} in the engine), machine busy "
                         f"{runs[name][-1]['machine_busy_percent']}%")
        a = statistics.median(r["tps"] for r in runs["argon"])
        b = statistics.median(r["tps"] for r in runs["pgbouncer"])
        # within a round the two ran back to back: its ratio, how often Argon was ahead and their interval
        # say more than medians whose rounds move by 20-50 % on this machine (commit latency, the scheduler)
        ratios = [x["tps"] / y["tps"] for x, y in zip(runs["argon"], runs["pgbouncer"], strict=True)]
        by_round = statistics.median(ratios)
        ahead = sum(r >= 1 for r in ratios)
        mean, low, high = paired_interval(ratios)
        return {"argon_tps": a, "pgbouncer_tps": b, "ratio": round(a / b, 3), "ratio_by_round": round(by_round, 3),
                "argon_ahead_rounds": ahead, "ratio_geomean": round(mean, 3), "ratio_interval_95": [round(low, 3),
                                                                                                    round(high, 3)],
                "argon_cpu_us_per_txn": statistics.median(r["pooler_cpu_us_per_txn"] for r in runs["argon"]),
                "pgbouncer_cpu_us_per_txn": statistics.median(r["pooler_cpu_us_per_txn"] for r in runs["pgbouncer"]),
                "argon_engine_cpu_us_per_txn": statistics.median(r["engine_cpu_us_per_txn"] for r in runs["argon"]),
                "machine_busy_percent": statistics.median(r["machine_busy_percent"] or 0 for r in
                                                          runs["argon"] + runs["pgbouncer"]),
                "seconds": seconds, "runs": runs}

    # 2. memory per idle client ---------------------------------------------------------------------

    def idle_memory(self) -> None:
        out = self.results.setdefault("idle_memory", {})
        assert self.project is not None
        parts = urlsplit(self.project.uri)
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        # plaintext first: the proxy's heap keeps what TLS clients made it grow, and would hide theirs
        for transport in ("plaintext", "tls"):
            tls = transport == "tls"
            for name in ("argon", "pgbouncer"):
                with self.section(f"{self.idle_clients} idle clients, {name} {transport}"):
                    if name == "argon":
                        cmd = {"host": "127.0.0.1", "port": self.rp.platform.proxy.port,
                               "options": f"endpoint={self.project.endpoint_id}-pooler"}
                        pid: int | str = "self"
                    else:
                        bouncer = self.bouncers[transport]
                        cmd = {"host": "127.0.0.1", "port": bouncer.port, "options": ""}
                        pid = bouncer.pid
                    cmd.update(op="hold_idle", n=self.idle_clients, user=user, password=password, dbname=self.dbname,
                               tls=tls)
                    out[f"{name} {transport}"] = self.hold(cmd, pid)

    def hold(self, cmd: dict[str, Any], pid: int | str) -> dict[str, Any]:
        import gc

        gc.collect()
        time.sleep(1)
        before = rss_mb(pid)
        backends_before = self.backends()
        worker = Worker()
        try:
            opened = worker.send(cmd, timeout=900)
            time.sleep(2)
            during = rss_mb(pid)
            backends = self.backends()
            pooler = self.rp.platform.proxy.ctx.pooler
            held = pooler.clients if pid == "self" else None
        finally:
            worker.release()
            worker.close()
        time.sleep(2)
        per_client_kb = (during - before) * 1024 / cmd["n"]
        self.say(f"  {opened['opened']} clients in {opened['seconds']} s: RSS {before:.0f} -> {during:.0f} MB, "
                 f"{per_client_kb:.2f} KiB per client, compute backends {backends_before} -> {backends}")
        return {"clients": opened["opened"], "connect_seconds": opened["seconds"], "rss_before_mb": round(before, 1),
                "rss_with_clients_mb": round(during, 1), "kib_per_client": round(per_client_kb, 2),
                "compute_backends_before": backends_before, "compute_backends": backends,
                "pooled_clients_seen_by_proxy": held}

    def backends(self) -> int:
        import psycopg

        with psycopg.connect(self.uri(False, True)) as conn:
            return int(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                                    "AND pid <> pg_backend_pid()").fetchone()[0])

    # 3. the first query after a suspend ------------------------------------------------------------

    def after_suspend(self, reps: int) -> None:
        assert self.project is not None
        worker = Worker()
        pooled_ms: list[float] = []
        cold_ms: list[float] = []
        try:
            worker.send({"op": "open", "name": "pooled", "dsn": self.uri(True, True)})
            for _ in range(reps):
                self.project.suspend(self.rp)
                pooled_ms.append(worker.send({"op": "query", "name": "pooled"})["ms"])
                self.project.suspend(self.rp)
                cold_ms.append(worker.send({"op": "connect_query", "dsn": self.uri(False, True)})["ms"])
            worker.send({"op": "close", "name": "pooled"})
        finally:
            worker.close()
        p, c = summarize(pooled_ms), summarize(cold_ms)
        self.results["after_suspend"] = {"pooled_first_query_ms": p, "direct_cold_start_ms": c,
                                         "ratio": round(p["median"] / c["median"], 2), "repetitions": reps}

    def execute(self) -> None:
        self.say(f"starting the platform in {self.root} ...")
        self.start()
        with self.section("throughput"):
            self.throughput()
        if self.idle_clients > 0:  # --idle-clients 0: throughput and the suspend only
            with self.section("idle memory"):
                self.idle_memory()
        with self.section("first query after a suspend"):
            self.after_suspend(5 if self.quick else COLD_REPS)
        self.results["environment"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]


# Output ------------------------------------------------------------------------------------------------


def paired_interval(ratios: list[float], resamples: int = 10_000) -> tuple[float, float, float]:
    """The geometric mean of the per-round ratios (each round ran the two back to back) and a 95 %
    bootstrap interval for it (seeded: the same rounds give the same interval). With rounds moving by
    20-50 %, a row whose interval holds 1 cannot be told from PgBouncer at this many rounds."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), math.exp(mean), math.exp(mean)
    rng = random.Random(16)
    means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(resamples))
    return math.exp(mean), math.exp(means[int(0.025 * resamples)]), math.exp(means[int(0.975 * resamples) - 1])


def verdict(row: dict[str, Any]) -> str:
    """above / level / below PgBouncer by the paired interval (level: it holds 1)."""
    low, high = row.get("ratio_interval_95", (0.0, math.inf))
    return "above" if low > 1 else "below" if high < 1 else "level"


def ahead_of(row: dict[str, Any]) -> str:
    runs = row.get("runs", {}).get("argon", [])
    return f"{row['argon_ahead_rounds']}/{len(runs)}" if "argon_ahead_rounds" in row else "-"


def render(results: dict[str, Any], errors: dict[str, str]) -> str:
    env = results.get("environment", {})
    lines = ["Argon transaction pooler vs PgBouncer (transaction mode)", "=" * 56,
             f"{env.get('cpus')} CPUs, kernel {env.get('kernel')}, Python {env.get('python')}, "
             f"{env.get('pgbench')}, {env.get('pgbouncer')}",
             f"pooler engine: {env.get('pooler_engine')}; pool size {env.get('pool_size')} on both; compute "
             f"{env.get('compute_cu')} CU (cgroup CPU limit {env.get('compute_cpu_limit')}), max_connections "
             f"{env.get('compute_max_connections')}; pgbench scale {env.get('pgbench_scale')}, "
             f"-j 2, {env.get('rounds')} interleaved rounds (median)",
             f"TLS negotiated: proxy {env.get('tls', {}).get('proxy')}, pgbouncer {env.get('tls', {}).get('pgbouncer')}",
             f"load average at start {env.get('loadavg_at_start')}, at end {env.get('loadavg_at_end')}", ""]
    if not env:  # stopped before the platform answered: no environment to describe
        lines[2:] = [""]
    tp = results.get("throughput", {})
    if tp:
        lines.append(f"{'pgbench':28} {'argon TPS':>10} {'pgbouncer':>10} {'ratio':>7} {'by round':>9} "
                     f"{'95% interval':>13} {'':>6} {'ahead':>6} {'CPU us/txn a/p':>15} {'engine':>7} {'busy%':>6}")
        for key, r in tp.items():
            low, high = r.get("ratio_interval_95", (0.0, 0.0))
            lines.append(f"{key:28} {r['argon_tps']:>10.0f} {r['pgbouncer_tps']:>10.0f} {r['ratio']:>6.2f}x "
                         f"{r['ratio_by_round']:>8.2f}x {f'{low:.2f}-{high:.2f}x':>13} {verdict(r):>6} {ahead_of(r):>6} "
                         f"{r['argon_cpu_us_per_txn']:>7.1f}/{r['pgbouncer_cpu_us_per_txn']:<7.1f}"
                         f" {r.get('argon_engine_cpu_us_per_txn') or 0:>7.1f} {r['machine_busy_percent']:>6.1f}")
        lines.append("(by round: the median of the rounds' ratios; 95% interval: of their geometric mean, bootstrap;"
                     " above / level / below: the interval is over 1, holds 1, is under 1; ahead: the rounds in"
                     " which Argon's TPS was at or above PgBouncer's, which ran just before or after)")
        worst = min(tp.values(), key=lambda r: r["ratio"])
        met = all(r["ratio"] >= 1.0 for r in tp.values())
        below = [k for k, r in tp.items() if verdict(r) == "below"]
        lines += ["", f"target: argon TPS >= PgBouncer TPS at every client count: {'yes' if met else 'NO'} "
                      f"(lowest ratio {worst['ratio']:.2f}x by medians); rows below PgBouncer beyond the rounds' "
                      f"noise: {', '.join(below) if below else 'none'}", ""]
    mem = results.get("idle_memory", {})
    if mem:
        lines.append(f"{'idle clients':24} {'clients':>8} {'RSS before':>11} {'with':>8} {'KiB/client':>11} "
                     f"{'backends':>9}")
        for key, r in mem.items():
            lines.append(f"{key:24} {r['clients']:>8} {r['rss_before_mb']:>9.0f}MB {r['rss_with_clients_mb']:>6.0f}MB "
                         f"{r['kib_per_client']:>11.2f} {r['compute_backends']:>9}")
        for transport in TRANSPORTS:
            a, b = mem.get(f"argon {transport}"), mem.get(f"pgbouncer {transport}")
            if a and b and b["kib_per_client"] > 0:
                lines.append(f"  {transport}: argon / pgbouncer memory per idle client = "
                             f"{a['kib_per_client'] / b['kib_per_client']:.2f}x")
        lines.append("")
    sus = results.get("after_suspend")
    if sus:
        p, c = sus["pooled_first_query_ms"], sus["direct_cold_start_ms"]
        lines += [f"first query after a suspend, {sus['repetitions']} each, interleaved:",
                  f"  pooled connection kept open, SELECT 1   p50 {p['median']:.1f} ms  p95 {p['p95']:.1f} ms",
                  f"  direct host: connect + SELECT 1          p50 {c['median']:.1f} ms  p95 {c['p95']:.1f} ms",
                  f"  ratio (p50) {sus['ratio']:.2f}x", ""]
    for name, err in errors.items():
        lines.append(f"FAILED {name}: {err}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 4 s pgbench windows (after the logins)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per pgbench pair (default 3)")
    parser.add_argument("--clients", default=None, help="comma-separated client counts (default 8,64,512,2000)")
    parser.add_argument("--scripts", default=",".join(SCRIPTS), help="comma-separated: tpcb, select (default both)")
    parser.add_argument("--transports", default=",".join(TRANSPORTS),
                        help="comma-separated: tls, plaintext (default both)")
    parser.add_argument("--idle-clients", type=int, default=IDLE_CLIENTS, help="idle clients held (default 10000; 0 skips)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    stop_on_sigterm()
    counts = tuple(int(c) for c in args.clients.split(",")) if args.clients else CLIENT_COUNTS
    scripts, transports = tuple(args.scripts.split(",")), tuple(args.transports.split(","))
    if not set(scripts) <= set(SCRIPTS) or not set(transports) <= set(TRANSPORTS):
        parser.error(f"--scripts takes {', '.join(SCRIPTS)}; --transports takes {', '.join(TRANSPORTS)}")
    run = Run(quick=args.quick, rounds=args.rounds or (1 if args.quick else 3), counts=counts,
              idle_clients=args.idle_clients, scripts=scripts, transports=transports)
    started = time.monotonic()
    try:
        run.execute()
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: report what was measured
        run.errors["run"] = f"interrupted ({exc or 'Ctrl-C'})"
    finally:
        run.stop()
    run.results["total_seconds"] = round(time.monotonic() - started, 1)
    text = render(run.results, run.errors)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"results": run.results, "errors": run.errors}, indent=2))
    return 0 if not run.errors else 1


if __name__ == "__main__":
    sys.exit(main())

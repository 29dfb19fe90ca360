"""Argon's core benchmark: what the platform costs compared with plain PostgreSQL, side by side.

Run from the repository root, as root or as a user that can run Postgres itself:

    /work/venv/bin/python -m benchmarks.core [--quick] [--json PATH]

One run starts a whole platform in this process (exactly like the test fixture does, on free
ports in a short temp dir), throwaway "raw" Postgres clusters of the same majors with the same
performance settings as Argon's computes, and PgBouncer (plaintext and TLS) if it is installed,
then measures:

1. cold start: suspended endpoint -> first `SELECT 1` answered through the proxy, vs starting the
   raw postmaster until it answers `SELECT 1`, for each installed major (30 wakes, 10 with --quick);
2. warm connect: connect + `SELECT 1` + close through the proxy (TLS and plaintext) vs direct to
   raw Postgres over TCP and over its Unix socket, and through PgBouncer (plaintext and TLS);
3. throughput: `pgbench -S` at 1, 8 and 32 clients against raw (TCP, TCP with TLS, Unix socket), the proxy
   (TLS and plaintext) and PgBouncer in session mode (TLS and plaintext) in front of the same
   compute the proxy relays to, with the CPU split between Argon, the Postgres processes, pgbench,
   PgBouncer and the rest of the machine; proxy and PgBouncer alternate over 5 rounds;
4. project creation latency: `POST /api/v2/projects` returned, and POST -> first `SELECT 1`
   answered through the proxy with the returned URI;
5. memory: processes left by a suspended endpoint (must be none), and the PSS of a running idle
   compute vs an idle raw Postgres of the same major.

Every latency is measured by a separate client process (so the client never competes with the
in-process platform for the GIL) and reported as median (p50) and p95 over N repetitions.
Everything started here is stopped by PID in `finally` blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform as pyplatform
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
PGBENCH = "/usr/bin/pgbench"
PGBOUNCER = "/usr/sbin/pgbouncer"
PGBENCH_SCALE = 10
PGBENCH_CLIENT_COUNTS = (1, 8, 32)
PGBENCH_ROUNDS = 5  # proxy / PgBouncer runs per client count, interleaved; the median is reported
PGBOUNCER_POOL_SIZE = 40  # > the largest client count: in session mode no client ever waits for a server
SCRAM_ROLE = "bench_scram"
SCRAM_PASSWORD = "bench-scram-password"
CLIENT_TIMEOUT = 60.0  # seconds for any single client operation (a cold start included)
# Settings copied from the compute's generated postgresql.conf onto the raw baseline, so both run
# with the same memory and worker configuration (the rest stays at initdb's defaults).
MATCHED_SETTINGS = ("shared_buffers", "max_connections", "max_worker_processes", "effective_cache_size",
                    "work_mem", "maintenance_work_mem", "jit", "huge_pages", "wal_level", "max_wal_senders",
                    "max_replication_slots", "dynamic_shared_memory_type", "fsync", "synchronous_commit",
                    "full_page_writes", "wal_buffers", "max_wal_size", "checkpoint_timeout", "autovacuum")


class BenchError(RuntimeError):
    pass


# Statistics ----------------------------------------------------------------------------------------


def _nearest_rank(ordered: list[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(values: list[float]) -> dict[str, Any]:
    """Median (p50) and nearest-rank p95 (and p90) of a list of milliseconds (plus the raw samples)."""
    if not values:
        raise BenchError("no samples")
    ordered = sorted(values)
    return {"n": len(values), "median": round(statistics.median(ordered), 2),
            "p95": round(_nearest_rank(ordered, 0.95), 2), "p90": round(_nearest_rank(ordered, 0.9), 2),
            "min": round(ordered[0], 2), "max": round(ordered[-1], 2), "samples": [round(v, 2) for v in values]}


def pgbench_threads(clients: int) -> int:
    return 1 if clients == 1 else 2


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


# /proc helpers -------------------------------------------------------------------------------------


def _read_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, own utime+stime, reaped children's cutime+cstime) in clock ticks, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    # rest[0] is field 3 (state): field k is rest[k - 3].
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])


def _process_table() -> dict[int, tuple[int, int, int]]:
    table: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat is not None:
                table[int(entry)] = stat
    return table


def process_tree(root_pid: int, table: dict[int, tuple[int, int, int]] | None = None) -> list[int]:
    """`root_pid` and all its live descendants."""
    table = table if table is not None else _process_table()
    if root_pid not in table:
        raise BenchError(f"process {root_pid} is not running")
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU time of a process tree, including children that exited (a postmaster reaps its backends,
    so their time lands in its cutime/cstime): monotonic across backends coming and going."""
    table = _process_table()
    if root_pid not in table:
        raise BenchError(f"process {root_pid} is not running")
    ticks = 0
    for pid in process_tree(root_pid, table):
        ticks += table[pid][1] + table[pid][2]
    return ticks / CLK_TCK


def own_cpu_seconds(pid: int) -> float:
    stat = _read_stat(pid)
    if stat is None:
        raise BenchError(f"process {pid} is not running")
    return stat[1] / CLK_TCK


def self_cpu_seconds() -> float:
    """This process (the in-process platform: API, proxy, event loop; not its children)."""
    t = os.times()
    return t.user + t.system


def system_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from the first line of /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - fields[3] - fields[4], total


def _kb_field(path: str, name: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def tree_memory(root_pid: int) -> dict[str, Any]:
    """Sum of PSS (proportional: shared pages split between sharers) and RSS over a process tree."""
    pids = process_tree(root_pid)
    pss = sum(_kb_field(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
    rss = sum(_kb_field(f"/proc/{p}/status", "VmRSS") for p in pids)
    return {"processes": len(pids), "pss_mb": round(pss / 1024, 1), "rss_mb": round(rss / 1024, 1)}


def postmaster_pid(pgdata: Path) -> int:
    try:
        pid = int(Path(pgdata, "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise BenchError(f"no running postmaster in {pgdata}: {exc}") from None
    if _read_stat(pid) is None:
        raise BenchError(f"postmaster {pid} of {pgdata} is not running")
    return pid


def pgdata_processes(pgdata: Path) -> list[dict[str, Any]]:
    """Every live process that belongs to the cluster in `pgdata`: its command line names the
    directory (the postmaster: `postgres -D <pgdata>`) or its working directory is inside it (every
    Postgres process chdirs into its data directory; the children rewrite their command line to
    `postgres: checkpointer` etc., so the command line alone would miss them, orphans included)."""
    real = os.path.realpath(pgdata)
    needle = str(pgdata).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if not cmdline:  # kernel thread or zombie: no memory, nothing running
            continue
        cwd = ""
        with contextlib.suppress(OSError):
            cwd = os.readlink(f"/proc/{entry}/cwd")
        in_cmdline = needle in cmdline or real.encode() in cmdline
        in_cwd = cwd == real or cwd.startswith(real + "/")
        if in_cmdline or in_cwd:
            found.append({"pid": int(entry), "cmdline": cmdline.replace(b"\0", b" ").decode(errors="replace").strip(),
                          "cwd": cwd})
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def short_tmpdir(prefix: str = "ab") -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    return path


def _as_postgres_user() -> dict[str, Any]:
    """Postgres refuses to run as root: run it as nobody then."""
    return _as_user(NOBODY, NOBODY)


def _as_user(uid: int, gid: int) -> dict[str, Any]:
    """Popen arguments that run a server as `uid` when we are root (as ourselves otherwise)."""
    if os.geteuid() == 0:
        return {"user": uid, "group": gid, "extra_groups": [], "umask": 0o077}
    return {"umask": 0o077}


def _own_dir(path: Path, uid: int = NOBODY, gid: int = NOBODY) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, uid, gid)
    os.chmod(path, 0o700)
    return path


def _stop_pid(proc: subprocess.Popen[Any] | None, first: int = signal.SIGINT, timeout: float = 20) -> None:
    """Stop one server we started, by PID: a polite signal, then SIGQUIT, then SIGKILL of it and its children."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((first, timeout), (signal.SIGQUIT, 5)):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(BenchError):
        for pid in reversed(process_tree(proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.wait(5)


# The client: a separate process doing every timed connection ----------------------------------------


def worker_main() -> None:
    """`--worker`: read JSON commands on stdin, answer one JSON line each."""
    import psycopg

    def connect_once(dsn: str, timeout: float) -> None:
        conn = psycopg.connect(dsn, connect_timeout=max(2, math.ceil(timeout)), autocommit=True)
        try:
            if conn.execute("SELECT 1").fetchone() != (1,):
                raise BenchError("SELECT 1 did not return 1")
        finally:
            conn.close()

    for line in sys.stdin:
        cmd = json.loads(line)
        t0 = time.perf_counter()
        try:
            if cmd["op"] == "connect":
                connect_once(cmd["dsn"], cmd["timeout"])
                out: dict[str, Any] = {"ok": True}
            elif cmd["op"] == "poll":  # until a server that is starting answers
                deadline = t0 + cmd["timeout"]
                attempts = 0
                while True:
                    attempts += 1
                    try:
                        connect_once(cmd["dsn"], 2)
                        break
                    except psycopg.OperationalError:
                        if time.perf_counter() > deadline:
                            raise
                        time.sleep(0.002)
                out = {"ok": True, "attempts": attempts}
            else:
                raise BenchError(f"unknown op {cmd['op']!r}")
            out["ms"] = (time.perf_counter() - t0) * 1000
        except Exception as exc:  # reported to the parent
            out = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip()}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


class Client:
    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self._start()

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.core", "--worker"], cwd=REPO_ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def request(self, op: str, dsn: str, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
        """Run one command in the client; `wall_ms` is measured here, `ms` inside the client."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        t0 = time.perf_counter()
        self.proc.stdin.write(json.dumps({"op": op, "dsn": dsn, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout + 10)
        if not ready:
            self.close()
            self._start()
            raise BenchError(f"client {op} did not answer in {timeout + 10:.0f} s")
        line = self.proc.stdout.readline()
        wall = (time.perf_counter() - t0) * 1000
        if not line:
            self.close()
            self._start()
            raise BenchError("the client process died")
        resp = json.loads(line)
        if not resp["ok"]:
            raise BenchError(f"{op} failed: {resp['error']}")
        resp["wall_ms"] = wall
        return resp

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# Raw Postgres and PgBouncer baselines --------------------------------------------------------------


class RawPostgres:
    """A throwaway cluster: trust auth, TCP on loopback, no TLS, the compute's memory settings."""

    def __init__(self, bindir: Path, root: Path, settings: dict[str, str]) -> None:
        self.bindir = bindir
        self.dir = _own_dir(root)
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.settings = settings
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls: tuple[Path, Path] | None = None  # (certificate, key) once enable_tls() ran

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=bench dbname=postgres sslmode=disable"

    @property
    def tls_dsn(self) -> str:
        """The same server over TCP with TLS (after enable_tls() and a restart)."""
        return f"host=127.0.0.1 port={self.port} user=bench dbname=postgres sslmode=require"

    def ssl_library(self) -> str:
        """The TLS library this build links ("OpenSSL"), or "" when built without one."""
        res = subprocess.run([str(self.bindir / "postgres"), "-D", str(self.data), "-C", "ssl_library"], cwd=self.dir,
                             capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
                             **_as_postgres_user())
        return res.stdout.strip() if res.returncode == 0 else ""

    def enable_tls(self, cert: Path, key: Path) -> None:
        """Serve TLS from the next start on, with copies of `cert`/`key` (the key 0600, owned by the
        user Postgres runs as). Off during the cold starts: a compute does no TLS, the proxy does."""
        own_cert, own_key = self.dir / "server.crt", self.dir / "server.key"
        shutil.copyfile(cert, own_cert)
        shutil.copyfile(key, own_key)
        os.chmod(own_cert, 0o644)
        os.chmod(own_key, 0o600)
        if os.geteuid() == 0:
            for path in (own_cert, own_key):
                os.chown(path, NOBODY, NOBODY)
        self.tls = (own_cert, own_key)

    @property
    def unix_dsn(self) -> str:
        """The same server over its Unix socket (in the data directory; we are root or its owner)."""
        return f"host={self.data} port={self.port} user=bench dbname=postgres sslmode=disable"

    @property
    def scram_dsn(self) -> str:
        """The same server with password (SCRAM-SHA-256) authentication, as every Argon role uses."""
        return (f"host=127.0.0.1 port={self.port} user={SCRAM_ROLE} password={SCRAM_PASSWORD} dbname=postgres "
                "sslmode=disable")

    @property
    def pid(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError("raw postgres is not running")
        return self.proc.pid

    def init(self) -> None:
        res = subprocess.run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "bench", "--auth=trust",
                              "--no-sync", "-E", "UTF8", "--locale=C"], cwd=self.dir, capture_output=True, text=True,
                             timeout=120, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, **_as_postgres_user())
        if res.returncode != 0:
            raise BenchError(f"initdb failed: {res.stderr.strip()[-1000:]}")
        hba = self.data / "pg_hba.conf"  # SCRAM for one role, ahead of initdb's trust lines
        hba.write_text(f"host all {SCRAM_ROLE} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())

    def create_scram_role(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"CREATE ROLE {SCRAM_ROLE} LOGIN PASSWORD '{SCRAM_PASSWORD}'")

    def spawn(self) -> None:
        """Start the postmaster (returns at once: readiness is the caller's `SELECT 1`)."""
        args = [str(self.bindir / "postgres"), "-D", str(self.data), "-c", "listen_addresses=127.0.0.1",
                "-c", f"port={self.port}", "-c", f"unix_socket_directories={self.data}"]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        if self.tls is not None:
            args += ["-c", "ssl=on", "-c", f"ssl_cert_file={self.tls[0]}", "-c", f"ssl_key_file={self.tls[1]}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, start_new_session=True,
                                         **_as_postgres_user())

    def start(self, client: Client) -> float:
        """Start and wait for `SELECT 1`; the elapsed milliseconds."""
        t0 = time.perf_counter()
        self.spawn()
        try:
            client.request("poll", self.dsn, timeout=30)
        except BenchError as exc:
            raise BenchError(f"{exc}; log: {self.tail_log()}") from None
        return (time.perf_counter() - t0) * 1000

    def stop(self) -> None:
        _stop_pid(self.proc, signal.SIGINT)  # fast shutdown
        self.proc = None

    def tail_log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-800:]
        return ""


@dataclass
class Upstream:
    """The Postgres a PgBouncer fronts: a Unix socket, the role it logs in as (SCRAM with `password`
    when given) and the OS user it must run as to reach that socket."""

    socket_dir: Path
    port: int
    user: str
    dbname: str
    password: str = ""
    uid: int = NOBODY
    gid: int = NOBODY


class PgBouncer:
    """PgBouncer in session mode in front of `upstream`, reaching it over its Unix socket (as the
    proxy reaches a compute); clients connect over TCP, with `client_tls_sslmode = require` when
    `tls` = (certificate, key) is given."""

    def __init__(self, root: Path, upstream: Upstream, tls: tuple[Path, Path] | None = None) -> None:
        self.upstream = upstream
        self.dir = _own_dir(root, upstream.uid, upstream.gid)
        self.port = free_port()
        self.tls = tls is not None
        self.proc: subprocess.Popen[bytes] | None = None
        owned = ["userlist.txt", "pgbouncer.ini"]
        tls_conf = ""
        if tls is not None:
            # Its own copies, the key 0600 owned by the user that runs it.
            shutil.copyfile(tls[0], self.dir / "server.crt")
            shutil.copyfile(tls[1], self.dir / "server.key")
            os.chmod(self.dir / "server.crt", 0o644)
            os.chmod(self.dir / "server.key", 0o600)
            owned += ["server.crt", "server.key"]
            tls_conf = (f"client_tls_sslmode = require\nclient_tls_cert_file = {self.dir / 'server.crt'}\n"
                        f"client_tls_key_file = {self.dir / 'server.key'}\n")
        (self.dir / "userlist.txt").write_text(f'"{upstream.user}" "{upstream.password}"\n')
        os.chmod(self.dir / "userlist.txt", 0o600)
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={upstream.socket_dir} port={upstream.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.dir / 'userlist.txt'}\n"
            f"pool_mode = session\nmax_client_conn = 200\ndefault_pool_size = {PGBOUNCER_POOL_SIZE}\n"
            # Server connections left idle by one pgbench run close soon, so two PgBouncers' leftovers
            # never crowd the server (max_connections is the compute's) during the next runs.
            "server_idle_timeout = 2\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"{tls_conf}logfile = {self.dir / 'pgbouncer.log'}\n")
        if os.geteuid() == 0:
            for name in owned:
                os.chown(self.dir / name, upstream.uid, upstream.gid)

    @property
    def dsn(self) -> str:
        mode = "require" if self.tls else "disable"
        return f"host=127.0.0.1 port={self.port} user={self.upstream.user} dbname={self.upstream.dbname} sslmode={mode}"

    @property
    def pid(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError("pgbouncer is not running")
        return self.proc.pid

    def start(self, client: Client) -> None:
        with open(self.dir / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen([PGBOUNCER, str(self.dir / "pgbouncer.ini")], cwd=self.dir,
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
                                         **_as_user(self.upstream.uid, self.upstream.gid))
        try:
            client.request("poll", self.dsn, timeout=20)
        except BenchError as exc:
            log = ""
            with contextlib.suppress(OSError):
                log = (self.dir / "stderr.log").read_text()[-500:] + (self.dir / "pgbouncer.log").read_text()[-500:]
            raise BenchError(f"pgbouncer did not answer: {exc}; {log}") from None

    def stop(self) -> None:
        _stop_pid(self.proc, signal.SIGTERM)  # immediate shutdown
        self.proc = None


def tls_session(port: int) -> str:
    """The protocol and cipher a TLS listener speaking the Postgres protocol negotiates with OpenSSL's
    defaults (what libpq gets too), e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"; "?" if unknown."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(["openssl", "s_client", "-starttls", "postgres", "-connect", f"127.0.0.1:{port}",
                              "-brief"], input="", capture_output=True, text=True, timeout=10)
        text = res.stdout + res.stderr
        proto = re.search(r"Protocol version:\s*(\S+)", text)
        cipher = re.search(r"Ciphersuite:\s*(\S+)", text)
        if proto and cipher:
            return f"{proto.group(1)} {cipher.group(1)}"
    return "?"


def tool_version(path: str) -> str | None:
    if not os.access(path, os.X_OK):
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.strip().splitlines()[0]
    return None


# pgbench ---------------------------------------------------------------------------------------------


def pgbench_init(target: str, timeout: float = 300) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([PGBENCH, "-i", "-q", "-s", str(PGBENCH_SCALE), target], capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode != 0:
        raise BenchError(f"pgbench -i failed: {res.stderr.strip()[-800:]}")
    return time.perf_counter() - t0


def pgbench_run(target: str, clients: int, seconds: int, cpu: dict[str, Callable[[], float]]) -> dict[str, Any]:
    """One `pgbench -S` run; TPS, latency and CPU use of each part (percent of all cores)."""
    args = [PGBENCH, "-n", "-S", "-c", str(clients), "-j", str(pgbench_threads(clients)), "-T", str(seconds),
            target]
    time.sleep(0.3)  # the previous run's backends exit and are reaped (their CPU moves to the postmaster)
    before = {name: fn() for name, fn in cpu.items()}
    sys_before = system_cpu_ticks()
    out_path = Path(f"/tmp/argon-bench-pgbench-{os.getpid()}.out")
    with open(out_path, "w+") as out:
        t0 = time.perf_counter()
        # Its own session, like the servers: with the kernel's autogroup scheduling (on by default)
        # a session is one CPU-share group, and pgbench in ours would share a group with the Argon
        # platform this process hosts, while PgBouncer and raw Postgres each get a group of their own.
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timer = threading.Timer(seconds + 60, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # pgbench's own rusage, exactly
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    out_path.unlink(missing_ok=True)
    sys_after = system_cpu_ticks()
    time.sleep(0.3)
    after = {name: fn() for name, fn in cpu.items()}
    if proc.returncode != 0:
        raise BenchError(f"pgbench exited with {proc.returncode}: {text.strip()[-800:]}")
    match = (re.search(r"tps = ([\d.]+) \(without initial connection time\)", text)
             or re.search(r"tps = ([\d.]+)", text))
    if match is None:
        raise BenchError(f"no tps in pgbench output: {text.strip()[-800:]}")
    latency = re.search(r"latency average = ([\d.]+) ms", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    shares = {name: round((after[name] - before[name]) / (wall * NCPU) * 100, 1) for name in cpu}
    shares["pgbench"] = round((usage.ru_utime + usage.ru_stime) / (wall * NCPU) * 100, 1)
    busy, total = sys_after[0] - sys_before[0], sys_after[1] - sys_before[1]
    busy_percent = busy / total * 100 if total > 0 else 0.0
    # Anything else the machine did meanwhile (other processes, kernel threads), then idle cores.
    shares["other"] = round(max(0.0, busy_percent - sum(shares.values())), 1)
    shares["idle"] = round(max(0.0, 100 - busy_percent), 1)
    return {"tps": round(float(match.group(1)), 1), "latency_ms": float(latency.group(1)) if latency else None,
            "failed": int(failed.group(1)) if failed else 0, "seconds": round(wall, 2), "cpu_percent": shares}


# The platform ----------------------------------------------------------------------------------------


def start_platform(root: Path) -> Any:
    sys.path.insert(0, str(REPO_ROOT))
    from tests.fixtures.platform import RunningPlatform

    running = RunningPlatform(root)
    # The fixture logs at DEBUG for tests; measure what `argon up` does by default (info).
    logging.getLogger("argon").setLevel(logging.INFO)
    return running


def with_sslmode(uri: str, mode: str) -> str:
    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "sslmode"]
    query.insert(0, ("sslmode", mode))
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass
class Project:
    id: str
    branch_id: str
    endpoint_id: str
    uri: str
    major: int

    @classmethod
    def create(cls, rp: Any, name: str, major: int) -> Project:
        resp = rp.api.post("/projects", json={"project": {"name": name, "pg_version": major}})
        if resp.status_code != 201:
            raise BenchError(f"POST /projects answered {resp.status_code}: {resp.text[:500]}")
        body = resp.json()
        return cls(body["project"]["id"], body["branch"]["id"], body["endpoints"][0]["id"],
                   body["connection_uris"][0]["connection_uri"], major)

    def state(self, rp: Any) -> str:
        resp = rp.api.get(f"/projects/{self.id}/endpoints/{self.endpoint_id}")
        if resp.status_code != 200:
            raise BenchError(f"GET endpoint answered {resp.status_code}: {resp.text[:500]}")
        return str(resp.json()["endpoint"]["current_state"])

    def suspend(self, rp: Any, timeout: float = 30, wait_postmaster_gone: bool = True) -> None:
        """`POST .../suspend`, then poll until the API says `idle` (and, unless told not to, until
        `postmaster.pid` is gone too)."""
        resp = rp.api.post(f"/projects/{self.id}/endpoints/{self.endpoint_id}/suspend")
        if resp.status_code != 200:
            raise BenchError(f"suspend answered {resp.status_code}: {resp.text[:500]}")
        deadline = time.monotonic() + timeout
        while (state := self.state(rp)) != "idle":
            if time.monotonic() > deadline:
                raise BenchError(f"endpoint still {state!r} {timeout:.0f} s after suspend")
            time.sleep(0.02)
        if not wait_postmaster_gone:
            return
        pgdata = self.pgdata(rp)
        while (pgdata / "postmaster.pid").exists():  # idle in the API; make sure the postmaster is gone too
            if time.monotonic() > deadline:
                raise BenchError(f"postmaster.pid still present {timeout:.0f} s after suspend")
            time.sleep(0.02)

    def pgdata(self, rp: Any) -> Path:
        return Path(rp.plane.layout.pgdata(self.id, self.branch_id))

    def postmaster(self, rp: Any) -> int:
        return postmaster_pid(self.pgdata(rp))

    def conf(self, rp: Any) -> dict[str, str]:
        out: dict[str, str] = {}
        with contextlib.suppress(OSError):
            for line in (self.pgdata(rp) / "postgresql.conf").read_text().splitlines():
                m = re.match(r"\s*(\w+)\s*=\s*'((?:[^']|'')*)'", line) or re.match(r"\s*(\w+)\s*=\s*(\S+)", line)
                if m:
                    out[m.group(1)] = m.group(2).replace("''", "'")
        return out


# The run ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    quick: bool
    reps: int  # project creates (of each kind)
    wakes: int  # cold starts per major, and warm connects per target
    seconds: int  # each pgbench run
    rp: Any = None
    client: Client | None = None
    root: Path = field(default_factory=lambda: short_tmpdir("ab"))
    raws: dict[int, RawPostgres] = field(default_factory=dict)
    bouncers: dict[str, PgBouncer] = field(default_factory=dict)  # "plaintext", "tls"
    projects: dict[int, Project] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

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
            self.say(f"{name} done in {time.monotonic() - t0:.1f} s")

    def environment(self) -> dict[str, Any]:
        model = ""
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        import psycopg

        plane = self.rp.plane
        return {
            "cpus": NCPU, "cpu_model": model, "kernel": pyplatform.release(),
            "memory_gb": round(_kb_field("/proc/meminfo", "MemTotal") / 1024 / 1024, 1),
            "python": pyplatform.python_version(), "psycopg": psycopg.__version__,
            "postgres": {str(m): f"{i.version} ({i.source})" for m, i in sorted(plane.installs.items())},
            "clone_backend": plane.backend.name,
            "pgbench": tool_version(PGBENCH), "pgbouncer": tool_version(PGBOUNCER) or "not installed",
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
            "repetitions": self.reps, "wakes": self.wakes, "pgbench_seconds": self.seconds,
            "pgbench_scale": PGBENCH_SCALE, "pgbench_clients": list(PGBENCH_CLIENT_COUNTS),
            "pgbench_rounds": PGBENCH_ROUNDS,
        }

    def execute(self) -> None:
        client = self.client = Client()
        self.say(f"starting the platform in {self.root} ...")
        t0 = time.monotonic()
        (self.root / "argon").mkdir(mode=0o755, exist_ok=True)
        self.rp = start_platform(self.root / "argon")
        self.say(f"platform up in {time.monotonic() - t0:.1f} s")
        env = self.results["environment"] = self.environment()
        majors = sorted(self.rp.plane.installs)
        default = self.rp.plane.settings.default_pg_version or max(majors)
        env["default_major"] = default
        env["raw_settings"] = {}

        for major in majors:
            with self.section(f"cold start PG{major}"):
                self.cold_start(major, client, keep_raw=True)
            with self.section(f"idle memory PG{major}"):
                self.idle_memory(major)
            if major != default and major in self.raws:
                self.raws[major].stop()
        with self.section("pgbouncer"):
            self.start_bouncers(default, client)
        with self.section("warm connect"):
            self.warm_connect(default, client)
        with self.section("project create"):
            self.project_create(client)
        with self.section("throughput"):
            self.throughput(default)

    # 1. cold start -----------------------------------------------------------------------------------

    def cold_start(self, major: int, client: Client, keep_raw: bool) -> None:
        rp = self.rp
        proj = self.projects[major] = Project.create(rp, f"bench-pg{major}", major)
        # The create already started the compute in the background: this waits for that first start.
        first = client.request("connect", proj.uri)["wall_ms"]
        # The raw baseline gets the compute's own memory/worker settings.
        conf = proj.conf(rp)
        settings = {k: conf[k] for k in MATCHED_SETTINGS if k in conf}
        self.results["environment"]["raw_settings"][str(major)] = settings
        raw = self.raws[major] = RawPostgres(rp.plane.installs[major].bindir, self.root / f"r{major}", settings)
        raw.init()
        raw.start(client)  # warm-up (page cache), not counted
        raw.stop()
        # Interleaved, so that anything else happening on the machine hits both sides alike.
        cold: list[float] = []
        starts: list[float] = []
        pids = {proj.postmaster(rp)}
        for _ in range(self.wakes):
            proj.suspend(rp)
            cold.append(client.request("connect", proj.uri)["wall_ms"])
            pid = proj.postmaster(rp)
            if pid in pids:
                raise BenchError(f"the postmaster {pid} was not restarted: the endpoint did not really suspend")
            pids.add(pid)
            starts.append(raw.start(client))
            raw.stop()
        if keep_raw:
            raw.start(client)
        c, r = summarize(cold), summarize(starts)
        self.results.setdefault("cold_start", {})[str(major)] = {
            "argon_cold_start_ms": c, "raw_start_ms": r, "ratio": ratio(c["median"], r["median"]),
            "ratio_p95": ratio(c["p95"], r["p95"]), "argon_first_connect_after_create_ms": round(first, 1)}

    # 5. memory: idle running compute (PSS), suspended endpoint (processes) ---------------------------

    def idle_memory(self, major: int) -> None:
        proj, raw = self.projects.get(major), self.raws.get(major)
        if proj is None or raw is None or raw.proc is None:
            raise BenchError("no running compute/raw server (cold start failed)")
        if proj.state(self.rp) != "active":
            assert self.client is not None
            self.client.request("connect", proj.uri)
        time.sleep(3)  # both idle: startup work and the last session's exit settle
        compute = tree_memory(proj.postmaster(self.rp))
        baseline = tree_memory(raw.pid)
        argon_rss = _kb_field("/proc/self/status", "VmRSS") / 1024
        pgdata = proj.pgdata(self.rp)
        # The same process search while it runs: it must find the whole running tree, or it proves nothing.
        found_active = pgdata_processes(pgdata)
        # Suspend through the API; count the processes the moment the API says idle, and 1 s later.
        t0 = time.perf_counter()
        proj.suspend(self.rp, wait_postmaster_gone=False)
        suspend_ms = (time.perf_counter() - t0) * 1000
        at_idle = pgdata_processes(pgdata)
        time.sleep(1)
        after_1s = pgdata_processes(pgdata)
        self.results.setdefault("idle_memory", {})[str(major)] = {
            "argon_compute": compute, "raw_postgres": baseline,
            "ratio_pss": ratio(compute["pss_mb"], baseline["pss_mb"]),
            "ratio_rss": ratio(compute["rss_mb"], baseline["rss_mb"]),
            "argon_process_rss_mb": round(argon_rss, 1),
            "suspended": {"suspend_api_to_idle_ms": round(suspend_ms, 1),
                          "processes_while_active": len(found_active),
                          "processes_at_idle": len(at_idle), "processes_1s_after_idle": len(after_1s),
                          "leftovers": at_idle or after_1s, "pgdata": str(pgdata)}}

    # PgBouncer ---------------------------------------------------------------------------------------

    def start_bouncers(self, major: int, client: Client) -> None:
        """Two PgBouncers (plaintext, TLS) in front of the same compute the proxy relays to, so the
        comparison of the two proxies has one Postgres behind both (its Unix socket, as the proxy
        reaches it; SCRAM as the project's owner role; run as the compute's OS user, the only one
        its socket admits)."""
        if not os.access(PGBOUNCER, os.X_OK):
            raise BenchError(f"{PGBOUNCER} is not installed")
        proj = self.projects.get(major)
        if proj is None:
            raise BenchError(f"no PG{major} project (cold start failed)")
        client.request("connect", proj.uri)  # awake, so its socket exists
        socket = Path(self.rp.plane.layout.socket_path(proj.endpoint_id))
        owner = socket.stat()
        parts = urlsplit(proj.uri)
        upstream = Upstream(socket.parent, 5432, unquote(parts.username or ""), parts.path.lstrip("/"),
                            unquote(parts.password or ""), owner.st_uid, owner.st_gid)
        # Argon's own generated leaf (ECDSA P-256), so both TLS terminators serve the same certificate.
        tls_dir = Path(self.rp.plane.layout.tls_dir)
        cert, key = tls_dir / "server.crt", tls_dir / "server.key"
        if not (cert.is_file() and key.is_file()):
            raise BenchError(f"no server.crt/server.key in {tls_dir}: {sorted(p.name for p in tls_dir.iterdir())}")
        for mode, tls in (("plaintext", None), ("tls", (cert, key))):
            bouncer = PgBouncer(self.root / f"pgb-{mode}", upstream, tls)
            self.bouncers[mode] = bouncer
            bouncer.start(client)
        proxy_port = int(self.rp.proxy_port)
        self.results["environment"]["tls"] = {"argon_proxy": tls_session(proxy_port),
                                              "pgbouncer": tls_session(self.bouncers["tls"].port)}

    # 2. warm connect ---------------------------------------------------------------------------------

    def warm_connect(self, major: int, client: Client) -> None:
        proj, raw = self.projects.get(major), self.raws.get(major)
        if proj is None or raw is None or raw.proc is None:
            raise BenchError(f"no PG{major} project/raw server (cold start failed)")
        raw.create_scram_role()
        targets = {"argon_proxy_tls": proj.uri, "argon_proxy_plaintext": with_sslmode(proj.uri, "disable"),
                   "raw_tcp": raw.dsn, "raw_unix": raw.unix_dsn, "raw_tcp_scram": raw.scram_dsn}
        for mode, bouncer in self.bouncers.items():
            if bouncer.proc is not None:
                targets[f"pgbouncer_{mode}"] = bouncer.dsn
        samples: dict[str, list[float]] = {name: [] for name in targets}
        for dsn in targets.values():
            client.request("connect", dsn)  # warm-up: wakes the compute if needed, fills pools and caches
        for _ in range(self.wakes):  # round robin, so background noise spreads over all targets
            for name, dsn in targets.items():
                samples[name].append(client.request("connect", dsn)["ms"])
        out: dict[str, Any] = {name: summarize(v) for name, v in samples.items()}
        for mode in ("plaintext", "tls"):
            out.setdefault(f"pgbouncer_{mode}", "skipped (pgbouncer not running)")
        for base_name in ("raw_tcp", "raw_unix"):
            base = out[base_name]["median"]
            out[f"ratios_vs_{base_name}"] = {name: ratio(v["median"], base) for name, v in out.items()
                                             if isinstance(v, dict) and "median" in v and name != base_name}
        self.results["warm_connect_ms"] = out

    # 3. throughput -----------------------------------------------------------------------------------

    def throughput(self, major: int) -> None:
        if not os.access(PGBENCH, os.X_OK):
            raise BenchError(f"{PGBENCH} not found")
        proj, raw = self.projects.get(major), self.raws.get(major)
        if proj is None or raw is None or raw.proc is None:
            raise BenchError(f"no PG{major} project/raw server (cold start failed)")
        rp = self.rp
        plain = with_sslmode(proj.uri, "disable")
        warmup = 1 if self.quick else 2
        out: dict[str, Any] = {"major": major, "clients": list(PGBENCH_CLIENT_COUNTS),
                               "threads": {str(c): pgbench_threads(c) for c in PGBENCH_CLIENT_COUNTS},
                               "seconds": self.seconds, "warmup_seconds": warmup, "scale": PGBENCH_SCALE}
        self.say(f"  pgbench -i -s {PGBENCH_SCALE}: raw ...")
        out["init_seconds_raw"] = round(pgbench_init(raw.dsn), 1)
        self.say(f"  pgbench -i -s {PGBENCH_SCALE}: argon ...")
        out["init_seconds_argon"] = round(pgbench_init(plain), 1)

        def compute_cpu() -> float:
            return tree_cpu_seconds(proj.postmaster(rp))

        # Direct TCP with TLS too, with Argon's certificate: what TLS costs with no relay at all.
        tls_dir = Path(rp.plane.layout.tls_dir)
        raw_tls_skipped = "skipped (no TLS on the raw server)"
        if raw.tls is None and self.client is not None:
            if raw.ssl_library():
                raw.stop()
                raw.enable_tls(tls_dir / "server.crt", tls_dir / "server.key")
                raw.start(self.client)
            else:  # e.g. the embedded wheel's Postgres, built without OpenSSL
                raw_tls_skipped = f"skipped (PG{major} here is built without TLS)"
        raw_cpu = {"argon": self_cpu_seconds, "postgres": lambda: tree_cpu_seconds(raw.pid)}
        argon_cpu = {"argon": self_cpu_seconds, "postgres": compute_cpu}
        targets: dict[str, tuple[str, dict[str, Callable[[], float]]]] = {
            "raw_tcp": (raw.dsn, raw_cpu), "raw_unix": (raw.unix_dsn, raw_cpu),
            "argon_proxy_tls": (proj.uri, argon_cpu), "argon_proxy_plaintext": (plain, argon_cpu)}
        if raw.tls is not None:
            targets["raw_tcp_tls"] = (raw.tls_dsn, raw_cpu)
        for mode, bouncer in self.bouncers.items():
            if bouncer.proc is not None:
                targets[f"pgbouncer_{mode}"] = (bouncer.dsn, {**argon_cpu,  # the proxy's compute behind it too
                                                              "pgbouncer": lambda b=bouncer: own_cpu_seconds(b.pid)})
        pairs = [("argon_proxy_tls", "pgbouncer_tls"), ("argon_proxy_plaintext", "pgbouncer_plaintext")]
        out["rounds"] = PGBENCH_ROUNDS
        for clients in PGBENCH_CLIENT_COUNTS:
            # Raw first and again last (drift). In between, PGBENCH_ROUNDS rounds: each proxy run next
            # to its PgBouncer run, who of the two goes first alternating between rounds. A single
            # few-second run on 2 busy cores swings by 20% either way; each figure below is the
            # median run of its rounds (its CPU split is that run's), the others are kept as samples.
            order = ["raw_tcp", "raw_unix", "raw_tcp_tls"]
            for r in range(PGBENCH_ROUNDS):
                for a, b in pairs:
                    order += [a, b] if r % 2 == 0 else [b, a]
            order.append("raw_tcp_repeat")
            samples: dict[str, list[dict[str, Any]]] = {}
            runs: dict[str, Any] = {}
            for name in order:
                target = targets.get(name.removesuffix("_repeat"))
                if target is None:
                    runs[name] = (raw_tls_skipped if name == "raw_tcp_tls"
                                  else "skipped (pgbouncer not installed)" if not os.access(PGBOUNCER, os.X_OK)
                                  else "skipped (pgbouncer did not start)")
                    continue
                dsn, cpu = target
                self.say(f"  pgbench -S -c {clients} {name} ...")
                if name.startswith("pgbouncer") and self.client is not None:
                    self.client.request("connect", plain)  # PgBouncer does not wake a suspended compute
                try:
                    pgbench_run(dsn, clients, warmup, {})  # warm-up: caches, connections, compute awake
                    samples.setdefault(name, []).append(pgbench_run(dsn, clients, self.seconds, cpu))
                except Exception as exc:
                    runs[name] = f"failed: {exc}"
                    self.errors[f"pgbench -c {clients} {name}"] = str(exc)
            for name, done in samples.items():
                if isinstance(runs.get(name), str):
                    continue
                ordered = sorted(done, key=lambda run: run["tps"])
                runs[name] = {**ordered[(len(ordered) - 1) // 2],
                              "tps_samples": [run["tps"] for run in done]} if len(done) > 1 else done[0]
            runs["order"] = list(dict.fromkeys(order))
            raw_tps = [runs[n]["tps"] for n in ("raw_tcp", "raw_tcp_repeat") if isinstance(runs.get(n), dict)]
            base = statistics.mean(raw_tps) if raw_tps else None
            runs["raw_tps_baseline"] = round(base, 1) if base else None  # the mean of the two raw TCP runs
            if len(raw_tps) == 2:
                runs["raw_drift_percent"] = round((raw_tps[1] - raw_tps[0]) / raw_tps[0] * 100, 1)
            runs["ratios_vs_raw_tcp"] = {name: ratio(runs[name]["tps"], base) for name in order
                                         if name not in ("raw_tcp", "raw_tcp_repeat")
                                         and isinstance(runs.get(name), dict)}

            def tps(name: str, r: dict[str, Any] = runs) -> float | None:
                v = r.get(name)
                return v["tps"] if isinstance(v, dict) else None

            runs["proxy_vs_pgbouncer"] = {"tls": ratio(tps("argon_proxy_tls"), tps("pgbouncer_tls")),
                                          "plaintext": ratio(tps("argon_proxy_plaintext"),
                                                             tps("pgbouncer_plaintext"))}
            # The same comparison round by round: each proxy run against the PgBouncer run next to it,
            # so the machine's drift over minutes (often 20 %) cancels out of each ratio.
            paired: dict[str, Any] = {}
            for a, b in pairs:
                mode = a.removeprefix("argon_proxy_")
                sa, sb = samples.get(a, []), samples.get(b, [])
                if isinstance(runs.get(a), dict) and isinstance(runs.get(b), dict) and len(sa) == len(sb):
                    each = [x["tps"] / y["tps"] for x, y in zip(sa, sb, strict=True) if y["tps"]]
                    paired[mode] = {"ratios": [round(v, 3) for v in each],
                                    "median": round(statistics.median(each), 3) if each else None}
            runs["proxy_vs_pgbouncer_paired"] = paired
            # What each proxy itself spends per transaction (microseconds of CPU): the part of the
            # figure above that the proxy controls, and steadier than TPS on a busy 2-core machine.
            for name, part in (("argon_proxy_tls", "argon"), ("argon_proxy_plaintext", "argon"),
                               ("pgbouncer_tls", "pgbouncer"), ("pgbouncer_plaintext", "pgbouncer")):
                v = runs.get(name)
                if isinstance(v, dict) and v["tps"] and part in v["cpu_percent"]:
                    v["proxy_cpu_us_per_txn"] = round(v["cpu_percent"][part] / 100 * NCPU * 1e6 / v["tps"], 2)
            out[str(clients)] = runs
        self.results["throughput"] = out

    # 4. project create -------------------------------------------------------------------------------

    def project_create(self, client: Client) -> None:
        """2 x reps creates, one at a time, alternating two kinds: (a) POST, then connect through the
        proxy with the URI the POST returned until `SELECT 1` is answered (timed from before the POST);
        (b) POST, then poll the endpoint until `active` (timed likewise). Every POST is timed on its
        own. Each project is deleted (timed) before the next POST, once its compute is up, so one
        project's background first start never overlaps the next create."""
        rp = self.rp
        creates: list[float] = []
        first_query: list[float] = []
        ready: list[float] = []
        deletes: list[float] = []
        os.sync()  # earlier phases' dirty pages must not be flushed during the timed clones
        for i in range(2 * self.reps):
            t0 = time.perf_counter()
            resp = rp.api.post("/projects", json={"project": {"name": f"bench-create-{i}"}})
            creates.append((time.perf_counter() - t0) * 1000)
            if resp.status_code != 201:
                raise BenchError(f"POST /projects answered {resp.status_code}: {resp.text[:500]}")
            body = resp.json()
            project_id, endpoint_id = body["project"]["id"], body["endpoints"][0]["id"]
            try:
                if i % 2 == 0:
                    client.request("connect", body["connection_uris"][0]["connection_uri"])
                    first_query.append((time.perf_counter() - t0) * 1000)
                deadline = time.monotonic() + 30
                while True:
                    state = rp.api.get(f"/projects/{project_id}/endpoints/{endpoint_id}").json()["endpoint"]
                    if state["current_state"] == "active":
                        break
                    if time.monotonic() > deadline:
                        raise BenchError(f"new project's compute still {state['current_state']!r} after 30 s")
                    time.sleep(0.005)
                if i % 2 == 1:
                    ready.append((time.perf_counter() - t0) * 1000)
            finally:
                t1 = time.perf_counter()
                resp = rp.api.delete(f"/projects/{project_id}")
                deletes.append((time.perf_counter() - t1) * 1000)
                if resp.status_code != 200:
                    raise BenchError(f"DELETE /projects/{project_id} answered {resp.status_code}: {resp.text[:300]}")
        self.results["project_create_ms"] = summarize(creates)
        self.results["project_create_to_first_query_ms"] = summarize(first_query)
        self.results["project_create_to_active_ms"] = summarize(ready)
        self.results["project_delete_ms"] = summarize(deletes)

    # Cleanup -----------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        steps: list[tuple[str, Callable[[], None]]] = []
        for mode, bouncer in self.bouncers.items():
            steps.append((f"pgbouncer {mode}", bouncer.stop))
        for major, raw in self.raws.items():
            steps.append((f"raw PG{major}", raw.stop))
        if self.rp is not None:
            rp = self.rp
            for proj in self.projects.values():
                steps.append((f"project {proj.id}", lambda p=proj: rp.delete_project(p.id)))
            steps.append(("platform", rp.stop))
        if self.client is not None:
            steps.append(("client", self.client.close))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # keep cleaning up
                self.say(f"cleanup of {what} failed: {exc}")
                self.errors[f"cleanup {what}"] = str(exc)
        if "cleanup platform" not in self.errors:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            self.say(f"kept {self.root} for inspection")


# Report ----------------------------------------------------------------------------------------------

TARGET_COLD_START_RATIO = 2.0  # cold start p50 <= 2x the raw start p50
TARGET_CREATE_MS = 300.0  # project create (POST) p50
TARGET_BOUNCER_CLIENTS = (8, 32)  # proxy TPS >= PgBouncer TPS at these client counts

PGBENCH_LABELS = {"raw_unix": "raw Unix socket", "raw_tcp_tls": "raw TCP TLS", "argon_proxy_tls": "proxy TLS",
                  "pgbouncer_tls": "pgbouncer TLS", "argon_proxy_plaintext": "proxy plaintext",
                  "pgbouncer_plaintext": "pgbouncer plaintext"}


def _ms(s: Any) -> str:
    if not isinstance(s, dict):
        return str(s)
    return f"{s['median']:.1f} ms (p95 {s['p95']:.1f})"


def _x(r: Any) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _yes(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


def verdicts(results: dict[str, Any]) -> list[str]:
    """One line per target of the issue, straight from the medians of this run (no margins)."""
    lines: list[tuple[str, str]] = []
    cold = results.get("cold_start", {})
    ratios = {m: r.get("ratio") for m, r in cold.items()}
    # Decided on the medians themselves, not on the rounded ratio.
    ok = None if not cold else all(r["argon_cold_start_ms"]["median"]
                                   <= TARGET_COLD_START_RATIO * r["raw_start_ms"]["median"] for r in cold.values())
    detail = ", ".join(f"PG{m} {_x(v)}" for m, v in ratios.items()) or "not measured"
    lines.append((f"cold start p50 <= {TARGET_COLD_START_RATIO:g}x raw start p50", f"{_yes(ok)} ({detail})"))
    tp = results.get("throughput") or {}
    for clients in TARGET_BOUNCER_CLIENTS:
        runs = tp.get(str(clients)) or {}
        parts = []
        for mode in ("tls", "plaintext"):
            proxy, bouncer = runs.get(f"argon_proxy_{mode}"), runs.get(f"pgbouncer_{mode}")
            label = "TLS" if mode == "tls" else "plaintext"
            if isinstance(proxy, dict) and isinstance(bouncer, dict):
                # Unrounded, with the TPS: a 0.996x must not read as a tie won.
                parts.append(f"{label} {_yes(proxy['tps'] >= bouncer['tps'])} ({proxy['tps']:.0f} vs "
                             f"{bouncer['tps']:.0f} TPS = {proxy['tps'] / bouncer['tps']:.3f}x)")
            else:
                parts.append(f"{label} n/a")
        lines.append((f"proxy TPS >= PgBouncer TPS at {clients} clients", ", ".join(parts)))
    create = results.get("project_create_ms")
    ok = None if not isinstance(create, dict) else create["median"] <= TARGET_CREATE_MS
    detail = f"{create['median']:.0f} ms" if isinstance(create, dict) else "not measured"
    lines.append((f"project create (POST) p50 <= {TARGET_CREATE_MS:.0f} ms", f"{_yes(ok)} ({detail})"))
    mem = results.get("idle_memory", {})
    counts = {m: r["suspended"]["processes_at_idle"] for m, r in mem.items() if "suspended" in r}
    ok = None if not counts else all(v == 0 for v in counts.values())
    detail = ", ".join(f"PG{m} {v}" for m, v in counts.items()) or "not measured"
    lines.append(("suspended endpoint has 0 processes", f"{_yes(ok)} ({detail})"))
    width = max(len(label) for label, _ in lines) + 1
    return [f"{label + ':':<{width}} {text}" for label, text in lines]


def render_table(results: dict[str, Any], errors: dict[str, str]) -> str:
    env = results.get("environment", {})
    lines = ["Argon core benchmark", "=" * 20]
    if env:
        pgs = ", ".join(f"PG{m} {v}" for m, v in env["postgres"].items())
        clients = "/".join(str(c) for c in env.get("pgbench_clients", PGBENCH_CLIENT_COUNTS))
        lines += [f"CPUs: {env['cpus']} x {env['cpu_model']}   memory: {env['memory_gb']} GB   kernel: {env['kernel']}",
                  f"Python {env['python']}   psycopg {env['psycopg']}   clone backend: {env['clone_backend']}",
                  f"Postgres: {pgs}",
                  f"{env['pgbench']}   PgBouncer: {env['pgbouncer']}   "
                  f"load average at start: {env['loadavg_1m_at_start']}",
                  f"Repetitions: cold starts and warm connects {env['wakes']}, project creates {env['repetitions']} "
                  f"of each kind (p50 = median, p95 nearest rank)",
                  f"pgbench: -n -S -c {clients} (-j 1 for 1 client, else -j 2) -T {env['pgbench_seconds']}, "
                  f"scale {env['pgbench_scale']}; raw runs once first and once last, proxy and PgBouncer "
                  f"{env.get('pgbench_rounds', 1)} interleaved rounds each (median shown)"]
        if "tls" in env:
            lines.append(f"TLS negotiated (openssl s_client): proxy {env['tls']['argon_proxy']}, "
                         f"pgbouncer {env['tls']['pgbouncer']}")
        for m, s in env.get("raw_settings", {}).items():
            lines.append(f"Raw PG{m} runs with the compute's settings: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    lines += ["", "Targets (this run, no margins):"] + [f"  {v}" for v in verdicts(results)]
    rows: list[tuple[str, str, str, str]] = []
    for major, r in results.get("cold_start", {}).items():
        rows.append((f"cold start PG{major}", _ms(r["argon_cold_start_ms"]),
                     "raw start " + _ms(r["raw_start_ms"]), _x(r["ratio"])))
    warm = results.get("warm_connect_ms")
    if warm:
        tcp, unix = warm["ratios_vs_raw_tcp"], warm["ratios_vs_raw_unix"]
        for name, label in (("argon_proxy_tls", "proxy TLS"), ("argon_proxy_plaintext", "proxy plaintext")):
            rows.append((f"warm connect, {label}", _ms(warm[name]), "raw TCP " + _ms(warm["raw_tcp"]),
                         _x(tcp.get(name))))
            rows.append(("", "", "raw Unix " + _ms(warm["raw_unix"]), _x(unix.get(name))))
        rows.append(("warm connect, raw Unix socket", _ms(warm["raw_unix"]), "raw TCP", _x(tcp.get("raw_unix"))))
        for mode in ("plaintext", "tls"):
            name = f"pgbouncer_{mode}"
            rows.append((f"warm connect, pgbouncer {'TLS' if mode == 'tls' else mode}", _ms(warm.get(name)),
                         "raw TCP", _x(tcp.get(name))))
        rows.append(("(raw TCP with SCRAM auth)", _ms(warm["raw_tcp_scram"]), "raw TCP", _x(tcp.get("raw_tcp_scram"))))
    tp = results.get("throughput") or {}
    for clients in tp.get("clients", []):
        runs = tp.get(str(clients))
        if not runs:
            continue
        raws = [runs[n] for n in ("raw_tcp", "raw_tcp_repeat") if isinstance(runs.get(n), dict)]
        each = " / ".join(f"{r['tps']:.0f}" for r in raws)
        basev = (f"raw TCP {runs['raw_tps_baseline']:.0f} TPS (runs {each})" if raws else str(runs.get("raw_tcp")))
        for name, label in PGBENCH_LABELS.items():
            v = runs.get(name)
            value = f"{v['tps']:.0f} TPS" if isinstance(v, dict) else str(v)
            rows.append((f"pgbench -S -c {clients}, {label}", value, basev, _x(runs["ratios_vs_raw_tcp"].get(name))))
    if "project_create_ms" in results:
        rows.append(("project create (POST)", _ms(results["project_create_ms"]), "-", "-"))
    if "project_create_to_first_query_ms" in results:
        rows.append(("project create -> first SELECT 1", _ms(results["project_create_to_first_query_ms"]), "-", "-"))
    if "project_create_to_active_ms" in results:
        rows.append(("project create -> compute active", _ms(results["project_create_to_active_ms"]), "-", "-"))
    if "project_delete_ms" in results:
        rows.append(("project delete (DELETE)", _ms(results["project_delete_ms"]), "-", "-"))
    for major, r in results.get("idle_memory", {}).items():
        susp = r.get("suspended")
        if susp:
            rows.append((f"suspended endpoint PG{major}", f"{susp['processes_at_idle']} processes", "target: 0", "-"))
        a, b = r["argon_compute"], r["raw_postgres"]
        rows.append((f"idle memory PG{major} (PSS)", f"{a['pss_mb']:.1f} MB ({a['processes']} procs)",
                     f"raw {b['pss_mb']:.1f} MB ({b['processes']} procs)", _x(r["ratio_pss"])))
    if rows:
        header = ("measure", "Argon", "baseline", "ratio")
        widths = [max(len(str(row[i])) for row in [*rows, header]) for i in range(4)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines += ["", fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row).rstrip() for row in rows]
    if any(str(c) in tp for c in tp.get("clients", [])):
        lines += ["", "Proxy vs PgBouncer, same run (TPS ratio proxy / PgBouncer, >= 1.00x meets the target; "
                      "and the CPU each proxy spends per transaction):"]
        for clients in tp["clients"]:
            runs = tp.get(str(clients)) or {}

            def cmp(a: str, b: str, r: dict[str, Any] = runs) -> str:
                va, vb = r.get(a), r.get(b)
                if not (isinstance(va, dict) and isinstance(vb, dict)):
                    return "n/a"
                text = f"{va['tps']:.0f} / {vb['tps']:.0f} = {_x(ratio(va['tps'], vb['tps']))}"
                pair = (r.get("proxy_vs_pgbouncer_paired") or {}).get(a.removeprefix("argon_proxy_"))
                if pair and pair.get("median"):
                    text += f", round by round {_x(pair['median'])}"
                ca, cb = va.get("proxy_cpu_us_per_txn"), vb.get("proxy_cpu_us_per_txn")
                if ca and cb:
                    text += f" (proxy CPU {ca:.1f} / {cb:.1f} us per txn = {_x(ratio(ca, cb))})"
                return text

            lines.append(f"  {clients:>2} clients: TLS {cmp('argon_proxy_tls', 'pgbouncer_tls')};   "
                         f"plaintext {cmp('argon_proxy_plaintext', 'pgbouncer_plaintext')}")
        lines += ["", "CPU during pgbench (% of all cores; other = the rest of the machine, idle = unused):"]
        for clients in tp["clients"]:
            runs = tp.get(str(clients)) or {}
            drift = runs.get("raw_drift_percent")
            lines.append(f"  -c {clients} (-j {pgbench_threads(clients)})"
                         + (f", raw TCP drift first -> last run {drift:+.1f}%" if drift is not None else "") + ":")
            for name in runs.get("order", []):
                v = runs.get(name)
                if isinstance(v, dict):
                    parts = ", ".join(f"{k} {p:.1f}%" for k, p in v["cpu_percent"].items())
                    spread = ("   runs " + " / ".join(f"{t:.0f}" for t in v["tps_samples"])) if "tps_samples" in v else ""
                    lines.append(f"    {name:<22} {v['tps']:>7.0f} TPS  {parts}   (avg latency {v['latency_ms']} ms)"
                                 + spread)
    for major, r in results.get("idle_memory", {}).items():
        a, b = r["argon_compute"], r["raw_postgres"]
        lines.append(f"Idle PG{major} RSS: compute {a['rss_mb']:.1f} MB vs raw {b['rss_mb']:.1f} MB "
                     f"({_x(r['ratio_rss'])}); argon process itself {r['argon_process_rss_mb']:.1f} MB RSS")
        susp = r.get("suspended")
        if susp:
            lines.append(f"Suspended PG{major}: processes on its pgdata (cmdline or cwd): {susp['processes_while_active']} "
                         f"while active, {susp['processes_at_idle']} when the API said idle "
                         f"({susp['suspend_api_to_idle_ms']:.0f} ms after POST .../suspend), "
                         f"{susp['processes_1s_after_idle']} 1 s later")
    if errors:
        lines += ["", "ERRORS:"] + [f"  {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.core", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="10 wakes, 5 project creates of each kind, 4 s pgbench runs")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON results to PATH")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return 0

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    run = Run(quick=args.quick, reps=5 if args.quick else 10, wakes=10 if args.quick else 30,
              seconds=4 if args.quick else 8)
    started = time.monotonic()
    try:
        run.execute()
    except BaseException as exc:  # report what we have
        run.errors["run"] = f"{type(exc).__name__}: {exc}"
        run.say(f"run aborted: {exc!r}")
    finally:
        run.cleanup()
    run.results["elapsed_seconds"] = round(time.monotonic() - started, 1)
    report = {"results": run.results, "errors": run.errors}
    print(render_table(run.results, run.errors))
    print(f"\n(total {run.results['elapsed_seconds']} s)\n")
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())

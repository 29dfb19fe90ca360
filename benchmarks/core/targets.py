"""What is measured: the in-process platform and its projects, raw Postgres clusters with the
compute's settings, PgBouncer in front of a compute, pgbench runs against any of them."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from benchmarks.core.common import (
    NCPU,
    NOBODY,
    PGBENCH,
    PGBENCH_SCALE,
    PGBOUNCER,
    PGBOUNCER_POOL_SIZE,
    REPO_ROOT,
    SCRAM_PASSWORD,
    SCRAM_ROLE,
    BenchError,
    as_postgres_user,
    as_user,
    free_port,
    own_dir,
    pgbench_threads,
)
from benchmarks.core.procfs import postmaster_pid, stop_pid, system_cpu_ticks
from benchmarks.core.worker import Client


class RawPostgres:
    """A throwaway cluster: trust auth, TCP on loopback, no TLS, the compute's memory settings."""

    def __init__(self, bindir: Path, root: Path, settings: dict[str, str]) -> None:
        self.bindir = bindir
        self.dir = own_dir(root)
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
                             **as_postgres_user())
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
                             timeout=120, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, **as_postgres_user())
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
                                         **as_postgres_user())

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
        stop_pid(self.proc, signal.SIGINT)  # fast shutdown
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
        self.dir = own_dir(root, upstream.uid, upstream.gid)
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
                                         **as_user(self.upstream.uid, self.upstream.gid))
        try:
            client.request("poll", self.dsn, timeout=20)
        except BenchError as exc:
            log = ""
            with contextlib.suppress(OSError):
                log = (self.dir / "stderr.log").read_text()[-500:] + (self.dir / "pgbouncer.log").read_text()[-500:]
            raise BenchError(f"pgbouncer did not answer: {exc}; {log}") from None

    def stop(self) -> None:
        stop_pid(self.proc, signal.SIGTERM)  # immediate shutdown
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

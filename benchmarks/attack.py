"""The proxy under attack: well-behaved logins while strangers and a hostile tenant hammer it.

Run from the repository root, as root or as a user that can run Postgres itself:

    .venv/bin/python -m benchmarks.attack [--quick] [--json PATH]

One run starts a whole platform in this process (as `benchmarks.core` does), two projects (a
well-behaved one and a hostile tenant's), then measures the p50/p99 login latency of a well-behaved
client (connect over TLS with SCRAM + `SELECT 1` + close, one after the other, from a separate
process) in three phases, side by side: quiet, under attack, quiet again. The attack runs in its
own process, from other loopback addresses (an attacker is not the victim's address):

- 1,000 silent TCP connections (50 from each of 20 addresses), reopened as the proxy drops them;
- 100 clients looping on a wrong password (the password hack: the proxy runs PBKDF2 for each);
- the tenant, whose role's verifier asks for 10**9 PBKDF2 iterations (set straight in `pg_authid`,
  as `ALTER ROLE ... PASSWORD` would, without Postgres' own minutes-long check of it), looping on
  `POST /sql` and on cleartext logins with its password.

Target: p99 under attack <= 2x p99 without (the quiet phases together). The attack is bounded in
time and stops by itself; everything started here is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from benchmarks.core.common import REPO_ROOT, short_tmpdir, stop_on_sigterm, summarize
from benchmarks.core.targets import Project, start_platform
from benchmarks.core.worker import Client

TARGET_RATIO = 2.0
SILENT = 1000
SILENT_SOURCES = 20  # 127.0.1.1 ... : 50 each, under the per-client cap
WRONG_PASSWORD_CLIENTS = 100
TENANT_SQL_LOOPS = 8
TENANT_LOGIN_LOOPS = 4


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-99 * len(ordered) // 100) - 1)]


def _stats(values: list[float]) -> dict[str, Any]:
    out = summarize(values)
    out["p99"] = round(_p99(values), 2)
    return out


# The attacker: a separate process (`--attacker CONFIG`) ------------------------------------------


async def _silent(port: int, source: str, stop: float, counts: dict[str, int]) -> None:
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        except OSError:
            counts["silent_connect_failed"] += 1
            await asyncio.sleep(0.1)
            continue
        counts["silent_opened"] += 1
        try:
            await asyncio.wait_for(reader.read(), max(0.1, stop - time.monotonic()))  # until the proxy drops it
            counts["silent_dropped"] += 1
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()


async def _password_loop(port: int, endpoint: str, password: str, source: str, stop: float, counts: dict[str, int],
                         label: str) -> None:
    """Log in again and again with the password hack (cleartext: the proxy runs PBKDF2 for each)."""
    from argon.wire import codec

    startup = codec.startup_message({"user": "neondb_owner", "database": "neondb"})
    message = codec.password_message(f"endpoint={endpoint};{password}")
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            writer.write(startup)
            await reader.readexactly(9)  # AuthenticationCleartextPassword
            writer.write(message)
            reply = await asyncio.wait_for(reader.read(), max(0.1, stop - time.monotonic()))
            counts[f"{label}_" + ("refused" if b"password authentication failed" in reply else "other")] += 1
            writer.close()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            counts[f"{label}_error"] += 1
            await asyncio.sleep(0.05)


async def _tenant_sql(http_url: str, dsn: str, source: str, stop: float, counts: dict[str, int]) -> None:
    import httpx

    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(transport=transport, timeout=60) as client:
        while time.monotonic() < stop:
            try:
                resp = await client.post(http_url + "/sql", json={"query": "select 1"},
                                         headers={"Neon-Connection-String": dsn})
                counts[f"tenant_sql_{resp.status_code}"] += 1
            except httpx.HTTPError:
                counts["tenant_sql_error"] += 1
                await asyncio.sleep(0.05)


async def _attack(cfg: dict[str, Any]) -> dict[str, int]:
    from collections import Counter

    counts: Counter[str] = Counter()
    stop = time.monotonic() + cfg["seconds"]
    tasks = [_silent(cfg["port"], f"127.0.1.{1 + i % SILENT_SOURCES}", stop, counts) for i in range(SILENT)]
    tasks += [_password_loop(cfg["port"], cfg["victim_endpoint"], "not-the-password", "127.0.2.1", stop, counts,
                             "wrong_password") for _ in range(WRONG_PASSWORD_CLIENTS)]
    tasks += [_tenant_sql(cfg["http_url"], cfg["tenant_dsn"], "127.0.3.1", stop, counts)
              for _ in range(TENANT_SQL_LOOPS)]
    tasks += [_password_loop(cfg["port"], cfg["tenant_endpoint"], cfg["tenant_password"], "127.0.3.2", stop, counts,
                             "tenant_login") for _ in range(TENANT_LOGIN_LOOPS)]
    await asyncio.gather(*tasks)
    return dict(counts)


def attacker_main(config: str) -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 16), hard))
    cfg = json.loads(config)
    print("ready", flush=True)
    print(json.dumps(asyncio.run(_attack(cfg))), flush=True)


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (the attacker competes for the same cores as the platform)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 1)


# The run -------------------------------------------------------------------------------------------


@dataclass
class Run:
    logins: int  # per phase
    attack_seconds: float
    root: Path = field(default_factory=lambda: short_tmpdir("aa"))
    rp: Any = None
    client: Client | None = None
    attacker: subprocess.Popen[str] | None = None
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def say(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def logins_ms(self, dsn: str, n: int, *, until: float | None = None) -> list[float]:
        assert self.client is not None
        out = []
        for _ in range(n):
            if until is not None and time.monotonic() > until:
                break
            out.append(self.client.request("connect", dsn, timeout=30)["ms"])
        return out

    def wait_active(self, project: Project) -> None:
        deadline = time.monotonic() + 60
        while project.state(self.rp) != "active":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{project.endpoint_id} did not start")
            time.sleep(0.1)

    def set_verifier_iterations(self, project: Project, iterations: int) -> None:
        from argon.compute.admin import connect_admin
        from argon.wire.scram import ScramSecret

        async def update() -> None:
            conn = await connect_admin(self.rp.plane.layout.socket_dir(project.endpoint_id))
            try:
                cur = await conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'neondb_owner'")
                row = await cur.fetchone()
                assert row is not None
                old = ScramSecret.parse(row[0])
                huge = ScramSecret(iterations, old.salt, old.stored_key, old.server_key).to_string()
                await conn.execute("UPDATE pg_authid SET rolpassword = %s WHERE rolname = 'neondb_owner'", (huge,))
            finally:
                await conn.close()

        self.rp.call(update())

    def execute(self) -> None:
        self.client = Client()
        self.say(f"starting the platform in {self.root} ...")
        (self.root / "argon").mkdir(mode=0o755, exist_ok=True)
        self.rp = start_platform(self.root / "argon")
        major = self.rp.plane.settings.default_pg_version or max(self.rp.plane.installs)
        good = Project.create(self.rp, "well-behaved", major)
        tenant = Project.create(self.rp, "hostile", major)
        self.wait_active(good)
        self.wait_active(tenant)
        self.set_verifier_iterations(tenant, 10**9)
        self.results["environment"] = {"cpus": os.cpu_count(), "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
                                       "logins_per_phase": self.logins, "attack_seconds": self.attack_seconds,
                                       "silent": SILENT, "wrong_password_clients": WRONG_PASSWORD_CLIENTS,
                                       "tenant_sql_loops": TENANT_SQL_LOOPS, "tenant_login_loops": TENANT_LOGIN_LOOPS,
                                       "tenant_iterations": 10**9}
        self.logins_ms(good.uri, 20)  # warm up: TLS session, pool, caches
        self.say(f"quiet: {self.logins} logins ...")
        before = self.logins_ms(good.uri, self.logins)
        self.say("attack: starting the attacker ...")
        cfg = {"port": self.rp.proxy_port, "http_url": self.rp.api_url, "seconds": self.attack_seconds,
               "victim_endpoint": good.endpoint_id, "tenant_dsn": tenant.uri, "tenant_endpoint": tenant.endpoint_id,
               "tenant_password": unquote(urlsplit(tenant.uri).password or "")}
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.attacker = subprocess.Popen([sys.executable, "-m", "benchmarks.attack", "--attacker", json.dumps(cfg)],
                                         cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         text=True)
        assert self.attacker.stdout is not None
        if self.attacker.stdout.readline().strip() != "ready":
            raise RuntimeError("the attacker did not start")
        attack_end = time.monotonic() + self.attack_seconds
        cpu_start = (time.process_time(), time.monotonic())
        time.sleep(min(12.0, self.attack_seconds / 3))  # let every part of the attack reach full strength
        proxy = self.rp.platform.proxy
        peak = {"sessions": proxy.sessions, "unauthenticated": proxy.unauthenticated}
        self.say(f"attack: {self.logins} logins (proxy holds {peak['sessions']} sessions, "
                 f"{peak['unauthenticated']} unauthenticated) ...")
        during = self.logins_ms(good.uri, self.logins, until=attack_end - 1)
        peak_after = {"sessions": proxy.sessions, "unauthenticated": proxy.unauthenticated,
                      "refused": dict(proxy.refused)}
        platform_cpu = (time.process_time() - cpu_start[0]) / (time.monotonic() - cpu_start[1])
        attacker_pid = self.attacker.pid
        attacker_cpu = _cpu_seconds(attacker_pid)
        out, _ = self.attacker.communicate(timeout=self.attack_seconds + 120)
        self.attacker = None
        attack_counts = json.loads(out.strip().splitlines()[-1])
        self.say("quiet again ...")
        time.sleep(2)
        after = self.logins_ms(good.uri, self.logins)
        quiet = before + after
        self.results["login_ms"] = {"quiet_before": _stats(before), "under_attack": _stats(during),
                                    "quiet_after": _stats(after), "quiet": _stats(quiet)}
        self.results["ratio_p99"] = round(_p99(during) / _p99(quiet), 2)
        self.results["ratio_p50"] = round(_stats(during)["median"] / _stats(quiet)["median"], 2)
        self.results["attack"] = {"proxy_at_start_of_measure": peak, "proxy_at_end_of_measure": peak_after,
                                  "attacker_outcomes": attack_counts,
                                  "platform_cpu_cores_while_measuring": round(platform_cpu, 2),
                                  "attacker_cpu_seconds": attacker_cpu}
        self.results["target_met"] = _p99(during) <= TARGET_RATIO * _p99(quiet)

    def cleanup(self) -> None:
        if self.attacker is not None and self.attacker.poll() is None:
            self.attacker.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.attacker.wait(10)
            if self.attacker.poll() is None:
                self.attacker.kill()
        if self.client is not None:
            self.client.close()
        if self.rp is not None:
            try:
                self.rp.stop()
            except Exception as exc:
                self.errors["stop"] = repr(exc)
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


def render_table(results: dict[str, Any], errors: dict[str, str]) -> str:
    lines = ["Argon proxy under attack", "=" * 24]
    env = results.get("environment")
    if env:
        lines += [f"CPUs: {env['cpus']}   load average at start: {env['loadavg_1m_at_start']}   "
                  f"logins per phase: {env['logins_per_phase']}   attack: {env['attack_seconds']:.0f} s",
                  f"Attack: {env['silent']} silent connections, {env['wrong_password_clients']} wrong-password "
                  f"clients, a tenant with a {env['tenant_iterations']:.0e}-iteration verifier "
                  f"({env['tenant_sql_loops']} /sql loops, {env['tenant_login_loops']} login loops)"]
    login = results.get("login_ms")
    if login:
        rows = [("phase", "n", "p50 ms", "p95 ms", "p99 ms", "max ms")]
        for name, label in (("quiet_before", "quiet (before)"), ("under_attack", "under attack"),
                            ("quiet_after", "quiet (after)"), ("quiet", "quiet (both)")):
            s = login[name]
            rows.append((label, str(s["n"]), f"{s['median']:.1f}", f"{s['p95']:.1f}", f"{s['p99']:.1f}",
                         f"{s['max']:.1f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines += [""] + ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        ok = "yes" if results["target_met"] else "NO"
        lines += ["", f"p99 under attack / p99 quiet = {results['ratio_p99']:.2f}x (target <= {TARGET_RATIO:g}x): {ok}",
                  f"p50 under attack / p50 quiet = {results['ratio_p50']:.2f}x"]
        attack = results["attack"]
        lines += [f"proxy while measuring: {attack['proxy_at_start_of_measure']} -> {attack['proxy_at_end_of_measure']}",
                  f"attacker outcomes: {attack['attacker_outcomes']}",
                  f"CPU while measuring under attack: the platform {attack['platform_cpu_cores_while_measuring']} "
                  f"cores; the attacker (same machine) {attack['attacker_cpu_seconds']} s so far"]
    if errors:
        lines += ["", "ERRORS:"] + [f"  {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attack", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 logins per phase, a 40 s attack")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON results to PATH")
    parser.add_argument("--attacker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attacker:
        attacker_main(args.attacker)
        return 0

    stop_on_sigterm()
    run = Run(logins=100 if args.quick else 300, attack_seconds=40 if args.quick else 90)
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
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())

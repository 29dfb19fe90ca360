"""Compute units enforced (issue 17): CPU share by CU, a noisy neighbour with and without limits,
and autoscaling, side by side in one platform.

Run from the repository root, as root on a host with cgroups (v2, or v1's cpu, cpuacct and memory):

    .venv/bin/python -m benchmarks.compute_limits [--seconds 8] [--json PATH]

Every load is pgbench with a server-side CPU script (`SELECT sum(g) FROM generate_series(1, N) g`),
so the CPU pgbench's own client processes spend (outside any compute's cgroup) stays small. One
platform, in this process, with `autoscaling_quiet_seconds` of 5 (the default is 30):

1. share: a 0.25 CU compute under `pgbench -c 8`, next to an idle one: the CPU its cgroup used per
   second (target: 0.25 within 10 %), and its TPS against a 1 CU compute's under the same load;
2. noisy neighbour: a 1 CU compute's TPS under `pgbench -c 2`, alone, then while a noisy tenant runs
   `pgbench -c 8` at 0.25 CU (limited), then at 16 CU (on this machine: no limit); target >= 90 %
   of the alone TPS with the limit;
3. autoscaling: a 0.25..2 CU compute under `pgbench -c 4`: seconds from load start to 1 CU and to
   2 CU, from load end back to 0.25 CU (the quiet period included), and its TPS against a compute
   fixed at 2 CU under the same load;
4. cold start: suspend, then connect and `SELECT 1` through the proxy, at 0.25 CU and at 16 CU.

Prints progress on stderr, then a table and the JSON on stdout. Everything it starts is stopped in
`finally` blocks (the platform by its own stop; pgbench by PID).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.core.common import PGBENCH, BenchError, short_tmpdir, stop_on_sigterm

SCRIPT = "SELECT sum(g) FROM generate_series(1, 100000) g;\n"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, root: Path, seconds: float) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.fixtures.platform import RunningPlatform

        self.rp = RunningPlatform(root, autoscaling_quiet_seconds=5.0)
        import logging

        logging.getLogger("argon").setLevel(logging.INFO)
        if self.rp.plane.computes.cgroups is None:
            raise BenchError(f"compute limits are not enforced here: {self.rp.plane.computes.limits_note}")
        self.seconds = seconds
        self.script = root / "cpu.sql"
        self.script.write_text(SCRIPT)
        self.projects: list[str] = []

    def compute(self, name: str, lo: float, hi: float) -> dict[str, Any]:
        created = self.rp.create_project(name=name, default_endpoint_settings={
            "autoscaling_limit_min_cu": lo, "autoscaling_limit_max_cu": hi})
        self.projects.append(created["project"]["id"])
        with psycopg.connect(self.rp.dsn(created), connect_timeout=60) as conn:
            conn.execute("SELECT 1")
        return created

    def resize(self, created: dict[str, Any], cu: float) -> None:
        pid, eid = created["project"]["id"], created["endpoints"][0]["id"]
        resp = self.rp.api.patch(f"/projects/{pid}/endpoints/{eid}", json={"endpoint": {
            "autoscaling_limit_min_cu": cu, "autoscaling_limit_max_cu": cu}})
        if resp.status_code != 200 or "autoscaling_limit_max_cu" not in resp.json()["applied"]["now"]:
            raise BenchError(f"resize failed: {resp.text[:300]}")

    def pgbench(self, created: dict[str, Any], clients: int, seconds: float) -> subprocess.Popen[str]:
        p = self.rp.params(created)
        env = {**os.environ, "PGHOST": p["host"], "PGPORT": p["port"], "PGUSER": p["user"],
               "PGPASSWORD": p["password"], "PGDATABASE": p["dbname"], "PGSSLMODE": "disable",
               "PGOPTIONS": f"endpoint={created['endpoints'][0]['id']}"}
        return subprocess.Popen([PGBENCH, "-n", "-c", str(clients), "-j", str(min(clients, 2)), "-T",
                                 str(int(seconds)), "-f", str(self.script)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    @staticmethod
    def tps(proc: subprocess.Popen[str]) -> float:
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        m = re.search(r"tps = ([\d.]+)", out)
        if proc.returncode != 0 or m is None:
            raise BenchError(f"pgbench failed: {out[-800:]}")
        return float(m.group(1))

    def cpu_usec(self, created: dict[str, Any]) -> int:
        usage = self.rp.plane.computes.usage(created["endpoints"][0]["id"])
        if usage is None:
            raise BenchError("no cgroup usage for the compute")
        return usage.cpu_usec

    def current_cu(self, created: dict[str, Any]) -> float:
        return self.rp.control.autoscaler.current_cu(created["endpoints"][0]["id"]) or 0.0

    def close(self) -> None:
        for pid in self.projects:
            self.rp.delete_project(pid)
        self.rp.stop()

    # Scenarios ------------------------------------------------------------------------------------------

    def share(self) -> dict[str, Any]:
        quarter, idle, whole = self.compute("quarter", 0.25, 0.25), self.compute("idle", 0.25, 0.25), \
            self.compute("whole", 1, 1)
        out: dict[str, Any] = {}
        for name, created in (("0.25 CU", quarter), ("1 CU", whole)):
            say(f"share: pgbench -c 8 on the {name} compute for {self.seconds:g} s")
            before, t0 = self.cpu_usec(created), time.monotonic()
            tps = self.tps(self.pgbench(created, 8, self.seconds))
            cpus = (self.cpu_usec(created) - before) / 1e6 / (time.monotonic() - t0)
            out[name] = {"tps": tps, "cpus_used": round(cpus, 3)}
        out["idle neighbour cpu seconds, whole run"] = round(self.cpu_usec(idle) / 1e6, 3)
        share = out["0.25 CU"]["cpus_used"]
        out["verdict share within 10%"] = abs(share - 0.25) <= 0.025
        out["tps ratio 0.25/1 CU"] = round(out["0.25 CU"]["tps"] / out["1 CU"]["tps"], 3)
        return out

    def neighbour(self) -> dict[str, Any]:
        victim, noisy = self.compute("victim", 1, 1), self.compute("noisy", 0.25, 0.25)
        out: dict[str, Any] = {}
        say(f"neighbour: the 1 CU compute alone, pgbench -c 2 for {self.seconds:g} s")
        out["alone tps"] = self.tps(self.pgbench(victim, 2, self.seconds))
        for label, cu in (("noisy at 0.25 CU", 0.25), ("noisy at 16 CU (no limit)", 16)):
            if cu != 0.25:
                self.resize(noisy, cu)
            say(f"neighbour: the 1 CU compute next to a {label} running pgbench -c 8")
            loud = self.pgbench(noisy, 8, self.seconds + 2)
            time.sleep(1)
            before = self.cpu_usec(noisy)
            t0 = time.monotonic()
            tps = self.tps(self.pgbench(victim, 2, self.seconds))
            noisy_cpus = (self.cpu_usec(noisy) - before) / 1e6 / (time.monotonic() - t0)
            self.tps(loud)
            out[label] = {"victim tps": tps, "ratio to alone": round(tps / out["alone tps"], 3),
                          "noisy cpus": round(noisy_cpus, 3)}
        out["verdict >= 90% with limits"] = out["noisy at 0.25 CU"]["ratio to alone"] >= 0.9
        return out

    def cold_start(self, rounds: int = 7) -> dict[str, Any]:
        """Suspend, then time a new connection's first `SELECT 1` (the wake included): at 0.25 CU
        the start-up itself runs under the quota."""
        out: dict[str, Any] = {}
        for label, cu in (("0.25 CU", 0.25), ("16 CU (no limit here)", 16)):
            created = self.compute(f"cold{cu:g}", cu, cu)
            pid, eid = created["project"]["id"], created["endpoints"][0]["id"]
            times = []
            for _ in range(rounds):
                resp = self.rp.api.post(f"/projects/{pid}/endpoints/{eid}/suspend")
                if resp.status_code != 200:
                    raise BenchError(f"suspend failed: {resp.text[:300]}")
                t0 = time.monotonic()
                with psycopg.connect(self.rp.dsn(created), connect_timeout=60) as conn:
                    conn.execute("SELECT 1")
                times.append((time.monotonic() - t0) * 1000)
            times.sort()
            out[label] = {"median ms": round(times[len(times) // 2], 1), "max ms": round(times[-1], 1)}
            say(f"cold start at {label}: median {out[label]['median ms']} ms")
        return out

    def autoscaling(self) -> dict[str, Any]:
        scaled, fixed = self.compute("scaled", 0.25, 2), self.compute("fixed", 2, 2)
        out: dict[str, Any] = {}
        seconds = max(self.seconds, 10)
        say(f"autoscaling: pgbench -c 4 on a 0.25..2 CU compute for {seconds:g} s")
        t0 = time.monotonic()
        bench = self.pgbench(scaled, 4, seconds)
        reached: dict[float, float] = {}
        while bench.poll() is None:
            cu = self.current_cu(scaled)
            for step in (1.0, 2.0):
                if cu >= step and step not in reached:
                    reached[step] = round(time.monotonic() - t0, 2)
            time.sleep(0.05)
        out["scaled tps"] = self.tps(bench)
        ended = time.monotonic()
        out["seconds to 1 CU"] = reached.get(1.0)
        out["seconds to 2 CU"] = reached.get(2.0)
        while self.current_cu(scaled) > 0.25 and time.monotonic() - ended < 60:
            time.sleep(0.05)
        out["seconds from load end to 0.25 CU"] = round(time.monotonic() - ended, 2)
        out["quiet period (s)"] = self.rp.settings.autoscaling_quiet_seconds
        say(f"autoscaling: the same on a compute fixed at 2 CU for {seconds:g} s")
        out["fixed 2 CU tps"] = self.tps(self.pgbench(fixed, 4, seconds))
        out["tps ratio scaled/fixed"] = round(out["scaled tps"] / out["fixed 2 CU tps"], 3)
        return out


def table(results: dict[str, Any]) -> str:
    lines = []
    for section, values in results.items():
        if not isinstance(values, dict):
            continue
        lines.append(section)
        for key, value in values.items():
            lines.append(f"  {key:<38} {json.dumps(value)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each pgbench run")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if not Path(PGBENCH).exists():
        print(f"{PGBENCH} is missing", file=sys.stderr)
        return 2
    stop_on_sigterm()
    root = short_tmpdir("cl")
    results: dict[str, Any] = {"cpus": os.cpu_count(), "seconds": args.seconds}
    bench = None
    try:
        bench = Bench(root, args.seconds)
        results["limits"] = bench.rp.plane.computes.limits_note
        results["share"] = bench.share()
        results["neighbour"] = bench.neighbour()
        results["autoscaling"] = bench.autoscaling()
        results["cold start"] = bench.cold_start()
    except BenchError as exc:
        results["error"] = str(exc)
    finally:
        if bench is not None:
            bench.close()
        shutil.rmtree(root, ignore_errors=True)
    print(table(results))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if "error" in results else 0


if __name__ == "__main__":
    sys.exit(main())

"""Argon's branching benchmark: how long a branch takes to be queryable, and what it costs on disk,
against `cp -a` of the same data in the same run, on the copy and reflink backends.

Run from the repository root (root is needed for the reflink backend: a loop-mounted XFS image):

    /work/venv/bin/python -m benchmarks.branching [--sizes 40M,1G,5G] [--quick] [--json PATH]

For each backend (copy: this machine's filesystem; reflink: an XFS image made by `argon storage
init`'s code) and each parent size (pgbench data of ~40 MB, ~1 GB, ~5 GB), one run measures:

1. `cp -a` (with `--reflink=never` / `always`, as the backend copies) of the parent's data directory
   without `pg_wal` (what a branch copies), after a CHECKPOINT (an idle parent has nothing to flush);
2. branch from head with the parent idle: API call -> first `SELECT 1` through the proxy on the new
   branch, and the disk space it took; with history on (the default: the branch's history base is
   a second clone) and off (`history_retention_seconds: 0`);
   1 and 2 run interleaved, each after a sync, three rounds (one with --quick); medians are reported.
   `cp -a` leaves the copy in the page cache; a branch's first start makes it durable (Postgres
   fsyncs every file of a cluster that was not shut down cleanly), so `cp -a` + `sync` is shown too;
3. the same under pgbench write load on the parent (4 clients, TPC-B-like);
then, on the smallest parent: point-in-time branches against the amount of WAL replayed, and the
parent's TPS alone, while branches are being created, and after 20 branches exist.
Everything started here is stopped in `finally` blocks; the XFS image is unmounted and removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.core.common import PGBENCH, BenchError, backend_root, say, used_bytes
from benchmarks.core.targets import start_platform

MB = 1024 * 1024
SCALE_PER_MB = 1 / 15.0  # pgbench: ~15 MB of data per scale unit
SIZES = {"40M": 40, "1G": 1024, "5G": 5120}


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def wait_queryable(uri: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(uri, connect_timeout=30) as conn:
                conn.execute("SELECT 1")
                return
        except psycopg.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Load:
    """pgbench TPC-B-like writes on the parent while something else happens."""

    def __init__(self, uri: str, clients: int = 4) -> None:
        self.proc = subprocess.Popen([PGBENCH, "-n", "-c", str(clients), "-j", "2", "-T", "3600", "-P", "1", uri],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.started = time.monotonic()

    def stop(self) -> float:
        """Stop it; returns the TPS over its run."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        rates = [float(line.split()[3]) for line in err.splitlines() if line.startswith("progress:") and " tps" in line]
        return round(statistics.mean(rates), 1) if rates else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: dict[str, Any] = {"backends": {}, "pitr": [], "parent_tps": {}}
        self.errors: dict[str, str] = {}

    def branch(self, running: Any, pid: str, **spec: Any) -> tuple[float, float, dict[str, Any]]:
        """(ms until the API answered, ms until SELECT 1 on the branch, the response)."""
        t0 = time.perf_counter()
        resp = running.api.post(f"/projects/{pid}/branches", json={"branch": spec, "endpoints": [{"type": "read_write"}]})
        api = (time.perf_counter() - t0) * 1000
        if resp.status_code != 201:
            raise BenchError(f"branch create: {resp.status_code} {resp.text[:300]}")
        created = resp.json()
        wait_queryable(created["connection_uris"][0]["connection_uri"])
        return round(api, 1), round((time.perf_counter() - t0) * 1000, 1), created

    @staticmethod
    def checkpoint(running: Any, endpoint_id: str) -> None:
        from argon.compute.admin import connect_admin

        async def run() -> None:
            conn = await connect_admin(running.plane.layout.socket_dir(endpoint_id))
            try:
                await conn.execute("CHECKPOINT")
            finally:
                await conn.close()

        running.call(run(), timeout=600)

    def measure_backend(self, kind: str) -> None:
        largest = max(SIZES[s] for s in self.args.sizes)
        with backend_root(kind, max(4, largest * 5 // 1024 + 4)) as root:
            running = start_platform(root)
            try:
                assert running.plane.backend.name == kind, running.plane.backend.name
                rows = {}
                for size in self.args.sizes:
                    say(f"{kind}: parent of ~{size} ...")
                    rows[size] = self.measure_size(running, root, kind, size)
                self.results["backends"][kind] = rows
                if kind == self.args.extra_on:
                    self.measure_pitr(running)
                    self.measure_parent_tps(running)
            finally:
                running.stop()

    def measure_size(self, running: Any, root: Path, kind: str, size: str) -> dict[str, Any]:
        created = running.create_project(name=f"bench-{size}")
        pid = created["project"]["id"]
        uri = created["connection_uris"][0]["connection_uri"]
        scale = max(1, round(SIZES[size] * SCALE_PER_MB))
        t0 = time.perf_counter()
        init = subprocess.run([PGBENCH, "-i", "-q", "-s", str(scale), uri], capture_output=True, text=True)
        if init.returncode != 0:
            raise BenchError(init.stderr[-500:])
        say(f"  pgbench -i -s {scale} in {time.perf_counter() - t0:.1f} s")
        pgdata = running.plane.layout.pgdata(pid, created["branch"]["id"])
        self.checkpoint(running, created["endpoints"][0]["id"])  # "idle": nothing left to flush
        files = [pgdata / name for name in sorted(os.listdir(pgdata)) if name != "pg_wal"]
        data = sum(tree_bytes(f) if f.is_dir() else f.stat().st_size for f in files)
        row: dict[str, Any] = {"pgbench_scale": scale, "data_mb": round(data / MB, 1)}
        # cp -a of the same data (the cluster without pg_wal, as a branch copies it), same filesystem,
        # interleaved with the branches it is compared with; every step starts after a sync, so
        # none pays for the previous one's writeback. Medians of `reps` rounds.
        data_dir = root / "data"
        cp_ms: list[float] = []
        sync_ms: list[float] = []
        idle: dict[str, list[tuple[float, float, float]]] = {"on": [], "off": []}
        reps = 1 if self.args.quick else 3
        for rep in range(reps):
            target = data_dir / "cp-baseline"
            target.mkdir()
            os.sync()
            t0 = time.perf_counter()
            subprocess.run(["cp", "-a", f"--reflink={'always' if kind == 'reflink' else 'never'}", "-t",
                            str(target), *map(str, files)], check=True, capture_output=True)
            cp_ms.append((time.perf_counter() - t0) * 1000)
            os.sync()  # the copy made durable: what a branch's first start does (Postgres fsyncs its files)
            sync_ms.append((time.perf_counter() - t0) * 1000)
            shutil.rmtree(target, ignore_errors=True)
            for history in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                self.checkpoint(running, created["endpoints"][0]["id"])
                running.api.patch(f"/projects/{pid}", json={"project": {
                    "history_retention_seconds": 86400 if history == "on" else 0}})
                before = used_bytes(data_dir)  # syncs
                api, ready, child = self.branch(running, pid, name=f"idle-history-{history}-{rep}")
                idle[history].append((api, ready, (used_bytes(data_dir) - before) / MB))
                say(f"  idle, history {history}: queryable in {ready:.0f} ms (cp -a {cp_ms[-1]:.0f} ms)")
                running.api.delete(f"/projects/{pid}/branches/{child['branch']['id']}")
        row["cp_a_ms"] = round(statistics.median(cp_ms), 1)
        row["cp_a_samples_ms"] = [round(v, 1) for v in cp_ms]
        row["cp_a_sync_ms"] = round(statistics.median(sync_ms), 1)
        for history, samples in idle.items():
            row[f"idle_history_{history}"] = {
                "api_ms": round(statistics.median(s[0] for s in samples), 1),
                "queryable_ms": round(statistics.median(s[1] for s in samples), 1),
                "disk_mb": round(statistics.median(s[2] for s in samples), 1),
                "queryable_samples_ms": [s[1] for s in samples]}
        running.api.patch(f"/projects/{pid}", json={"project": {"history_retention_seconds": 86400}})
        load = Load(uri)
        try:
            time.sleep(2)
            api, ready, child = self.branch(running, pid, name="under-load")
        finally:
            tps = load.stop()
        row["under_load"] = {"api_ms": api, "queryable_ms": ready, "parent_tps_meanwhile": tps}
        say(f"  under load: queryable in {ready:.0f} ms (parent at {tps:.0f} TPS)")
        running.api.delete(f"/projects/{pid}/branches/{child['branch']['id']}")
        running.delete_project(pid)
        return row

    def measure_pitr(self, running: Any) -> None:
        say("point in time vs WAL replayed ...")
        created = running.create_project(name="bench-pitr")
        pid = created["project"]["id"]
        uri = created["connection_uris"][0]["connection_uri"]
        try:
            with psycopg.connect(uri, autocommit=True) as conn:
                conn.execute("CREATE TABLE w (v int, pad text)")
                start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
                for wal_mb in self.args.pitr_wal:
                    while True:
                        conn.execute("INSERT INTO w SELECT g, repeat('x', 500) FROM generate_series(1, 20000) g")
                        lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
                        written = conn.execute("SELECT pg_wal_lsn_diff(%s, %s)", (lsn, start)).fetchone()[0]
                        if written >= wal_mb * MB:
                            break
                    rows = conn.execute("SELECT count(*) FROM w").fetchone()[0]
                    api, ready, child = self.branch(running, pid, parent_lsn=str(lsn))
                    with psycopg.connect(child["connection_uris"][0]["connection_uri"]) as c:
                        ok = c.execute("SELECT count(*) FROM w").fetchone()[0] == rows
                    self.results["pitr"].append({"wal_replayed_mb": round(float(written) / MB, 1), "api_ms": api,
                                                 "queryable_ms": ready, "exact": ok})
                    say(f"  {float(written) / MB:.0f} MB of WAL: queryable in {ready:.0f} ms (exact: {ok})")
                    running.api.delete(f"/projects/{pid}/branches/{child['branch']['id']}")
        finally:
            running.delete_project(pid)

    def measure_parent_tps(self, running: Any) -> None:
        say("parent TPS: alone, while branches are created, after 20 branches exist ...")
        created = running.create_project(name="bench-tps")
        pid = created["project"]["id"]
        uri = created["connection_uris"][0]["connection_uri"]
        seconds = self.args.tps_seconds
        try:
            subprocess.run([PGBENCH, "-i", "-q", "-s", "5", uri], check=True, capture_output=True)
            load = Load(uri)
            time.sleep(seconds)
            alone = load.stop()
            load = Load(uri)
            made = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds or made < 2:
                resp = running.api.post(f"/projects/{pid}/branches", json={"branch": {}, "endpoints": []})
                if resp.status_code != 201:
                    raise BenchError(resp.text[:300])
                made += 1
            during = load.stop()
            while made < 20:
                running.api.post(f"/projects/{pid}/branches", json={"branch": {}, "endpoints": []})
                made += 1
            load = Load(uri)
            time.sleep(seconds)
            after = load.stop()
            self.results["parent_tps"] = {"alone": alone, "while_branching": during, "after_20_branches": after,
                                          "branches_created_while_loaded": made}
        finally:
            running.delete_project(pid)

    def run(self) -> None:
        kinds = ["copy"] + (["reflink"] if os.geteuid() == 0 and not self.args.no_reflink else [])
        if "reflink" not in kinds:
            self.errors["reflink"] = ("skipped: --no-reflink" if self.args.no_reflink else
                                      "skipped: the reflink backend needs root (a loop-mounted XFS image)")
        self.args.extra_on = kinds[-1] if self.args.extra_on == "auto" else self.args.extra_on
        for kind in kinds:
            try:
                self.measure_backend(kind)
            except Exception as exc:
                self.errors[kind] = f"{type(exc).__name__}: {exc}"
                say(f"{kind} failed: {exc!r}")


def verdicts(results: dict[str, Any]) -> list[str]:
    out = []
    for size, row in results["backends"].get("reflink", {}).items():
        ms = row["idle_history_on"]["queryable_ms"]
        out.append(f"reflink, {size} parent idle: queryable in {ms:.0f} ms -> target <= 1000 ms "
                   f"{'MET' if ms <= 1000 else 'NOT MET'}")
    for size, row in results["backends"].get("copy", {}).items():
        for history in ("on", "off"):
            ms = row[f"idle_history_{history}"]["queryable_ms"]
            r, durable = ms / row["cp_a_ms"], ms / row.get("cp_a_sync_ms", row["cp_a_ms"])
            out.append(f"copy, {size} parent idle, history {history}: {r:.2f}x cp -a -> target <= 1.2x "
                       f"{'MET' if r <= 1.2 else 'NOT MET'} ({durable:.2f}x cp -a + sync)")
    return out


def render(results: dict[str, Any], errors: dict[str, str]) -> str:
    lines = ["Argon branching benchmark", "=========================", ""]
    header = f"{'backend':8} {'parent':7} {'data MB':>8} {'cp -a ms':>9} {'+sync ms':>9} {'idle ms':>9} {'disk MB':>8} " \
             f"{'no-history ms':>13} {'disk MB':>8} {'loaded ms':>10} {'parent TPS':>10}"
    lines += [header, "-" * len(header)]
    for kind, rows in results["backends"].items():
        for size, r in rows.items():
            on, off, load = r["idle_history_on"], r["idle_history_off"], r["under_load"]
            lines.append(f"{kind:8} {size:7} {r['data_mb']:>8} {r['cp_a_ms']:>9} {r.get('cp_a_sync_ms', '-'):>9} "
                         f"{on['queryable_ms']:>9} "
                         f"{on['disk_mb']:>8} {off['queryable_ms']:>13} {off['disk_mb']:>8} "
                         f"{load['queryable_ms']:>10} {load['parent_tps_meanwhile']:>10}")
    if results["pitr"]:
        lines += ["", "Point in time (branch at an LSN) vs WAL replayed:"]
        for p in results["pitr"]:
            lines.append(f"  {p['wal_replayed_mb']:>7} MB WAL -> queryable in {p['queryable_ms']:.0f} ms "
                         f"(API {p['api_ms']:.0f} ms), contents exact: {p['exact']}")
    if results["parent_tps"]:
        t = results["parent_tps"]
        lines += ["", f"Parent TPS (pgbench TPC-B-like, 4 clients): alone {t['alone']}, while branches are created "
                      f"{t['while_branching']}, after {t['branches_created_while_loaded']}+ branches exist "
                      f"{t['after_20_branches']}"]
    lines += ["", "Verdicts:"] + [f"  {v}" for v in verdicts(results)]
    for k, v in errors.items():
        lines.append(f"  ({k}: {v})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.branching", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="40M", help="parent sizes, comma separated, from 40M,1G,5G (default 40M)")
    parser.add_argument("--quick", action="store_true", help="shorter TPS runs and less WAL for point in time")
    parser.add_argument("--no-reflink", action="store_true", help="only the copy backend")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON results to PATH")
    args = parser.parse_args(argv)
    args.sizes = [s.strip().upper() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size {unknown[0]}; choose from {', '.join(SIZES)}")
    args.pitr_wal = (8, 32) if args.quick else (16, 64, 256)
    args.tps_seconds = 4 if args.quick else 10
    args.extra_on = "auto"
    bench = Bench(args)
    started = time.monotonic()
    try:
        bench.run()
    finally:
        bench.results["elapsed_seconds"] = round(time.monotonic() - started, 1)
    print(render(bench.results, bench.errors))
    report = {"results": bench.results, "errors": bench.errors}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(k != "reflink" or not v.startswith("skipped") for k, v in bench.errors.items()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Argon's backup benchmark (issue 14): RPO after losing the machine, restore time, overhead, and
what branches cost in the bucket.

Run from the repository root, as root or as a user who can run Postgres:

    .venv/bin/python -m benchmarks.backup [--quick] [--trials 10] [--sizes 100M,1G] [--bucket s3|file] [--json PATH]

1. **RPO**, for `s3://` (moto's S3 server on loopback) and `file://`: `argon up` runs as its own
   process with backup on (default settings); a writer commits numbered rows through the proxy,
   recording when each commit was acknowledged; after a random 2-4 s everything is killed with
   SIGKILL (`argon up`'s process group and every compute's), the data directory is deleted, and
   `argon restore` fills a new one. The restored cluster is read directly: the gap is the time
   between the last acknowledged commit and the last restored one (p50/max over the trials), and
   the number of acknowledged commits lost.
2. **Restore time** per size (pgbench data; the bucket on moto's S3 server, or `--bucket file`):
   `argon restore --eager` of a platform holding one project of that size (its compute suspended,
   so a base backup of the data is in the bucket), then time to the first query on the restored
   cluster; and the default lazy restore: `argon
   restore` (metadata), `argon up`, the first query through the proxy (whose wake restores the
   branch) and the end of the background sweep; against `pg_basebackup` of the same running
   cluster plus its start (WAL replay) on the same machine.
3. **Overhead**: pgbench TPC-B (4 clients) through the proxy on a platform with backup on against
   one without, interleaved rounds, medians; target >= 90 %.
4. **Bucket bytes** for a ~1 GB parent (the largest size given), and after 20 branches of it.

Everything runs under a short temp dir on loopback ports and is stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.core.common import NCPU, PGBENCH, REPO_ROOT, short_tmpdir

sys.path.insert(0, str(REPO_ROOT))

from tests.fixtures.argon_process import ArgonProcess, query, restored_cluster

SCALE_PER_MB = 1 / 15.0
# The computes get the whole machine (1 CU = 1 CPU, ADR 0019), as the plain clusters they are compared
# with do: at the default 0.25 CU the cgroup throttles loads, commits and a restore's replay.
COMPUTE_CU = float(NCPU)
SIZES = {"100M": 100, "1G": 1024, "5G": 5120}
ARGON = [sys.executable, "-m", "argon"]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


VERBOSE = False


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def bucket_bytes(url: str, endpoint: str | None) -> int:
    from argon.storage.backup.store import open_store

    return sum(o.size for o in open_store(url, s3_endpoint=endpoint).list(""))


@contextlib.contextmanager
def s3_server() -> Iterator[Any]:
    from tests.fixtures.s3 import start_s3

    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    server = start_s3()
    try:
        yield server
    finally:
        server.stop()


def restore(root: Path, url: str, endpoint: str | None, target: Path, *, eager: bool = True) -> float:
    env = {**os.environ, "ARGON_CONFIG_FILE": str(root / "none.toml")}
    if endpoint:
        env["ARGON_BACKUP_S3_ENDPOINT"] = endpoint
    started = time.monotonic()
    proc = subprocess.Popen([*ARGON, "restore", "--from", url, "--data-dir", str(target), "--run-dir",
                             str(root / "run"), *(["--eager"] if eager else [])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert proc.stderr is not None
    lines = [f"{time.monotonic() - started:6.1f} s  {line.rstrip()}" for line in proc.stderr]  # when each step began
    if proc.wait(7200) != 0:
        raise RuntimeError("argon restore failed: " + "\n".join(lines[-20:]))
    if VERBOSE:
        say("argon restore, step by step:\n" + "\n".join(lines))
    return time.monotonic() - started


# --- 1. RPO ---------------------------------------------------------------------------------------------

def rpo_trial(root: Path, seed: Path, url: str, endpoint: str | None, n: int) -> dict[str, Any]:
    trial = root / f"t{n}"
    trial.mkdir()
    argon = ArgonProcess(trial, trial / "data", url, endpoint, seed=seed, spares=0).start()
    acks: list[tuple[int, float]] = []
    stop = threading.Event()
    try:
        _pid, uri = argon.create_project(cu=COMPUTE_CU)
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE TABLE w (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")
        wait_backed_up(argon, 1)  # steady state: the project's base and metadata are in the bucket
        time.sleep(2.5)

        failed: list[BaseException] = []

        def writer() -> None:
            try:
                with psycopg.connect(uri, autocommit=True, connect_timeout=60) as conn:
                    i = 0
                    while not stop.is_set():
                        i += 1
                        conn.execute("INSERT INTO w (id) VALUES (%s)", (i,))
                        acks.append((i, time.time()))
            except psycopg.Error as exc:  # the kill below ends it; before that, it is the trial's failure
                failed.append(exc)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while not acks:  # a loaded machine can take a while to wake the compute: count from the first commit
            if failed or time.monotonic() > deadline:
                raise RuntimeError(f"the writer committed nothing: {failed[0] if failed else 'timed out'}")
            time.sleep(0.05)
        time.sleep(random.uniform(2.0, 4.0))
    except BaseException:
        argon.stop()
        raise
    argon.kill()  # the machine is lost: no flush, no clean shutdown
    stop.set()
    thread.join(30)
    shutil.rmtree(trial / "data")
    target = trial / "restored"
    seconds = restore(trial, url, endpoint, target)
    with restored_cluster(trial, target) as sock:
        restored = query(sock, "SELECT coalesce(max(id), 0) FROM w")
    last_id, last_at = acks[-1]
    at = dict(acks)
    gap = last_at - at[restored] if restored in at else float("inf") if restored < last_id else 0.0
    shutil.rmtree(trial, ignore_errors=True)
    return {"acknowledged": last_id, "restored": restored, "lost": max(0, last_id - restored),
            "gap_s": max(0.0, gap), "restore_s": seconds, "commits_per_s": last_id / max(0.001, acks[-1][1] - acks[0][1])}


def measure_rpo(root: Path, seed: Path, trials: int, s3: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    targets = [("file", f"file://{root}/bucket-file", None),
               ("s3", f"s3://{s3.new_bucket()}/rpo", s3.endpoint)]
    for kind, url, endpoint in targets:
        rows = []
        for n in range(trials):
            # A fresh bucket per trial: each is its own machine and disaster.
            trial_url = f"{url}/{n}"
            rows.append(rpo_trial(root, seed, trial_url, endpoint, n))
            say(f"RPO {kind} trial {n + 1}/{trials}: gap {rows[-1]['gap_s'] * 1000:.0f} ms, "
                f"lost {rows[-1]['lost']} of {rows[-1]['acknowledged']} commits")
        gaps = [r["gap_s"] for r in rows]
        out[kind] = {"trials": rows, "gap_p50_s": pct(gaps, 0.5), "gap_max_s": max(gaps),
                     "lost_p50": pct([r["lost"] for r in rows], 0.5), "lost_max": max(r["lost"] for r in rows),
                     "commits_per_s_p50": pct([r["commits_per_s"] for r in rows], 0.5)}
    return out


# --- 2 and 4. Restore time, bucket bytes -----------------------------------------------------------------

def pgbench_init(uri: str, scale: int) -> None:
    subprocess.run([PGBENCH, "-i", "-q", "-s", str(scale), "--no-vacuum", uri], check=True, capture_output=True,
                   timeout=3600)


def suspend(argon: ArgonProcess, pid: str) -> None:
    ep = argon.api.get(f"/projects/{pid}/endpoints").json()["endpoints"][0]["id"]
    argon.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").raise_for_status()


def wait_backed_up(argon: ArgonProcess, branches: int, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = argon.api.get("/backup").json()["backup"]
        rows = status["branches"]
        if len(rows) >= branches and all(r["lag_bytes"] == 0 and r["last_base_backup"] for r in rows):
            # ... and the newest snapshot of each branch is up: no base upload pending.
            pending = [p for p in argon.data.glob("projects/*/branches/*/history/*/snapshots/*")
                       if p.name not in _shipped_bases(argon.data / "backup" / p.parts[-7] / p.parts[-5]
                                                       / p.parts[-3] / "bases.json")]
            if not pending:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"backup did not catch up: {status}")
        time.sleep(0.5)


def _shipped_bases(path: Path) -> set[str]:
    try:
        return set(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError):
        return set()


def measure_size(root: Path, seed: Path, size: str, s3: Any, branches: int, restore_branches: int = 0,
                 bucket: str = "s3") -> dict[str, Any]:
    mb = SIZES[size]
    run = root / f"size-{size}"
    run.mkdir()
    url, endpoint = (f"s3://{s3.new_bucket()}/size", s3.endpoint) if bucket == "s3" else (f"file://{run}/bucket", None)
    argon = ArgonProcess(run, run / "data", url, endpoint, seed=seed, spares=0).start()
    result: dict[str, Any] = {"size": size, "bucket": bucket}
    try:
        pid, uri = argon.create_project(cu=COMPUTE_CU)
        t0 = time.monotonic()
        pgbench_init(uri, max(1, round(mb * SCALE_PER_MB)))
        result["load_s"] = time.monotonic() - t0
        with psycopg.connect(uri, autocommit=True) as conn:
            result["database_bytes"] = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]  # type: ignore[index]
        if not branches:
            result.update(basebackup_baseline(run, argon.data, max(1, round(mb * SCALE_PER_MB))))
        suspend(argon, pid)  # a clean stop takes a snapshot of the data: the base the bucket gets
        for i in range(restore_branches):  # more to restore: what a lazy restore leaves for later
            argon.api.post(f"/projects/{pid}/branches", json={"branch": {"name": f"r{i}"}}).raise_for_status()
        result["restored_branches"] = 1 + restore_branches
        t0 = time.monotonic()
        wait_backed_up(argon, 1 + restore_branches)
        result["ship_base_s"] = time.monotonic() - t0
        result["bucket_bytes_1"] = bucket_bytes(url, endpoint)
        if branches:
            for i in range(branches):
                argon.api.post(f"/projects/{pid}/branches",
                               json={"branch": {"name": f"b{i}"}}).raise_for_status()
            wait_backed_up(argon, 1 + branches)
            result["branches"] = branches
            result["bucket_bytes_after_branches"] = bucket_bytes(url, endpoint)
    finally:
        argon.stop()
    shutil.rmtree(argon.data, ignore_errors=True)
    if not branches:
        target = run / "restored"
        result["restore_s"] = restore(run, url, endpoint, target)
        t0 = time.monotonic()
        with restored_cluster(run, target) as sock:
            query(sock, "SELECT count(*) FROM pgbench_branches")
            result["first_query_after_restore_s"] = time.monotonic() - t0 + result["restore_s"]
        shutil.rmtree(target, ignore_errors=True)
        result.update(measure_lazy(run, seed, url, endpoint, uri, argon))
    shutil.rmtree(run, ignore_errors=True)
    return result


def measure_lazy(run: Path, seed: Path, url: str, endpoint: str | None, uri: str, old: ArgonProcess
                 ) -> dict[str, float]:
    """The default, lazy restore (ADR 0032): `argon restore` (the metadata), `argon up` on it, the
    first query through the proxy (its wake restores the branch), and the background sweep's end.
    The machine's templates are seeded as a warm machine has them (built once per machine)."""
    target = run / "lazy"
    out: dict[str, float] = {}
    t0 = time.monotonic()
    out["lazy_restore_s"] = restore(run, url, endpoint, target, eager=False)
    seeding = time.monotonic()  # the warm machine's templates and runtime: not part of the restore's time
    for name in ("templates", "runtime"):  # `argon restore` may have made them empty: fill them then
        if (seed / name).exists() and not any((target / name).glob("*")):
            (target / name).mkdir(exist_ok=True)
            subprocess.run(["cp", "-a", f"{seed / name}/.", str(target / name)], check=True)
    t1 = time.monotonic()
    t0 += t1 - seeding
    again = ArgonProcess(run, target, url, endpoint, uids=old.uids, spares=0)  # the same machine and settings
    try:
        again.start()
        out["lazy_up_s"] = time.monotonic() - t1
        with psycopg.connect(uri.replace(f":{old.proxy_port}/", f":{again.proxy_port}/"), connect_timeout=3600) as conn:
            conn.execute("SELECT count(*) FROM pgbench_branches")
        out["lazy_first_query_s"] = time.monotonic() - t0
        while again.api.get("/backup").json()["backup"]["restoring"]["pending"]:
            time.sleep(0.2)
        out["lazy_full_restore_s"] = time.monotonic() - t0
    finally:
        again.stop()
    return out


def basebackup_baseline(run: Path, data: Path, scale: int) -> dict[str, float]:
    """The same pgbench data in a plain cluster on this machine: `pg_basebackup -X stream` of it,
    then the copy's start (WAL replay from the backup) to its first query."""
    from argon.compute.binaries import discover
    from benchmarks.core.common import as_postgres_user, free_port, own_dir
    from benchmarks.core.targets import RawPostgres

    install = discover({}, data / "runtime")[18]
    raw = RawPostgres(install.bindir, run / "raw", {"shared_buffers": "128MB"})
    raw.init()
    raw.spawn()
    copy_dir = own_dir(run / "copy")
    copy_proc = None
    try:
        wait_sql(raw.dsn)
        subprocess.run([PGBENCH, "-i", "-q", "-s", str(scale), "--no-vacuum", raw.dsn], check=True,
                       capture_output=True, timeout=3600)
        t0 = time.monotonic()
        subprocess.run([str(install.bin("pg_basebackup")), "-d", raw.dsn, "-D", str(copy_dir / "data"), "-X", "stream",
                        "-c", "fast"], check=True, capture_output=True, timeout=7200, **as_postgres_user())
        copied = time.monotonic() - t0
        port = free_port()
        copy_proc = subprocess.Popen([str(install.bin("postgres")), "-D", str(copy_dir / "data"), "-c", f"port={port}",
                                      "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={copy_dir}"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, **as_postgres_user())
        wait_sql(f"host=127.0.0.1 port={port} user=bench dbname=postgres sslmode=disable", "SELECT count(*) FROM pgbench_branches")
        return {"pg_basebackup_s": copied, "pg_basebackup_first_query_s": time.monotonic() - t0}
    finally:
        if copy_proc is not None:
            os.killpg(copy_proc.pid, signal.SIGTERM)
            copy_proc.wait(60)
        raw.stop()


def wait_sql(dsn: str, sql: str = "SELECT 1", timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=5) as conn:
                conn.execute(sql)
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- 3. Overhead ----------------------------------------------------------------------------------------

def measure_overhead(root: Path, seed: Path, rounds: int, seconds: int) -> dict[str, Any]:
    runs: dict[str, list[float]] = {"off": [], "on": []}
    procs = {}
    try:
        for kind in ("off", "on"):
            d = root / f"tps-{kind}"
            d.mkdir()
            procs[kind] = ArgonProcess(d, d / "data", f"file://{d}/bucket" if kind == "on" else None, seed=seed,
                                       spares=0).start()
        uris = {}
        for kind, argon in procs.items():
            _pid, uri = argon.create_project(cu=COMPUTE_CU)
            pgbench_init(uri, 10)
            uris[kind] = uri
        for _ in range(rounds):
            for kind in ("off", "on"):
                out = subprocess.run([PGBENCH, "-c", "4", "-j", "2", "-T", str(seconds), "-n", uris[kind]],
                                     capture_output=True, text=True, timeout=seconds + 120)
                tps = next(float(line.split("=")[1].split()[0]) for line in out.stdout.splitlines()
                           if line.startswith("tps ="))
                runs[kind].append(tps)
                say(f"pgbench backup {kind}: {tps:.0f} TPS")
    finally:
        for argon in procs.values():
            argon.stop()
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    return {"rounds": runs, "tps_off": off, "tps_on": on, "ratio": on / off}


# --- Report ---------------------------------------------------------------------------------------------

def render(results: dict[str, Any]) -> str:
    lines = ["", "Argon backup benchmark", "=" * 60]
    for kind, r in results.get("rpo", {}).items():
        lines.append(f"RPO {kind:5} gap p50 {r['gap_p50_s'] * 1000:6.0f} ms   max {r['gap_max_s'] * 1000:6.0f} ms   "
                     f"lost commits p50 {r['lost_p50']} max {r['lost_max']}   ({len(r['trials'])} trials, "
                     f"~{r['commits_per_s_p50']:.0f} commits/s)")
    for r in results.get("restore", []):
        lines.append(f"restore {r['size']:5} ({r['database_bytes'] / 1e6:.0f} MB x {r.get('restored_branches', 1)} "
                     f"branch(es), {r.get('bucket', 's3')}://): argon restore --eager {r['restore_s']:.1f} s, "
                     f"first query {r['first_query_after_restore_s']:.1f} s; pg_basebackup + replay of the same data "
                     f"{r['pg_basebackup_s']:.1f} s, first query {r['pg_basebackup_first_query_s']:.1f} s; "
                     f"bucket {r['bucket_bytes_1'] / 1e6:.0f} MB")
        if "lazy_first_query_s" in r:
            lines.append(f"  lazy: argon restore {r['lazy_restore_s']:.1f} s, argon up {r['lazy_up_s']:.1f} s, first "
                         f"query (its wake restores the branch) {r['lazy_first_query_s']:.1f} s, everything restored "
                         f"{r['lazy_full_restore_s']:.1f} s (from the start of argon restore)")
    b = results.get("branches")
    if b:
        lines.append(f"bucket for a {b['database_bytes'] / 1e6:.0f} MB parent: {b['bucket_bytes_1'] / 1e6:.0f} MB; "
                     f"with {b['branches']} branches: {b['bucket_bytes_after_branches'] / 1e6:.0f} MB")
    o = results.get("overhead")
    if o:
        verdict = "ok" if o["ratio"] >= 0.9 else "BELOW TARGET"
        lines.append(f"pgbench TPC-B 4 clients: backup off {o['tps_off']:.0f} TPS, on {o['tps_on']:.0f} TPS "
                     f"= {o['ratio'] * 100:.0f} % (target >= 90 %: {verdict})")
    for what, err in results.get("errors", {}).items():
        lines.append(f"ERROR {what}: {err}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 RPO trials, 100M only, 2 short pgbench rounds")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--sizes", default="100M,1G")
    parser.add_argument("--branches", type=int, default=20)
    parser.add_argument("--only", default="rpo,restore,branches,overhead")
    parser.add_argument("--restore-branches", type=int, default=0,
                        help="branches of the project besides main for the restore section (the lazy restore's "
                             "first query needs only main)")
    parser.add_argument("--bucket", choices=("s3", "file"), default="s3",
                        help="where the restore section's bucket is: moto's S3 server on loopback (one request at a "
                             "time, in Python) or a file:// directory")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--verbose", action="store_true", help="print argon restore's steps with their times")
    args = parser.parse_args(argv)
    global VERBOSE
    VERBOSE = args.verbose
    if args.quick:
        args.trials, args.sizes, args.branches = 3, "100M", 3
    only = set(args.only.split(","))
    root = short_tmpdir("bb")
    results: dict[str, Any] = {"errors": {}}
    try:
        with s3_server() as s3:
            say("warming up: templates and runtime, built once and copied into every data dir")
            warm = root / "warm"
            warm.mkdir()
            ArgonProcess(warm, warm / "data", spares=0).start().stop()
            seed = warm / "data"
            sections = [("rpo", lambda: measure_rpo(root, seed, args.trials, s3)),
                        ("restore", lambda: [measure_size(root, seed, s, s3, 0, args.restore_branches, args.bucket)
                                             for s in args.sizes.split(",")]),
                        ("branches", lambda: measure_size(root, seed, args.sizes.split(",")[-1], s3, args.branches)),
                        ("overhead", lambda: measure_overhead(root, seed, 2 if args.quick else 5,
                                                              5 if args.quick else 15))]
            for name, run in sections:
                if name not in only:
                    continue
                say(f"--- {name}")
                try:
                    results[name] = run()
                except Exception as exc:  # report and go on with the other sections
                    results["errors"][name] = f"{type(exc).__name__}: {exc}"
                    say(f"{name} failed: {traceback.format_exc()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(render(results))
    print(json.dumps(results, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

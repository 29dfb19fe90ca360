"""CPU per login on the pooled host against PgBouncer 1.18 in front of the same compute (issue 16).

Run from the repository root, as root or as a user that can run Postgres itself:

    .venv/bin/python -m benchmarks.pooler_logins [--seconds N] [--rounds N] [--clients N] [--profile]

It sets up what `benchmarks.pooler` does (a platform in this process, one project, two PgBouncers
in transaction mode, plaintext and TLS, with the same pool size), then runs a login storm through
each: `pgbench -C -S` (a new connection, TLS + SCRAM or plaintext + SCRAM, for every `SELECT`),
Argon and PgBouncer interleaved, and divides each side's CPU (`/proc/<pid>/stat` utime + stime:
this whole process with all its threads for Argon, the PgBouncer process) by the logins made.
`--profile` runs py-spy (when installed) on this process during one more Argon TLS storm and
prints where the event loop's time went.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.core.common import PGBENCH, stop_on_sigterm
from benchmarks.core.procfs import CLK_TCK
from benchmarks.pooler import Run


def threads_cpu() -> Counter[str]:
    """CPU seconds of this process's threads, by thread name."""
    out: Counter[str] = Counter()
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a thread that ended meanwhile
        out[re.sub(r"_\d+$", "", name)] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def own_cpu() -> tuple[float, float]:
    """(user + system, system) CPU seconds of this process, all its threads."""
    t = os.times()
    return t.user + t.system, t.system


def process_cpu(pid: int) -> tuple[float, float]:
    """(user + system, system) CPU seconds of process `pid` (/proc/<pid>/stat utime, stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[12]) / CLK_TCK


def storm(target: str, clients: int, seconds: int, cpu: Any, by_thread: bool = False) -> dict[str, Any]:
    args = [PGBENCH, "-n", "-C", "-S", "-c", str(clients), "-j", "2", "-T", str(seconds), "-M", "simple", target]
    threads = threads_cpu() if by_thread else Counter()
    before, t0 = cpu(), time.perf_counter()
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=seconds + 120)
    after, wall = cpu(), time.perf_counter() - t0
    used, kernel = after[0] - before[0], after[1] - before[1]
    if by_thread:
        threads = threads_cpu() - threads
    out = proc.stdout + proc.stderr
    txns = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if proc.returncode != 0 or txns is None or int(txns.group(1)) == 0:
        raise RuntimeError(f"pgbench -C failed ({proc.returncode}): {out.strip()[-800:]}")
    logins = int(txns.group(1))
    result = {"logins": logins, "logins_per_s": round(logins / wall, 1),
              "cpu_ms_per_login": round(used / logins * 1000, 3),
              "kernel_ms_per_login": round(kernel / logins * 1000, 3), "failed": int(failed.group(1)) if failed else 0,
              "load": round(os.getloadavg()[0], 2)}
    if by_thread:
        result["threads_ms_per_login"] = {name: round(s / logins * 1000, 3) for name, s in threads.most_common() if s}
    return result


def profile(run: Run, clients: int, seconds: int, tls: bool, native: bool) -> None:
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        print("py-spy not installed: no profile", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "profile.txt")
        rec = subprocess.Popen([spy, "record", "--pid", str(os.getpid()), "--format", "raw", "--output", raw,
                                *(["--native"] if native else []), "--rate", "250", "--duration", str(seconds),
                                "--threads"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        try:
            storm(run.uri(True, tls), clients, seconds + 2, own_cpu)
        finally:
            rec.wait(60)
        summarize_profile(raw, "TLS" if tls else "plaintext")


def summarize_profile(raw: str, label: str, top: int = 90) -> None:
    """Inclusive share of each frame in the event loop's busy samples (py-spy's collapsed stacks;
    samples waiting in epoll are idle and left out)."""
    inclusive: Counter[str] = Counter()
    total = 0
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if "argon-platform" not in frames[0] or "epoll_pwait" in frames[-1] or "run_forever" in frames[-1]:
                continue
            n = int(count)
            total += n
            for frame in set(frames):
                inclusive[frame] += n
    print(f"\nprofile ({label} logins): {total} busy samples of the event loop's thread, inclusive")
    for frame, n in inclusive.most_common(top):
        print(f"{n * 100 / max(total, 1):6.1f}%  {frame}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-storms", action="store_true", help="only the profiles")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="py-spy the event loop during one more storm each")
    parser.add_argument("--python-frames", action="store_true", help="profile Python frames only (no --native)")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    run = Run(quick=True, rounds=args.rounds, idle_clients=0)
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        run.start()
        for transport in ("tls", "plaintext"):
            tls = transport == "tls"
            bouncer = run.bouncers[transport]
            sides = {"argon": (run.uri(True, tls), own_cpu),
                     "pgbouncer": (bouncer.dsn(run.dbname), lambda b=bouncer: process_cpu(b.pid))}
            storm(sides["argon"][0], args.clients, 2, sides["argon"][1])  # warm-up: the pool opens its servers
            row = rows.setdefault(transport, {"argon": [], "pgbouncer": []})
            for round_ in range(0 if args.skip_storms else args.rounds):
                for name in (("argon", "pgbouncer") if round_ % 2 == 0 else ("pgbouncer", "argon")):
                    result = storm(sides[name][0], args.clients, args.seconds, sides[name][1], name == "argon")
                    row[name].append(result)
                    run.say(f"{transport:9} {name:9} {result}")
        if args.profile:
            profile(run, args.clients, args.seconds, True, not args.python_frames)
            profile(run, args.clients, args.seconds, False, not args.python_frames)
    finally:
        run.stop()
    print(f"\nlogin storm: pgbench -C -S, {args.clients} clients, {args.seconds} s, {args.rounds} rounds (median)")
    for transport, row in rows.items():
        if not row["argon"]:
            continue
        a = statistics.median(r["cpu_ms_per_login"] for r in row["argon"])
        b = statistics.median(r["cpu_ms_per_login"] for r in row["pgbouncer"])
        ar = statistics.median(r["logins_per_s"] for r in row["argon"])
        br = statistics.median(r["logins_per_s"] for r in row["pgbouncer"])
        loads = [r["load"] for r in row["argon"] + row["pgbouncer"]]
        ak = statistics.median(r["kernel_ms_per_login"] for r in row["argon"])
        bk = statistics.median(r["kernel_ms_per_login"] for r in row["pgbouncer"])
        print(f"{transport:9}  CPU/login argon {a:.3f} ms ({ak:.3f} in the kernel)  pgbouncer {b:.3f} ms "
              f"({bk:.3f})  ratio {a / b:.2f}x   "
              f"logins/s argon {ar:.0f}  pgbouncer {br:.0f}   load {min(loads):.1f}-{max(loads):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

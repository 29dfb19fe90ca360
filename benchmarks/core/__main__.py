"""Argon's core benchmark: what the platform costs compared with plain PostgreSQL, side by side.

Run from the repository root, as root or as a user that can run Postgres itself:

    .venv/bin/python -m benchmarks.core [--quick] [--json PATH]

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
import json
import sys
import time
from pathlib import Path

from benchmarks.core.common import stop_on_sigterm
from benchmarks.core.report import render_table
from benchmarks.core.scenarios import Run
from benchmarks.core.worker import worker_main


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

    stop_on_sigterm()
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

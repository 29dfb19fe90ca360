"""What every part of the core benchmark shares: its constants, its error, the statistics, and
small process and directory helpers (the clone backend's temp root that the branching, density
and Django benchmarks run on)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


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


def stop_on_sigterm() -> None:
    """Make SIGTERM (a `timeout`, a CI runner, a `kill`) unwind like Ctrl-C, so that a benchmark's
    `finally` blocks stop by PID what it started (platforms, PgBouncers, pgbench, clients)."""

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)


class BenchError(RuntimeError):
    pass


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def short_tmpdir(prefix: str = "ab") -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    return path


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def used_bytes(path: Path) -> int:
    """The file system's used bytes (after a sync): what a reflink backend's shared blocks cost, once."""
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@contextlib.contextmanager
def backend_root(kind: str, size_gb: int, prefix: str = "bb") -> Iterator[Path]:
    """A short temp root whose `data/` is on the clone backend's file system: for "reflink" an XFS
    image of `size_gb` (sparse) made and loop-mounted by `argon storage init`'s code, for "copy" the
    temp dir's own. Unmounted, detached and removed on the way out."""
    root = short_tmpdir(prefix)
    image = root / "argon.img"
    mounted = False
    try:
        if kind == "reflink":
            from argon.storage import volume

            plan = volume.plan(root / "data", image=image, size=f"{size_gb}G")
            problems = volume.problems(plan)
            if problems:
                raise BenchError("; ".join(problems))
            volume.apply(plan)
            mounted = True
        yield root
    finally:
        if mounted:
            subprocess.run(["umount", str(root / "data")], capture_output=True)
            attached = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout
            for line in attached.splitlines():
                subprocess.run(["losetup", "-d", line.split(":", 1)[0]], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def as_postgres_user() -> dict[str, Any]:
    """Postgres refuses to run as root: run it as nobody then."""
    return as_user(NOBODY, NOBODY)


def as_user(uid: int, gid: int) -> dict[str, Any]:
    """Popen arguments that run a server as `uid` when we are root (as ourselves otherwise)."""
    if os.geteuid() == 0:
        return {"user": uid, "group": gid, "extra_groups": [], "umask": 0o077}
    return {"umask": 0o077}


def own_dir(path: Path, uid: int = NOBODY, gid: int = NOBODY) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, uid, gid)
    os.chmod(path, 0o700)
    return path

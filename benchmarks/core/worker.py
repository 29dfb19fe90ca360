"""The client: a separate process that makes every timed connection (so it never competes with
the in-process platform for the GIL), and the parent's handle on it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import subprocess
import sys
import time
from typing import Any

from benchmarks.core.common import CLIENT_TIMEOUT, REPO_ROOT, BenchError


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

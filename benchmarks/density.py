"""Argon's density benchmark: what a project costs when there are 1, 100 and 1,000 of them (ADR 0022).

Run from the repository root, as root (the reflink backend is a loop-mounted XFS image):

    .venv/bin/python -m benchmarks.density [--sizes 1,100,1000] [--copy-sizes 1,100] [--quick] [--json PATH]

One `argon up` process per backend (its default settings; the data directory on a loop-mounted XFS
image made by `argon storage init`'s code for reflink, under /tmp for copy) grows to each N in turn,
with real projects created through the API (every tenth gets a second branch), each with
`suspend_timeout_seconds: 1` so that it starts (as every new project does), goes idle and suspends.
At each N, with every compute suspended, it measures:

- disk per idle project: the file system's used bytes (reflink: shared blocks count once) or the
  allocated bytes of the projects' directories (copy: each inode once), over N;
- `argon up`'s idle CPU per minute (the suspend monitor, the metrics sampler, the storage figures and
  history maintenance, with no compute running) and its resident memory (VmRSS);
- list and get p50 of projects (`?limit=400`), branches and endpoints, a /metrics scrape, and the
  console's Projects page (all projects) and a project's dashboard;
- create p50/p95: POST /projects one at a time, each deleted once its first start is over;
- wake p50: a connection through the proxy to a suspended project, to its first `SELECT 1`;
- restart-to-ready: with ceil(N/10) computes running, `argon up` is killed (SIGKILL; its computes
  keep running) and started again on the same data: time until its API answers (it has reconciled
  and adopted the running computes by then), and how many it adopted.

Ratios to N = 1 are printed beside each figure. The machine's load (`uptime`) is printed with them:
on a shared machine both sides of a ratio run in the same process, minutes apart. Everything is
stopped by PID in `finally` blocks and the XFS image unmounted and removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from benchmarks.core.common import (
    BenchError,
    backend_root,
    ratio,
    say,
    stop_on_sigterm,
    summarize,
    used_bytes,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fixtures.argon_process import API_KEY, ArgonProcess

MB = 1 << 20
GB = 1 << 30
FREE_FLOOR = 20 * GB  # never grow the copy backend below this much free disk
MAX_STARTING = 6  # computes running at once while growing (each new project starts once)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for {pid}")


def allocated_once(path: Path) -> int:
    """Allocated bytes under `path`, each inode once (what the copy backend costs on disk)."""
    seen: set[int] = set()
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += st.st_blocks * 512
    return total


class Fleet:
    """One `argon up` and the projects it holds."""

    def __init__(self, root: Path, kind: str, quick: bool) -> None:
        self.root, self.kind, self.quick = root, kind, quick
        self.data = root / "data"
        self.env = {"ARGON_SPARE_CLUSTERS": "2", "ARGON_CLONE_BACKEND": kind}  # argon up's default spares
        self.argon = ArgonProcess(root, self.data, env=self.env).start()
        self.projects: list[dict[str, str]] = []  # id, branch, endpoint, uri
        self.branches = 0
        self.base_used = used_bytes(self.data)

    @property
    def api(self) -> httpx.Client:
        return self.argon.api

    def running(self) -> int:
        return sum(1 for _ in self.data.glob("projects/*/branches/*/pgdata/postmaster.pid"))

    def wait_running(self, at_most: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self.running() > at_most:
            if time.monotonic() > deadline:
                raise BenchError(f"{self.running()} computes still running after {timeout:.0f} s")
            time.sleep(0.2)

    def create(self, name: str, timeout: int = 1) -> tuple[float, dict[str, Any]]:
        t0 = time.perf_counter()
        resp = self.api.post("/projects", json={"project": {
            "name": name, "default_endpoint_settings": {"suspend_timeout_seconds": timeout}}})
        elapsed = (time.perf_counter() - t0) * 1000
        if resp.status_code != 201:
            raise BenchError(f"POST /projects: {resp.status_code} {resp.text[:300]}")
        return elapsed, resp.json()

    def grow(self, n: int) -> None:
        while len(self.projects) < n:
            if self.kind == "copy" and free_bytes(self.data) < FREE_FLOOR:
                raise BenchError(f"less than {FREE_FLOOR // GB} GB free: stopped at {len(self.projects)} projects")
            _, body = self.create(f"d{len(self.projects)}")
            pid = body["project"]["id"]
            self.projects.append({"id": pid, "branch": body["branch"]["id"], "endpoint": body["endpoints"][0]["id"],
                                  "uri": body["connection_uris"][0]["connection_uri"]})
            if len(self.projects) % 10 == 0:  # branches too: every tenth project gets a second one
                resp = self.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "dev"}})
                if resp.status_code != 201:
                    raise BenchError(f"POST branches: {resp.status_code} {resp.text[:300]}")
                self.branches += 1
            if len(self.projects) % 100 == 0:
                say(f"  {self.kind}: {len(self.projects)} projects (load {load()})")
            self.wait_running(MAX_STARTING)
        self.wait_running(0)

    def timed(self, path: str, samples: int) -> dict[str, Any]:
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            resp = self.api.get(path.format(**random.choice(self.projects)))
            times.append((time.perf_counter() - t0) * 1000)
            if resp.status_code != 200:
                raise BenchError(f"GET {path}: {resp.status_code} {resp.text[:300]}")
        return summarize(times)

    def metrics_scrape(self, samples: int) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.argon.http_port}/metrics"
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60).raise_for_status()
            times.append((time.perf_counter() - t0) * 1000)
        return summarize(times)

    def console_pages(self, samples: int) -> dict[str, Any]:
        """The console's Projects page (every project, one row each) and a project's dashboard."""
        base = f"http://127.0.0.1:{self.argon.http_port}"
        with httpx.Client(base_url=base, timeout=60, follow_redirects=False) as web:
            token = web.get("/login").cookies.get("argon_login_csrf")
            resp = web.post("/login", data={"api_key": API_KEY, "csrf_token": token or "", "next": "/"})
            if resp.status_code != 303 or "argon_session" not in web.cookies:
                raise BenchError(f"console sign-in: {resp.status_code} {resp.text[:200]}")
            out = {}
            for label, path in (("projects_page_ms", "/"), ("dashboard_ms", "/projects/{id}")):
                times = []
                for _ in range(samples):
                    t0 = time.perf_counter()
                    page = web.get(path.format(**random.choice(self.projects)))
                    times.append((time.perf_counter() - t0) * 1000)
                    if page.status_code != 200:
                        raise BenchError(f"console {path}: {page.status_code}")
                out[label] = summarize(times)
        return out

    def creates(self, samples: int) -> dict[str, Any]:
        """POST /projects one at a time; each deleted once its first start is over (N stays N)."""
        times = []
        for i in range(samples):
            ms, body = self.create(f"sample{i}")
            times.append(ms)
            pid, ep = body["project"]["id"], body["endpoints"][0]["id"]
            deadline = time.monotonic() + 120
            while self.api.get(f"/projects/{pid}/endpoints/{ep}").json()["endpoint"]["current_state"] != "active":
                if time.monotonic() > deadline:
                    raise BenchError(f"the first start of {ep} did not finish")
                time.sleep(0.05)
            self.api.delete(f"/projects/{pid}").raise_for_status()
        self.wait_running(0)
        return summarize(times)

    def suspend(self, project: dict[str, str]) -> None:
        self.api.post(f"/projects/{project['id']}/endpoints/{project['endpoint']}/suspend")

    def wakes(self, samples: int) -> dict[str, Any]:
        """A connection through the proxy to a suspended project, up to its first SELECT 1."""
        times = []
        for project in random.sample(self.projects, min(samples, len(self.projects))):
            t0 = time.perf_counter()
            with psycopg.connect(project["uri"], connect_timeout=60) as conn:
                conn.execute("SELECT 1")
                times.append((time.perf_counter() - t0) * 1000)
            self.suspend(project)
            self.wait_running(0)
        return summarize(times)

    def idle_cpu(self, seconds: float) -> float:
        """CPU seconds per minute `argon up` uses with every compute suspended."""
        pid = self.argon.proc.pid
        before = cpu_seconds(pid)
        time.sleep(seconds)
        return round((cpu_seconds(pid) - before) * 60 / seconds, 3)

    def restart(self, running: int) -> dict[str, Any]:
        """`running` computes up (suspend disabled), argon killed, started again: seconds to ready."""
        chosen = self.projects[:running]
        for p in chosen:
            self.api.patch(f"/projects/{p['id']}/endpoints/{p['endpoint']}",
                           json={"endpoint": {"suspend_timeout_seconds": -1}}).raise_for_status()
            with psycopg.connect(p["uri"], connect_timeout=60) as conn:
                conn.execute("SELECT 1")
        self.wait_running(running)
        up = self.running()
        old_port = self.argon.proxy_port
        self.argon.kill9()  # argon only: its computes run on, each in its session
        self.argon.close_clients()
        t0 = time.perf_counter()
        self.argon = ArgonProcess(self.root, self.data, uids=self.argon.uids, env=self.env).start()
        ready = time.perf_counter() - t0
        for p in self.projects:  # the new process listens on other ports
            p["uri"] = p["uri"].replace(f":{old_port}/", f":{self.argon.proxy_port}/")
        eps = {e["id"]: e for p in chosen for e in
               self.api.get(f"/projects/{p['id']}/endpoints").json()["endpoints"]}
        adopted = sum(1 for p in chosen if eps[p["endpoint"]]["current_state"] == "active")
        for p in chosen:
            self.api.patch(f"/projects/{p['id']}/endpoints/{p['endpoint']}",
                           json={"endpoint": {"suspend_timeout_seconds": 1}}).raise_for_status()
            self.suspend(p)
        self.wait_running(0)
        return {"seconds": round(ready, 2), "running": up, "adopted": adopted}

    def disk_per_project(self) -> dict[str, Any]:
        n = len(self.projects)
        fs = (used_bytes(self.data) - self.base_used) / n
        dirs = allocated_once(self.data / "projects") / n
        # reflink: the file system's count (shared blocks once); copy: the directories' (others share /tmp's fs)
        chosen = fs if self.kind == "reflink" else dirs
        return {"mb": round(chosen / MB, 2), "fs_used_mb": round(fs / MB, 2), "dirs_allocated_mb": round(dirs / MB, 2)}

    def stop(self) -> None:
        self.argon.stop()
        for pidfile in self.data.glob("projects/*/branches/*/pgdata/postmaster.pid"):  # none, unless it failed
            with contextlib.suppress(OSError, ValueError, IndexError):
                os.killpg(int(pidfile.read_text().split()[0]), signal.SIGKILL)


def measure_level(fleet: Fleet, n: int, args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    samples = 5 if quick else 15
    t0 = time.monotonic()
    fleet.grow(n)
    say(f"{fleet.kind}: {n} projects, {fleet.branches} extra branches in {time.monotonic() - t0:.0f} s; measuring")
    time.sleep(5)  # the last suspends' bookkeeping
    row: dict[str, Any] = {"projects": n, "branches": n + fleet.branches, "load_before": load()}
    row["disk_per_idle_project"] = fleet.disk_per_project()
    row["idle_cpu_s_per_min"] = fleet.idle_cpu(20 if quick else 60)
    row["argon_rss_mb"] = round(rss_bytes(fleet.argon.proc.pid) / MB, 1)
    row["list_projects_ms"] = fleet.timed("/projects?limit=400", samples)
    row["get_project_ms"] = fleet.timed("/projects/{id}", samples)
    row["list_branches_ms"] = fleet.timed("/projects/{id}/branches", samples)
    row["get_branch_ms"] = fleet.timed("/projects/{id}/branches/{branch}", samples)
    row["list_endpoints_ms"] = fleet.timed("/projects/{id}/endpoints", samples)
    row["get_endpoint_ms"] = fleet.timed("/projects/{id}/endpoints/{endpoint}", samples)
    row["metrics_scrape_ms"] = fleet.metrics_scrape(5)
    row.update(fleet.console_pages(5))
    row["create_ms"] = fleet.creates(samples)
    row["wake_ms"] = fleet.wakes(5 if quick else 10)
    row["restart"] = fleet.restart(math.ceil(n / 10))
    row["load_after"] = load()
    say(f"  create p50 {row['create_ms']['median']:.0f} ms, list p50 {row['list_projects_ms']['median']:.1f} ms, "
        f"wake p50 {row['wake_ms']['median']:.0f} ms, restart {row['restart']['seconds']} s, "
        f"RSS {row['argon_rss_mb']} MB, disk {row['disk_per_idle_project']['mb']} MB/project")
    return row


def run_backend(kind: str, sizes: list[int], args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Each N's row is appended to `rows` as soon as it is measured (a failure keeps the rows before it)."""
    with backend_root(kind, 60, "dn") as root:  # sparse: grows with what is written
        fleet = Fleet(root, kind, args.quick)
        try:
            for n in sizes:
                rows.append(measure_level(fleet, n, args))
        finally:
            fleet.stop()


MEDIANS = [("create p50", "create_ms", "median", "ms"), ("create p95", "create_ms", "p95", "ms"),
           ("list projects p50", "list_projects_ms", "median", "ms"), ("get project p50", "get_project_ms", "median", "ms"),
           ("list branches p50", "list_branches_ms", "median", "ms"), ("get branch p50", "get_branch_ms", "median", "ms"),
           ("list endpoints p50", "list_endpoints_ms", "median", "ms"),
           ("get endpoint p50", "get_endpoint_ms", "median", "ms"),
           ("/metrics scrape p50", "metrics_scrape_ms", "median", "ms"),
           ("console Projects page p50", "projects_page_ms", "median", "ms"),
           ("console dashboard p50", "dashboard_ms", "median", "ms"), ("wake p50", "wake_ms", "median", "ms")]


def figure(row: dict[str, Any], key: str, sub: str | None) -> float:
    v = row[key]
    return float(v[sub] if sub else v)


def render(results: dict[str, Any]) -> str:
    lines = ["Argon density benchmark", "=" * 23, f"load at start {results['load']}; {results['cpus']} CPUs", ""]
    for kind, rows in results["backends"].items():
        if not rows:
            continue
        lines.append(f"{kind} backend: " + ", ".join(f"N={r['projects']} ({r['branches']} branches, load "
                                                     f"{r['load_before']})" for r in rows))
        head = f"{'':<28}" + "".join(f"{'N=' + str(r['projects']):>12}{'x N=1':>8}" for r in rows)
        lines.append(head)
        specs = [(label, key, sub, unit) for label, key, sub, unit in MEDIANS] + [
            ("restart to ready", "restart", "seconds", "s"), ("argon up RSS", "argon_rss_mb", None, "MB"),
            ("idle CPU per minute", "idle_cpu_s_per_min", None, "s"),
            ("disk per idle project", "disk_per_idle_project", "mb", "MB")]
        base = rows[0]
        for label, key, sub, unit in specs:
            cells = ""
            for r in rows:
                v = figure(r, key, sub)
                x = ratio(v, figure(base, key, sub))
                cells += f"{v:>9.1f} {unit:<2}" + f"{'-' if x is None else f'{x:.2f}x':>8}"
            lines.append(f"{label:<28}{cells}")
        running = ", ".join(f"N={r['projects']}: {r['restart']['adopted']}/{r['restart']['running']}" for r in rows)
        lines.append(f"{'computes adopted at restart':<28}{running}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,100,1000", help="N for the reflink backend")
    parser.add_argument("--copy-sizes", default="1,100", help="N for the copy backend (disk: ~31 MB a project)")
    parser.add_argument("--quick", action="store_true", help="fewer samples, a 20 s idle CPU window")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    stop_on_sigterm()  # a `timeout` unwinds like Ctrl-C: argon, its computes and the XFS image are cleaned up
    results: dict[str, Any] = {"load": load(), "cpus": os.cpu_count(), "backends": {}}
    errors: dict[str, str] = {}
    for kind, spec in (("reflink", args.sizes), ("copy", args.copy_sizes)):
        sizes = [int(s) for s in spec.split(",") if s.strip()]
        if not sizes:
            continue
        results["backends"][kind] = []
        try:
            run_backend(kind, sizes, args, results["backends"][kind])
        except Exception as exc:
            errors[kind] = f"{type(exc).__name__}: {exc}"
            say(f"{kind}: FAILED {errors[kind]}")
    results["errors"] = errors
    table = render(results)
    print(table)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

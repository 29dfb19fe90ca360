"""What operating Argon costs: the HTTP middleware per request, a /metrics scrape by platform size, a log line.

    .venv/bin/python -m benchmarks.ops [--json PATH] [--quick]

Side by side in one run, interleaved rounds:
- a request to a trivial FastAPI route with and without `argon.api.ops.Observe` (request id, log
  context, one counter and one histogram), through httpx's in-process ASGI transport;
- a scrape with the control plane's collector over a view of 10, 100 and 1,000 running computes (a
  stand-in view and sampler with the real collector): what runs on the event loop (the collectors'
  copies of the view), and the families and the text, which /metrics builds in a thread; and the
  size of the text;
- one log line through the JSON formatter, the text formatter and logging's plain one.
Prints a table, then the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI

from argon import logs, model
from argon.api.ops import Observe
from argon.control import exposition
from argon.control.metrics import ProcTimes, _Last
from argon.telemetry import Telemetry


def _app(observed: bool) -> FastAPI:
    app = FastAPI()

    @app.get("/api/v2/projects/{project_id}")
    async def get(project_id: str) -> dict[str, str]:
        return {"id": project_id}

    if observed:
        app.add_middleware(Observe, telemetry=Telemetry())
    return app


async def _requests(app: FastAPI, n: int) -> list[float]:
    out = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as client:
        for i in range(n):
            t0 = time.perf_counter()
            await client.get(f"/api/v2/projects/p-{i % 50}")
            out.append((time.perf_counter() - t0) * 1e6)
    return out


def middleware(rounds: int, per_round: int) -> dict[str, Any]:
    plain, observed = _app(False), _app(True)
    samples: dict[str, list[float]] = {"plain": [], "observed": []}
    asyncio.run(_requests(plain, 200))
    asyncio.run(_requests(observed, 200))
    for _ in range(rounds):
        samples["plain"] += asyncio.run(_requests(plain, per_round))
        samples["observed"] += asyncio.run(_requests(observed, per_round))
    p50 = {k: statistics.median(v) for k, v in samples.items()}
    return {"requests_each": len(samples["plain"]), "plain_us_p50": p50["plain"], "observed_us_p50": p50["observed"],
            "added_us_p50": p50["observed"] - p50["plain"], "ratio": p50["observed"] / p50["plain"]}


@dataclass
class _Plane:
    eps: list[model.Endpoint]

    def projects(self) -> list[Any]:
        now = datetime.now(UTC)
        return [model.Project(id=e.project_id, name="p", region_id="local", pg_version=18, created_at=now,
                              updated_at=now) for e in self.eps]

    def branches(self, project_id: str) -> list[model.Branch]:
        now = datetime.now(UTC)
        return [model.Branch(id=f"br-{project_id}", project_id=project_id, name="main", created_at=now, updated_at=now)]

    def all_branches(self) -> list[model.Branch]:
        return [b for e in self.eps for b in self.branches(e.project_id)]

    def endpoints(self) -> list[model.Endpoint]:
        return self.eps

    def endpoints_unordered(self) -> list[model.Endpoint]:
        return list(self.eps)

    def running_endpoints(self) -> list[model.Endpoint]:
        return self.eps

    def project_count(self) -> int:
        return len(self.eps)

    def is_running(self, endpoint_id: str) -> bool:
        return True

    @property
    def activity(self) -> Any:
        return _Activity()


class _Activity:
    def endpoints_in_use(self) -> list[str]:
        return []


class _Scaler:
    enforced = False


class _Sampler:
    def __init__(self, eps: list[model.Endpoint]) -> None:
        now = datetime.now(UTC)
        self.looks = {e.id: _Last(at=0.0, xacts=12345, proc=ProcTimes(1, 3.5, 600.0), lsn=1 << 30, wall=now,
                                  connections=7, blocks_hit=10**6, blocks_read=10**3) for e in eps}
        self.alloc = {e.branch_id: (e.project_id, 50 << 20) for e in eps}

    def latest(self, endpoint_id: str) -> _Last | None:
        return self.looks.get(endpoint_id)

    def allocated(self) -> dict[str, tuple[str, int]]:
        return self.alloc

    def logical_size(self, branch_id: str) -> int | None:
        return 30 << 20

    def logical_sizes(self) -> dict[str, int]:
        return {b: 30 << 20 for b in self.alloc}


@dataclass
class _Control:
    plane: Any
    metrics: Any
    autoscaler: Any = field(default_factory=_Scaler)
    backup: Any = None


def scrape(sizes: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    rows = []
    now = datetime.now(UTC)
    for n in sizes:
        eps = [model.Endpoint(id=f"ep-{i:06d}", project_id=f"proj-{i:06d}", branch_id=f"br-proj-{i:06d}",
                              created_at=now, updated_at=now, current_state=model.ComputeState.ACTIVE)
               for i in range(n)]
        telemetry = Telemetry()
        control = _Control(_Plane(eps), _Sampler(eps))
        telemetry.register_view(lambda control=control: exposition.snapshot(control),  # type: ignore[misc]
                                exposition.families)
        for e in eps:
            telemetry.wakes.labels(e.project_id, e.branch_id, e.id).inc()
        body = telemetry.exposition()
        on_loop, off_loop = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            taken = telemetry.collect()
            t1 = time.perf_counter()
            telemetry.render(taken)
            on_loop.append((t1 - t0) * 1000)
            off_loop.append((time.perf_counter() - t1) * 1000)
        rows.append({"computes": n, "collect_ms_p50": statistics.median(on_loop), "collect_ms_max": max(on_loop),
                     "render_ms_p50": statistics.median(off_loop), "bytes": len(body)})
    return rows


def log_lines(n: int) -> dict[str, float]:
    record = logging.LogRecord("argon.proxy.session", logging.INFO, __file__, 1,
                               "session ended: endpoint=%s user=%s peer=%s duration=%.1fs bytes_in=%d bytes_out=%d",
                               ("ep-cool-1", "neondb_owner", "10.1.2.3", 1.5, 120, 4000), None)
    out = {}
    with logs.bound(endpoint_id="ep-cool-1", client_addr="10.1.2.3"):
        for name, fmt in (("plain", logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")),
                          ("text", logs.TextFormatter()), ("json", logs.JsonFormatter())):
            t0 = time.perf_counter()
            for _ in range(n):
                fmt.format(record)
            out[f"{name}_us"] = (time.perf_counter() - t0) / n * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the JSON here")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, per_round = (3, 300) if args.quick else (6, 1000)
    result = {"middleware": middleware(rounds, per_round),
              "scrape": scrape((10, 100, 1000), 5 if args.quick else 20),
              "log_line": log_lines(2000 if args.quick else 20000)}
    m = result["middleware"]
    print(f"HTTP request, p50 over {m['requests_each']} each: plain {m['plain_us_p50']:.0f} us, with Observe "
          f"{m['observed_us_p50']:.0f} us (+{m['added_us_p50']:.0f} us, {m['ratio']:.2f}x)")
    print(f"{'computes':>9} {'collect p50 ms (loop)':>22} {'max ms':>8} {'render p50 ms (thread)':>23} {'bytes':>10}")
    for row in result["scrape"]:
        print(f"{row['computes']:>9} {row['collect_ms_p50']:>22.1f} {row['collect_ms_max']:>8.1f} "
              f"{row['render_ms_p50']:>23.1f} {row['bytes']:>10}")
    lines = result["log_line"]
    print(f"log line: plain {lines['plain_us']:.1f} us, text {lines['text_us']:.1f} us, json {lines['json_us']:.1f} us")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""One benchmark run: every measurement, interleaved Argon / baseline, into `results`."""

from __future__ import annotations

import contextlib
import os
import platform as pyplatform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from benchmarks.core.common import (
    MATCHED_SETTINGS,
    NCPU,
    PGBENCH,
    PGBENCH_CLIENT_COUNTS,
    PGBENCH_ROUNDS,
    PGBENCH_SCALE,
    PGBOUNCER,
    BenchError,
    pgbench_threads,
    ratio,
    short_tmpdir,
    summarize,
)
from benchmarks.core.procfs import (
    kb_field,
    own_cpu_seconds,
    pgdata_processes,
    self_cpu_seconds,
    tree_cpu_seconds,
    tree_memory,
)
from benchmarks.core.targets import (
    PgBouncer,
    Project,
    RawPostgres,
    Upstream,
    pgbench_init,
    pgbench_run,
    start_platform,
    tls_session,
    tool_version,
    with_sslmode,
)
from benchmarks.core.worker import Client


@dataclass
class Run:
    quick: bool
    reps: int  # project creates (of each kind)
    wakes: int  # cold starts per major, and warm connects per target
    seconds: int  # each pgbench run
    rp: Any = None
    client: Client | None = None
    root: Path = field(default_factory=lambda: short_tmpdir("ab"))
    raws: dict[int, RawPostgres] = field(default_factory=dict)
    bouncers: dict[str, PgBouncer] = field(default_factory=dict)  # "plaintext", "tls"
    projects: dict[int, Project] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def say(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        self.say(f"{name} ...")
        try:
            yield
        except Exception as exc:  # one failed measurement must not hide the others
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            self.say(f"{name} FAILED: {exc}")
        else:
            self.say(f"{name} done in {time.monotonic() - t0:.1f} s")

    def environment(self) -> dict[str, Any]:
        model = ""
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        import psycopg

        plane = self.rp.plane
        return {
            "cpus": NCPU, "cpu_model": model, "kernel": pyplatform.release(),
            "memory_gb": round(kb_field("/proc/meminfo", "MemTotal") / 1024 / 1024, 1),
            "python": pyplatform.python_version(), "psycopg": psycopg.__version__,
            "postgres": {str(m): f"{i.version} ({i.source})" for m, i in sorted(plane.installs.items())},
            "clone_backend": plane.backend.name,
            "pgbench": tool_version(PGBENCH), "pgbouncer": tool_version(PGBOUNCER) or "not installed",
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
            "repetitions": self.reps, "wakes": self.wakes, "pgbench_seconds": self.seconds,
            "pgbench_scale": PGBENCH_SCALE, "pgbench_clients": list(PGBENCH_CLIENT_COUNTS),
            "pgbench_rounds": PGBENCH_ROUNDS,
        }

    def execute(self) -> None:
        client = self.client = Client()
        self.say(f"starting the platform in {self.root} ...")
        t0 = time.monotonic()
        (self.root / "argon").mkdir(mode=0o755, exist_ok=True)
        self.rp = start_platform(self.root / "argon")
        self.say(f"platform up in {time.monotonic() - t0:.1f} s")
        env = self.results["environment"] = self.environment()
        majors = sorted(self.rp.plane.installs)
        default = self.rp.plane.settings.default_pg_version or max(majors)
        env["default_major"] = default
        env["raw_settings"] = {}

        for major in majors:
            with self.section(f"cold start PG{major}"):
                self.cold_start(major, client, keep_raw=True)
            with self.section(f"idle memory PG{major}"):
                self.idle_memory(major)
            if major != default and major in self.raws:
                self.raws[major].stop()
        with self.section("pgbouncer"):
            self.start_bouncers(default, client)
        with self.section("warm connect"):
            self.warm_connect(default, client)
        with self.section("project create"):
            self.project_create(client)
        with self.section("throughput"):
            self.throughput(default)

    # 1. cold start -----------------------------------------------------------------------------------

    def cold_start(self, major: int, client: Client, keep_raw: bool) -> None:
        rp = self.rp
        proj = self.projects[major] = Project.create(rp, f"bench-pg{major}", major)
        # The create already started the compute in the background: this waits for that first start.
        first = client.request("connect", proj.uri)["wall_ms"]
        # The raw baseline gets the compute's own memory/worker settings.
        conf = proj.conf(rp)
        settings = {k: conf[k] for k in MATCHED_SETTINGS if k in conf}
        self.results["environment"]["raw_settings"][str(major)] = settings
        raw = self.raws[major] = RawPostgres(rp.plane.installs[major].bindir, self.root / f"r{major}", settings)
        raw.init()
        raw.start(client)  # warm-up (page cache), not counted
        raw.stop()
        # Interleaved, so that anything else happening on the machine hits both sides alike.
        cold: list[float] = []
        starts: list[float] = []
        pids = {proj.postmaster(rp)}
        for _ in range(self.wakes):
            proj.suspend(rp)
            cold.append(client.request("connect", proj.uri)["wall_ms"])
            pid = proj.postmaster(rp)
            if pid in pids:
                raise BenchError(f"the postmaster {pid} was not restarted: the endpoint did not really suspend")
            pids.add(pid)
            starts.append(raw.start(client))
            raw.stop()
        if keep_raw:
            raw.start(client)
        c, r = summarize(cold), summarize(starts)
        self.results.setdefault("cold_start", {})[str(major)] = {
            "argon_cold_start_ms": c, "raw_start_ms": r, "ratio": ratio(c["median"], r["median"]),
            "ratio_p95": ratio(c["p95"], r["p95"]), "argon_first_connect_after_create_ms": round(first, 1)}

    # 5. memory: idle running compute (PSS), suspended endpoint (processes) ---------------------------

    def idle_memory(self, major: int) -> None:
        proj, raw = self.projects.get(major), self.raws.get(major)
        if proj is None or raw is None or raw.proc is None:
            raise BenchError("no running compute/raw server (cold start failed)")
        if proj.state(self.rp) != "active":
            assert self.client is not None
            self.client.request("connect", proj.uri)
        time.sleep(3)  # both idle: startup work and the last session's exit settle
        compute = tree_memory(proj.postmaster(self.rp))
        baseline = tree_memory(raw.pid)
        argon_rss = kb_field("/proc/self/status", "VmRSS") / 1024
        pgdata = proj.pgdata(self.rp)
        # The same process search while it runs: it must find the whole running tree, or it proves nothing.
        found_active = pgdata_processes(pgdata)
        # Suspend through the API; count the processes the moment the API says idle, and 1 s later.
        t0 = time.perf_counter()
        proj.suspend(self.rp, wait_postmaster_gone=False)
        suspend_ms = (time.perf_counter() - t0) * 1000
        at_idle = pgdata_processes(pgdata)
        time.sleep(1)
        after_1s = pgdata_processes(pgdata)
        self.results.setdefault("idle_memory", {})[str(major)] = {
            "argon_compute": compute, "raw_postgres": baseline,
            "ratio_pss": ratio(compute["pss_mb"], baseline["pss_mb"]),
            "ratio_rss": ratio(compute["rss_mb"], baseline["rss_mb"]),
            "argon_process_rss_mb": round(argon_rss, 1),
            "suspended": {"suspend_api_to_idle_ms": round(suspend_ms, 1),
                          "processes_while_active": len(found_active),
                          "processes_at_idle": len(at_idle), "processes_1s_after_idle": len(after_1s),
                          "leftovers": at_idle or after_1s, "pgdata": str(pgdata)}}

    # PgBouncer ---------------------------------------------------------------------------------------

    def start_bouncers(self, major: int, client: Client) -> None:
        """Two PgBouncers (plaintext, TLS) in front of the same compute the proxy relays to, so the
        comparison of the two proxies has one Postgres behind both (its Unix socket, as the proxy
        reaches it; SCRAM as the project's owner role; run as the compute's OS user, the only one
        its socket admits)."""
        if not os.access(PGBOUNCER, os.X_OK):
            raise BenchError(f"{PGBOUNCER} is not installed")
        proj = self.projects.get(major)
        if proj is None:
            raise BenchError(f"no PG{major} project (cold start failed)")
        client.request("connect", proj.uri)  # awake, so its socket exists
        socket = Path(self.rp.plane.layout.socket_path(proj.endpoint_id))
        owner = socket.stat()
        parts = urlsplit(proj.uri)
        upstream = Upstream(socket.parent, 5432, unquote(parts.username or ""), parts.path.lstrip("/"),
                            unquote(parts.password or ""), owner.st_uid, owner.st_gid)
        # Argon's own generated leaf (ECDSA P-256), so both TLS terminators serve the same certificate.
        tls_dir = Path(self.rp.plane.layout.tls_dir)
        cert, key = tls_dir / "server.crt", tls_dir / "server.key"
        if not (cert.is_file() and key.is_file()):
            raise BenchError(f"no server.crt/server.key in {tls_dir}: {sorted(p.name for p in tls_dir.iterdir())}")
        for mode, tls in (("plaintext", None), ("tls", (cert, key))):
            bouncer = PgBouncer(self.root / f"pgb-{mode}", upstream, tls)
            self.bouncers[mode] = bouncer
            bouncer.start(client)
        proxy_port = int(self.rp.proxy_port)
        self.results["environment"]["tls"] = {"argon_proxy": tls_session(proxy_port),
                                              "pgbouncer": tls_session(self.bouncers["tls"].port)}

    # 2. warm connect ---------------------------------------------------------------------------------

    def warm_connect(self, major: int, client: Client) -> None:
        proj, raw = self.projects.get(major), self.raws.get(major)
        if proj is None or raw is None or raw.proc is None:
            raise BenchError(f"no PG{major} project/raw server (cold start failed)")
        raw.create_scram_role()
        targets = {"argon_proxy_tls": proj.uri, "argon_proxy_plaintext": with_sslmode(proj.uri, "disable"),
                   "raw_tcp": raw.dsn, "raw_unix": raw.unix_dsn, "raw_tcp_scram": raw.scram_dsn}
        for mode, bouncer in self.bouncers.items():
            if bouncer.proc is not None:
                targets[f"pgbouncer_{mode}"] = bouncer.dsn
        samples: dict[str, list[float]] = {name: [] for name in targets}
        for dsn in targets.values():
            client.request("connect", dsn)  # warm-up: wakes the compute if needed, fills pools and caches
        for _ in range(self.wakes):  # round robin, so background noise spreads over all targets
            for name, dsn in targets.items():
                samples[name].append(client.request("connect", dsn)["ms"])
        out: dict[str, Any] = {name: summarize(v) for name, v in samples.items()}
        for mode in ("plaintext", "tls"):
            out.setdefault(f"pgbouncer_{mode}", "skipped (pgbouncer not running)")
        for base_name in ("raw_tcp", "raw_unix"):
            base = out[base_name]["median"]
            out[f"ratios_vs_{base_name}"] = {name: ratio(v["median"], base) for name, v in out.items()
                                             if isinstance(v, dict) and "median" in v and name != base_name}
        self.results["warm_connect_ms"] = out

    # 3. throughput -----------------------------------------------------------------------------------

    def throughput(self, major: int) -> None:
        if not os.access(PGBENCH, os.X_OK):
            raise BenchError(f"{PGBENCH} not found")
        proj, raw = self.projects.get(major), self.raws.get(major)
        if proj is None or raw is None or raw.proc is None:
            raise BenchError(f"no PG{major} project/raw server (cold start failed)")
        rp = self.rp
        plain = with_sslmode(proj.uri, "disable")
        warmup = 1 if self.quick else 2
        out: dict[str, Any] = {"major": major, "clients": list(PGBENCH_CLIENT_COUNTS),
                               "threads": {str(c): pgbench_threads(c) for c in PGBENCH_CLIENT_COUNTS},
                               "seconds": self.seconds, "warmup_seconds": warmup, "scale": PGBENCH_SCALE}
        self.say(f"  pgbench -i -s {PGBENCH_SCALE}: raw ...")
        out["init_seconds_raw"] = round(pgbench_init(raw.dsn), 1)
        self.say(f"  pgbench -i -s {PGBENCH_SCALE}: argon ...")
        out["init_seconds_argon"] = round(pgbench_init(plain), 1)

        def compute_cpu() -> float:
            return tree_cpu_seconds(proj.postmaster(rp))

        # Direct TCP with TLS too, with Argon's certificate: what TLS costs with no relay at all.
        tls_dir = Path(rp.plane.layout.tls_dir)
        raw_tls_skipped = "skipped (no TLS on the raw server)"
        if raw.tls is None and self.client is not None:
            if raw.ssl_library():
                raw.stop()
                raw.enable_tls(tls_dir / "server.crt", tls_dir / "server.key")
                raw.start(self.client)
            else:  # e.g. the embedded wheel's Postgres, built without OpenSSL
                raw_tls_skipped = f"skipped (PG{major} here is built without TLS)"
        raw_cpu = {"argon": self_cpu_seconds, "postgres": lambda: tree_cpu_seconds(raw.pid)}
        argon_cpu = {"argon": self_cpu_seconds, "postgres": compute_cpu}
        targets: dict[str, tuple[str, dict[str, Callable[[], float]]]] = {
            "raw_tcp": (raw.dsn, raw_cpu), "raw_unix": (raw.unix_dsn, raw_cpu),
            "argon_proxy_tls": (proj.uri, argon_cpu), "argon_proxy_plaintext": (plain, argon_cpu)}
        if raw.tls is not None:
            targets["raw_tcp_tls"] = (raw.tls_dsn, raw_cpu)
        for mode, bouncer in self.bouncers.items():
            if bouncer.proc is not None:
                targets[f"pgbouncer_{mode}"] = (bouncer.dsn, {**argon_cpu,  # the proxy's compute behind it too
                                                              "pgbouncer": lambda b=bouncer: own_cpu_seconds(b.pid)})
        pairs = [("argon_proxy_tls", "pgbouncer_tls"), ("argon_proxy_plaintext", "pgbouncer_plaintext")]
        out["rounds"] = PGBENCH_ROUNDS
        for clients in PGBENCH_CLIENT_COUNTS:
            # Raw first and again last (drift). In between, PGBENCH_ROUNDS rounds: each proxy run next
            # to its PgBouncer run, who of the two goes first alternating between rounds. A single
            # few-second run on 2 busy cores swings by 20% either way; each figure below is the
            # median run of its rounds (its CPU split is that run's), the others are kept as samples.
            order = ["raw_tcp", "raw_unix", "raw_tcp_tls"]
            for r in range(PGBENCH_ROUNDS):
                for a, b in pairs:
                    order += [a, b] if r % 2 == 0 else [b, a]
            order.append("raw_tcp_repeat")
            samples: dict[str, list[dict[str, Any]]] = {}
            runs: dict[str, Any] = {}
            for name in order:
                target = targets.get(name.removesuffix("_repeat"))
                if target is None:
                    runs[name] = (raw_tls_skipped if name == "raw_tcp_tls"
                                  else "skipped (pgbouncer not installed)" if not os.access(PGBOUNCER, os.X_OK)
                                  else "skipped (pgbouncer did not start)")
                    continue
                dsn, cpu = target
                self.say(f"  pgbench -S -c {clients} {name} ...")
                if name.startswith("pgbouncer") and self.client is not None:
                    self.client.request("connect", plain)  # PgBouncer does not wake a suspended compute
                try:
                    pgbench_run(dsn, clients, warmup, {})  # warm-up: caches, connections, compute awake
                    samples.setdefault(name, []).append(pgbench_run(dsn, clients, self.seconds, cpu))
                except Exception as exc:
                    runs[name] = f"failed: {exc}"
                    self.errors[f"pgbench -c {clients} {name}"] = str(exc)
            for name, done in samples.items():
                if isinstance(runs.get(name), str):
                    continue
                ordered = sorted(done, key=lambda run: run["tps"])
                runs[name] = {**ordered[(len(ordered) - 1) // 2],
                              "tps_samples": [run["tps"] for run in done]} if len(done) > 1 else done[0]
            runs["order"] = list(dict.fromkeys(order))
            raw_tps = [runs[n]["tps"] for n in ("raw_tcp", "raw_tcp_repeat") if isinstance(runs.get(n), dict)]
            base = statistics.mean(raw_tps) if raw_tps else None
            runs["raw_tps_baseline"] = round(base, 1) if base else None  # the mean of the two raw TCP runs
            if len(raw_tps) == 2:
                runs["raw_drift_percent"] = round((raw_tps[1] - raw_tps[0]) / raw_tps[0] * 100, 1)
            runs["ratios_vs_raw_tcp"] = {name: ratio(runs[name]["tps"], base) for name in order
                                         if name not in ("raw_tcp", "raw_tcp_repeat")
                                         and isinstance(runs.get(name), dict)}

            def tps(name: str, r: dict[str, Any] = runs) -> float | None:
                v = r.get(name)
                return v["tps"] if isinstance(v, dict) else None

            runs["proxy_vs_pgbouncer"] = {"tls": ratio(tps("argon_proxy_tls"), tps("pgbouncer_tls")),
                                          "plaintext": ratio(tps("argon_proxy_plaintext"),
                                                             tps("pgbouncer_plaintext"))}
            # The same comparison round by round: each proxy run against the PgBouncer run next to it,
            # so the machine's drift over minutes (often 20 %) cancels out of each ratio.
            paired: dict[str, Any] = {}
            for a, b in pairs:
                mode = a.removeprefix("argon_proxy_")
                sa, sb = samples.get(a, []), samples.get(b, [])
                if isinstance(runs.get(a), dict) and isinstance(runs.get(b), dict) and len(sa) == len(sb):
                    each = [x["tps"] / y["tps"] for x, y in zip(sa, sb, strict=True) if y["tps"]]
                    paired[mode] = {"ratios": [round(v, 3) for v in each],
                                    "median": round(statistics.median(each), 3) if each else None}
            runs["proxy_vs_pgbouncer_paired"] = paired
            # What each proxy itself spends per transaction (microseconds of CPU): the part of the
            # figure above that the proxy controls, and steadier than TPS on a busy 2-core machine.
            for name, part in (("argon_proxy_tls", "argon"), ("argon_proxy_plaintext", "argon"),
                               ("pgbouncer_tls", "pgbouncer"), ("pgbouncer_plaintext", "pgbouncer")):
                v = runs.get(name)
                if isinstance(v, dict) and v["tps"] and part in v["cpu_percent"]:
                    v["proxy_cpu_us_per_txn"] = round(v["cpu_percent"][part] / 100 * NCPU * 1e6 / v["tps"], 2)
            out[str(clients)] = runs
        self.results["throughput"] = out

    # 4. project create -------------------------------------------------------------------------------

    def project_create(self, client: Client) -> None:
        """2 x reps creates, one at a time, alternating two kinds: (a) POST, then connect through the
        proxy with the URI the POST returned until `SELECT 1` is answered (timed from before the POST);
        (b) POST, then poll the endpoint until `active` (timed likewise). Every POST is timed on its
        own. Each project is deleted (timed) before the next POST, once its compute is up, so one
        project's background first start never overlaps the next create."""
        rp = self.rp
        creates: list[float] = []
        first_query: list[float] = []
        ready: list[float] = []
        deletes: list[float] = []
        os.sync()  # earlier phases' dirty pages must not be flushed during the timed clones
        for i in range(2 * self.reps):
            t0 = time.perf_counter()
            resp = rp.api.post("/projects", json={"project": {"name": f"bench-create-{i}"}})
            creates.append((time.perf_counter() - t0) * 1000)
            if resp.status_code != 201:
                raise BenchError(f"POST /projects answered {resp.status_code}: {resp.text[:500]}")
            body = resp.json()
            project_id, endpoint_id = body["project"]["id"], body["endpoints"][0]["id"]
            try:
                if i % 2 == 0:
                    client.request("connect", body["connection_uris"][0]["connection_uri"])
                    first_query.append((time.perf_counter() - t0) * 1000)
                deadline = time.monotonic() + 30
                while True:
                    state = rp.api.get(f"/projects/{project_id}/endpoints/{endpoint_id}").json()["endpoint"]
                    if state["current_state"] == "active":
                        break
                    if time.monotonic() > deadline:
                        raise BenchError(f"new project's compute still {state['current_state']!r} after 30 s")
                    time.sleep(0.005)
                if i % 2 == 1:
                    ready.append((time.perf_counter() - t0) * 1000)
            finally:
                t1 = time.perf_counter()
                resp = rp.api.delete(f"/projects/{project_id}")
                deletes.append((time.perf_counter() - t1) * 1000)
                if resp.status_code != 200:
                    raise BenchError(f"DELETE /projects/{project_id} answered {resp.status_code}: {resp.text[:300]}")
        self.results["project_create_ms"] = summarize(creates)
        self.results["project_create_to_first_query_ms"] = summarize(first_query)
        self.results["project_create_to_active_ms"] = summarize(ready)
        self.results["project_delete_ms"] = summarize(deletes)

    # Cleanup -----------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        steps: list[tuple[str, Callable[[], None]]] = []
        for mode, bouncer in self.bouncers.items():
            steps.append((f"pgbouncer {mode}", bouncer.stop))
        for major, raw in self.raws.items():
            steps.append((f"raw PG{major}", raw.stop))
        if self.rp is not None:
            rp = self.rp
            for proj in self.projects.values():
                steps.append((f"project {proj.id}", lambda p=proj: rp.delete_project(p.id)))
            steps.append(("platform", rp.stop))
        if self.client is not None:
            steps.append(("client", self.client.close))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # keep cleaning up
                self.say(f"cleanup of {what} failed: {exc}")
                self.errors[f"cleanup {what}"] = str(exc)
        if "cleanup platform" not in self.errors:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            self.say(f"kept {self.root} for inspection")

"""The run's targets, their verdicts and the readable table."""

from __future__ import annotations

from typing import Any

from benchmarks.core.common import PGBENCH_CLIENT_COUNTS, pgbench_threads, ratio

TARGET_COLD_START_RATIO = 2.0  # cold start p50 <= 2x the raw start p50


TARGET_CREATE_MS = 300.0  # project create (POST) p50


TARGET_BOUNCER_CLIENTS = (8, 32)  # proxy TPS >= PgBouncer TPS at these client counts


PGBENCH_LABELS = {"raw_unix": "raw Unix socket", "raw_tcp_tls": "raw TCP TLS", "argon_proxy_tls": "proxy TLS",
                  "pgbouncer_tls": "pgbouncer TLS", "argon_proxy_plaintext": "proxy plaintext",
                  "pgbouncer_plaintext": "pgbouncer plaintext"}


def _ms(s: Any) -> str:
    if not isinstance(s, dict):
        return str(s)
    return f"{s['median']:.1f} ms (p95 {s['p95']:.1f})"


def _x(r: Any) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _yes(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


def verdicts(results: dict[str, Any]) -> list[str]:
    """One line per target of the issue, straight from the medians of this run (no margins)."""
    lines: list[tuple[str, str]] = []
    cold = results.get("cold_start", {})
    ratios = {m: r.get("ratio") for m, r in cold.items()}
    # Decided on the medians themselves, not on the rounded ratio.
    ok = None if not cold else all(r["argon_cold_start_ms"]["median"]
                                   <= TARGET_COLD_START_RATIO * r["raw_start_ms"]["median"] for r in cold.values())
    detail = ", ".join(f"PG{m} {_x(v)}" for m, v in ratios.items()) or "not measured"
    lines.append((f"cold start p50 <= {TARGET_COLD_START_RATIO:g}x raw start p50", f"{_yes(ok)} ({detail})"))
    tp = results.get("throughput") or {}
    for clients in TARGET_BOUNCER_CLIENTS:
        runs = tp.get(str(clients)) or {}
        parts = []
        for mode in ("tls", "plaintext"):
            proxy, bouncer = runs.get(f"argon_proxy_{mode}"), runs.get(f"pgbouncer_{mode}")
            label = "TLS" if mode == "tls" else "plaintext"
            if isinstance(proxy, dict) and isinstance(bouncer, dict):
                # Unrounded, with the TPS: a 0.996x must not read as a tie won.
                parts.append(f"{label} {_yes(proxy['tps'] >= bouncer['tps'])} ({proxy['tps']:.0f} vs "
                             f"{bouncer['tps']:.0f} TPS = {proxy['tps'] / bouncer['tps']:.3f}x)")
            else:
                parts.append(f"{label} n/a")
        lines.append((f"proxy TPS >= PgBouncer TPS at {clients} clients", ", ".join(parts)))
    create = results.get("project_create_ms")
    ok = None if not isinstance(create, dict) else create["median"] <= TARGET_CREATE_MS
    detail = f"{create['median']:.0f} ms" if isinstance(create, dict) else "not measured"
    lines.append((f"project create (POST) p50 <= {TARGET_CREATE_MS:.0f} ms", f"{_yes(ok)} ({detail})"))
    mem = results.get("idle_memory", {})
    counts = {m: r["suspended"]["processes_at_idle"] for m, r in mem.items() if "suspended" in r}
    ok = None if not counts else all(v == 0 for v in counts.values())
    detail = ", ".join(f"PG{m} {v}" for m, v in counts.items()) or "not measured"
    lines.append(("suspended endpoint has 0 processes", f"{_yes(ok)} ({detail})"))
    width = max(len(label) for label, _ in lines) + 1
    return [f"{label + ':':<{width}} {text}" for label, text in lines]


def render_table(results: dict[str, Any], errors: dict[str, str]) -> str:
    env = results.get("environment", {})
    lines = ["Argon core benchmark", "=" * 20]
    if env:
        pgs = ", ".join(f"PG{m} {v}" for m, v in env["postgres"].items())
        clients = "/".join(str(c) for c in env.get("pgbench_clients", PGBENCH_CLIENT_COUNTS))
        lines += [f"CPUs: {env['cpus']} x {env['cpu_model']}   memory: {env['memory_gb']} GB   kernel: {env['kernel']}",
                  f"Python {env['python']}   psycopg {env['psycopg']}   clone backend: {env['clone_backend']}",
                  f"Postgres: {pgs}",
                  f"{env['pgbench']}   PgBouncer: {env['pgbouncer']}   "
                  f"load average at start: {env['loadavg_1m_at_start']}",
                  f"Repetitions: cold starts and warm connects {env['wakes']}, project creates {env['repetitions']} "
                  f"of each kind (p50 = median, p95 nearest rank)",
                  f"pgbench: -n -S -c {clients} (-j 1 for 1 client, else -j 2) -T {env['pgbench_seconds']}, "
                  f"scale {env['pgbench_scale']}; raw runs once first and once last, proxy and PgBouncer "
                  f"{env.get('pgbench_rounds', 1)} interleaved rounds each (median shown)"]
        if "tls" in env:
            lines.append(f"TLS negotiated (openssl s_client): proxy {env['tls']['argon_proxy']}, "
                         f"pgbouncer {env['tls']['pgbouncer']}")
        for m, s in env.get("raw_settings", {}).items():
            lines.append(f"Raw PG{m} runs with the compute's settings: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    lines += ["", "Targets (this run, no margins):"] + [f"  {v}" for v in verdicts(results)]
    rows: list[tuple[str, str, str, str]] = []
    for major, r in results.get("cold_start", {}).items():
        rows.append((f"cold start PG{major}", _ms(r["argon_cold_start_ms"]),
                     "raw start " + _ms(r["raw_start_ms"]), _x(r["ratio"])))
    warm = results.get("warm_connect_ms")
    if warm:
        tcp, unix = warm["ratios_vs_raw_tcp"], warm["ratios_vs_raw_unix"]
        for name, label in (("argon_proxy_tls", "proxy TLS"), ("argon_proxy_plaintext", "proxy plaintext")):
            rows.append((f"warm connect, {label}", _ms(warm[name]), "raw TCP " + _ms(warm["raw_tcp"]),
                         _x(tcp.get(name))))
            rows.append(("", "", "raw Unix " + _ms(warm["raw_unix"]), _x(unix.get(name))))
        rows.append(("warm connect, raw Unix socket", _ms(warm["raw_unix"]), "raw TCP", _x(tcp.get("raw_unix"))))
        for mode in ("plaintext", "tls"):
            name = f"pgbouncer_{mode}"
            rows.append((f"warm connect, pgbouncer {'TLS' if mode == 'tls' else mode}", _ms(warm.get(name)),
                         "raw TCP", _x(tcp.get(name))))
        rows.append(("(raw TCP with SCRAM auth)", _ms(warm["raw_tcp_scram"]), "raw TCP", _x(tcp.get("raw_tcp_scram"))))
    tp = results.get("throughput") or {}
    for clients in tp.get("clients", []):
        runs = tp.get(str(clients))
        if not runs:
            continue
        raws = [runs[n] for n in ("raw_tcp", "raw_tcp_repeat") if isinstance(runs.get(n), dict)]
        each = " / ".join(f"{r['tps']:.0f}" for r in raws)
        basev = (f"raw TCP {runs['raw_tps_baseline']:.0f} TPS (runs {each})" if raws else str(runs.get("raw_tcp")))
        for name, label in PGBENCH_LABELS.items():
            v = runs.get(name)
            value = f"{v['tps']:.0f} TPS" if isinstance(v, dict) else str(v)
            rows.append((f"pgbench -S -c {clients}, {label}", value, basev, _x(runs["ratios_vs_raw_tcp"].get(name))))
    if "project_create_ms" in results:
        rows.append(("project create (POST)", _ms(results["project_create_ms"]), "-", "-"))
    if "project_create_to_first_query_ms" in results:
        rows.append(("project create -> first SELECT 1", _ms(results["project_create_to_first_query_ms"]), "-", "-"))
    if "project_create_to_active_ms" in results:
        rows.append(("project create -> compute active", _ms(results["project_create_to_active_ms"]), "-", "-"))
    if "project_delete_ms" in results:
        rows.append(("project delete (DELETE)", _ms(results["project_delete_ms"]), "-", "-"))
    for major, r in results.get("idle_memory", {}).items():
        susp = r.get("suspended")
        if susp:
            rows.append((f"suspended endpoint PG{major}", f"{susp['processes_at_idle']} processes", "target: 0", "-"))
        a, b = r["argon_compute"], r["raw_postgres"]
        rows.append((f"idle memory PG{major} (PSS)", f"{a['pss_mb']:.1f} MB ({a['processes']} procs)",
                     f"raw {b['pss_mb']:.1f} MB ({b['processes']} procs)", _x(r["ratio_pss"])))
    if rows:
        header = ("measure", "Argon", "baseline", "ratio")
        widths = [max(len(str(row[i])) for row in [*rows, header]) for i in range(4)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines += ["", fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row).rstrip() for row in rows]
    if any(str(c) in tp for c in tp.get("clients", [])):
        lines += ["", "Proxy vs PgBouncer, same run (TPS ratio proxy / PgBouncer, >= 1.00x meets the target; "
                      "and the CPU each proxy spends per transaction):"]
        for clients in tp["clients"]:
            runs = tp.get(str(clients)) or {}

            def cmp(a: str, b: str, r: dict[str, Any] = runs) -> str:
                va, vb = r.get(a), r.get(b)
                if not (isinstance(va, dict) and isinstance(vb, dict)):
                    return "n/a"
                text = f"{va['tps']:.0f} / {vb['tps']:.0f} = {_x(ratio(va['tps'], vb['tps']))}"
                pair = (r.get("proxy_vs_pgbouncer_paired") or {}).get(a.removeprefix("argon_proxy_"))
                if pair and pair.get("median"):
                    text += f", round by round {_x(pair['median'])}"
                ca, cb = va.get("proxy_cpu_us_per_txn"), vb.get("proxy_cpu_us_per_txn")
                if ca and cb:
                    text += f" (proxy CPU {ca:.1f} / {cb:.1f} us per txn = {_x(ratio(ca, cb))})"
                return text

            lines.append(f"  {clients:>2} clients: TLS {cmp('argon_proxy_tls', 'pgbouncer_tls')};   "
                         f"plaintext {cmp('argon_proxy_plaintext', 'pgbouncer_plaintext')}")
        lines += ["", "CPU during pgbench (% of all cores; other = the rest of the machine, idle = unused):"]
        for clients in tp["clients"]:
            runs = tp.get(str(clients)) or {}
            drift = runs.get("raw_drift_percent")
            lines.append(f"  -c {clients} (-j {pgbench_threads(clients)})"
                         + (f", raw TCP drift first -> last run {drift:+.1f}%" if drift is not None else "") + ":")
            for name in runs.get("order", []):
                v = runs.get(name)
                if isinstance(v, dict):
                    parts = ", ".join(f"{k} {p:.1f}%" for k, p in v["cpu_percent"].items())
                    spread = ("   runs " + " / ".join(f"{t:.0f}" for t in v["tps_samples"])) if "tps_samples" in v else ""
                    lines.append(f"    {name:<22} {v['tps']:>7.0f} TPS  {parts}   (avg latency {v['latency_ms']} ms)"
                                 + spread)
    for major, r in results.get("idle_memory", {}).items():
        a, b = r["argon_compute"], r["raw_postgres"]
        lines.append(f"Idle PG{major} RSS: compute {a['rss_mb']:.1f} MB vs raw {b['rss_mb']:.1f} MB "
                     f"({_x(r['ratio_rss'])}); argon process itself {r['argon_process_rss_mb']:.1f} MB RSS")
        susp = r.get("suspended")
        if susp:
            lines.append(f"Suspended PG{major}: processes on its pgdata (cmdline or cwd): {susp['processes_while_active']} "
                         f"while active, {susp['processes_at_idle']} when the API said idle "
                         f"({susp['suspend_api_to_idle_ms']:.0f} ms after POST .../suspend), "
                         f"{susp['processes_1s_after_idle']} 1 s later")
    if errors:
        lines += ["", "ERRORS:"] + [f"  {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines)

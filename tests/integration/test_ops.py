"""Operating Argon: /metrics scraped with Prometheus' own parser and checked against what the test did,
/healthz and /readyz, request ids, JSON logs with the ids in context and no secret in any line."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from argon.control.metrics import STORAGE_EVERY
from tests.fixtures.argon_process import running_argon
from tests.fixtures.platform import API_KEY, RunningPlatform

pytestmark = pytest.mark.pg

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "argon-dashboard.json"


def scrape(platform: RunningPlatform) -> dict[str, Any]:
    """name -> family, and (name, labels) -> value for every sample."""
    resp = httpx.get(platform.api_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[str, Any] = {"families": {}, "samples": {}}
    for family in text_string_to_metric_families(resp.text):
        out["families"][family.name] = family
        for sample in family.samples:
            out["samples"][(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(scraped: dict[str, Any], name: str, **labels: str) -> float:
    return float(scraped["samples"].get((name, tuple(sorted(labels.items()))), 0.0))


def ids(created: dict[str, Any]) -> dict[str, str]:
    ep = created["endpoints"][0]
    return {"project_id": ep["project_id"], "branch_id": ep["branch_id"], "endpoint_id": ep["id"]}


def wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def suspend(platform: RunningPlatform, labels: dict[str, str]) -> None:
    resp = platform.api.post(f"/projects/{labels['project_id']}/endpoints/{labels['endpoint_id']}/suspend")
    assert resp.status_code == 200, resp.text
    assert wait_for(lambda: platform.endpoint(labels["project_id"], labels["endpoint_id"])["current_state"] == "idle")


def test_metrics_count_what_happened(platform: RunningPlatform, project: dict[str, Any]) -> None:
    labels = ids(project)
    dsn = platform.dsn(project)
    with psycopg.connect(dsn) as conn:  # the first start may still be under way: this waits for it
        conn.execute("select 1")
    before = scrape(platform)

    for _ in range(3):
        suspend(platform, labels)
        with psycopg.connect(dsn) as conn:
            conn.execute("select repeat('x', 50000)").fetchone()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn.replace(f":{project['connection_uris'][0]['connection_parameters']['password']}@",
                                    ":wrong-password@"))
    platform.api.get(f"/projects/{labels['project_id']}/branches")
    after = wait_for(lambda: (s := scrape(platform)) and value(s, "argon_proxy_sessions_total")
                     >= value(before, "argon_proxy_sessions_total") + 3 and s)

    assert value(after, "argon_compute_wakes_total", **labels) - value(before, "argon_compute_wakes_total", **labels) == 3
    assert (value(after, "argon_compute_suspends_total", **labels)
            - value(before, "argon_compute_suspends_total", **labels)) == 3
    assert (value(after, "argon_compute_cold_start_seconds_count")
            - value(before, "argon_compute_cold_start_seconds_count")) >= 3
    assert (value(after, "argon_operations_total", action="suspend_compute", status="finished")
            - value(before, "argon_operations_total", action="suspend_compute", status="finished")) >= 3
    assert (value(after, "argon_proxy_logins_total", outcome="success")
            - value(before, "argon_proxy_logins_total", outcome="success")) >= 3
    assert (value(after, "argon_proxy_logins_total", outcome="failed")
            - value(before, "argon_proxy_logins_total", outcome="failed")) >= 1
    grown = (value(after, "argon_proxy_relayed_bytes_total", direction="from_compute")
             - value(before, "argon_proxy_relayed_bytes_total", direction="from_compute"))
    assert grown >= 3 * 50000
    route = "/api/v2/projects/{project_id}/branches"
    assert value(after, "argon_http_requests_total", route=route, method="GET", status="200") >= 1
    assert value(after, "argon_http_request_duration_seconds_count", route=route, method="GET") >= 1
    assert value(after, "argon_projects") >= 1
    assert value(after, "argon_compute_up", type="read_write", **labels) == 1


def test_the_c_relay_counts_bytes_of_open_sessions(platform: RunningPlatform, project: dict[str, Any]) -> None:
    before = value(scrape(platform), "argon_proxy_relayed_bytes_total", direction="from_compute")
    with psycopg.connect(platform.dsn(project)) as conn:
        conn.execute("select repeat('y', 200000)").fetchone()
        relays = platform.platform.proxy.ctx.relays
        if relays is None or relays.sessions == 0:
            pytest.skip("this session is relayed in Python, which counts its bytes when it ends")
        during = value(scrape(platform), "argon_proxy_relayed_bytes_total", direction="from_compute")
        assert during - before >= 200000  # counted while the session is open


def test_per_compute_metrics_never_wake_a_suspended_compute(platform: RunningPlatform,
                                                            project: dict[str, Any]) -> None:
    labels = ids(project)
    with psycopg.connect(platform.dsn(project)) as conn:
        conn.execute("create table t as select generate_series(1, 1000) as i")
        conn.execute("select count(*) from t").fetchone()
        platform.call(platform.control.metrics.tick())  # the sampler's look, as every ARGON_METRICS_INTERVAL
        running = scrape(platform)
    assert value(running, "argon_compute_connections", **labels) == 1  # this test's own session
    assert value(running, "argon_compute_transactions_total", **labels) > 0
    assert value(running, "argon_compute_blocks_hit_total", **labels) > 0
    assert 0 < value(running, "argon_compute_cache_hit_ratio", **labels) <= 1
    assert value(running, "argon_compute_wal_position_bytes", **labels) > 0

    suspend(platform, labels)
    platform.control.figures.touch(labels["branch_id"])  # the background figures measure it now, not at their tick
    platform.call(platform.control.figures.settle())
    for _ in range(STORAGE_EVERY):  # storage is measured every STORAGE_EVERY-th look
        platform.call(platform.control.metrics.tick())
        idle = scrape(platform)
    assert platform.endpoint(labels["project_id"], labels["endpoint_id"])["current_state"] == "idle"
    assert not platform.plane.is_running(labels["endpoint_id"])
    assert value(idle, "argon_compute_up", type="read_write", **labels) == 0
    key = tuple(sorted(labels.items()))
    assert ("argon_compute_connections", key) not in idle["samples"]  # no look at a suspended compute
    assert value(idle, "argon_branch_disk_bytes", project_id=labels["project_id"], branch_id=labels["branch_id"]) > 0
    assert value(idle, "argon_project_disk_bytes", project_id=labels["project_id"]) > 0


def test_metrics_need_a_token(platform: RunningPlatform) -> None:
    anonymous = httpx.get(platform.api_url + "/metrics")
    assert anonymous.status_code == 401 and "ARGON_METRICS_TOKEN" in anonymous.json()["message"]
    wrong = httpx.get(platform.api_url + "/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_health_and_readiness(platform: RunningPlatform) -> None:
    assert httpx.get(platform.api_url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(platform.api_url + "/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"metadata": "ok", "proxy": "ok", "reconcile": "ok", "lifecycle": "ok"}


def test_request_ids(platform: RunningPlatform) -> None:
    mine = httpx.get(platform.api_url + "/api/v2/projects/no-such-project",
                     headers={"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "trace-42"})
    assert mine.status_code == 404
    assert mine.headers["x-request-id"] == "trace-42" and mine.headers["x-neon-ret-request-id"] == "trace-42"
    assert mine.json()["request_id"] == "trace-42"
    hostile = httpx.get(platform.api_url + "/healthz", headers={"X-Request-Id": "x" * 500})
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["x-request-id"])  # replaced, not echoed
    console = httpx.get(platform.api_url + "/login")
    assert re.fullmatch(r"[0-9a-f]{32}", console.headers["x-request-id"])


def test_the_dashboard_names_only_metrics_that_exist(platform: RunningPlatform) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
              for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "query"]
    assert len(exprs) >= 10
    families = scrape(platform)["families"]
    exposed = set()
    for name, family in families.items():
        exposed.add(name)
        exposed.update({"counter": {name + "_total"},
                        "histogram": {name + "_bucket", name + "_sum", name + "_count"}}.get(family.type, set()))
    named = {m for expr in exprs for m in re.findall(r"\bargon_[a-z0-9_]+", expr)}
    assert named, exprs
    assert named <= exposed, sorted(named - exposed)


def test_logs_are_json_with_ids_and_no_secrets(platform: RunningPlatform) -> None:
    from argon import logs

    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(logs.JsonFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    secrets: list[str] = []
    try:
        created = platform.create_project(name="logged")
        labels = ids(created)
        pid, bid = labels["project_id"], labels["branch_id"]
        secrets.append(created["connection_uris"][0]["connection_parameters"]["password"])
        role = platform.api.post(f"/projects/{pid}/branches/{bid}/roles", json={"role": {"name": "app"}}).json()
        secrets.append(role["role"]["password"])
        reset = platform.api.post(f"/projects/{pid}/branches/{bid}/roles/app/reset_password").json()
        secrets.append(reset["role"]["password"])
        key = platform.api.post("/api_keys", json={"key_name": "logged"}).json()
        secrets.append(key["key"])
        link = platform.api.post("/console/sign_in_links").json()["url"]
        secrets.append(link.rsplit("token=", 1)[1])
        dsn = platform.dsn(created)
        with psycopg.connect(dsn) as conn:
            conn.execute("select 1")
            conn.execute("alter role neondb_owner password 'sql-set-secret-9731'")
        secrets.append("sql-set-secret-9731")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn.replace(f":{secrets[0]}@", ":wrong-secret-5519@"))
        secrets.append("wrong-secret-5519")
        platform.call(platform.plane.drain())
        verifiers = [platform.plane.verifier(bid, name) for name in ("neondb_owner", "app")]
        secrets += [v for v in verifiers if v]
        platform.delete_project(pid)
    finally:
        root.removeHandler(handler)
    lines = [json.loads(line) for line in captured.getvalue().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert {"timestamp", "level", "logger", "message"} <= set(line), line
    assert any(line.get("request_id") and line.get("project_id") == pid for line in lines)
    assert any(line.get("client_addr") and line.get("endpoint_id") == labels["endpoint_id"]
               and line["logger"].startswith("argon.proxy") for line in lines)
    everything = captured.getvalue() + platform.log_file.read_text()
    assert len(secrets) >= 8
    for secret in secrets:
        assert secret not in everything, f"a secret reached the log: {secret[:6]}..."
    assert "SCRAM-SHA-256$" not in everything


@pytest.mark.slow
def test_argon_up_as_a_service() -> None:
    """What systemd sees: READY=1 once it serves, JSON lines on stderr, a graceful stop on SIGTERM."""
    with running_argon("sv", spares=0) as argon, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(argon.root / "notify"))
        notify.settimeout(120)
        argon.start(wait=False, stdout=subprocess.DEVNULL, NOTIFY_SOCKET=str(argon.root / "notify"))
        assert argon.proc is not None
        ready = notify.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=serving"), ready
        assert httpx.get(f"http://127.0.0.1:{argon.http_port}/readyz").status_code == 200
        argon.proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        assert argon.proc.wait(60) == 0
        lines = [line for line in argon.log.read_text().splitlines() if line and not line.startswith("=== ")]
    assert lines
    parsed = [json.loads(line) for line in lines]  # every line of the log is one JSON object
    assert any(p["message"] == "Stopped." for p in parsed)


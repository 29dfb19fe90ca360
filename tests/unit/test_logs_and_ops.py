"""The log formats and their context, the secret net, the ops routes (token, readiness), route labels."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client.parser import text_string_to_metric_families

from argon import logs
from argon.api import ops
from argon.errors import ArgonError, Unauthorized
from argon.proxy.auth import AuthFailed
from argon.proxy.session import login_outcome
from argon.proxy.throttle import Throttled
from argon.telemetry import Telemetry
from argon.wire.codec import ProtocolViolation


def _line(formatter: logging.Formatter, msg: str, *args: Any, exc: bool = False) -> str:
    record = logging.LogRecord("argon.test", logging.WARNING, __file__, 1, msg, args, None)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            record.exc_info = sys.exc_info()
    return formatter.format(record)


def test_json_lines_carry_the_ids_in_context() -> None:
    with logs.bound(project_id="p-1", endpoint_id="ep-1"), logs.bound(request_id="r-9", branch_id=None):
        line = json.loads(_line(logs.JsonFormatter(), "compute %s started", "ep-1", exc=True))
    assert line["level"] == "warning" and line["logger"] == "argon.test" and line["message"] == "compute ep-1 started"
    assert line["timestamp"].endswith("Z") and "T" in line["timestamp"]
    assert (line["request_id"], line["project_id"], line["endpoint_id"]) == ("r-9", "p-1", "ep-1")
    assert "branch_id" not in line and "ValueError: boom" in line["exception"]
    after = json.loads(_line(logs.JsonFormatter(), "later"))
    assert "project_id" not in after  # the block ended


def test_route_parameters_name_the_ids_of_a_request() -> None:
    scope: dict[str, Any] = {"path_params": {}}

    async def serve() -> str:
        logs.bind_request(scope, "req-1", "10.0.0.7")
        scope["path_params"] = {"project_id": "p-2", "endpoint_id": "ep-2"}  # routing fills them in later
        return _line(logs.TextFormatter(), "served")

    text = asyncio.run(serve())
    assert text.endswith("[request_id=req-1 client_addr=10.0.0.7 project_id=p-2 endpoint_id=ep-2]")
    assert text[:4].isdigit() and text[4] == "-"  # the date, not only the time


def test_secrets_are_masked_whatever_wrote_them() -> None:
    verifier = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy"
    line = _line(logs.JsonFormatter(), "got %s for postgresql://app:hunter2@127.0.0.1/db key %s password=pw1",
                 verifier, "argon_abcdefghijklmnopqrstuvwxyz012345")
    for secret in ("c3RvcmVk", "hunter2", "argon_abcdefghijklmnopqrstuvwxyz012345", "pw1"):
        assert secret not in line
    assert "postgresql://app:<redacted>@127.0.0.1/db" in line
    assert logs.redact("password authentication failed for user 'app'") == (
        "password authentication failed for user 'app'")


def test_auto_is_text_on_a_terminal_json_elsewhere() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        assert logs.configure("auto", "info", Tty()) == "text"
        pipe = io.StringIO()
        assert logs.configure("auto", "debug", pipe) == "json"
        logging.getLogger("argon.x").info("hello")
        assert json.loads(pipe.getvalue())["message"] == "hello"
        assert logs.configure("text", "info", pipe) == "text"
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)


def test_login_outcomes() -> None:
    assert login_outcome(TimeoutError()) == "timeout"
    assert login_outcome(AuthFailed("password authentication failed for user 'x'")) == "failed"
    assert login_outcome(Throttled("too many")) == "throttled"
    assert login_outcome(ProtocolViolation("bad")) == "protocol_error"
    assert login_outcome(ConnectionResetError()) == "abandoned"
    assert login_outcome(RuntimeError()) == "error"


@pytest.mark.parametrize(("path", "params", "template"), [
    ("/api/v2/projects/p-1/branches/br-1", {"project_id": "p-1", "branch_id": "br-1"},
     "/api/v2/projects/{project_id}/branches/{branch_id}"),
    ("/api/v2/projects/api/branches", {"project_id": "api"}, "/api/v2/projects/{project_id}/branches"),
    ("/static/css/app.css", {"path": "css/app.css"}, "/static/{path}"),
    ("/api/v2/projects/p-1", {"project_id": "p-1"}, "/api/v2/projects/{project_id}"),
    ("/healthz", {}, "/healthz"),
])
def test_route_templates(path: str, params: dict[str, str], template: str) -> None:
    class Route:  # FastAPI gives an included route's own template, without the prefix (newer versions)
        def __init__(self, fmt: str) -> None:
            self.path_format = fmt
            self.path = fmt.replace("{path}", "{path:path}")  # as Starlette keeps a converter

    own = template.removeprefix("/api/v2")
    assert ops.route_template({"path": path, "path_params": params, "route": Route(own)}) == template
    assert ops.route_template({"path": path, "path_params": params, "route": Route(template)}) == template
    if "{path}" not in template:
        assert ops.route_template({"path": path, "path_params": params, "endpoint": object()}) == (
            template if "api" not in params.values() else "/{project_id}/v2/projects/api/branches")


def test_unmatched_paths_share_one_label() -> None:
    assert ops.route_template({"path": "/random/x1", "path_params": {}}) == "unmatched"


class _Client:
    """Requests to an ASGI app in this process (httpx's ASGI transport)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t") as c:
                return await c.get(path, headers=headers)

        return asyncio.run(go())


def _app(checks: list[ops.Check], telemetry: Telemetry) -> _Client:
    def authorize(header: str) -> object:
        if header != "Bearer api-key":
            raise Unauthorized("invalid API key")
        return object()

    app = FastAPI()
    app.add_middleware(ops.Observe, telemetry=telemetry)

    @app.exception_handler(ArgonError)
    async def _error(request: Request, exc: ArgonError) -> JSONResponse:
        return JSONResponse({"message": exc.user_message}, status_code=exc.http_status)

    app.include_router(ops.router(telemetry, authorize_key=authorize, metrics_token="scrape-token", checks=checks))
    return _Client(app)


def test_metrics_take_the_metrics_token_or_an_api_key() -> None:
    telemetry = Telemetry()
    client = _app([], telemetry)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer scrape-tokenX"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Basic scrape-token"}).status_code == 401
    for header in ("Bearer scrape-token", "Bearer api-key"):
        resp = client.get("/metrics", headers={"Authorization": header})
        assert resp.status_code == 200, resp.text
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    requests = families["argon_http_requests"].samples
    assert any(s.labels == {"route": "/metrics", "method": "GET", "status": "401"} and s.value == 3 for s in requests)


def test_readiness_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "READY_TIMEOUT", 0.05)

    async def fine() -> str | None:
        return None

    async def starting() -> str | None:
        return "start-up reconciliation is not done"

    async def stuck() -> str | None:
        await asyncio.sleep(5)
        return None

    client = _app([ops.Check("metadata", fine), ops.Check("reconcile", starting), ops.Check("proxy", stuck)],
                  Telemetry())
    resp = client.get("/readyz")
    assert resp.status_code == 503
    body = resp.json()
    assert body["checks"] == {"reconcile": "start-up reconciliation is not done", "proxy": "no answer in 0 s"}
    assert "reconcile: start-up reconciliation is not done" in body["reason"]
    assert client.get("/healthz").status_code == 200
    ok = _app([ops.Check("metadata", fine)], Telemetry()).get("/readyz")
    assert ok.status_code == 200 and ok.json()["status"] == "ready"


def test_a_view_is_copied_at_collect_and_built_at_render() -> None:
    """/metrics copies a view on the event loop (`collect`) and builds its families from the copy in a
    thread (`render`): what changes in between is not what the scrape reports."""
    from prometheus_client.core import GaugeMetricFamily

    telemetry = Telemetry()
    state = {"projects": 3}

    def build(view: dict[str, int]) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("argon_projects", "Projects", value=view["projects"])]

    telemetry.register_view(lambda: dict(state), build)
    telemetry.register(lambda: [GaugeMetricFamily("argon_on_loop", "Read at collect", value=state["projects"])])
    scrape = telemetry.collect()
    state["projects"] = 1000
    text = telemetry.render(scrape).decode()
    families = {f.name: f.samples[0].value for f in text_string_to_metric_families(text) if f.samples}
    assert families["argon_projects"] == 3 and families["argon_on_loop"] == 3
    assert "argon_build_info" in text  # what is counted in place comes along

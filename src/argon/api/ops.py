"""What operators and their tools read: `/metrics`, `/healthz`, `/readyz`, and the request middleware.

- `GET /metrics`: the Prometheus text format of the platform's registry (`argon.telemetry`).
  It names every project, branch and endpoint, so it is not public: `Authorization: Bearer
  <token>` with `ARGON_METRICS_TOKEN` (a secret that opens /metrics and nothing else, for
  Prometheus' `credentials_file`) or any API key. ADR 0020.
- `GET /healthz`: 200 while the process serves HTTP (liveness: restart when it stops answering).
- `GET /readyz`: 200 when the metadata store answers, the proxy accepts connections and start-up
  reconciliation is done; 503 with the reason otherwise (readiness: send traffic or not).
  Both are public and say nothing about tenants.
- `Observe`, an ASGI middleware over the whole HTTP app (API, console, serverless driver): a
  request id per request (the client's `X-Request-Id` when it is a short token, else a new one),
  sent back as `X-Request-Id` and Neon's `x-neon-ret-request-id` and put in every log line the
  request causes (`argon.logs`); requests counted by route template, method and status, with
  their latency.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from argon import logs
from argon.errors import Unauthorized
from argon.telemetry import CONTENT_TYPE, Telemetry

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
READY_TIMEOUT = 2.0  # seconds one readiness check may take


@dataclass(frozen=True)
class Check:
    """One readiness condition: `probe` answers None when it holds, else the reason it does not."""

    name: str
    probe: Callable[[], Awaitable[str | None]]


class Observe:
    """Pure ASGI (no BaseHTTPMiddleware): request ids, logging context, request metrics."""

    def __init__(self, app: Any, telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # labels -> (counter, histogram) children

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        client = scope.get("client")
        logs.bind_request(scope, request_id, client[0] if client else None)
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                raw = request_id.encode()
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", raw),
                                      (b"x-neon-ret-request-id", raw)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            key = (route_template(scope), scope.get("method", ""), status)
            series = self._series.get(key)
            if series is None:  # a bounded set: route templates x methods x statuses
                t = self.telemetry
                series = self._series[key] = (t.http_requests.labels(key[0], key[1], str(status)),
                                              t.http_seconds.labels(key[0], key[1]))
            series[0].inc()
            series[1].observe(elapsed)


def route_template(scope: dict[str, Any]) -> str:
    """The request's path with its parameters named (`/api/v2/projects/{project_id}`): a label with a
    bounded number of values. "unmatched" when no route took the request."""
    route = scope.get("route")
    if route is None and scope.get("endpoint") is None:
        return "unmatched"
    path = scope.get("path", "")
    fmt = getattr(route, "path_format", None)
    if isinstance(fmt, str) and ":path}" not in str(getattr(route, "path", "")):
        # The route's own template, after the prefix it was included under (what the path has more).
        parts, own = path.split("/"), fmt.split("/")
        if len(parts) >= len(own):
            return "/".join(parts[:len(parts) - len(own) + 1]) + fmt
    params = scope.get("path_params") or {}
    for name, value in sorted(params.items(), key=lambda kv: -len(str(kv[1]))):
        value = str(value)
        if not value:
            continue
        needle = "/" + value
        at = path.find(needle)
        while at >= 0:
            end = at + len(needle)
            if end == len(path) or path[end] == "/":
                path = path[:at] + "/{" + name + "}" + path[end:]
                break
            at = path.find(needle, at + 1)
    return path


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def router(telemetry: Telemetry, *, authorize_key: Callable[[str], object], metrics_token: str | None,
           checks: list[Check]) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.get("/metrics")
    async def metrics(request: Request) -> Response:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if not (metrics_token and scheme.lower() == "bearer"
                and hmac.compare_digest(token.encode(), metrics_token.encode())):
            try:
                authorize_key(header)
            except Unauthorized:
                raise Unauthorized("authentication required: send 'Authorization: Bearer <token>' with "
                                   "ARGON_METRICS_TOKEN or an API key") from None
        scrape = telemetry.collect()  # on the loop: the view is not thread-safe; big parts are only copied
        body = await asyncio.to_thread(telemetry.render, scrape)  # the families and the text off it
        return Response(body, media_type=CONTENT_TYPE)

    @r.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @r.get("/readyz")
    async def readyz() -> JSONResponse:
        failing = {}
        for check in checks:
            try:
                reason = await asyncio.wait_for(check.probe(), READY_TIMEOUT)
            except TimeoutError:
                reason = f"no answer in {READY_TIMEOUT:.0f} s"
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if reason is not None:
                failing[check.name] = reason
        if failing:
            reasons = "; ".join(f"{name}: {why}" for name, why in failing.items())
            return JSONResponse({"status": "not ready", "reason": reasons, "checks": failing}, status_code=503)
        return JSONResponse({"status": "ready", "checks": {c.name: "ok" for c in checks}})

    return r

"""The HTTP app: Neon's management API under /api/v2. The platform mounts the serverless driver's
endpoints (`argon.proxy.serverless`) and the web console (`argon.console`) on it.

Thin: parse -> `argon.control` use case -> `argon.api.views` shape. Errors map to Neon's
`{"code", "message"}` bodies with the status of their kind, in one place (`_argon_error`).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from argon import __version__, logs
from argon.api import (
    ops,
    routes_absent,
    routes_account,
    routes_backup,
    routes_branches,
    routes_endpoints,
    routes_projects,
    routes_roles,
    routes_schema,
    routes_snapshots,
)
from argon.control.services import Control
from argon.errors import ArgonError, Unauthorized
from argon.telemetry import Telemetry

log = logging.getLogger(__name__)


def error_body(message: str, code: str = "") -> dict[str, Any]:
    body = {"code": code, "message": message}
    request_id = logs.current().get("request_id")
    if request_id:
        body["request_id"] = request_id  # Neon's GeneralError has it too
    return body


def create_app(control: Control, telemetry: Telemetry | None = None, checks: list[ops.Check] | None = None) -> FastAPI:
    """`telemetry`: the registry /metrics serves (one of its own when not given); `checks`: what /readyz
    asks (the platform's: metadata, proxy, reconcile)."""
    telemetry = telemetry or Telemetry()
    app = FastAPI(title="Argon API", version=__version__, docs_url="/api/v2/docs", redoc_url=None,
                  openapi_url="/api/v2/openapi.json",
                  description="Neon-compatible management API v2 of a self-hosted Argon server.")
    app.state.control = control
    app.add_middleware(ops.Observe, telemetry=telemetry)

    @app.exception_handler(ArgonError)
    async def _argon_error(request: Request, exc: ArgonError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc.user_message)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else {}
        if exc.http_status == 423:  # @neon/sdk honours it; neonctl retries 423 every 3 s
            headers["Retry-After"] = "3"
        return JSONResponse(error_body(exc.user_message, exc.code), status_code=exc.http_status,
                            headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":  # loc is ("body", <character offset>)
                at = [p for p in err.get("loc", ()) if p != "body"]
                detail = (err.get("ctx") or {}).get("error")
                parts.append("the request body is not valid JSON" + (f" ({detail})" if detail else "")
                             + (f" at character {at[0]}" if at else ""))
                continue
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            msg = str(err.get("msg")).removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                msg = "Argon does not support this field (it would have no effect), so the request is refused"
            parts.append(f"{loc}: {msg}" if loc else msg)
        return JSONResponse(error_body("invalid request: " + "; ".join(parts)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such API path: {request.method} {request.url.path}"
        if exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse(error_body(message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s: unexpected error", request.method, request.url.path)
        return JSONResponse(error_body("internal error; the server log has the details"), status_code=500)

    for module in (routes_projects, routes_branches, routes_roles, routes_endpoints, routes_account, routes_schema,
                   routes_backup, routes_snapshots, routes_absent):
        app.include_router(module.router, prefix="/api/v2")

    def authorize_metrics(header: str) -> object:
        key = control.api_keys.authorize(header)
        control.api_keys.allows(key, "GET", "/metrics")  # a project-scoped key sees only its project: 403
        return key

    app.include_router(ops.router(telemetry, authorize_key=authorize_metrics,
                                  metrics_token=control.plane.settings.metrics_token, checks=checks or []))
    return app

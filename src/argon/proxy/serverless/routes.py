"""Neon's serverless driver endpoints on the HTTP port: `POST /sql` and WebSockets on /v2, /v1, /sql.

Thin: read the body within the limit, hand it to `http_sql`, write its JSON; hand WebSockets to
`websocket`. If the HTTP client goes away mid-query, the query is cancelled (its backend is then
dropped). The platform mounts them on its HTTP app (`mount_serverless`) with the proxy they
relay to; on an app without one, /sql answers 503 and WebSockets are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.responses import Response

from argon.proxy.server import ProxyServer
from argon.proxy.serverless import sql_over_http as sql
from argon.proxy.serverless import websocket
from argon.proxy.serverless.http_sql import HttpSql
from argon.proxy.serverless.http_sql import Response as SqlResponse

router = APIRouter(include_in_schema=False)


@dataclass
class Serverless:
    """What the routes need, set on `app.state.serverless` by the platform."""

    proxy: ProxyServer
    http_sql: HttpSql


def mount_serverless(app: FastAPI, serverless: Serverless) -> None:
    app.state.serverless = serverless
    app.include_router(router)


def _service(request: Request | WebSocket) -> Serverless | None:
    return getattr(request.app.state, "serverless", None)


def _answer(resp: SqlResponse, max_response: int) -> Response:
    body = sql.encode(resp.body)
    status = resp.status
    if status == 200 and len(body) > max_response:
        status, body = 507, sql.encode(sql.proxy_error_json(f"response is too large (max is {max_response} bytes)"))
    headers = {**sql.CORS_ORIGIN, "Neon-Request-Id": str(uuid.uuid4()), **resp.headers}
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = sql.HttpSqlError(f"request is too large (max is {limit} bytes)", 413)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/sql")
async def query(request: Request) -> Response:
    service = _service(request)
    if service is None:
        return _answer(SqlResponse(503, sql.proxy_error_json("SQL over HTTP is not available here")), 0)
    handler = service.http_sql
    try:
        body = await _read_body(request, sql.MAX_REQUEST_BYTES)
    except sql.HttpSqlError as exc:
        return _answer(SqlResponse(exc.status, sql.proxy_error_json(exc.user_message)), handler.max_response)
    peer_ip = request.client.host if request.client else ""
    work = asyncio.ensure_future(handler.handle(request.headers, body, peer_ip, secure=request.url.scheme == "https"))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()  # psycopg sends a CancelRequest; the backend is then dropped
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        return _answer(SqlResponse(400, sql.proxy_error_json(sql.CANCELLED, "08P01")), handler.max_response)
    return _answer(work.result(), handler.max_response)


@router.options("/sql")
async def preflight() -> Response:
    return Response(status_code=200, headers={**sql.PREFLIGHT, "Neon-Request-Id": str(uuid.uuid4())})


@router.api_route("/sql", methods=["GET", "HEAD", "PUT", "PATCH", "DELETE"])
async def not_supported() -> Response:
    return Response(sql.encode(sql.NOT_SUPPORTED), status_code=400, media_type="application/json",
                    headers={**sql.CORS_ORIGIN, "Neon-Request-Id": str(uuid.uuid4())})


async def _websocket(ws: WebSocket) -> None:
    service = _service(ws)
    if service is None:
        await ws.close(1011)
        return
    await websocket.serve(ws, service.proxy)


for _path in ("/v2", "/v1", "/sql"):
    router.add_api_websocket_route(_path, _websocket)

"""Request dependencies (the control plane's services and Bearer API-key authentication) and how the
API's handlers answer (`JsonRoute`, `FastJSON`).

Both are `async def` although they await nothing: FastAPI runs a plain `def` dependency in its
thread pool, a hop to a worker thread and back on every request (most of a small GET's time on a
loaded machine, ADR 0022); these only read memory, so they run on the event loop."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from fastapi.datastructures import DefaultPlaceholder
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from argon.control.services import Control


async def get_control(request: Request) -> Control:
    control: Control = request.app.state.control
    return control


async def require_key(request: Request) -> Control:
    control: Control = request.app.state.control
    key = control.api_keys.authorize(request.headers.get("authorization", ""))
    control.api_keys.allows(key, request.method, request.url.path)
    return control


Authorized = Annotated[Control, Depends(require_key)]


class FastJSON(JSONResponse):
    """A JSON body encoded by orjson (a list of 400 projects: ~3 ms rather than ~15 ms with `json`),
    or by `json` after FastAPI's encoder when it holds something orjson does not take."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:  # orjson.JSONEncodeError is one: a model, a set, a non-str key
            return super().render(jsonable_encoder(content))


class JsonRoute(APIRoute):
    """The API's routes: a handler's dict (or list) goes out as `FastJSON` at the route's status, not
    through FastAPI's response-model validation and encoding (a copy of every body, then its
    encoding). The OpenAPI document is unchanged: the handler's annotations are kept."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        response_class = kwargs.get("response_class")
        if inspect.iscoroutinefunction(endpoint) and not getattr(endpoint, "_as_json", False) and \
                (response_class is None or isinstance(response_class, DefaultPlaceholder)):
            endpoint = _as_json(endpoint, kwargs.get("status_code"))
        super().__init__(path, endpoint, **kwargs)


def _as_json(endpoint: Callable[..., Awaitable[Any]], status_code: int | None) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(endpoint)
    async def handler(*args: Any, **kwargs: Any) -> Any:
        out = await endpoint(*args, **kwargs)
        if isinstance(out, Response):
            return out
        return FastJSON(out, status_code=status_code or 200)

    handler._as_json = True  # type: ignore[attr-defined]  # include_router adds routes again: wrap once
    return handler

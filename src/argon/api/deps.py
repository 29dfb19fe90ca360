"""Request dependencies: the control plane's services and Bearer API-key authentication."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from argon.control.services import Control


def get_control(request: Request) -> Control:
    control: Control = request.app.state.control
    return control


def require_key(request: Request) -> Control:
    control = get_control(request)
    key = control.api_keys.authorize(request.headers.get("authorization", ""))
    control.api_keys.allows(key, request.method, request.url.path)
    return control


Authorized = Annotated[Control, Depends(require_key)]

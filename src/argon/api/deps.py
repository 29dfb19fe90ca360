"""Request dependencies: the control plane and Bearer API-key authentication."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from argon.control.plane import ControlPlane
from argon.errors import Unauthorized


def get_plane(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.plane
    return plane


def require_key(request: Request) -> ControlPlane:
    plane = get_plane(request)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("authentication required: send 'Authorization: Bearer <API key>' "
                           "(the key is printed by `argon up`; `argon api-keys create` makes more)")
    if not plane.api_keys.check(token.strip()):
        raise Unauthorized("invalid API key")
    return plane


Plane = Annotated[ControlPlane, Depends(require_key)]

"""The seam between the proxy and the control plane: what the proxy may ask, and nothing more.

The proxy never touches the metadata store. It asks a `ControlClient` for a role's SCRAM secret
(answered from memory, so no SQLite on the hot path) and to wake an endpoint; it reports session
activity through `ActivityRegistry`, which the suspend policy reads. Endpoints are named by their
compute id: a pooled host's `-pooler` suffix is stripped when the proxy routes (`Route.compute_id`).
`argon up` wires the in-process implementation (`argon.control.proxy_service.ProxyService`); tests
use `FakeControl` beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ComputeAddress:
    """Where a running compute listens: a Unix socket file, reachable only by argon."""

    socket_path: str
    cold_start: bool = False  # True if this wake started the compute


class ControlClient(Protocol):
    async def get_role_secret(self, endpoint_id: str, role: str) -> str | None:
        """The role's SCRAM verifier (pg_authid form), or None if endpoint or role is unknown.

        Must be cheap (served from memory). None means: run a doomed mock exchange and answer
        "password authentication failed", exactly as for a wrong password.
        """

    async def refresh_role_secret(self, endpoint_id: str, role: str) -> str | None:
        """Re-read the verifier from the compute when it is running (after a failed check or a
        compute-side rejection: the password may have been changed through SQL)."""

    async def wake(self, endpoint_id: str) -> ComputeAddress:
        """Make sure the endpoint's compute runs; single-flight per endpoint; clients that arrive
        during a wake or a suspend wait here. Raises `argon.errors.ArgonError` whose
        `user_message` is sent to the client (e.g. endpoint disabled)."""

    def allowed_ips(self, endpoint_id: str) -> tuple[str, ...]:
        """The project's IP allow-list in force for this endpoint (`argon.model.ip_allowed` reads it);
        empty when everyone may connect, or the endpoint is unknown. Served from memory."""

    def endpoint_exists(self, endpoint_id: str) -> bool:
        """Cheap check used only for metrics/logging; auth must not depend on it."""

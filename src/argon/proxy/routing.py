"""Which endpoint a client wants: TLS SNI, the `options` startup parameter, or the password hack.

Pure functions, Neon's rules and texts (reference/neon-proxy.md §1.1, §1.4): the SNI's first label
is the endpoint id when the rest of the name equals the configured domain (labels `api` and
`apiauth` excepted); `options=endpoint=<id>` (or the deprecated `project=`) names it for clients
without SNI; both present must agree; with neither, the proxy asks for a cleartext password of the
form `endpoint=<id>;<password>` (or `$` as separator). Before the password hack, an endpoint's own
loopback address (ADR 0031) names it: a client that reached one sends no SNI (an IP address) and no
option, and SNI or an option still win over the address. A `-pooler` suffix stays in the endpoint id
(`Route.pooler` records that it was asked for) and is stripped here, once: `Route.compute_id` names
the compute that serves the route, which is what the proxy asks the control plane about and what
activity and throttling count; the session then goes to the transaction pooler (ADR 0017).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from argon.errors import UserError
from argon.wire.codec import endpoint_from_options

NO_ENDPOINT = (
    "Endpoint ID is not specified. Either please upgrade the postgres client library (libpq) for SNI "
    "support or pass the endpoint ID (first part of the domain name) as a parameter: "
    "'?options=endpoint%3D<endpoint-id>'. See more at https://neon.tech/sni"
)
MISSING_USER = "Parameter 'user' is missing in startup packet."
_RESERVED_LABELS = frozenset({"api", "apiauth"})
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
POOLER_SUFFIX = "-pooler"


class RoutingError(UserError):
    """A routing problem the client is told about verbatim (then the connection is closed)."""


@dataclass(frozen=True)
class Route:
    """Where a startup packet points. `endpoint_id` is None when only the password hack can tell."""

    user: str
    database: str
    endpoint_id: str | None
    source: Literal["sni", "options", "address", "password"] | None

    @property
    def pooler(self) -> bool:
        return self.endpoint_id is not None and self.endpoint_id.endswith(POOLER_SUFFIX)

    @property
    def compute_id(self) -> str | None:
        """The endpoint whose compute serves this route (`-pooler` stripped): the control plane's
        lookups and wakes, activity, throttling."""
        return None if self.endpoint_id is None else self.endpoint_id.removesuffix(POOLER_SUFFIX)

    def with_endpoint(self, endpoint_id: str) -> Route:
        return Route(self.user, self.database, check_endpoint_id(endpoint_id), "password")


def endpoint_from_sni(server_name: str | None, domain: str | None) -> str | None:
    """The endpoint id in `<id>.<domain>`; None for any other name (a custom CNAME is no error)."""
    if not server_name or not domain:
        return None
    label, dot, rest = server_name.rstrip(".").lower().partition(".")
    if not dot or not label or rest != domain.lower().rstrip(".") or label in _RESERVED_LABELS:
        return None
    return label


def endpoint_from_host(host: str | None, domain: str | None,
                       addresses: Mapping[str, str] | None = None) -> str | None:
    """The endpoint an HTTP or WebSocket client's host names (the connection string's host, `Host`,
    `?address=`): the first label under the domain, or any first label shaped like an id (`ep-...`,
    as Neon's hosts are), or an endpoint's own address (`addresses`, ADR 0031). Any other IP address
    or name names none."""
    if not host:
        return None
    host = host.strip("[]").rstrip(".").lower()
    try:
        ipaddress.ip_address(host)
        return addresses.get(host) if addresses else None
    except ValueError:
        pass
    under_domain = endpoint_from_sni(host, domain)
    if under_domain is not None:
        return under_domain
    label = host.split(".", 1)[0]
    return label if label.startswith("ep-") else None


def check_endpoint_id(endpoint_id: str) -> str:
    if not endpoint_id or not set(endpoint_id) <= _ID_CHARS:
        raise RoutingError(f"Project name ('{endpoint_id}') must contain only alphanumeric characters and hyphen.")
    return endpoint_id


def resolve(params: dict[str, str], server_name: str | None, domain: str | None, *,
            host_endpoint: str | None = None, address_endpoint: str | None = None) -> Route:
    """Route a startup packet. Raises `RoutingError` with Neon's text; never asks the control plane.

    `host_endpoint`: the endpoint a WebSocket's Host header or `?address=` named (counts as SNI).
    `address_endpoint`: the endpoint whose own address the connection arrived on (ADR 0031)."""
    user = params.get("user")
    if not user:
        raise RoutingError(MISSING_USER)
    database = params.get("database") or user
    from_options = endpoint_from_options(params.get("options", ""))
    from_sni = endpoint_from_sni(server_name, domain) or host_endpoint
    if from_sni is not None and from_options is not None and from_sni != from_options:
        raise RoutingError(f"Inconsistent project name inferred from SNI ('{from_sni}') "
                           f"and project option ('{from_options}').")
    if from_sni is not None:
        return Route(user, database, check_endpoint_id(from_sni), "sni")
    if from_options is not None:
        return Route(user, database, check_endpoint_id(from_options), "options")
    if address_endpoint is not None:
        return Route(user, database, check_endpoint_id(address_endpoint), "address")
    return Route(user, database, None, None)


def parse_password_hack(payload: str) -> tuple[str, str]:
    """`endpoint=<id>;<password>` (or `project=`, or `$` instead of `;`) -> (id, password).

    Split at the first `;` if there is one, else at the first `$`; the password may contain either.
    Raises `RoutingError(NO_ENDPOINT)` for anything else.
    """
    sep = payload.find(";")
    if sep < 0:
        sep = payload.find("$")
    if sep < 0:
        raise RoutingError(NO_ENDPOINT)
    head, password = payload[:sep], payload[sep + 1:]
    for prefix in ("endpoint=", "project="):
        if head.startswith(prefix):
            return check_endpoint_id(head[len(prefix):]), password
    raise RoutingError(NO_ENDPOINT)

"""Connection strings and parameters, built in one place for the API, the CLI and the console.

Two forms of Argon's own strings (the API's `connection_uris`, `argon connection-string`, the
console). The Neon form (when a domain is configured) puts the endpoint in the host name,
`<endpoint-id>.<domain>`, routed by TLS SNI. The local form works on the machine as is, with no DNS:
the endpoint in `options=endpoint=<id>`, and as host the endpoint's own loopback address in the
address form (`endpoint_hosts = "addresses"`, ADR 0031: `127.1.X.Y`, `127.2.X.Y` for the pooled
host), else the proxy's address. The option is kept beside the address so that tools that read the
endpoint from a string (argon.django's test branches) keep finding it; it agrees with the address.

`endpoint.host` in the API is what Neon's clients derive their strings from (neonctl's
`connection-string`, the create-branch action): the name form `<id>.<domain>` (with the default
domain when none is set), or the endpoint's address in the address form.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from argon import model
from argon.control.addresses import pooled_address
from argon.settings import Settings


@dataclass(frozen=True)
class ConnectionParameters:
    host: str  # what clients connect to (IP or name)
    port: int
    database: str
    role: str
    password: str
    endpoint_id: str
    pooled: bool = False
    sni_host: str | None = None  # the Neon-form host name, when a domain is configured

    @property
    def endpoint_label(self) -> str:
        return self.endpoint_id + ("-pooler" if self.pooled else "")

    @property
    def options(self) -> str | None:
        """The `options` startup parameter of the local form (None in the Neon form)."""
        return None if self.sni_host else f"endpoint={self.endpoint_label}"

    @property
    def uri(self) -> str:
        host = self.sni_host or self.host
        netloc = f"{quote(self.role, safe='')}:{quote(self.password, safe='')}@{host}"
        if self.port != 5432:
            netloc += f":{self.port}"
        query = "sslmode=require"
        if self.options:
            query += "&options=" + quote(self.options, safe="")
        return f"postgresql://{netloc}/{quote(self.database, safe='')}?{query}"


def uses_addresses(settings: Settings) -> bool:
    """Whether endpoints are reached at their own addresses (the platform resolves "auto" at start;
    unresolved, it means names)."""
    return settings.endpoint_hosts == "addresses"


def endpoint_host(settings: Settings, endpoint: model.Endpoint, *, pooled: bool = False) -> str:
    """`endpoint.host` in the API. In the name form it contains the id, so that neonctl's `--pooled`
    (which replaces the id with `<id>-pooler` in it) names the pooler; an address cannot carry the
    id, so there `--pooled` gives the direct address, which works in session mode (ADR 0031)."""
    if uses_addresses(settings) and endpoint.address:
        return pooled_address(endpoint.address) if pooled else endpoint.address
    return f"{endpoint.id}{'-pooler' if pooled else ''}.{settings.cert_domain}"


def parameters(settings: Settings, *, endpoint: model.Endpoint, role: str, password: str, database: str,
               pooled: bool = False) -> ConnectionParameters:
    label = endpoint.id + ("-pooler" if pooled else "")
    own = uses_addresses(settings) and bool(endpoint.address) and not settings.public_host
    return ConnectionParameters(
        host=endpoint_host(settings, endpoint, pooled=pooled) if own else settings.connect_host, port=settings.proxy_port, database=database, role=role,
        password=password, endpoint_id=endpoint.id, pooled=pooled,
        sni_host=f"{label}.{settings.domain}" if settings.domain else None)


def django_databases(*, database: str, role: str, password: str, host: str, port: str | int,
                     options: dict[str, str]) -> str:
    """The `DATABASES` block of Django's settings.py, in the form Neon's Django guide uses (shared by
    the CLI and the console, so the two can never disagree)."""
    return ("DATABASES = {\n    \"default\": {\n        \"ENGINE\": \"django.db.backends.postgresql\",\n"
            f"        \"NAME\": {database!r},\n        \"USER\": {role!r},\n"
            f"        \"PASSWORD\": {password!r},\n        \"HOST\": {host!r},\n"
            f"        \"PORT\": {str(port)!r},\n        \"OPTIONS\": {options!r},\n    }}\n}}")

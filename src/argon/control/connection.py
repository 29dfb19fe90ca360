"""Connection strings and parameters, built in one place for the API, the CLI and the console.

Two forms. The local form works on the machine as is, with no DNS: host = the proxy address, the
endpoint in `options=endpoint=<id>`. The Neon form (when a domain is configured) puts the endpoint
in the host name, `<endpoint-id>.<domain>`, routed by TLS SNI.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

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
        """The `options` startup parameter the local form needs (None in the Neon form)."""
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


def endpoint_host(settings: Settings, endpoint_id: str) -> str:
    """`endpoint.host` in the API: always contains the id (neonctl derives the pooler host from it)."""
    return f"{endpoint_id}.{settings.cert_domain}"


def parameters(settings: Settings, *, endpoint_id: str, role: str, password: str, database: str,
               pooled: bool = False) -> ConnectionParameters:
    label = endpoint_id + ("-pooler" if pooled else "")
    return ConnectionParameters(
        host=settings.connect_host, port=settings.proxy_port, database=database, role=role,
        password=password, endpoint_id=endpoint_id, pooled=pooled,
        sni_host=f"{label}.{settings.domain}" if settings.domain else None)


def django_databases(*, database: str, role: str, password: str, host: str, port: str | int,
                     options: dict[str, str]) -> str:
    """The `DATABASES` block of Django's settings.py, in the form Neon's Django guide uses (shared by
    the CLI and the console, so the two can never disagree)."""
    return ("DATABASES = {\n    \"default\": {\n        \"ENGINE\": \"django.db.backends.postgresql\",\n"
            f"        \"NAME\": {database!r},\n        \"USER\": {role!r},\n"
            f"        \"PASSWORD\": {password!r},\n        \"HOST\": {host!r},\n"
            f"        \"PORT\": {str(port)!r},\n        \"OPTIONS\": {options!r},\n    }}\n}}")

"""Ready-to-paste connection snippets for the Connection Details widget, one per client.

All derive from `argon.control.connection.ConnectionParameters`, like the API's and the CLI's
connection strings, so the console can never show a host or port the proxy does not serve. The
Django `DATABASES` form is the one `argon connection-string --format django` prints (a test keeps
the two identical).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from argon.control.connection import ConnectionParameters, django_databases


@dataclass(frozen=True)
class Snippet:
    key: str
    label: str
    text: str
    password: str

    @property
    def parts(self) -> list[tuple[str, bool]]:
        """The text cut around the password, so the page can mask it: (segment, is_password)."""
        out: list[tuple[str, bool]] = []
        for i, chunk in enumerate(self.text.split(self.password)):
            if i:
                out.append((self.password, True))
            if chunk:
                out.append((chunk, False))
        return out


def django_settings(p: ConnectionParameters) -> str:
    options = {"sslmode": "require"}
    if p.options:
        options["options"] = p.options
    return django_databases(database=p.database, role=p.role, password=p.password, host=p.sni_host or p.host,
                            port=p.port, options=options)


def _dj_database_url(uri: str) -> str:
    return ("# pip install dj-database-url\nimport dj_database_url\n\nDATABASES = {\n"
            f"    \"default\": dj_database_url.parse(\n        {json.dumps(uri)},\n"
            "        conn_max_age=600,\n        conn_health_checks=True,\n    ),\n}")


def _sqlalchemy(uri: str) -> str:
    url = "postgresql+psycopg://" + uri.removeprefix("postgresql://")
    return ("from sqlalchemy import create_engine\n\n"
            f"engine = create_engine({json.dumps(url)}, pool_pre_ping=True)")


def _psycopg(uri: str) -> str:
    return f"import psycopg\n\nconn = psycopg.connect({json.dumps(uri)})"


def _asyncpg(uri: str) -> str:
    return f"import asyncpg\n\nconn = await asyncpg.connect({json.dumps(uri)})"


def _node(uri: str) -> str:
    return ("// npm install pg\n// node-postgres verifies the certificate for sslmode=require: trust Argon's CA with\n"
            "// NODE_EXTRA_CA_CERTS=<data dir>/tls/ca.crt (printed by `argon up`)\nimport pg from \"pg\";\n\n"
            f"const client = new pg.Client({{ connectionString: {json.dumps(uri)} }});\n"
            "await client.connect();")


def snippets(p: ConnectionParameters) -> list[Snippet]:
    uri = p.uri
    texts = [
        ("uri", "Connection string", uri),
        ("psql", "psql", f"psql '{uri}'"),
        ("django", "Django (settings.py)", django_settings(p)),
        ("dj-database-url", "Django (dj-database-url)", _dj_database_url(uri)),
        ("env", ".env", f"DATABASE_URL='{uri}'"),
        ("sqlalchemy", "SQLAlchemy", _sqlalchemy(uri)),
        ("psycopg", "psycopg", _psycopg(uri)),
        ("asyncpg", "asyncpg", _asyncpg(uri)),
        ("node", "Node.js (pg)", _node(uri)),
    ]
    return [Snippet(key, label, text, p.password) for key, label, text in texts]

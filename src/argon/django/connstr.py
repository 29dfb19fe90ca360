"""Connection strings to Django's `DATABASES` entries, and where the endpoint sits in such an entry.

Imports nothing of Django's: `settings.py` calls `database()` before Django is set up, and the
helper works without Django installed. URLs are parsed by libpq itself (through psycopg's
`conninfo_to_dict`), so quoting and query parameters mean exactly what they mean to libpq.

An Argon or Neon endpoint is named in one of three places, as the proxy reads them: the first
label of the host (`ep-…` or `ep-…-pooler`, Neon's form and Argon's with a domain), the `options`
parameter (`endpoint=ep-…`, Argon's local form), or the password (`endpoint=ep-…;secret`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

POOLER = "-pooler"
POSTGRES_ENGINE = "django.db.backends.postgresql"
ENGINES = {
    "postgres": POSTGRES_ENGINE,
    "postgresql": POSTGRES_ENGINE,
    "pgsql": POSTGRES_ENGINE,
    "postgis": "django.contrib.gis.db.backends.postgis",
}
# Keys of a libpq conninfo that become top-level DATABASES keys; the rest go to OPTIONS.
_TOP_LEVEL = {"dbname": "NAME", "user": "USER", "password": "PASSWORD", "host": "HOST", "port": "PORT"}
_OPTION_WORD = re.compile(r"(?<!\S)(endpoint|project)=([A-Za-z0-9-]+)")
_PASSWORD_HACK = re.compile(r"(endpoint|project)=([A-Za-z0-9-]+)([;$])")


class ConnectionStringError(ValueError):
    """A connection string or DATABASES entry the helper cannot use; the message says why."""


@dataclass(frozen=True)
class EndpointRef:
    """The endpoint a DATABASES entry connects to. `endpoint_id` never carries `-pooler`."""

    endpoint_id: str
    pooled: bool
    where: Literal["host", "options", "password"]


def _label(endpoint_id: str, pooled: bool) -> str:
    return endpoint_id + (POOLER if pooled else "")


def _split_label(label: str) -> tuple[str, bool]:
    return (label[: -len(POOLER)], True) if label.endswith(POOLER) else (label, False)


def find_endpoint(entry: Mapping[str, Any]) -> EndpointRef | None:
    """The Argon/Neon endpoint of a DATABASES entry, or None for plain PostgreSQL."""
    options = (entry.get("OPTIONS") or {}).get("options")
    if isinstance(options, str):
        match = _OPTION_WORD.search(options)
        if match:
            return EndpointRef(*_split_label(match.group(2)), "options")
    host = str(entry.get("HOST") or "")
    first = host.split(",", 1)[0].split(".", 1)[0].lower()
    if first.startswith("ep-") and "." in host:
        return EndpointRef(*_split_label(first), "host")
    match = _PASSWORD_HACK.match(str(entry.get("PASSWORD") or ""))
    if match:
        return EndpointRef(*_split_label(match.group(2)), "password")
    return None


def retarget(entry: Mapping[str, Any], endpoint_id: str, *, pooled: bool | None = None,
             password: str | None = None) -> dict[str, Any]:
    """A copy of `entry` that connects to another endpoint (another branch's compute) in the same
    place the entry names its own. `pooled=None` keeps the entry's choice; `password` replaces the
    role's password (kept in the password-hack form when the entry uses it)."""
    ref = find_endpoint(entry)
    if ref is None:
        raise ConnectionStringError("this DATABASES entry names no Argon or Neon endpoint")
    label = _label(endpoint_id, ref.pooled if pooled is None else pooled)
    out = dict(entry)
    out["OPTIONS"] = dict(entry.get("OPTIONS") or {})
    if isinstance(out["OPTIONS"].get("options"), str):
        out["OPTIONS"]["options"] = _OPTION_WORD.sub(lambda m: f"{m.group(1)}={label}", out["OPTIONS"]["options"])
    host = str(entry.get("HOST") or "")
    first, dot, rest = host.partition(".")
    if first.lower().startswith("ep-") and dot:
        out["HOST"] = f"{label}.{rest}"
    current = str(entry.get("PASSWORD") or "")
    match = _PASSWORD_HACK.match(current)
    secret = password if password is not None else (current[match.end():] if match else current)
    out["PASSWORD"] = f"{match.group(1)}={label}{match.group(3)}{secret}" if match else secret
    return out


def set_pooled(entry: Mapping[str, Any], pooled: bool) -> dict[str, Any]:
    """The same endpoint through its pooled (`-pooler`) or direct name."""
    ref = find_endpoint(entry)
    if ref is None:
        raise ConnectionStringError("pooled= needs an Argon or Neon connection string (an ep-… endpoint)")
    return retarget(entry, ref.endpoint_id, pooled=pooled)


def parse_url(url: str) -> dict[str, Any]:
    """A postgres:// URL (or a libpq `key=value` string) as a DATABASES entry, the keys
    dj-database-url gives: ENGINE, NAME, USER, PASSWORD, HOST, PORT, OPTIONS (the query)."""
    text = url.strip()
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme and scheme not in ENGINES:
        raise ConnectionStringError(f"unsupported scheme {scheme + '://'!r}: use postgresql:// (or postgres://, "
                                    "postgis://)")
    engine = ENGINES.get(scheme, POSTGRES_ENGINE)
    if scheme in ("pgsql", "postgis"):
        text = "postgresql" + text[len(scheme):]
    try:
        params = conninfo_to_dict(text)
    except psycopg.ProgrammingError as exc:
        raise ConnectionStringError(f"not a valid connection string: {str(exc).splitlines()[0]}") from None
    out: dict[str, Any] = {"ENGINE": engine, "NAME": "", "USER": "", "PASSWORD": "", "HOST": "", "PORT": ""}
    options: dict[str, Any] = {}
    for key, value in params.items():
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = "" if value is None else str(value)
        else:
            options[key] = value
    out["OPTIONS"] = options
    return out


def database(url: str | Mapping[str, Any] | None = None, *, env: str = "DATABASE_URL", pooled: bool | None = None,
             conn_max_age: int | None = 600, conn_health_checks: bool = True, ssl_require: bool | None = None,
             options: Mapping[str, Any] | None = None, test_options: Mapping[str, Any] | None = None,
             engine: str | None = None) -> dict[str, Any]:
    """One `DATABASES` entry from an Argon or Neon connection string (or any PostgreSQL URL).

    `url`: a URL, a libpq `key=value` string, or a dict such as `dj_database_url.parse()` returns;
    None reads the environment variable `env`. What it adds for a serverless endpoint:

    - `sslmode=require` unless the string says otherwise (`ssl_require=True` forces it, False
      leaves it out);
    - `pooled=True`/`False` switches to the endpoint's `-pooler` name or back (None: as given);
    - on a pooled name (PgBouncer in transaction mode on Neon): no server-side prepared statements
      (`prepare_threshold: None`, psycopg 3) and `DISABLE_SERVER_SIDE_CURSORS`, as Django's
      documentation asks for transaction pooling;
    - persistent connections checked before reuse (`CONN_MAX_AGE` 600 s with
      `CONN_HEALTH_CHECKS`): a suspended compute closes them, the check replaces them with a new
      connection that wakes the compute, and requests in between pay no new TLS handshake.

    `options` is merged into OPTIONS last and `test_options` becomes TEST, so the caller always wins.
    """
    if url is None:
        value = os.environ.get(env)
        if not value:
            raise ConnectionStringError(f"argon.django.database(): the environment variable {env} is not set")
        url = value
    if isinstance(url, str):
        entry = parse_url(url)
    elif isinstance(url, Mapping):
        entry = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in url.items()}
        entry.setdefault("OPTIONS", {})
    else:
        raise ConnectionStringError(f"argon.django.database() takes a URL or a dict, not {type(url).__name__}")
    if engine:
        entry["ENGINE"] = engine
    entry.setdefault("ENGINE", POSTGRES_ENGINE)
    ref = find_endpoint(entry)
    if pooled is not None:
        entry = set_pooled(entry, pooled)
        ref = find_endpoint(entry)
    opts = entry["OPTIONS"]
    if ssl_require or (ssl_require is None and ref is not None and "sslmode" not in opts):
        opts["sslmode"] = "require"
    if ref is not None and ref.pooled:
        opts["prepare_threshold"] = None
        entry["DISABLE_SERVER_SIDE_CURSORS"] = True
    entry["CONN_MAX_AGE"] = conn_max_age
    entry["CONN_HEALTH_CHECKS"] = conn_health_checks
    opts.update(options or {})
    if test_options is not None:
        entry["TEST"] = dict(test_options)
    return entry

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from argon import ids
from argon.control import connection
from argon.errors import UserError
from argon.settings import Settings


def _settings(**kw: object) -> Settings:
    return Settings(data_dir=Path("/tmp/x"), config_file=None, **kw)  # type: ignore[arg-type]


def test_local_form_needs_no_dns() -> None:
    p = connection.parameters(_settings(proxy_port=6000), endpoint_id="ep-a-b-12345678", role="neondb_owner",
                              password="p@ss/w:rd", database="neondb")
    parts = urlsplit(p.uri)
    assert parts.hostname == "127.0.0.1" and parts.port == 6000
    assert parts.password == "p%40ss%2Fw%3Ard"
    assert parse_qs(parts.query) == {"sslmode": ["require"], "options": ["endpoint=ep-a-b-12345678"]}


def test_neon_form_with_domain() -> None:
    p = connection.parameters(_settings(domain="db.example.com"), endpoint_id="ep-a-b-12345678", role="r",
                              password="x", database="d", pooled=True)
    assert p.uri == "postgresql://r:x@ep-a-b-12345678-pooler.db.example.com/d?sslmode=require"
    assert connection.endpoint_host(_settings(domain="db.example.com"), "ep-a-b-c") == "ep-a-b-c.db.example.com"


def test_ids_have_neon_shapes() -> None:
    assert ids.BRANCH_ID_RE.match(ids.branch_id())
    assert ids.ENDPOINT_ID_RE.match(ids.endpoint_id())
    pid = ids.project_id()
    assert ids.ID_RE.match(pid) and len(pid.split("-")) == 3


@pytest.mark.parametrize("bad", ["", "x" * 64, "a\x00b", "new\nline"])
def test_pg_names_are_checked(bad: str) -> None:
    with pytest.raises(UserError):
        ids.check_pg_name(bad, "role")


def test_hostile_names_are_allowed_because_they_are_quoted() -> None:
    assert ids.check_pg_name('Robert"); DROP TABLE x;--', "role")

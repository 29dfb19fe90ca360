from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from argon import ids, model
from argon.control import addresses, connection
from argon.errors import UserError
from argon.settings import Settings


def _settings(**kw: object) -> Settings:
    return Settings(data_dir=Path("/tmp/x"), config_file=None, **kw)  # type: ignore[arg-type]


def _endpoint(endpoint_id: str = "ep-a-b-12345678", address: str | None = None) -> model.Endpoint:
    now = model.utcnow()
    return model.Endpoint(id=endpoint_id, project_id="p", branch_id="br-x", created_at=now, updated_at=now,
                          address=address)


def test_local_form_needs_no_dns() -> None:
    p = connection.parameters(_settings(proxy_port=6000), endpoint=_endpoint(), role="neondb_owner",
                              password="p@ss/w:rd", database="neondb")
    parts = urlsplit(p.uri)
    assert parts.hostname == "127.0.0.1" and parts.port == 6000
    assert parts.password == "p%40ss%2Fw%3Ard"
    assert parse_qs(parts.query) == {"sslmode": ["require"], "options": ["endpoint=ep-a-b-12345678"]}


def test_neon_form_with_domain() -> None:
    p = connection.parameters(_settings(domain="db.example.com"), endpoint=_endpoint(address="127.1.0.9"),
                              role="r", password="x", database="d", pooled=True)
    assert p.uri == "postgresql://r:x@ep-a-b-12345678-pooler.db.example.com/d?sslmode=require"
    assert connection.endpoint_host(_settings(domain="db.example.com"), _endpoint("ep-a-b-c", "127.1.0.9")) \
        == "ep-a-b-c.db.example.com"
    # "auto" left unresolved (the platform resolves it at start) means names, with the default domain
    assert connection.endpoint_host(_settings(), _endpoint("ep-a-b-c", "127.1.0.9")) == "ep-a-b-c.argon.localhost"


def test_address_form_puts_the_endpoints_own_address_in_the_host() -> None:
    s = _settings(endpoint_hosts="addresses", proxy_port=6000)
    ep = _endpoint(address="127.1.3.7")
    direct = connection.parameters(s, endpoint=ep, role="r", password="x", database="d")
    pooled = connection.parameters(s, endpoint=ep, role="r", password="x", database="d", pooled=True)
    # the option stays beside the address (it agrees with it): tools that read it keep working
    assert direct.uri == "postgresql://r:x@127.1.3.7:6000/d?sslmode=require&options=endpoint%3Dep-a-b-12345678"
    assert pooled.uri == "postgresql://r:x@127.2.3.7:6000/d?sslmode=require&options=endpoint%3Dep-a-b-12345678-pooler"
    assert connection.endpoint_host(s, ep) == "127.1.3.7"
    assert connection.endpoint_host(s, ep, pooled=True) == "127.2.3.7"
    # what neonctl does for --pooled: an address has no id to replace, so it stays the direct one
    assert connection.endpoint_host(s, ep).replace(ep.id, ep.id + "-pooler") == "127.1.3.7"
    # an endpoint without an address of its own (none should remain after migration 0006): the proxy's
    legacy = connection.parameters(s, endpoint=_endpoint(), role="r", password="x", database="d")
    assert legacy.host == "127.0.0.1" and legacy.options == "endpoint=ep-a-b-12345678"
    # a public host set for clients elsewhere: loopback addresses would not reach them
    public = connection.parameters(_settings(endpoint_hosts="addresses", public_host="db.example.com"), endpoint=ep,
                                   role="r", password="x", database="d")
    assert public.host == "db.example.com"


def test_address_slots_round_trip_and_stay_clear_of_special_addresses() -> None:
    seen = set()
    for slot in (0, 1, 252, 253, 254, 255, 1000, addresses.SLOTS - 1):
        address = addresses.address_of(slot)
        assert addresses.slot_of(address) == slot
        assert addresses.slot_of(addresses.pooled_address(address)) == slot
        last = int(address.rsplit(".", 1)[1])
        assert 1 <= last <= 254 and address.startswith("127.1.")
        assert addresses.pooled_address(address).startswith("127.2.")
        seen.add(address)
    assert len(seen) == 8
    assert addresses.address_of(0) == "127.1.0.1" and addresses.address_of(254) == "127.1.1.1"
    assert len({addresses.address_of(s) for s in range(0, addresses.SLOTS, 97)}) == len(range(0, addresses.SLOTS, 97))
    with pytest.raises(ValueError):
        addresses.address_of(addresses.SLOTS)
    for other in (None, "", "127.0.0.1", "127.1.0.0", "127.1.0.255", "10.1.0.1", "127.1.0", "127.1.x.1", "::1"):
        assert addresses.slot_of(other) is None
    assert addresses.listen_map("ep-a", "127.1.0.5") == {"127.1.0.5": "ep-a", "127.2.0.5": "ep-a-pooler"}


def test_next_slot_moves_on_and_never_gives_a_taken_one() -> None:
    assert addresses.next_slot(set(), 0) == 0
    assert addresses.next_slot({0, 1, 2}, 3) == 3
    assert addresses.next_slot({3, 4}, 3) == 5
    assert addresses.next_slot({0, 5}, 1) == 1  # a freed slot below the start is not given again...
    assert addresses.next_slot({addresses.SLOTS - 1, 0}, addresses.SLOTS - 1) == 1  # ...until the slots go round
    assert addresses.next_slot(set(), addresses.SLOTS + 3) == 3
    with pytest.raises(UserError, match="every endpoint address is taken"):
        addresses.next_slot(set(range(addresses.SLOTS)), 0)


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


def test_argon_up_says_which_form_and_how_to_get_neons_names() -> None:
    from argon.cli.main import endpoint_hosts_lines

    lines = endpoint_hosts_lines(_settings(), "addresses")
    text = " ".join(lines)
    assert "127.1.X.Y" in text and "127.2.X.Y" in text and "does not resolve here" in text
    assert "ARGON_DOMAIN" in text and "libnss-myhostname" in text
    assert endpoint_hosts_lines(_settings(domain="db.example.com"), "names") == [
        "<endpoint-id>.db.example.com, Neon's form; pooled: <endpoint-id>-pooler.db.example.com"]
    assert "resolve on this machine" in endpoint_hosts_lines(_settings(), "names")[0]


def test_the_start_probe_finds_no_name_under_a_domain_that_never_resolves() -> None:
    import asyncio

    from argon.platform import names_resolve

    assert asyncio.run(names_resolve("argon.invalid")) is False  # RFC 6761: .invalid never resolves

"""Endpoint routing: SNI, `options`, the password hack, and Neon's exact error texts."""

from __future__ import annotations

import pytest

from argon.proxy.routing import (
    MISSING_USER,
    NO_ENDPOINT,
    Route,
    RoutingError,
    check_endpoint_id,
    endpoint_from_sni,
    parse_password_hack,
    resolve,
)

DOMAIN = "db.example.com"


@pytest.mark.parametrize(("server_name", "expected"), [
    ("ep-cool-darkness-123456.db.example.com", "ep-cool-darkness-123456"),
    ("EP-Upper.DB.Example.com", "ep-upper"),
    ("ep-x-pooler.db.example.com", "ep-x-pooler"),
    ("ep-x.db.example.com.", "ep-x"),
    ("api.db.example.com", None),
    ("apiauth.db.example.com", None),
    ("ep-x.other.example.com", None),  # a custom CNAME: no endpoint, not an error
    ("ep-x.a.db.example.com", None),  # only the first label may be the id
    ("db.example.com", None),
    ("localhost", None),
    ("", None),
    (None, None),
])
def test_endpoint_from_sni(server_name: str | None, expected: str | None) -> None:
    assert endpoint_from_sni(server_name, DOMAIN) == expected


def test_sni_without_configured_domain_routes_nothing() -> None:
    assert endpoint_from_sni("ep-x.db.example.com", None) is None


def test_resolve_prefers_sni_and_defaults_database_to_user() -> None:
    route = resolve({"user": "alice"}, "ep-one.db.example.com", DOMAIN)
    assert route == Route("alice", "alice", "ep-one", "sni")
    assert not route.pooler


def test_resolve_from_options() -> None:
    route = resolve({"user": "alice", "database": "app", "options": "-c search_path=x endpoint=ep-two"}, None, DOMAIN)
    assert route == Route("alice", "app", "ep-two", "options")


def test_resolve_accepts_project_option_and_agreeing_sni() -> None:
    route = resolve({"user": "a", "options": "project=ep-two"}, "ep-two.db.example.com", DOMAIN)
    assert route.endpoint_id == "ep-two"
    assert route.source == "sni"


def test_pooler_suffix_is_kept_and_reported() -> None:
    route = resolve({"user": "a"}, "ep-two-pooler.db.example.com", DOMAIN)
    assert route.endpoint_id == "ep-two-pooler"
    assert route.pooler


def test_inconsistent_sni_and_option() -> None:
    with pytest.raises(RoutingError) as err:
        resolve({"user": "a", "options": "endpoint=ep-two"}, "ep-one.db.example.com", DOMAIN)
    assert err.value.user_message == ("Inconsistent project name inferred from SNI ('ep-one') "
                                      "and project option ('ep-two').")


def test_the_address_a_connection_arrived_on_routes_when_nothing_else_does() -> None:
    """ADR 0031: an endpoint's own address names it; SNI and an option still win over it."""
    assert resolve({"user": "a"}, None, DOMAIN, address_endpoint="ep-one") == Route("a", "a", "ep-one", "address")
    pooled = resolve({"user": "a"}, None, DOMAIN, address_endpoint="ep-one-pooler")
    assert pooled.pooler and pooled.compute_id == "ep-one"
    assert resolve({"user": "a", "options": "endpoint=ep-two"}, None, DOMAIN,
                   address_endpoint="ep-one") == Route("a", "a", "ep-two", "options")
    assert resolve({"user": "a"}, "ep-three.db.example.com", DOMAIN,
                   address_endpoint="ep-one") == Route("a", "a", "ep-three", "sni")


def test_no_endpoint_means_password_hack() -> None:
    route = resolve({"user": "a"}, "localhost", DOMAIN)
    assert route.endpoint_id is None
    assert route.with_endpoint("ep-three") == Route("a", "a", "ep-three", "password")


@pytest.mark.parametrize("params", [{}, {"user": ""}, {"database": "x", "options": "endpoint=ep-x"}])
def test_missing_user(params: dict[str, str]) -> None:
    with pytest.raises(RoutingError) as err:
        resolve(params, "ep-x.db.example.com", DOMAIN)
    assert err.value.user_message == MISSING_USER == "Parameter 'user' is missing in startup packet."


@pytest.mark.parametrize("bad", ["ep_x", "ep x", "ep.x", "épée", "ep-x;", ""])
def test_endpoint_charset(bad: str) -> None:
    with pytest.raises(RoutingError) as err:
        check_endpoint_id(bad)
    assert err.value.user_message == f"Project name ('{bad}') must contain only alphanumeric characters and hyphen."


def test_bad_option_id_is_rejected() -> None:
    with pytest.raises(RoutingError, match="must contain only alphanumeric"):
        resolve({"user": "a", "options": "endpoint=ep_x"}, None, DOMAIN)


@pytest.mark.parametrize(("payload", "expected"), [
    ("endpoint=ep-one;secret", ("ep-one", "secret")),
    ("project=ep-one;secret", ("ep-one", "secret")),
    ("endpoint=ep-one$secret", ("ep-one", "secret")),
    ("endpoint=ep-one;pa;ss$word", ("ep-one", "pa;ss$word")),
    ("endpoint=ep-one;pa$ss", ("ep-one", "pa$ss")),
    ("endpoint=ep-one;", ("ep-one", "")),
])
def test_password_hack(payload: str, expected: tuple[str, str]) -> None:
    assert parse_password_hack(payload) == expected


def test_password_hack_splits_at_first_semicolon_before_dollar() -> None:
    # ';' wins over an earlier '$': the id part then contains '$' and fails the charset check
    with pytest.raises(RoutingError, match="must contain only alphanumeric"):
        parse_password_hack("endpoint=ep$one;secret")


@pytest.mark.parametrize("payload", ["secret", "ep-one;secret", "endpoint:ep-one;x", "", "endpointep;x"])
def test_password_hack_without_prefix(payload: str) -> None:
    with pytest.raises(RoutingError) as err:
        parse_password_hack(payload)
    assert err.value.user_message == NO_ENDPOINT
    assert NO_ENDPOINT.startswith("Endpoint ID is not specified. Either please upgrade the postgres client library")
    assert NO_ENDPOINT.endswith("'?options=endpoint%3D<endpoint-id>'. See more at https://neon.tech/sni")

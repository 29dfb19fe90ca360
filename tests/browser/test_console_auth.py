"""The console's sign-in bookkeeping without a browser: link and session lifetimes on a fake clock.

Beside the browser tests because it is the console's own logic; it needs no browser and no Postgres.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from argon.console.auth import LINK_TTL, SESSION_TTL, ConsoleAuth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def token_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["token"][0]


def test_a_link_signs_in_once_and_only_within_its_lifetime() -> None:
    clock = Clock()
    auth = ConsoleAuth(clock)
    url = auth.issue_link("http://127.0.0.1:4444/")
    assert url.startswith("http://127.0.0.1:4444/login?token=")
    assert auth.redeem(token_of(url))
    assert not auth.redeem(token_of(url))

    late = auth.issue_link("http://127.0.0.1:4444")
    clock.now += LINK_TTL + 1
    assert not auth.redeem(token_of(late))
    assert not auth.redeem("made-up")


def test_tokens_are_kept_only_as_hashes() -> None:
    auth = ConsoleAuth(Clock())
    token = token_of(auth.issue_link("http://x"))
    assert token not in repr(vars(auth))


def test_sessions_expire_and_close() -> None:
    clock = Clock()
    auth = ConsoleAuth(clock)
    first, second = auth.open_session(), auth.open_session()
    assert first.id != second.id and first.csrf_token != second.csrf_token
    assert auth.session(first.id) is first
    assert first.csrf_ok(first.csrf_token) and not first.csrf_ok(second.csrf_token) and not first.csrf_ok(None)
    auth.close_session(first.id)
    assert auth.session(first.id) is None
    clock.now += SESSION_TTL + 1
    assert auth.session(second.id) is None
    assert auth.session(None) is None


def test_flashes_and_secrets_are_shown_once() -> None:
    session = ConsoleAuth(Clock()).open_session()
    session.flash("success", "done")
    session.secrets["password:p"] = "npg_x"
    assert session.pop_flashes() == [("success", "done")] and session.pop_flashes() == []
    assert session.pop_secret("password:p") == "npg_x" and session.pop_secret("password:p") is None

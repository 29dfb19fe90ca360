"""Who may use the console: one-time sign-in links, server-side sessions and CSRF tokens.

Everything lives in memory on purpose. A sign-in token exists only as a SHA-256 hash with an
expiry, so nothing that opens the console is ever written to disk or to a log; a session id is a
random key into a dict, so the cookie carries no data worth stealing beyond the session itself.
Restarting `argon up` signs everybody out, which is the right default for a self-hosted console
(`argon console` prints a fresh link at any time).

This module is pure bookkeeping: the clock is injectable and there is no HTTP here, except the
cookie's name and attributes, kept beside the session they describe.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LINK_TTL = 15 * 60  # seconds a sign-in link stays valid
SESSION_TTL = 12 * 3600  # seconds a session lives after sign-in
COOKIE_NAME = "argon_session"
CSRF_FIELD = "csrf_token"


@dataclass
class Session:
    """One signed-in browser. `flashes` are one-time messages shown on the next page rendered."""

    id: str
    csrf_token: str
    expires_at: float
    flashes: list[tuple[str, str]] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)  # one-time values, e.g. a new project's password
    history: dict[str, list[str]] = field(default_factory=dict)  # SQL editor: project id -> last queries
    api_key_id: int | None = None  # the API key it signed in with (None: a sign-in link)

    def flash(self, kind: str, message: str) -> None:
        self.flashes.append((kind, message))

    def pop_flashes(self) -> list[tuple[str, str]]:
        out, self.flashes = self.flashes, []
        return out

    def pop_secret(self, key: str) -> str | None:
        return self.secrets.pop(key, None)

    def remember_query(self, project_id: str, text: str, keep: int = 20) -> None:
        """The SQL editor's history of a project: newest first, no repeats, at most `keep`."""
        queries = [q for q in self.history.get(project_id, []) if q != text]
        self.history[project_id] = [text, *queries][:keep]

    def csrf_ok(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token.encode(), str(token).encode())


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ConsoleAuth:
    """Sign-in tokens and sessions of one console (one per app)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._links: dict[str, float] = {}  # sha256(token) -> expiry
        self._sessions: dict[str, Session] = {}

    # Sign-in links ---------------------------------------------------------------------------------

    def issue_link(self, base_url: str) -> str:
        """A URL that signs one browser in, once, within LINK_TTL seconds."""
        self._expire()
        token = secrets.token_urlsafe(32)
        self._links[_digest(token)] = self._clock() + LINK_TTL
        return f"{base_url.rstrip('/')}/login?token={token}"

    def redeem(self, token: str) -> bool:
        """Consume a sign-in token: True the first time it is used within its lifetime, never again."""
        expires = self._links.pop(_digest(token), None)
        return expires is not None and expires > self._clock()

    # Sessions --------------------------------------------------------------------------------------

    def open_session(self, api_key_id: int | None = None) -> Session:
        self._expire()
        session = Session(id=secrets.token_urlsafe(32), csrf_token=secrets.token_urlsafe(32),
                          expires_at=self._clock() + SESSION_TTL, api_key_id=api_key_id)
        self._sessions[session.id] = session
        return session

    def session(self, session_id: str | None) -> Session | None:
        session = self._sessions.get(session_id or "")
        if session is None or session.expires_at <= self._clock():
            return None
        return session

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def close_sessions_of_key(self, api_key_id: int) -> int:
        """Sign out every browser that signed in with this API key (it was revoked); how many."""
        doomed = [k for k, s in self._sessions.items() if s.api_key_id == api_key_id]
        for k in doomed:
            del self._sessions[k]
        return len(doomed)

    def _expire(self) -> None:
        now = self._clock()
        self._links = {h: t for h, t in self._links.items() if t > now}
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires_at > now}


def cookie_attributes(secure: bool) -> dict[str, Any]:
    """How the session cookie is set: unreadable by scripts, not sent on cross-site POSTs."""
    return {"key": COOKIE_NAME, "httponly": True, "samesite": "lax", "path": "/", "secure": secure,
            "max_age": SESSION_TTL}

"""The slice of the Neon-compatible management API the test runner uses, over httpx.

Runs inside the user's Django process: it imports nothing of Argon's server (nor its CLI, whose
settings pull in pydantic); only the path of the `argon login` file is shared with the CLI, and a
unit test keeps the two equal. Mutations are retried while the project answers 423 (another
operation runs, Neon's rule; also 429 and 503, honouring Retry-After), and the operations they
start are waited for, so the same code works against Neon, which runs operations asynchronously.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

ARGON_DEFAULT_URL = "http://127.0.0.1:4444"
NEON_DEFAULT_URL = "https://console.neon.tech/api/v2"
RETRY_STATUSES = frozenset({423, 429, 503})
FINISHED = frozenset({"finished", "skipped"})
FINE_POLL_S = 0.05  # Api.wait: the step while an operation is young (FINE_POLL_FOR_S), then up to 1 s
FINE_POLL_FOR_S = 3.0
FAILED = frozenset({"failed", "error", "cancelled"})


class ApiError(Exception):
    """An API call that failed; `str()` is one readable line."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def cli_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where `argon login` and `argon up` keep the API URL and key (argon.cli.client.cli_config_path)."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "argon" / "cli.json"


@dataclass(frozen=True)
class Credentials:
    api_url: str  # ends in /api/v2
    api_key: str
    source: str  # where the key came from, for messages


def _api_base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/api/v2") else url + "/api/v2"


def find_credentials(environ: Mapping[str, str] | None = None) -> Credentials | None:
    """The API to use: the key from ARGON_API_KEY, else NEON_API_KEY, else the `argon login`
    file; the URL from ARGON_API_URL, else NEON_API_HOST (neonctl's variable, with /api/v2), else
    the login file's URL (for its key or ARGON_API_KEY) or Neon's own (for NEON_API_KEY). None
    without a key."""
    env = os.environ if environ is None else environ
    try:
        stored = json.loads(cli_config_path(env).read_text())
        stored = stored if isinstance(stored, dict) else {}
    except (OSError, ValueError):
        stored = {}
    if env.get("ARGON_API_KEY"):
        key, source, default = env["ARGON_API_KEY"], "ARGON_API_KEY", stored.get("api_url") or ARGON_DEFAULT_URL
    elif env.get("NEON_API_KEY"):
        key, source, default = env["NEON_API_KEY"], "NEON_API_KEY", NEON_DEFAULT_URL
    elif stored.get("api_key"):
        key, source = str(stored["api_key"]), f"`argon login` ({cli_config_path(env)})"
        default = stored.get("api_url") or ARGON_DEFAULT_URL
    else:
        return None
    url = env.get("ARGON_API_URL") or env.get("NEON_API_HOST") or str(default)
    return Credentials(_api_base(url), key, source)


def expiry(hours: float) -> str:
    """An RFC 3339 time `hours` from now, for a branch's expires_at."""
    return (datetime.now(UTC) + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


class Api:
    """A blocking client of /api/v2 for one key. Every failure is an ApiError."""

    def __init__(self, credentials: Credentials, *, timeout: float = 120, retry_for: float = 60,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.credentials = credentials
        self.retry_for = retry_for
        # A plain-HTTP API (a local `argon up`) needs no TLS: without `verify=False` httpx loads the
        # CA bundle anyway, which is most of a second of the test database's set-up on a busy machine.
        self._http = httpx.Client(base_url=credentials.api_url, timeout=httpx.Timeout(timeout, connect=10),
                                  transport=transport, verify=credentials.api_url.startswith("https://"),
                                  headers={"Authorization": f"Bearer {credentials.api_key}",
                                           "Accept": "application/json",
                                           "User-Agent": "argon-django"})

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        deadline = time.monotonic() + self.retry_for
        delay = 0.1
        while True:
            try:
                resp = self._http.request(method, path, json=body, params=params)
            except httpx.TransportError as exc:
                raise ApiError(f"cannot reach the API at {self.credentials.api_url} ({type(exc).__name__})") from None
            if resp.status_code in RETRY_STATUSES and time.monotonic() < deadline:
                wait = delay
                with contextlib.suppress(ValueError):
                    wait = max(wait, float(resp.headers.get("Retry-After", 0)))
                time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 2.0)
                continue
            if resp.status_code >= 400:
                try:
                    message = resp.json().get("message") or resp.text
                except ValueError:
                    message = resp.text
                hint = f" (the key comes from {self.credentials.source})" if resp.status_code == 401 else ""
                raise ApiError(f"{method} {path}: {message.strip()} (HTTP {resp.status_code}){hint}",
                               resp.status_code)
            try:
                return resp.json()
            except ValueError:
                raise ApiError(f"{method} {path}: the answer is not JSON (HTTP {resp.status_code})") from None

    def wait(self, project_id: str, operations: list[dict[str, Any]], timeout: float = 300) -> None:
        """Until every operation finished (Neon runs them in the background); an ApiError if one failed."""
        began = time.monotonic()
        deadline = began + timeout
        delay = 0.02
        for op in operations:
            while op.get("status") not in FINISHED:
                if op.get("status") in FAILED:
                    raise ApiError(f"operation {op.get('action')} on {op.get('branch_id') or project_id} "
                                   f"{op.get('status')}: {op.get('error') or 'no reason given'}")
                if time.monotonic() > deadline:
                    raise ApiError(f"operation {op.get('action')} still {op.get('status')} after {timeout:.0f} s")
                time.sleep(delay)
                # A compute starts in a few tenths of a second: poll finely for the first seconds (a
                # coarse step there overshoots by up to half the start), then back off.
                delay = min(delay * 1.5, FINE_POLL_S if time.monotonic() - began < FINE_POLL_FOR_S else 1.0)
                op = self.request("GET", f"/projects/{project_id}/operations/{op['id']}")["operation"]

    # The calls the runner makes ---------------------------------------------------------------------

    def projects(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 100}
            if cursor:
                params["cursor"] = cursor
            page = self.request("GET", "/projects", params=params)
            items += page.get("projects", [])
            cursor = (page.get("pagination") or {}).get("cursor")
            if len(page.get("projects", [])) < 100 or not cursor:
                return items

    def endpoint(self, project_id: str, endpoint_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/projects/{project_id}/endpoints/{endpoint_id}")["endpoint"])

    def find_endpoint(self, endpoint_id: str, hint: str | None = None) -> tuple[str, dict[str, Any]]:
        """The project holding an endpoint, and the endpoint: in project `hint` (ARGON_PROJECT_ID)
        if given, else found by a search (whose endpoint lists hold it already)."""
        if hint:
            return hint, self.endpoint(hint, endpoint_id)
        for project in self.projects():
            endpoints = self.request("GET", f"/projects/{project['id']}/endpoints")["endpoints"]
            found = next((ep for ep in endpoints if ep["id"] == endpoint_id), None)
            if found is not None:
                return str(project["id"]), dict(found)
        raise ApiError(f"no project of this API key has the endpoint {endpoint_id}")

    def branch(self, project_id: str, branch_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/projects/{project_id}/branches/{branch_id}")["branch"])

    def branches(self, project_id: str) -> list[dict[str, Any]]:
        return list(self.request("GET", f"/projects/{project_id}/branches")["branches"])

    def branch_endpoints(self, project_id: str, branch_id: str) -> list[dict[str, Any]]:
        return list(self.request("GET", f"/projects/{project_id}/branches/{branch_id}/endpoints")["endpoints"])

    def databases(self, project_id: str, branch_id: str) -> list[dict[str, Any]]:
        """The branch's databases (from a running compute, the API reads them afresh: ADR 0005)."""
        return list(self.request("GET", f"/projects/{project_id}/branches/{branch_id}/databases")["databases"])

    def create_branch(self, project_id: str, *, name: str, parent_id: str, expires_at: str | None,
                      compute: bool = True, wait_start: bool = True) -> dict[str, Any]:
        """A branch of `parent_id` (with a read-write compute unless `compute=False`), its
        operations finished. Returns the API's answer: branch, endpoints, databases, …
        `wait_start=False`: the compute's start is not waited for (a first connection waits for it
        at the proxy, which wakes a compute anyway), only the branch's own operations."""
        spec: dict[str, Any] = {"name": name, "parent_id": parent_id}
        if expires_at:
            spec["expires_at"] = expires_at
        body = {"branch": spec, "endpoints": [{"type": "read_write"}] if compute else []}
        try:
            created = self.request("POST", f"/projects/{project_id}/branches", body=body)
        except ApiError as exc:
            if not (expires_at and exc.status in (400, 422) and "expire" in str(exc).lower()):
                raise
            del spec["expires_at"]  # a server (or plan) without branch expiry: the runner deletes its branches itself
            created = self.request("POST", f"/projects/{project_id}/branches", body=body)
        self.wait(project_id, [op for op in created.get("operations", [])
                               if wait_start or op.get("action") != "start_compute"])
        return dict(created)

    def add_compute(self, project_id: str, branch_id: str) -> dict[str, Any]:
        created = self.request("POST", f"/projects/{project_id}/endpoints",
                               body={"endpoint": {"branch_id": branch_id, "type": "read_write"}})
        self.wait(project_id, created.get("operations", []))
        return dict(created["endpoint"])

    def update_branch(self, project_id: str, branch_id: str, **fields: Any) -> dict[str, Any]:
        updated = self.request("PATCH", f"/projects/{project_id}/branches/{branch_id}", body={"branch": fields})
        self.wait(project_id, updated.get("operations", []))
        return dict(updated["branch"])

    def delete_branch(self, project_id: str, branch_id: str) -> None:
        deleted = self.request("DELETE", f"/projects/{project_id}/branches/{branch_id}")
        self.wait(project_id, deleted.get("operations", []))

    def delete_endpoint(self, project_id: str, endpoint_id: str) -> None:
        deleted = self.request("DELETE", f"/projects/{project_id}/endpoints/{endpoint_id}")
        self.wait(project_id, deleted.get("operations", []))

    def delete_database(self, project_id: str, branch_id: str, name: str) -> None:
        deleted = self.request("DELETE", f"/projects/{project_id}/branches/{branch_id}/databases/{quote(name, safe='')}")
        self.wait(project_id, deleted.get("operations", []))

    def reveal_password(self, project_id: str, branch_id: str, role: str) -> str:
        path = f"/projects/{project_id}/branches/{branch_id}/roles/{quote(role, safe='')}/reveal_password"
        return str(self.request("GET", path)["password"])

"""A small HTTP client of Argon's own API for the CLI, and where it finds the server and key.

Precedence: --api-url/--api-key flags > ARGON_API_URL/ARGON_API_KEY > the CLI config file that
`argon up` (or `argon login`) writes (0600, ~/.config/argon/cli.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from argon.settings import default_config_file

if TYPE_CHECKING:
    import httpx


class CliError(Exception):
    """An error the CLI prints as one readable line (never a traceback)."""


def cli_config_path() -> Path:
    return default_config_file().with_name("cli.json")


def _key(data_dir: str | Path) -> str:
    return str(Path(data_dir).expanduser().absolute())


def _load() -> dict[str, Any]:
    try:
        data = json.loads(cli_config_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(data: dict[str, Any]) -> Path:
    path = cli_config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
    return path


def read_cli_config() -> dict[str, str]:
    """The API URL and key: of the instance on ARGON_DATA_DIR when that is set and one was started on it
    here, else of the one started last (or `argon login`)."""
    data = _load()
    wanted = os.environ.get("ARGON_DATA_DIR")
    instance = data.get("instances", {}).get(_key(wanted)) if wanted else None
    chosen = {**data, **instance} if isinstance(instance, dict) else data
    return {k: str(v) for k, v in chosen.items() if k in ("api_url", "api_key")}


def write_cli_config(api_url: str, api_key: str | None, data_dir: Path | None = None) -> Path:
    """`argon login`, or `argon up` on `data_dir`: the top-level entry (what the CLI uses by default)
    and, for `argon up`, the instance's own entry keyed by its data directory."""
    data = _load()
    data["api_url"] = api_url
    if api_key:
        data["api_key"] = api_key
    if data_dir is not None:
        instances = data.setdefault("instances", {})
        entry = instances.setdefault(_key(data_dir), {})
        entry.update(api_url=api_url, running=True)
        if api_key:
            entry["api_key"] = api_key
        elif "api_key" in entry:  # this start knows no key: the instance's own, not another's
            data["api_key"] = entry["api_key"]
    return _save(data)


def forget_instance(data_dir: Path) -> Path | None:
    """`argon up` on `data_dir` stops: its entry is marked stopped, and the default moves to another
    running instance's, if the default was this one's."""
    data = _load()
    instances = data.get("instances", {})
    mine = instances.get(_key(data_dir))
    if mine is None:
        return None
    mine["running"] = False  # its key stays known for its next start
    others = [e for e in instances.values() if e.get("running")]
    if data.get("api_url") == mine.get("api_url") and others:
        data.update({k: v for k, v in others[-1].items() if k in ("api_url", "api_key")})
    return _save(data)


def forget_api_key() -> Path | None:
    data = _load()
    if "api_key" not in data:
        return None
    del data["api_key"]
    return _save(data)


class ApiClient:
    def __init__(self, api_url: str | None, api_key: str | None) -> None:
        cfg = read_cli_config()
        self.api_url = (api_url or os.environ.get("ARGON_API_URL") or cfg.get("api_url")
                        or "http://127.0.0.1:4444").rstrip("/")
        self.api_key = api_key or os.environ.get("ARGON_API_KEY") or cfg.get("api_key")
        import httpx  # here, not at the top: a command that never calls the API (--help, completion) skips it

        self._http: httpx.Client = httpx.Client(base_url=self.api_url + "/api/v2", timeout=120)

    def request(self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None,
                text: bool = False) -> Any:
        if not self.api_key:
            raise CliError("no API key: run `argon login`, pass --api-key, set ARGON_API_KEY, or run `argon up` on this machine "
                           f"(it writes {cli_config_path()})")
        import httpx

        try:
            resp = self._http.request(method, path, json=json_body, params=params,
                                      headers={"Authorization": f"Bearer {self.api_key}"})
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the Argon API at {self.api_url} ({exc.__class__.__name__}). "
                           "Is `argon up` running? Use --api-url or ARGON_API_URL to point elsewhere.") from None
        if resp.status_code >= 400:
            try:
                message = resp.json().get("message") or resp.text
            except ValueError:
                message = resp.text
            raise CliError(f"{message} (HTTP {resp.status_code})")
        return resp.text if text else resp.json()

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json_body=body, **kw)

    def patch(self, path: str, body: Any, **kw: Any) -> Any:
        return self.request("PATCH", path, json_body=body, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)

    def close(self) -> None:
        self._http.close()

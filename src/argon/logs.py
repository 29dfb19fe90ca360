"""The platform's log: text on a terminal, one JSON object per line elsewhere, with the ids in context.

`ARGON_LOG_FORMAT` picks `text`, `json` or `auto` (text when stderr is a terminal, else JSON: a
service's log goes to a pipeline). A JSON line holds `timestamp` (UTC, ISO 8601, ms), `level`,
`logger`, `message`, the ids in context (`request_id`, `client_addr`, `project_id`, `branch_id`,
`endpoint_id`, `operation_id`) and `exception` when there is one.

Ids reach a line through context variables, so every task started from a request or a proxy
session carries them: `bind()` for a task that owns its context (a proxy session), `bound()` for a
block, and `bind_request()` for the HTTP app, whose route parameters (`project_id`, `branch_id`,
`endpoint_id`) are read from the request's ASGI scope when a line is written (routing fills them
in after the request has begun).

Secrets never belong in a log and none is written on purpose. `redact()` is the net under that
rule: SCRAM verifiers, API keys and passwords in connection URIs are masked in every line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterator, MutableMapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["auto", "text", "json"]

IDS = ("request_id", "client_addr", "project_id", "branch_id", "endpoint_id", "operation_id")
_ROUTE_IDS = ("project_id", "branch_id", "endpoint_id")
_NOISY = ("uvicorn", "uvicorn.error", "uvicorn.access", "alembic", "httpx", "httpcore", "asyncio")

_ids: ContextVar[dict[str, str] | None] = ContextVar("argon_log_ids", default=None)
_scope: ContextVar[MutableMapping[str, Any] | None] = ContextVar("argon_log_scope", default=None)

# What must never be readable in a log line, whatever wrote it.
# Each pattern runs only on a line holding its marker (a substring test costs far less than a regex scan).
_SECRETS = (
    (("SCRAM-SHA-256$",), re.compile(r"SCRAM-SHA-256\$[^\s'\",]+"), "SCRAM-SHA-256$<redacted>"),
    (("argon_",), re.compile(r"\bargon_[A-Za-z0-9]{20,}"), "argon_<redacted>"),
    (("://",), re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@'\"]+:)[^\s@/'\"]+@"), r"\1<redacted>@"),
    (("password=", "passwd=", "secret=", "token="),  # looked for in the lower-cased line
     re.compile(r"(?i)\b(password|passwd|secret|token)=(?!<redacted>)[^\s&'\",]+"), r"\1=<redacted>"),
)


def redact(text: str) -> str:
    for i, (markers, pattern, replacement) in enumerate(_SECRETS):
        haystack = text.lower() if i == len(_SECRETS) - 1 else text
        if any(marker in haystack for marker in markers):
            text = pattern.sub(replacement, text)
    return text


# Context ------------------------------------------------------------------------------------------------


def bind(**ids: str | None) -> None:
    """Add ids to the current context for good (for a task that owns its context: a proxy session)."""
    _ids.set({**(_ids.get() or {}), **{k: v for k, v in ids.items() if v}})


@contextlib.contextmanager
def bound(**ids: str | None) -> Iterator[None]:
    """Add ids to the context for the duration of a block."""
    token = _ids.set({**(_ids.get() or {}), **{k: v for k, v in ids.items() if v}})
    try:
        yield
    finally:
        _ids.reset(token)


def bind_request(scope: MutableMapping[str, Any], request_id: str, client_addr: str | None) -> None:
    """The HTTP request this task serves: its id, its client, and (read when a line is written) the ids
    its route names."""
    _scope.set(scope)
    bind(request_id=request_id, client_addr=client_addr)


def current() -> dict[str, str]:
    """The ids in context now, in `IDS` order."""
    found = dict(_ids.get() or {})
    scope = _scope.get()
    if scope is not None:
        params = scope.get("path_params") or {}
        for name in _ROUTE_IDS:
            value = params.get(name)
            if isinstance(value, str) and value and name not in found:
                found[name] = value
    return {k: found[k] for k in IDS if k in found}


# Formatters ---------------------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        line.update(current())
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exception"] = redact(record.exc_text)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """For people: date and time, level, logger, message, then the ids in context as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        local = time.localtime(record.created)
        return time.strftime("%Y-%m-%d %H:%M:%S", local) + f".{int(record.msecs):03d}" + time.strftime("%z", local)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = current()
        if ids:
            text += " [" + " ".join(f"{k}={v}" for k, v in ids.items()) + "]"
        return redact(text)


def effective_format(fmt: LogFormat, stream: TextIO) -> Literal["text", "json"]:
    if fmt != "auto":
        return fmt
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def formatter(fmt: Literal["text", "json"]) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None) -> str:
    """Send every logger's lines to `stream` (stderr) in the chosen format; returns the format in effect."""
    stream = stream or sys.stderr
    chosen = effective_format(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(chosen))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return chosen

"""Failpoints: named places at the durable steps of every operation, where a test makes Argon die,
fail or wait on purpose (as Neon's `fail` crate, FoundationDB's BUGGIFY and etcd's gofail do).

A durable step is anything that survives a crash: a rename, a delete, a metadata write, a call
that changes a compute. Each has a point in front of or behind it:

    failpoint("branch.restore.after_swap")          # in sync code (threads included)
    await failpoint_async("project.create.after_claim")   # on the event loop

Names are `<operation>.<step>`; `python -m argon.failpoints` lists every point in the code (the
list in docs/failpoints.md is generated from it, and a test keeps the two equal), so a new durable
step without a failpoint shows up in review.

Switched on only by the environment of `argon up`:

    ARGON_FAILPOINTS="branch.restore.after_swap=kill,project.delete.before_rmtree=raise"

Actions: `kill` (SIGKILL this process, what `kill -9` does at that instant), `raise` (the step
fails with an internal error), `sleep(MS)`, `pause` (wait until the point is switched off), `off`;
`N*action` acts on the first N hits only. When the variable is unset, `failpoint` is a function
that returns at once and the table below stays empty: there is nothing to switch at run time.
With the variable set (even empty), `configure` changes points while Argon runs (from inside the
process: there is no API for it; tests arm a point at the start of `argon up`).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from argon.errors import ArgonError, ErrorKind

log = logging.getLogger(__name__)

ENV = "ARGON_FAILPOINTS"
_ACTION = re.compile(r"^(?:(?P<count>\d+)\*)?(?P<verb>kill|raise|pause|off|sleep\((?P<ms>\d+)\))$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")


class FailpointError(ArgonError):
    """What `raise` throws: the step fails as an I/O error there would make it fail."""

    kind = ErrorKind.INTERNAL


@dataclass
class _Point:
    verb: str  # kill | raise | pause | sleep
    ms: int = 0
    remaining: int | None = None  # None: every hit
    released: threading.Event | None = None  # pause waits on it


_points: dict[str, _Point] = {}
_guard = threading.Lock()
enabled = ENV in os.environ


def parse(spec: str) -> dict[str, str]:
    """`a.b=kill,c.d=2*sleep(100)` -> {name: action}; ValueError with the culprit otherwise."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, action = item.partition("=")
        name, action = name.strip(), action.strip()
        if not sep or not _NAME.match(name) or not _ACTION.match(action):
            raise ValueError(f"bad failpoint {item!r}: expected name=action, action one of kill, raise, pause, "
                             "sleep(MS), off, optionally N*action")
        out[name] = action
    return out


def configure(name: str, action: str) -> None:
    """Switch one point (`off` removes it and releases whoever it paused)."""
    if not enabled:
        raise RuntimeError(f"failpoints are off: start argon with {ENV} set (it may be empty)")
    match = _ACTION.match(action)
    if not _NAME.match(name) or match is None:
        raise ValueError(f"bad failpoint {name}={action}")
    with _guard:
        old = _points.pop(name, None)
        if old is not None and old.released is not None:
            old.released.set()
        verb = match["verb"]
        if verb == "off":
            return
        if verb.startswith("sleep"):
            verb = "sleep"
        count = int(match["count"]) if match["count"] else None
        _points[name] = _Point(verb=verb, ms=int(match["ms"] or 0), remaining=count,
                               released=threading.Event() if verb == "pause" else None)


def active() -> dict[str, str]:
    with _guard:
        return {name: p.verb for name, p in _points.items()}


def _take(name: str) -> _Point | None:
    with _guard:
        point = _points.get(name)
        if point is None:
            return None
        if point.remaining is not None:
            point.remaining -= 1
            if point.remaining <= 0:
                del _points[name]
        return point


def _hit(name: str, point: _Point) -> None:
    log.warning("failpoint %s: %s", name, point.verb)
    if point.verb == "kill":
        for handler in logging.getLogger().handlers + logging.getLogger("argon").handlers:
            with contextlib.suppress(Exception):  # dying anyway
                handler.flush()
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # SIGKILL is delivered before this returns
    if point.verb == "raise":
        raise FailpointError(f"failpoint {name}")


def _failpoint(name: str) -> None:
    point = _take(name)
    if point is None:
        return
    _hit(name, point)
    if point.verb == "sleep":
        time.sleep(point.ms / 1000)
    elif point.verb == "pause" and point.released is not None:
        point.released.wait()


async def _failpoint_async(name: str) -> None:
    point = _take(name)
    if point is None:
        return
    _hit(name, point)
    if point.verb == "sleep":
        await asyncio.sleep(point.ms / 1000)
    elif point.verb == "pause" and point.released is not None:
        while not point.released.is_set():
            await asyncio.sleep(0.02)


def _nothing(name: str) -> None:
    return None


async def _nothing_async(name: str) -> None:
    return None


failpoint = _failpoint if enabled else _nothing
failpoint_async = _failpoint_async if enabled else _nothing_async

if enabled:
    for _name, _action in parse(os.environ.get(ENV, "")).items():
        configure(_name, _action)


# The list, generated from the code -------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Site:
    name: str
    module: str  # argon.control.branches
    function: str
    line: int

    @property
    def operation(self) -> str:
        return self.name.rsplit(".", 1)[0]


def sites(root: Path | None = None) -> list[Site]:
    """Every `failpoint("...")` / `failpoint_async("...")` call in the package, from its source."""
    root = root or Path(__file__).parent
    found: list[Site] = []
    for path in sorted(root.rglob("*.py")):
        module = "argon." + ".".join(path.relative_to(root).with_suffix("").parts)
        tree = ast.parse(path.read_text(), str(path))
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id in ("failpoint", "failpoint_async") and node.args
                        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                    found.append(Site(node.args[0].value, module, func.name, node.lineno))
    # a call inside a nested function is seen from both: keep the innermost (the last one walked)
    unique = {(s.name, s.line): s for s in found}
    return sorted(unique.values())


def render(found: list[Site]) -> str:
    lines = ["<!-- Generated by `python -m argon.failpoints > docs/failpoints.md`; do not edit. -->",
             "# Failpoints", "",
             "Every durable step of every operation, by operation. Switch them on with `ARGON_FAILPOINTS`",
             "(see `argon/failpoints.py`); `tests/integration/test_failpoints*.py` kill Argon at each one.", ""]
    operation = None
    for site in found:
        if site.operation != operation:
            operation = site.operation
            lines += ["", f"## {operation}", "", "| failpoint | where |", "|---|---|"]
        lines.append(f"| `{site.name}` | `{site.module}.{site.function}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - a developer's command
    print(render(sites()), end="")

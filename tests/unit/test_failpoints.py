"""Failpoints: the switch, the actions, and the generated list staying equal to the code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from argon import failpoints

ROOT = Path(__file__).resolve().parents[2]


def test_parse_accepts_the_documented_actions_and_names_the_culprit() -> None:
    assert failpoints.parse("a.b=kill, c.d_e=3*sleep(250),x.y=pause,z.w=off,") == {
        "a.b": "kill", "c.d_e": "3*sleep(250)", "x.y": "pause", "z.w": "off"}
    for bad in ("a.b", "nodot=kill", "a.b=explode", "a.b=sleep(x)", "A.b=kill"):
        with pytest.raises(ValueError, match="bad failpoint"):
            failpoints.parse(bad)


def _run(code: str, spec: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != failpoints.ENV}
    if spec is not None:
        env[failpoints.ENV] = spec
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


def test_off_without_the_variable_and_nothing_to_switch() -> None:
    out = _run("from argon import failpoints as f\n"
               "f.failpoint('a.b')\n"
               "print(f.enabled, f.failpoint is f._nothing)\n"
               "f.configure('a.b', 'kill')\n", None)
    assert out.stdout.startswith("False True"), out.stdout + out.stderr
    assert "failpoints are off" in out.stderr


def test_kill_raise_count_and_pause() -> None:
    killed = _run("from argon import failpoints as f\nprint('before', flush=True)\nf.failpoint('a.b')\nprint('after')",
                  "a.b=kill")
    assert killed.returncode == -9 and killed.stdout == "before\n"
    counted = _run("from argon import failpoints as f\n"
                   "hits = 0\n"
                   "for _ in range(5):\n"
                   "    try:\n"
                   "        f.failpoint('a.b')\n"
                   "    except f.FailpointError as exc:\n"
                   "        hits += 1; msg = exc.user_message\n"
                   "print(hits, msg)\n", "a.b=2*raise")
    assert counted.stdout.strip() == "2 failpoint a.b", counted.stderr
    paused = _run("import asyncio, threading, time\n"
                  "from argon import failpoints as f\n"
                  "threading.Timer(0.3, f.configure, ('a.b', 'off')).start()\n"
                  "t = time.monotonic()\n"
                  "asyncio.run(f.failpoint_async('a.b'))\n"
                  "f.configure('c.d', 'sleep(200)')\n"
                  "f.failpoint('c.d')\n"
                  "print(round(time.monotonic() - t, 1) >= 0.5)\n", "a.b=pause")
    assert paused.stdout.strip() == "True", paused.stderr


def test_every_failpoint_is_named_once_and_the_list_is_current() -> None:
    """docs/failpoints.md is generated from the code: a new durable step shows up in review."""
    sites = failpoints.sites()
    names = [s.name for s in sites]
    assert len(names) == len(set(names)), f"failpoint names used twice: {sorted(n for n in names if names.count(n) > 1)}"
    for name in names:
        failpoints.parse(f"{name}=kill")
    expected = failpoints.render(sites)
    current = (ROOT / "docs" / "failpoints.md").read_text()
    assert current == expected, "docs/failpoints.md is stale: python -m argon.failpoints > docs/failpoints.md"

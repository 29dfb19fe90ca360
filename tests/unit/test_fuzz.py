"""The codec fuzzers: every seed replayed in-process, then a few seconds of coverage-guided fuzzing
per target (atheris/libFuzzer, in a subprocess: libFuzzer owns the process it runs in).

A crash is any exception other than the codec's own errors (see `tests/fuzz/targets.py`); libFuzzer
then writes the input next to its report, and this test prints both. New interesting inputs go to a
temporary directory; promote them to `tests/fuzz/corpus/<target>/` by hand when they are worth keeping.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus"
REPO = CORPUS.parent.parent.parent
SECONDS = 4


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_replay_cleanly(target: str) -> None:
    seeds = sorted((CORPUS / target).iterdir())
    assert len(seeds) >= 5
    for seed in seeds:
        TARGETS[target](seed.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris (the coverage-guided fuzzer) is not installed")
    found = tmp_path / "new"
    found.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "tests.fuzz.run", target, f"-max_total_time={SECONDS}",
                          "-rss_limit_mb=2048", "-timeout=10", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1",
                          str(found), str(CORPUS / target)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=SECONDS + 120)
    crashes = [p for p in tmp_path.iterdir() if p.is_file()]
    report = out.stderr[-4000:] + "".join(f"\n{p.name}: {p.read_bytes()[:300]!r}" for p in crashes)
    assert out.returncode == 0 and not crashes, report
    assert "Done" in out.stderr and "stat::number_of_executed_units" in out.stderr, report

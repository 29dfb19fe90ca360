"""`closed_ancestor`: root's Argon refuses a data or run directory its computes could not reach."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from argon.storage.layout import closed_ancestor


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="reach-", dir="/tmp"))  # pytest's tmp_path sits under a 0700 directory
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def test_a_directory_only_its_owner_may_enter_is_named(base: Path) -> None:
    closed = base / "private"
    closed.mkdir()
    os.chmod(closed, 0o700)
    message = closed_ancestor(closed / "argon" / "data")
    assert message is not None
    assert f"inside {closed} (mode 0700)" in message and f"chmod o+x {closed}" in message


def test_passable_parents_and_missing_ones_are_fine(base: Path) -> None:
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o711)
    assert closed_ancestor(shared / "data") is None
    assert closed_ancestor(shared / "not" / "yet" / "there") is None

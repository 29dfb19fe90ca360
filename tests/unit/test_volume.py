"""The pure parts of `argon storage init`: the plan, the fstab line, the reasons it cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest

from argon.storage import volume


def test_plan_and_fstab(tmp_path: Path) -> None:
    p = volume.plan(tmp_path / "data", size="50g")
    assert p.image == tmp_path / "data.img" and p.size == "50G" and p.fs == "xfs"
    assert p.commands[0] == ["truncate", "-s", "50G", str(p.image)]
    assert p.commands[1][:4] == ["mkfs.xfs", "-q", "-m", "reflink=1"]
    assert p.commands[-1] == ["mount", "-o", "loop", str(p.image), str(tmp_path / "data")]
    assert volume.fstab_line(p) == f"{p.image} {tmp_path / 'data'} xfs loop,defaults,nofail 0 0"
    assert volume.plan(tmp_path / "d", fs="btrfs").commands[1][0] == "mkfs.btrfs"
    assert "sudo truncate" in p.shell()


@pytest.mark.parametrize("bad", [{"size": "lots"}, {"size": "-1G"}, {"fs": "ext4"}])
def test_plan_rejects_bad_input(tmp_path: Path, bad: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        volume.plan(tmp_path / "data", **bad)


def test_problems_name_what_to_do(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "argon.db").write_text("")
    p = volume.plan(data)
    p.image.write_text("")
    found = " ".join(volume.problems(p))
    assert "not empty" in found and "already exists" in found


def test_status_of_an_ordinary_directory(tmp_path: Path) -> None:
    info = volume.status(tmp_path / "not-yet")
    assert info["clone_backend"] in ("copy", "reflink") and int(info["free_bytes"]) > 0
    assert info["filesystem"] != ""

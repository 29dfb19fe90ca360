"""The spare pool: ready copies are claimed by rename, refills skip work in progress and drop copies
of an older template."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from argon.compute.osuser import OsUser
from argon.safefs import chown_tree
from argon.storage.clone import CopyBackend
from argon.storage.spares import SparePool, template_key


def _template(root: Path, stamp: str) -> Path:
    t = root / "templates" / "pg18"
    t.mkdir(parents=True, exist_ok=True)
    (t / "ARGON_TEMPLATE").write_text(stamp)
    (t / "PG_VERSION").write_text("18\n")
    return t


def test_claim_refill_and_stale_copies(tmp_path: Path) -> None:
    template = _template(tmp_path, "18.6 aaaa\n")
    pool = SparePool(tmp_path / "spares", CopyBackend, size=2)
    assert not pool.claim(template, tmp_path / "p1")  # empty pool: the caller copies itself
    pool.refill(template)
    assert len(list((tmp_path / "spares").iterdir())) == 2
    assert pool.claim(template, tmp_path / "p1")
    assert (tmp_path / "p1" / "PG_VERSION").read_text() == "18\n"
    assert len(list((tmp_path / "spares").iterdir())) == 1
    (tmp_path / "spares" / ".tmp-half-done").mkdir()  # a copy interrupted by a crash
    template = _template(tmp_path, "18.7 bbbb\n")  # the template was rebuilt
    assert not pool.claim(template, tmp_path / "p2")  # never a copy of the old build
    pool.refill(template)
    names = sorted(p.name for p in (tmp_path / "spares").iterdir())
    assert len(names) == 2 and all(n.startswith(template_key(template)) for n in names)


def test_size_zero_turns_the_pool_off(tmp_path: Path) -> None:
    template = _template(tmp_path, "x")
    pool = SparePool(tmp_path / "spares", CopyBackend, size=0)
    pool.refill(template)
    assert not (tmp_path / "spares").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving copies to a compute uid needs root")
def test_a_copy_is_given_to_the_project_before_it_moves_in(tmp_path: Path) -> None:
    template = _template(tmp_path, "x")
    pool = SparePool(tmp_path / "spares", CopyBackend, size=1)
    owner = OsUser(54321, 54321)
    project = tmp_path / "project"
    project.mkdir(mode=0o700)
    os.chown(project, owner.uid, owner.gid)
    pool.refill(template)
    pool.take(template, project / "claimed", owner)  # the spare
    pool.take(template, project / "fresh", owner)  # none ready: copied now, the same way
    for path in [project / "claimed", *(project / "claimed").rglob("*"), project / "fresh",
                 *(project / "fresh").rglob("*")]:
        assert path.lstat().st_uid == owner.uid, path
    assert oct((tmp_path / "spares").stat().st_mode & 0o777) == "0o700"
    # A spare that is not root's (made when templates were nobody's) is never handed out.
    pool.refill(template)
    (stale,) = (tmp_path / "spares").iterdir()
    chown_tree(stale, OsUser(65534, 65534))
    assert not pool.claim(template, project / "third", owner)
    assert not (project / "third").exists() and list((tmp_path / "spares").iterdir()) == []

"""The one disk-usage measure of storage figures and storage samples: sizes once per inode,
allocated blocks shared between the hard links of a file."""

from __future__ import annotations

import os
from pathlib import Path

from argon.storage.usage import disk_usage


def test_sizes_count_each_inode_once_and_blocks_are_shared_by_links(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(os.urandom(100_000))
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c").write_bytes(b"x" * 5000)
    usage = disk_usage(tmp_path)
    assert usage.size == 105_000
    assert 105_000 <= usage.allocated < 2 * 105_000  # both links of `a` inside: one copy
    with open(tmp_path / "sparse", "wb") as f:  # a sparse file takes (almost) no blocks
        f.truncate(50_000_000)
    grown = disk_usage(tmp_path)
    assert grown.size == usage.size + 50_000_000 and grown.allocated < usage.allocated + 1_000_000


def test_trees_sharing_a_file_add_up_to_one_copy(tmp_path: Path) -> None:
    """A parent's snapshot and the child's history base linked to it (ADR 0010): the two branches'
    figures add up to the disk, not to one copy each."""
    parent, child = tmp_path / "parent", tmp_path / "child"
    parent.mkdir()
    child.mkdir()
    (parent / "base").write_bytes(os.urandom(1_000_000))
    os.link(parent / "base", child / "base")
    (child / "own").write_bytes(os.urandom(200_000))
    one_copy = disk_usage(parent).allocated * 2  # the parent holds half of the shared file
    total = disk_usage(parent).allocated + disk_usage(child).allocated
    assert abs(total - disk_usage(tmp_path).allocated) <= 1  # rounding of the shares
    assert abs(total - (one_copy + os.lstat(child / "own").st_blocks * 512)) <= 1
    assert disk_usage(child).size == 1_200_000

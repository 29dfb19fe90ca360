"""The compute uid range: refused when it overlaps a user, a group, a subordinate id range of
/etc/subuid or /etc/subgid, or the range of another running Argon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from argon.compute.osuser import claim_uid_range, free_uid_base, kill_all, read_subids, uid_range_conflicts
from argon.errors import ConfigError

HOST = {"users": [("root", 0), ("alice", 1000), ("nobody", 65534)], "groups": [("root", 0), ("staff", 250500)],
        "subuids": [("alice", 100000, 65536), ("bob", 165536, 65536)], "subgids": [("alice", 100000, 65536)]}


def test_a_free_range_has_no_conflicts() -> None:
    assert uid_range_conflicts(300000, 100000, **HOST) == []


def test_every_overlap_is_named() -> None:
    found = uid_range_conflicts(200000, 100000, **HOST)
    assert found == ["group 'staff' has gid 250500", "/etc/subuid gives 'bob' 165536-231071"]
    assert uid_range_conflicts(60000, 10000, **HOST) == ["user 'nobody' has uid 65534"]
    assert uid_range_conflicts(165535, 1, **HOST) == ["/etc/subuid gives 'alice' 100000-165535",
                                                      "/etc/subgid gives 'alice' 100000-165535"]


def test_a_free_base_is_suggested() -> None:
    assert free_uid_base(100000, **HOST) == 300000


def test_subid_files_are_parsed(tmp_path: Path) -> None:
    path = tmp_path / "subuid"
    path.write_text("alice:100000:65536\n# comment\nbroken line\n1001:231072:65536\n")
    assert read_subids(path) == [("alice", 100000, 65536), ("1001", 231072, 65536)]
    assert read_subids(tmp_path / "missing") == []


def test_a_second_running_argon_cannot_claim_an_overlapping_range(tmp_path: Path) -> None:
    ranges = tmp_path / "ranges"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from pathlib import Path
from argon.compute.osuser import claim_uid_range
claim_uid_range(200000, 1000, Path("/data/one"), Path({str(ranges)!r}))
print("claimed", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
        with pytest.raises(ConfigError, match=r"another running Argon \(pid \d+, data directory /data/one"):
            claim_uid_range(200500, 1000, Path("/data/two"), ranges)
        fd = claim_uid_range(201000, 1000, Path("/data/two"), ranges)  # beside it is fine
        os.close(fd)
    finally:
        holder.kill()
        holder.wait()
    fd = claim_uid_range(200500, 1000, Path("/data/two"), ranges)  # its holder is gone: a stale claim
    os.close(fd)


def test_kill_all_refuses_root_and_ourselves() -> None:
    for uid in (0, os.geteuid()):
        with pytest.raises(ValueError):
            kill_all(uid)

"""The cgroup mechanism without a kernel: the parsers, detection on both versions from recorded
`/proc` files, and the driver against a directory laid out like cgroupfs (a regular directory
accepts the same writes; the kernel's own checks are the integration tests' business)."""

from __future__ import annotations

from pathlib import Path

import pytest

from argon.compute import cgroups
from argon.compute.cgroups import Cgroups, Limits

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
"""
COMOUNTED = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"


def test_parse_mountinfo_and_proc_cgroup() -> None:
    mounts = cgroups.parse_mountinfo(HYBRID_MOUNTINFO + COMOUNTED)
    assert [(m.fstype, m.mountpoint, sorted(m.controllers)) for m in mounts] == [
        ("cgroup", "/sys/fs/cgroup/cpu", ["cpu"]), ("cgroup", "/sys/fs/cgroup/cpuacct", ["cpuacct"]),
        ("cgroup", "/sys/fs/cgroup/memory", ["memory"]), ("cgroup", "/sys/fs/cgroup/systemd", []),
        ("cgroup2", "/sys/fs/cgroup/unified", []), ("cgroup", "/sys/fs/cgroup/cpu,cpuacct", ["cpu", "cpuacct"])]
    own = cgroups.parse_proc_cgroup(HYBRID_CGROUP + "3:cpu,cpuacct:/x\n")
    assert own["memory"] == "/process_api/abc" and own[""] == "/" and own["name=systemd"] == "/"
    assert own["cpuacct"] == "/x"  # a co-mounted line names both


def test_value_parsers() -> None:
    assert cgroups.cpu_max_text(0.25) == "25000 100000" and cgroups.cpu_max_text(0.001) == "1000 100000"
    assert cgroups.parse_cpu_max("max 100000\n") is None and cgroups.parse_cpu_max("50000 100000") == 0.5
    assert cgroups.parse_memory_max("max\n") is None and cgroups.parse_memory_max("1073741824\n") == 2**30
    assert cgroups.parse_flat_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 3\nbad\n") == {
        "oom_kill_disable": 0, "under_oom": 0, "oom_kill": 3}
    assert cgroups.tag_for(Path("/a")) == cgroups.tag_for(Path("/a")) != cgroups.tag_for(Path("/b"))


def _proc(tmp_path: Path, mountinfo: str, cgroup: str) -> Path:
    proc = tmp_path / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "mountinfo").write_text(mountinfo)
    (proc / "cgroup").write_text(cgroup)
    return proc.parent


def test_detect_v1_nests_under_argons_own_cgroup(tmp_path: Path) -> None:
    proc = _proc(tmp_path, HYBRID_MOUNTINFO, HYBRID_CGROUP)
    found = cgroups.detect(Path("/data"), proc=proc, is_root=True)
    assert isinstance(found, Cgroups) and found.version == "v1"  # the unified mount has no controllers
    tag = cgroups.tag_for(Path("/data"))
    assert found.parents == {"cpu": Path("/sys/fs/cgroup/cpu") / tag, "cpuacct": Path("/sys/fs/cgroup/cpuacct") / tag,
                             "memory": Path("/sys/fs/cgroup/memory/process_api/abc") / tag}


def test_detect_says_why_not(tmp_path: Path) -> None:
    proc = _proc(tmp_path, HYBRID_MOUNTINFO.replace("rw,memory", "rw,blkio"), HYBRID_CGROUP)
    assert cgroups.detect(Path("/d"), proc=proc, is_root=False) == (
        "not running as root: computes run without CPU and memory limits")
    why = cgroups.detect(Path("/d"), proc=proc, is_root=True)
    assert why == "no cgroup memory controller available: computes run without CPU and memory limits"


def test_detect_v2(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    proc = _proc(tmp_path, f"41 31 0:38 / {root} rw - cgroup2 cgroup2 rw\n", "0::/system.slice/argon.service\n")
    found = cgroups.detect(Path("/data"), proc=proc, is_root=True)
    assert isinstance(found, Cgroups) and found.version == "v2"
    assert found.parents == {"": root / cgroups.tag_for(Path("/data"))}


def _kernel_files(d: Path, *names: str) -> None:
    """What the kernel puts in a new cgroup (the driver never creates files, it only writes them)."""
    d.mkdir(parents=True, exist_ok=True)
    for name in names:
        (d / name).write_text("")


def _fake_v2(tmp_path: Path) -> Cgroups:
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cgroup.subtree_control").write_text("cpu memory")
    (root / "argon-x").mkdir()  # the kernel fills a new cgroup with its files; a plain directory needs help
    (root / "argon-x" / "cgroup.subtree_control").write_text("")
    groups = Cgroups("v2", {"": root / "argon-x"})
    groups.ensure_parents()
    assert (root / "argon-x" / "cgroup.subtree_control").read_text() == "+memory"  # the last write of "+cpu", "+memory"
    return groups


def test_v2_driver_writes_limits_and_reads_usage(tmp_path: Path) -> None:
    groups = _fake_v2(tmp_path)
    d = tmp_path / "cg2" / "argon-x" / "ep-a-1"
    _kernel_files(d, "cpu.max", "memory.max", "cgroup.procs")
    groups.create("ep-a-1", Limits(cpus=0.5, memory_bytes=2**31))
    assert (d / "cpu.max").read_text() == "50000 100000" and (d / "memory.max").read_text() == str(2**31)
    assert groups.limits("ep-a-1") == Limits(cpus=0.5, memory_bytes=2**31)
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1\nnr_throttled 2\nthrottled_usec 250000\n")
    (d / "memory.current").write_text("12345\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    (d / "memory.stat").write_text("anon 1000\nfile 11000\nshmem 300\n")
    assert groups.usage("ep-a-1") == cgroups.Usage(cpu_usec=1500000, throttled_usec=250000, memory_bytes=12345,
                                                    oom_kills=1, resident_bytes=1300)
    assert groups.names() == ["ep-a-1"]


def test_v1_driver_writes_each_hierarchy(tmp_path: Path) -> None:
    parents = {c: tmp_path / c / "argon-x" for c in cgroups.V1_CONTROLLERS}
    for p in parents.values():
        p.mkdir(parents=True)
    groups = Cgroups("v1", parents)
    _kernel_files(parents["cpu"] / "ep-b-2", "cpu.cfs_quota_us", "cpu.cfs_period_us")
    _kernel_files(parents["memory"] / "ep-b-2", "memory.limit_in_bytes")
    groups.create("ep-b-2", Limits(cpus=0.25, memory_bytes=2**30))
    assert (parents["cpu"] / "ep-b-2" / "cpu.cfs_quota_us").read_text() == "25000"
    assert (parents["cpu"] / "ep-b-2" / "cpu.cfs_period_us").read_text() == "100000"
    assert (parents["memory"] / "ep-b-2" / "memory.limit_in_bytes").read_text() == str(2**30)
    assert groups.limits("ep-b-2") == Limits(cpus=0.25, memory_bytes=2**30)
    (parents["cpuacct"] / "ep-b-2" / "cpuacct.usage").write_text("3000000000\n")
    (parents["cpu"] / "ep-b-2" / "cpu.stat").write_text("nr_periods 10\nnr_throttled 4\nthrottled_time 7000000\n")
    (parents["memory"] / "ep-b-2" / "memory.usage_in_bytes").write_text("999\n")
    (parents["memory"] / "ep-b-2" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (parents["memory"] / "ep-b-2" / "memory.stat").write_text("cache 500\nrss 10\nshmem 5\ntotal_cache 600\n"
                                                              "total_rss 20\ntotal_shmem 7\n")
    assert groups.usage("ep-b-2") == cgroups.Usage(cpu_usec=3000000, throttled_usec=7000, memory_bytes=999,
                                                    oom_kills=2, resident_bytes=27)


def test_names_are_checked_and_links_not_followed(tmp_path: Path) -> None:
    groups = _fake_v2(tmp_path)
    for bad in ("../etc", "ep/x", "", "A"):
        with pytest.raises(cgroups.CgroupError):
            groups.create(bad, Limits(1, 2**30))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("untouched")
    d = tmp_path / "cg2" / "argon-x" / "ep-c-3"
    _kernel_files(d, "memory.max")
    (d / "cpu.max").symlink_to(elsewhere)
    with pytest.raises(cgroups.CgroupError):
        groups.set_limits("ep-c-3", Limits(1, 2**30))
    assert elsewhere.read_text() == "untouched"


def test_descendants(tmp_path: Path) -> None:
    for pid, tid, kids in ((10, 10, "11 12 "), (10, 13, "14"), (11, 11, "15"), (12, 12, ""), (14, 14, ""),
                           (15, 15, ""), (99, 99, "100")):
        (tmp_path / str(pid) / "task" / str(tid)).mkdir(parents=True)
        (tmp_path / str(pid) / "task" / str(tid) / "children").write_text(kids)
    assert sorted(cgroups.descendants(10, tmp_path)) == [11, 12, 14, 15]  # every thread's, recursively
    assert cgroups.descendants(7, tmp_path) == []

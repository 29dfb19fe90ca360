"""Processes through /proc: trees, their CPU time and memory (PSS), a cluster's processes, stopping one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.core.common import CLK_TCK, BenchError


def _read_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, own utime+stime, reaped children's cutime+cstime) in clock ticks, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    # rest[0] is field 3 (state): field k is rest[k - 3].
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])


def _process_table() -> dict[int, tuple[int, int, int]]:
    table: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat is not None:
                table[int(entry)] = stat
    return table


def process_tree(root_pid: int, table: dict[int, tuple[int, int, int]] | None = None) -> list[int]:
    """`root_pid` and all its live descendants."""
    table = table if table is not None else _process_table()
    if root_pid not in table:
        raise BenchError(f"process {root_pid} is not running")
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU time of a process tree, including children that exited (a postmaster reaps its backends,
    so their time lands in its cutime/cstime): monotonic across backends coming and going."""
    table = _process_table()
    if root_pid not in table:
        raise BenchError(f"process {root_pid} is not running")
    ticks = 0
    for pid in process_tree(root_pid, table):
        ticks += table[pid][1] + table[pid][2]
    return ticks / CLK_TCK


def own_cpu_seconds(pid: int) -> float:
    stat = _read_stat(pid)
    if stat is None:
        raise BenchError(f"process {pid} is not running")
    return stat[1] / CLK_TCK


def thread_cpu_seconds(name: str) -> float:
    """CPU of this process's threads named `name` (the C pooler and relay name theirs)."""
    ticks = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "comm").read_text().strip() != name:
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a thread that ended meanwhile
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLK_TCK


def self_cpu_seconds() -> float:
    """This process (the in-process platform: API, proxy, event loop; not its children)."""
    t = os.times()
    return t.user + t.system


def system_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from the first line of /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - fields[3] - fields[4], total


def kb_field(path: str, name: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def tree_memory(root_pid: int) -> dict[str, Any]:
    """Sum of PSS (proportional: shared pages split between sharers) and RSS over a process tree."""
    pids = process_tree(root_pid)
    pss = sum(kb_field(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
    rss = sum(kb_field(f"/proc/{p}/status", "VmRSS") for p in pids)
    return {"processes": len(pids), "pss_mb": round(pss / 1024, 1), "rss_mb": round(rss / 1024, 1)}


def postmaster_pid(pgdata: Path) -> int:
    try:
        pid = int(Path(pgdata, "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise BenchError(f"no running postmaster in {pgdata}: {exc}") from None
    if _read_stat(pid) is None:
        raise BenchError(f"postmaster {pid} of {pgdata} is not running")
    return pid


def pgdata_processes(pgdata: Path) -> list[dict[str, Any]]:
    """Every live process that belongs to the cluster in `pgdata`: its command line names the
    directory (the postmaster: `postgres -D <pgdata>`) or its working directory is inside it (every
    Postgres process chdirs into its data directory; the children rewrite their command line to
    `postgres: checkpointer` etc., so the command line alone would miss them, orphans included)."""
    real = os.path.realpath(pgdata)
    needle = str(pgdata).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if not cmdline:  # kernel thread or zombie: no memory, nothing running
            continue
        cwd = ""
        with contextlib.suppress(OSError):
            cwd = os.readlink(f"/proc/{entry}/cwd")
        in_cmdline = needle in cmdline or real.encode() in cmdline
        in_cwd = cwd == real or cwd.startswith(real + "/")
        if in_cmdline or in_cwd:
            found.append({"pid": int(entry), "cmdline": cmdline.replace(b"\0", b" ").decode(errors="replace").strip(),
                          "cwd": cwd})
    return found


def stop_pid(proc: subprocess.Popen[Any] | None, first: int = signal.SIGINT, timeout: float = 20) -> None:
    """Stop one server we started, by PID: a polite signal, then SIGQUIT, then SIGKILL of it and its children."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((first, timeout), (signal.SIGQUIT, 5)):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(BenchError):
        for pid in reversed(process_tree(proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.wait(5)

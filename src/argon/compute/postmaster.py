"""One postmaster process: start, readiness, stop, adoption after an Argon restart, exit watching.

We hold the postmaster's own PID (no pg_ctl, su or runuser in between), run it in its own session
so signals to Argon do not reach it, and send its output to a log file. Readiness is line 8 of
`postmaster.pid` saying `ready` (what pg_ctl waits for). Exits are watched through a pidfd, which
works the same for our children and for postmasters adopted from an earlier Argon process, and
costs no thread (asyncio's child watchers would spend one per child on 3.11).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from argon import safefs
from argon.compute.binaries import PgInstall
from argon.compute.osuser import OsUser, popen_kwargs, running_as_root

READY_TIMEOUT = 120.0  # crash recovery of a busy cluster can take a while
STOP_TIMEOUT = 60.0
_POLL = 0.005
_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
# PG_OOM_ADJUST_*: each child of the postmaster resets its OOM score to 0 (the postmaster is made the
# last victim when it runs in a cgroup, `manager.ComputeManager._join`).
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC",
        "PG_OOM_ADJUST_FILE": "/proc/self/oom_score_adj", "PG_OOM_ADJUST_VALUE": "0"}


class ComputeStartError(Exception):
    """Postgres did not come up; `user_message` says why in words a user can act on."""

    def __init__(self, user_message: str) -> None:
        super().__init__(user_message)
        self.user_message = user_message


def log_tail(log_file: Path, offset: int = 0, lines: int = 8, owner: OsUser | None = None) -> str:
    """The last lines of a compute's log written after `offset` (the log is the compute's: never
    read through a link it put there, nor a file of anyone else's)."""
    try:
        data = safefs.read_tail(log_file, limit=8192, start=offset, owner=owner)
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").strip().splitlines()
    return "\n".join(text[-lines:])


def _read_pid_file(pgdata: Path) -> list[str] | None:
    """`postmaster.pid`'s lines. The compute's uid can write the file: it is read without following
    a link, never blocking (a FIFO), and only its first 4 kB (it is about 100 bytes)."""
    try:
        return safefs.read_file(pgdata / "postmaster.pid", limit=4096).decode().splitlines()
    except (OSError, UnicodeDecodeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Postmaster:
    def __init__(self, pid: int, pgdata: Path, log_file: Path, proc: subprocess.Popen[bytes] | None = None,
                 log_offset: int = 0, owner: OsUser | None = None) -> None:
        self.pid = pid
        self.owner = owner  # the compute's user (root only): whose log this is
        self.pgdata = pgdata
        self.log_file = log_file
        self.proc = proc
        self.log_offset = log_offset
        self.pidfd: int | None = None
        self.returncode: int | None = None
        self.stop_requested = False
        with contextlib.suppress(OSError):
            self.pidfd = os.pidfd_open(pid)
        if self.pidfd is None:
            self.returncode = -1

    @property
    def alive(self) -> bool:
        if self.returncode is not None:
            return False
        if self.proc is not None:
            code = self.proc.poll()
            if code is not None:
                self.returncode = code
                return False
            return True
        if not _pid_alive(self.pid):
            self.returncode = -1
            return False
        return True

    def _reap(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.returncode = self.proc.wait(timeout=1)
        elif self.returncode is None:
            self.returncode = -1
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None

    def release(self) -> None:
        """Let go of the process handle of a postmaster nobody will watch (it runs on)."""
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None

    def watch(self, on_exit: Callable[[Postmaster], None]) -> None:
        """Call `on_exit(self)` on the running loop once the process is gone."""
        loop = asyncio.get_running_loop()
        if self.pidfd is None:
            loop.call_soon(on_exit, self)
            return
        fd = self.pidfd

        def exited() -> None:
            loop.remove_reader(fd)
            self._reap()
            on_exit(self)

        loop.add_reader(fd, exited)

    def is_ready(self, standby: bool = False) -> bool:
        lines = _read_pid_file(self.pgdata)
        states = ("ready", "standby") if standby else ("ready",)
        return bool(lines and len(lines) >= 8 and lines[0].strip() == str(self.pid) and lines[7].strip() in states)

    def _failure(self, what: str) -> ComputeStartError:
        tail = log_tail(self.log_file, self.log_offset, owner=self.owner)
        hint = f":\n{tail}" if tail else ""
        return ComputeStartError(f"PostgreSQL {what}{hint}")

    async def wait_ready(self, timeout: float = READY_TIMEOUT, *, standby: bool = False) -> None:
        deadline = time.monotonic() + timeout
        delay = _POLL
        while not self.is_ready(standby):
            if not self.alive:
                raise self._failure(f"exited during start-up (status {self.returncode})")
            if time.monotonic() > deadline:
                raise self._failure(f"was not ready after {timeout:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)

    def wait_ready_sync(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if not self.alive:
                raise self._failure(f"exited during start-up (status {self.returncode})")
            if time.monotonic() > deadline:
                raise self._failure(f"was not ready after {timeout:.0f} s")
            time.sleep(_POLL)

    def signal(self, mode: str) -> None:
        self.stop_requested = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, _SIGNALS[mode])

    def kill_group(self) -> None:
        """SIGKILL the postmaster and everything in its session (its backends)."""
        self.stop_requested = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    async def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def stop(self, mode: str = "fast", timeout: float = STOP_TIMEOUT) -> None:
        """Stop; escalate fast -> immediate -> SIGKILL if the previous step does not finish in time."""
        steps = {"smart": ["smart", "fast", "immediate"], "fast": ["fast", "immediate"],
                 "immediate": ["immediate"]}[mode]
        for step in steps:
            self.signal(step)
            if await self.wait_exit(timeout if step != "immediate" else 10):
                return
        self.kill_group()
        await self.wait_exit(10)

    def stop_sync(self, mode: str = "fast", timeout: float = STOP_TIMEOUT) -> None:
        self.signal(mode)
        deadline = time.monotonic() + timeout
        while self.alive:
            if time.monotonic() > deadline:
                self.kill_group()
                deadline = time.monotonic() + 10
            time.sleep(0.01)
        self._reap()


def start(install: PgInstall, pgdata: Path, log_file: Path, user: OsUser | None) -> Postmaster:
    """Spawn `postgres -D pgdata` (config already written); returns at once, see `wait_ready`.
    The log lies in the compute's own directory: opened by `safefs.open_append` (no link, FIFO or
    someone else's file is ever handed to the compute), created for `user`."""
    owner = user if running_as_root() else None
    try:
        safefs.makedirs(log_file.parent, owner=owner)
        fd = safefs.open_append(log_file, owner=owner)
    except OSError as exc:
        raise ComputeStartError(f"cannot open the compute's log {log_file}: {exc}") from None
    with os.fdopen(fd, "ab") as log:
        offset = log.tell()
        try:
            # cwd "/": Popen changes directory before it drops to `user`, i.e. as root, and the compute's
            # uid owns the path; postgres moves into its data directory itself.
            proc = subprocess.Popen([str(install.bin("postgres")), "-D", str(pgdata)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=_ENV,
                                    cwd="/", **popen_kwargs(user))
        except OSError as exc:
            raise ComputeStartError(f"cannot run {install.bin('postgres')}: {exc.strerror or exc}") from None
    return Postmaster(proc.pid, pgdata, log_file, proc=proc, log_offset=offset, owner=owner)


def _state(pid: int) -> str | None:
    """The process state letter from /proc (Z: zombie), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]


def _uid(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("Uid:")), None)
    return int(line.split()[1]) if line else None


def _serves(pid: int, pgdata: Path, uid: int | None = None) -> bool:
    """Whether `pid` is a live postgres whose command line names `pgdata` (and, given `uid`, that
    runs as it: the pid comes from `postmaster.pid`, which the compute's uid can write, and Argon
    signals it as root; anyone can name a process `postgres -D <that path>`)."""
    if _state(pid) in (None, "Z", "X"):
        return False
    if uid is not None and _uid(pid) != uid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"postgres") and str(pgdata).encode() in cmdline


def clear_stale_lock(pgdata: Path, socket_dir: Path | None = None, wait: float = 3.0) -> None:
    """Remove the lock files (`postmaster.pid`, the socket's `.lock`) of a postmaster that is gone
    (kill -9, OOM, reboot): Postgres refuses to start when their PID was reused or is a zombie
    nobody reaped yet. A live postmaster on the same directory is waited for briefly (it may be
    dying), then refused."""
    lines = _read_pid_file(pgdata)
    pid = 0
    if lines:
        with contextlib.suppress(ValueError):
            pid = int(lines[0])
    deadline = time.monotonic() + wait
    while pid > 0 and _serves(pid, pgdata):
        if time.monotonic() > deadline:
            raise ComputeStartError(f"another postmaster (pid {pid}) is still running on {pgdata}")
        time.sleep(0.02)
    safefs.unlink(pgdata / "postmaster.pid")
    if socket_dir is not None:
        for name in (".s.PGSQL.5432.lock", ".s.PGSQL.5432"):
            safefs.unlink(socket_dir / name)


def alive_on(pgdata: Path) -> bool:
    """Whether a postgres named in `pgdata`'s `postmaster.pid` serves it (ready or not yet: a crash
    recovery after a restart of Argon)."""
    lines = _read_pid_file(pgdata)
    try:
        return bool(lines) and _serves(int(lines[0]), pgdata)
    except ValueError:
        return False


def adopt(pgdata: Path, log_file: Path, user: OsUser | None = None) -> Postmaster | None:
    """The postmaster still serving `pgdata` from an earlier Argon process, if it is alive, ready
    and runs as the compute's user (as ourselves when unprivileged)."""
    lines = _read_pid_file(pgdata)
    if not lines or len(lines) < 8:
        return None
    try:
        pid = int(lines[0])
    except ValueError:
        return None
    owner = user if running_as_root() else None
    uid = owner.uid if owner is not None else os.geteuid()
    if lines[7].strip() not in ("ready", "standby") or not _serves(pid, pgdata, uid):
        return None  # gone, a zombie, or the pid was reused by an unrelated process
    pm = Postmaster(pid, pgdata, log_file, owner=owner)
    return pm if pm.pidfd is not None else None

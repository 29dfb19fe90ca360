"""Root's file operations in trees a tenant can write: never through a link it planted.

As root, Argon works inside directories that belong to compute uids: a project's tree, a compute's
socket directory. Whoever runs code as that uid can replace any name in them, at any moment, with
a symlink, a hard link to someone else's file, or a FIFO. So every operation here:

- resolves a path one component at a time from `/` (`openat` with `O_NOFOLLOW`), and follows a
  symlink only where it sits in a directory that only root or Argon's own user can write (an
  operator's symlinked data directory works; a tenant's link raises `UnsafePath`). `..` is refused;
- then acts relative to the directory it opened (`dir_fd`), so a name swapped after the check
  changes nothing;
- writes (or opens for appending) a file `O_NOFOLLOW | O_NONBLOCK` and keeps it only if it is a
  regular file of its owner (or ours) with one link, else removes it and makes a new one, handed
  over with `fchown`; or, where a crash must leave the old content or the new, writes a temp file
  renamed over the name;
- reads tenant-writable files `O_NOFOLLOW | O_NONBLOCK`, regular files only, with a size cap: a
  FIFO must not hang a thread, `/dev/zero` must not fill memory;
- walks, removes and gives away (`lchown`, the top directory last) trees by directory fd, opening
  each subdirectory `O_DIRECTORY | O_NOFOLLOW` (a link or FIFO swapped in is never entered or
  opened), with depth and open fds bounded however deep a tenant nests directories.

Unprivileged, every tree is Argon's own user's and these are ordinary file operations. Owners are
anything with `uid` and `gid` (`argon.compute.osuser.OsUser`); None leaves ownership alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_MAX_LINKS = 40
MAX_DEPTH = 48  # a cluster is about 5 levels deep; a tenant's deeper nesting is not followed further


class Owner(Protocol):
    @property
    def uid(self) -> int: ...

    @property
    def gid(self) -> int: ...


class _Self:
    """Argon's own user, as an owner."""

    uid = os.geteuid()
    gid = os.getegid()


class UnsafePath(OSError):
    """A symlink, or something other than what Argon expects, where a tenant could have put it."""

    def __init__(self, path: str | os.PathLike[str], why: str) -> None:
        super().__init__(errno.ELOOP, why, os.fspath(path))
        self.why = why

    def __str__(self) -> str:
        return f"{self.filename}: {self.why}"


def _trusted(st: os.stat_result) -> bool:
    """A directory only root or we can write: a symlink in it was put there by one of us."""
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def _parts(path: str) -> list[str]:
    if not os.path.isabs(path):
        raise ValueError(f"not an absolute path: {path!r}")
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise UnsafePath(path, "'..' in a path Argon works on")
    return parts


def open_dir(path: str | os.PathLike[str]) -> int:
    """An fd (O_DIRECTORY) of the directory at `path`, reached without following a tenant's link."""
    text = os.fspath(path)
    parts = _parts(text)
    links = 0
    fd = os.open("/", _DIR)
    done: list[str] = []
    try:
        i = 0
        while i < len(parts):
            name = parts[i]
            try:
                nfd = os.open(name, _DIR, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                where = "/" + "/".join([*done, name])
                if not stat.S_ISLNK(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", where) from None
                if not _trusted(os.fstat(fd)):
                    raise UnsafePath(where, "a symlink in a directory a compute can write") from None
                links += 1
                if links > _MAX_LINKS:
                    raise UnsafePath(text, "too many levels of symlinks") from None
                target = os.readlink(name, dir_fd=fd)
                # `done` is physical (every link on it was expanded here), so normpath's `..` is the kernel's.
                expanded = os.path.normpath(os.path.join("/" + "/".join(done), target))
                parts = [p for p in expanded.split("/") if p] + parts[i + 1:]
                os.close(fd)
                fd = os.open("/", _DIR)
                done, i = [], 0
                continue
            os.close(fd)
            fd = nfd
            done.append(name)
            i += 1
        return fd
    except BaseException:
        os.close(fd)
        raise


def _name(path: str | os.PathLike[str]) -> tuple[Path, str]:
    p = Path(path)
    if p.name in ("", ".", ".."):
        raise UnsafePath(p, "no file name")
    return p.parent, p.name


class Dir:
    """An open directory reached by `open_dir`; every method takes a single name inside it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.fd = open_dir(self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Dir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lstat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def exists(self, name: str) -> bool:
        try:
            self.lstat(name)
        except FileNotFoundError:
            return False
        return True

    def is_dir(self, name: str) -> bool:
        try:
            return stat.S_ISDIR(self.lstat(name).st_mode)
        except FileNotFoundError:
            return False

    def listdir(self) -> list[str]:
        return os.listdir(self.fd)

    def write(self, name: str, data: bytes | str, *, owner: Owner | None = None, mode: int = 0o600,
              atomic: bool = False) -> None:
        """Make `name` a file of `owner` holding `data`, never writing through what a tenant put
        there: an existing file is rewritten only if it is a regular file of the owner's (or ours)
        with one link, opened `O_NOFOLLOW`; anything else (a link, a FIFO, a hard link to someone
        else's file) is removed and a new file made. `atomic`: write a temp file, fsync it and rename
        it over the name, so a crash leaves the old content or the new (slower: on ext4 a rename
        over a file flushes it)."""
        raw = data.encode() if isinstance(data, str) else data
        if not atomic:
            fd = self._open_own(name, os.O_RDWR, owner, mode)
            try:
                # Unchanged (a restart): leave it. Else overwrite, then cut: never truncate to zero,
                # which ext4 answers with a flush of the file at close (milliseconds on a busy disk).
                if os.fstat(fd).st_size != len(raw) or _read_up_to(fd, len(raw)) != raw:
                    os.lseek(fd, 0, os.SEEK_SET)
                    _write_all(fd, raw)
                    os.ftruncate(fd, len(raw))
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            return
        tmp = f".{name[:64]}.argon-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)
        try:
            try:
                _write_all(fd, raw)
                os.fchmod(fd, mode)
                if owner is not None:
                    os.fchown(fd, owner.uid, owner.gid)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise

    def _open_own(self, name: str, flags: int, owner: Owner | None, mode: int = 0o600) -> int:
        """`name` opened for writing (created `mode` if missing) and given to `owner`: only ever a
        regular file with one link that is the owner's or ours (a root file of one link cannot be in
        the owner's tree unless root made it there); whatever else is there is removed first."""
        for _ in range(3):
            try:
                fd = os.open(name, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode,
                             dir_fd=self.fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EWOULDBLOCK):
                    raise
                self.remove(name)
                continue
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid in ((owner or _Self).uid, os.geteuid()):
                os.set_blocking(fd, True)
                if owner is not None and (st.st_uid, st.st_gid) != (owner.uid, owner.gid):
                    os.fchown(fd, owner.uid, owner.gid)
                return fd
            os.close(fd)
            self.remove(name)
        raise UnsafePath(self.path / name, "keeps being replaced while Argon opens it")

    def _open_regular(self, name: str, owner: Owner | None) -> tuple[int, os.stat_result]:
        try:
            fd = os.open(name, _READ, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(self.path / name, "a symlink where Argon expects a file") from None
            raise
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "not a regular file"
        elif owner is not None and st.st_uid != owner.uid:
            problem = "a file of another user (a hard link?)"
        if problem:
            os.close(fd)
            raise UnsafePath(self.path / name, problem)
        return fd, st

    def read(self, name: str, *, limit: int, owner: Owner | None = None) -> bytes:
        """The whole of a regular file of at most `limit` bytes (`UnsafePath` if larger). With
        `owner`: refuse a file that is not its (a hard link to someone else's, root's included)."""
        fd, st = self._open_regular(name, owner)
        try:
            if st.st_size > limit:
                raise UnsafePath(self.path / name, f"larger than {limit} bytes")
            return _read_up_to(fd, limit)
        finally:
            os.close(fd)

    def read_tail(self, name: str, *, limit: int, owner: Owner | None = None, start: int = 0) -> bytes:
        """The last `limit` bytes of a regular file (a log), none before offset `start`."""
        fd, st = self._open_regular(name, owner)
        try:
            os.lseek(fd, max(0, start, st.st_size - limit), os.SEEK_SET)
            return _read_up_to(fd, limit)
        finally:
            os.close(fd)

    def open_append(self, name: str, *, owner: Owner | None = None) -> int:
        """An fd appending to the log `name` (created 0600 for `owner`), by the rules of `write`."""
        return self._open_own(name, os.O_WRONLY | os.O_APPEND, owner)

    def mkdir(self, name: str, *, mode: int = 0o700, owner: Owner | None = None, exist_ok: bool = True) -> None:
        """Make the directory `name` (owned by `owner` when new); an existing one must be a real
        directory, not a link to one."""
        try:
            os.mkdir(name, mode, dir_fd=self.fd)
        except FileExistsError:
            if not exist_ok:
                raise
            if not stat.S_ISDIR(self.lstat(name).st_mode):
                raise UnsafePath(self.path / name, "not a directory (a symlink?)") from None
            return
        if owner is not None:
            os.chown(name, owner.uid, owner.gid, dir_fd=self.fd, follow_symlinks=False)

    def chown(self, name: str, owner: Owner) -> None:
        os.chown(name, owner.uid, owner.gid, dir_fd=self.fd, follow_symlinks=False)

    def chmod_dir(self, name: str, mode: int) -> None:
        """chmod a directory (never through a link: it is opened O_NOFOLLOW first)."""
        fd = os.open(name, _DIR, dir_fd=self.fd)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def unlink(self, name: str, *, missing_ok: bool = True) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove(self, name: str) -> None:
        """Remove `name` whatever it is (a tree, a file, a link; missing is fine), never following a link."""
        _remove_tree(self.fd, name)

    def rename(self, name: str, dst: Dir, dst_name: str) -> None:
        os.rename(name, dst_name, src_dir_fd=self.fd, dst_dir_fd=dst.fd)

    def link(self, name: str, dst: Dir, dst_name: str) -> None:
        """A hard link of `name` (the link itself if it is a symlink: never what it points to)."""
        os.link(name, dst_name, src_dir_fd=self.fd, dst_dir_fd=dst.fd, follow_symlinks=False)

    def copy(self, name: str, dst: Dir, dst_name: str, *, owner: Owner | None = None) -> None:
        """Copy a regular file of `owner` (or ours) to a new file `dst_name`, given to `owner`.
        With copy_file_range: a reflink where the file system shares extents (XFS, btrfs), an
        in-kernel copy elsewhere; sendfile where that call is refused."""
        src, st = self._open_regular(name, owner)
        try:
            out = os.open(dst_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          stat.S_IMODE(st.st_mode) & 0o700 or 0o600, dir_fd=dst.fd)
            try:
                _copy_contents(src, out, st.st_size)
                if owner is not None:
                    os.fchown(out, owner.uid, owner.gid)
            finally:
                os.close(out)
        finally:
            os.close(src)


def _copy_contents(src: int, out: int, size: int) -> None:
    """All of `src` (from its start) into the empty `out`."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, out, size - done)
            if n == 0:
                break  # the file shrank meanwhile: copy what is there
            done += n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP) or done:
            raise
    while os.sendfile(out, src, None, 1 << 20):  # the rest (a file that grew), or all where refused
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_up_to(fd: int, limit: int) -> bytes:
    chunks, left = [], limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def parent(path: str | os.PathLike[str]) -> Iterator[tuple[Dir, str]]:
    """The directory holding `path`, opened safely, and the name of `path` in it."""
    where, name = _name(path)
    with Dir(where) as d:
        yield d, name


# --- One-call forms of the above, by path -----------------------------------------------------------------

def write_file(path: str | os.PathLike[str], data: bytes | str, *, owner: Owner | None = None, mode: int = 0o600,
               atomic: bool = False) -> None:
    with parent(path) as (d, name):
        d.write(name, data, owner=owner, mode=mode, atomic=atomic)


def read_file(path: str | os.PathLike[str], *, limit: int, owner: Owner | None = None) -> bytes:
    with parent(path) as (d, name):
        return d.read(name, limit=limit, owner=owner)


def read_tail(path: str | os.PathLike[str], *, limit: int, owner: Owner | None = None, start: int = 0) -> bytes:
    with parent(path) as (d, name):
        return d.read_tail(name, limit=limit, owner=owner, start=start)


def open_append(path: str | os.PathLike[str], *, owner: Owner | None = None) -> int:
    with parent(path) as (d, name):
        return d.open_append(name, owner=owner)


def lexists(path: str | os.PathLike[str]) -> bool:
    """Whether `path` exists (as anything, a link included), resolved safely; False if unreachable."""
    try:
        with parent(path) as (d, name):
            return d.exists(name)
    except (FileNotFoundError, NotADirectoryError, UnsafePath):
        return False


def is_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a real directory (not a link to one) reached safely."""
    try:
        with parent(path) as (d, name):
            return d.is_dir(name)
    except (FileNotFoundError, NotADirectoryError, UnsafePath):
        return False


def listdir(path: str | os.PathLike[str]) -> list[str]:
    with Dir(path) as d:
        return d.listdir()


def makedirs(path: str | os.PathLike[str], *, mode: int = 0o700, owner: Owner | None = None) -> None:
    """`mkdir -p` that never follows a tenant's link; the directories it makes get `owner`."""
    try:
        os.close(open_dir(path))
        return
    except FileNotFoundError:
        pass
    where, name = _name(path)
    makedirs(where, mode=mode, owner=owner)
    with Dir(where) as d:
        d.mkdir(name, mode=mode, owner=owner)


def chown(path: str | os.PathLike[str], owner: Owner) -> None:
    with parent(path) as (d, name):
        d.chown(name, owner)


def unlink(path: str | os.PathLike[str], *, missing_ok: bool = True) -> None:
    try:
        with parent(path) as (d, name):
            d.unlink(name, missing_ok=missing_ok)
    except FileNotFoundError:
        if not missing_ok:
            raise


def rmtree(path: str | os.PathLike[str], *, ignore_errors: bool = True) -> None:
    """Remove the tree at `path` (or whatever is there); missing is fine. Never follows a link,
    neither on the way to `path` nor inside it. `ignore_errors`: like `shutil.rmtree`'s."""
    try:
        with parent(path) as (d, name):
            d.remove(name)
    except FileNotFoundError:
        pass
    except OSError:
        if not ignore_errors:
            raise


def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    with parent(src) as (s, sname), parent(dst) as (d, dname):
        s.rename(sname, d, dname)


def walk(path: str | os.PathLike[str]) -> Iterator[tuple[int, list[str]]]:
    """(dir fd, names of its non-directories) for every directory of the tree at `path`, never
    into a link, at most `MAX_DEPTH` levels down; stat names with
    `os.stat(name, dir_fd=fd, follow_symlinks=False)`."""
    with Dir(path) as top:
        yield from _walk(top.fd, 0)


def _walk(fd: int, depth: int) -> Iterator[tuple[int, list[str]]]:
    entries = _scan(fd)
    yield fd, [name for name, is_dir in entries if not is_dir]
    if depth >= MAX_DEPTH:
        return
    for name, is_dir in entries:
        sub = _open_sub(fd, name) if is_dir else None
        if sub is not None:
            try:
                yield from _walk(sub, depth + 1)
            finally:
                os.close(sub)


def tree_bytes(path: str | os.PathLike[str]) -> int:
    """Allocated bytes of the files in a tree (0 if it is not there or not reachable safely)."""
    total = 0
    try:
        for fd, files in walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.stat(name, dir_fd=fd, follow_symlinks=False).st_blocks * 512
    except (FileNotFoundError, NotADirectoryError, UnsafePath):
        return 0
    return total


def chown_tree(path: str | os.PathLike[str], owner: Owner) -> None:
    """Give a whole tree to `owner`: `lchown` by directory fd, never following a link; the top
    directory last, so a tree that was private stays so until every file in it is given away."""
    with parent(path) as (d, name):
        fd = _open_sub(d.fd, name)
        if fd is not None:
            try:
                _chown_in(fd, owner, 0)
            finally:
                os.close(fd)
        d.chown(name, owner)


def _chown_in(fd: int, owner: Owner, depth: int) -> None:
    for name, is_dir in _scan(fd):
        sub = _open_sub(fd, name) if is_dir else None
        if sub is not None:
            try:
                if depth >= MAX_DEPTH:
                    raise UnsafePath(name, f"a tree deeper than {MAX_DEPTH} levels")
                _chown_in(sub, owner, depth + 1)
            finally:
                os.close(sub)
        with contextlib.suppress(FileNotFoundError):
            os.chown(name, owner.uid, owner.gid, dir_fd=fd, follow_symlinks=False)


def _scan(fd: int) -> list[tuple[str, bool]]:
    """(name, is a real directory) of every entry of the directory `fd`."""
    with os.scandir(fd) as it:
        out = []
        for entry in it:
            try:
                out.append((entry.name, entry.is_dir(follow_symlinks=False)))
            except OSError:
                out.append((entry.name, False))
        return out


def _open_sub(fd: int, name: str) -> int | None:
    """The subdirectory `name` of `fd`, None if it is anything else now (a link, a FIFO, gone).
    O_DIRECTORY: a FIFO swapped in is refused, never opened (which would block)."""
    try:
        return os.open(name, _DIR | os.O_NONBLOCK, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT):
            return None
        raise


def _remove_tree(top: int, name: str) -> None:
    """Remove `name` in the directory `top`, whatever it is. Depth and fds stay bounded however deep
    a tenant nested its directories: a subtree `MAX_DEPTH` levels down is moved up into `top`
    under a temporary name and removed from there."""
    pending = [name]
    while pending:
        _remove_in(top, pending.pop(), top, 0, pending)


def _remove_in(parent_fd: int, name: str, top: int, depth: int, pending: list[str]) -> None:
    fd = _open_sub(parent_fd, name)
    if fd is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=parent_fd)
        return
    try:
        for entry, is_dir in _scan(fd):
            if not is_dir:
                try:
                    os.unlink(entry, dir_fd=fd)
                    continue
                except FileNotFoundError:
                    continue
                except IsADirectoryError:  # swapped for a directory meanwhile
                    pass
            if depth + 1 >= MAX_DEPTH:
                spill = f".argon-rm-{secrets.token_hex(6)}"
                os.rename(entry, spill, src_dir_fd=fd, dst_dir_fd=top)
                pending.append(spill)
            else:
                _remove_in(fd, entry, top, depth + 1, pending)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=parent_fd)


def run_as(owner: Owner | None) -> dict[str, Any]:
    """`subprocess` arguments that run a helper program (cp, pg_controldata, psql...) as `owner`
    with no supplementary groups, in `/` (as root; unprivileged, as ourselves)."""
    if owner is None or os.geteuid() != 0:
        return {"cwd": "/"}
    return {"user": owner.uid, "group": owner.gid, "extra_groups": [], "cwd": "/"}

"""argon.safefs: root's file operations in a tree a compute's uid can write never go through a link,
a FIFO or someone else's file that uid planted. The attacks need a directory owned by another uid,
so most tests run as root only (CI runs as root)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from argon import safefs
from argon.compute.osuser import OsUser

TENANT = OsUser(54321, 54321)
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="planting links as another uid needs root")


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file of root's (ours, unprivileged) outside every tenant tree."""
    path = tmp_path / "outside" / "secret"
    path.parent.mkdir()
    path.write_text("root's secret\n")
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def tenant(tmp_path: Path) -> Path:
    """A directory that belongs to a compute uid (as root; unprivileged, to us)."""
    path = tmp_path / "tenant"
    path.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(path, TENANT.uid, TENANT.gid)
    return path


def untouched(secret: Path) -> bool:
    st = secret.lstat()
    return secret.read_text() == "root's secret\n" and (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)


def test_paths_must_be_absolute_and_without_dotdot(tenant: Path) -> None:
    with pytest.raises(safefs.UnsafePath):
        safefs.open_dir(f"{tenant}/../tenant")
    with pytest.raises(ValueError):
        safefs.open_dir("relative/path")


@pytest.mark.parametrize("atomic", [False, True])
def test_writes_replace_links_fifos_and_hard_links_instead_of_writing_through(tenant: Path, secret: Path,
                                                                               atomic: bool) -> None:
    conf = tenant / "pg_ident.conf"
    owner = TENANT if os.geteuid() == 0 else None
    for plant in (lambda: conf.symlink_to(secret), lambda: os.mkfifo(conf), lambda: os.link(secret, conf), None):
        if plant is not None:
            plant()
        safefs.write_file(conf, "mine\n", owner=owner, atomic=atomic)
        assert untouched(secret)
        st = conf.lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and conf.read_text() == "mine\n"
        assert st.st_uid == (TENANT.uid if os.geteuid() == 0 else os.geteuid())
        assert [p.name for p in tenant.iterdir()] == ["pg_ident.conf"]  # no temp file left
        conf.unlink()


def test_reads_refuse_links_fifos_and_huge_files(tenant: Path, secret: Path) -> None:
    (tenant / "link").symlink_to(secret)
    os.mkfifo(tenant / "fifo")
    (tenant / "big").write_bytes(b"x" * 5000)
    done = threading.Event()

    def read_all() -> None:
        for name in ("link", "fifo", "big"):
            with pytest.raises(safefs.UnsafePath):
                safefs.read_file(tenant / name, limit=4096)
        done.set()

    thread = threading.Thread(target=read_all, daemon=True)
    thread.start()
    assert done.wait(5), "reading a FIFO blocked"  # a FIFO must never hang a thread of the platform
    thread.join()
    assert safefs.read_tail(tenant / "big", limit=10) == b"x" * 10


def test_log_opened_for_append_is_never_a_link_a_fifo_or_a_hard_link(tenant: Path, secret: Path) -> None:
    log = tenant / "postgres.log"
    for plant in (lambda: log.symlink_to(secret), lambda: os.mkfifo(log), lambda: os.link(secret, log)):
        plant()
        fd = safefs.open_append(log)
        try:
            os.write(fd, b"a log line\n")
        finally:
            os.close(fd)
        assert untouched(secret)
        st = log.lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and log.read_text() == "a log line\n"
        log.unlink()


@root_only
def test_links_in_a_tenants_directory_are_never_followed(tenant: Path, secret: Path) -> None:
    (tenant / "pgdata").symlink_to(secret.parent)  # where a directory should be
    with pytest.raises(safefs.UnsafePath):
        safefs.write_file(tenant / "pgdata" / "secret", "overwritten")
    with pytest.raises(safefs.UnsafePath):
        safefs.read_file(tenant / "pgdata" / "secret", limit=100)
    safefs.rmtree(tenant / "pgdata" / "secret")  # ignore_errors: nothing done, nothing raised
    with pytest.raises(safefs.UnsafePath):
        safefs.unlink(tenant / "pgdata" / "secret")
    with pytest.raises(safefs.UnsafePath):
        safefs.makedirs(tenant / "pgdata" / "new", owner=TENANT)
    assert untouched(secret) and not (secret.parent / "new").exists()


@root_only
def test_links_in_roots_own_directories_are_followed(tmp_path: Path) -> None:
    """An operator may symlink the data directory (or a part of it) elsewhere."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "data").symlink_to(real)
    safefs.write_file(tmp_path / "data" / "f", "ok")
    assert (real / "f").read_text() == "ok"


@root_only
def test_a_file_of_another_user_is_not_read_for_its_owner(tenant: Path, secret: Path) -> None:
    os.link(secret, tenant / "postgres.log")  # a hard link (with fs.protected_hardlinks = 0)
    with pytest.raises(safefs.UnsafePath):
        safefs.read_tail(tenant / "postgres.log", limit=100, owner=TENANT)


@root_only
def test_trees_are_removed_and_given_away_without_following_links(tenant: Path, secret: Path) -> None:
    tree = tenant / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_text("x")
    (tree / "sub" / "to-secret").symlink_to(secret)
    (tree / "to-outside").symlink_to(secret.parent)
    safefs.chown_tree(tree, TENANT)
    assert untouched(secret) and secret.parent.stat().st_uid == 0
    assert (tree / "sub" / "file").stat().st_uid == TENANT.uid and tree.stat().st_uid == TENANT.uid
    assert (tree / "to-outside").lstat().st_uid == TENANT.uid
    safefs.rmtree(tree)
    assert not tree.exists() and untouched(secret)


def test_deep_trees_are_removed_with_bounded_depth(tenant: Path) -> None:
    """However deep a tenant nests directories, removal keeps few fds open and no deep recursion."""
    path = tenant / "deep"
    path.mkdir()
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(3 * safefs.MAX_DEPTH + 5):  # by fd: deeper than a path could name
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    assert sum(1 for _ in safefs.walk(path)) == safefs.MAX_DEPTH + 1  # a walk stops at the bound
    safefs.rmtree(path, ignore_errors=False)
    assert list(tenant.iterdir()) == []


def test_run_as_drops_to_the_owner_only_as_root() -> None:
    kwargs = safefs.run_as(TENANT)
    if os.geteuid() == 0:
        assert kwargs == {"user": TENANT.uid, "group": TENANT.gid, "extra_groups": [], "cwd": "/"}
    else:
        assert kwargs == {"cwd": "/"}


@pytest.mark.parametrize("refused", [False, True])
def test_copy_whole_file_with_or_without_copy_file_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         refused: bool) -> None:
    """Dir.copy uses copy_file_range (a reflink on XFS/btrfs); where the kernel refuses it (EXDEV
    across file systems, EINVAL on some), sendfile copies the whole file all the same."""
    import errno

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    data = os.urandom(3 * 1024 * 1024 + 17)
    (src / "seg").write_bytes(data)
    os.chmod(src / "seg", 0o600)
    if refused:
        def refuse(*args: object, **kwargs: object) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    with safefs.Dir(src) as s, safefs.Dir(dst) as d:
        s.copy("seg", d, "seg")
    assert (dst / "seg").read_bytes() == data
    assert stat.S_IMODE((dst / "seg").stat().st_mode) == 0o600

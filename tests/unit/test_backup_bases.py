"""Base backups as content-addressed chunks: round trip (modes, packed small files, large files in
several chunks), sharing between identical trees, and damage named on the way back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from argon.storage.backup import bases as bb
from argon.storage.backup.objects import Codec, CorruptObject
from argon.storage.backup.store import FileStore


def make_tree(root: Path) -> None:
    (root / "base" / "1").mkdir(parents=True)
    (root / "global").mkdir()
    for i in range(300):
        (root / "base" / "1" / f"{i}").write_bytes(os.urandom(100) * (i % 7 + 1))
    (root / "base" / "1" / "big").write_bytes(os.urandom(bb.CHUNK) + os.urandom(1000))  # two chunks
    (root / "global" / "pg_control").write_bytes(b"c" * 8192)
    (root / "empty").write_bytes(b"")
    (root / "postmaster.pid").write_text("12345\n")  # never shipped
    os.chmod(root / "global" / "pg_control", 0o600)


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mode & 0o777)
            for p in root.rglob("*") if p.is_file()}


def test_round_trip_sharing_and_damage(tmp_path: Path) -> None:
    source = tmp_path / "src"
    make_tree(source)
    (tmp_path / "bucket").mkdir()
    store = FileStore(tmp_path / "bucket")
    codec = Codec("k")
    index = bb.ChunkIndex(store)
    first = bb.upload_snapshot(store, codec, index, source, "b/1.json", {"name": "one"})
    chunks = len(store.list("chunks/"))
    assert first.files == 303 and chunks < 20  # 300 small files travel in a few packs
    # An identical tree (a branch of an unchanged parent) costs its manifest only...
    again = bb.upload_snapshot(store, codec, bb.ChunkIndex(store), source, "b/2.json", {"name": "two"})
    assert again.chunks_uploaded == 0 and len(store.list("chunks/")) == chunks
    # ... and a changed small file one pack.
    (source / "base" / "1" / "5").write_bytes(b"changed" * 100)
    third = bb.upload_snapshot(store, codec, index, source, "b/3.json", {"name": "three"})
    assert third.chunks_uploaded == 1

    manifest = bb.read_manifest(store, codec, "b/3.json")
    assert manifest["record"] == {"name": "three"} and bb.manifest_bytes(manifest) == sum(
        len(d) for n, (d, _m) in tree(source).items() if n != "postmaster.pid")
    out = tmp_path / "out"
    bb.download_snapshot(store, codec, manifest, out)
    expected = tree(source)
    del expected["postmaster.pid"]
    assert tree(out) == expected

    first_manifest = bb.read_manifest(store, codec, "b/1.json")  # a chunk the first base needs
    entry = next(e for e in first_manifest["files"] if e.get("chunks") or e.get("pack"))
    victim = bb.chunk_key(entry["pack"] if "pack" in entry else entry["chunks"][0])
    (tmp_path / "bucket" / victim).write_bytes(b"garbage")
    with pytest.raises(CorruptObject, match=victim.rsplit("/", 1)[1]):
        bb.download_snapshot(store, codec, bb.read_manifest(store, codec, "b/1.json"), tmp_path / "out2")


def test_sync_tree_never_follows_a_link(tmp_path: Path) -> None:
    """The restored tree is made durable file by file; a link in it (to a FIFO that would block an
    open, or anywhere) is left alone."""
    make_tree(tmp_path / "t")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "t" / "link").symlink_to(tmp_path / "fifo")
    (tmp_path / "t" / "dirlink").symlink_to("/")
    bb.sync_tree(tmp_path / "t")


def test_a_manifest_cannot_write_outside_the_target(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    for bad in ("../escape", "/etc/passwd", "base/../../x"):
        manifest = {"format": bb.FORMAT, "record": {}, "dirs": [{"path": ".", "mode": 0o700}],
                    "files": [{"path": bad, "mode": 0o600, "size": 0, "chunks": []}]}
        with pytest.raises(CorruptObject, match="outside the cluster"):
            bb.download_snapshot(store, Codec(None), manifest, tmp_path / "out")
    assert not (tmp_path / "escape").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="a tenant's uid other than ours needs root")
def test_a_snapshot_is_read_without_following_a_tenants_links(tmp_path: Path) -> None:
    """As root, a base upload never enters a directory link the compute's uid planted in its
    snapshot, and refuses a file of another user there (a hard link to root's)."""
    from argon.compute.osuser import OsUser
    from argon.safefs import UnsafePath

    tenant = OsUser(65534, 65534)
    secret = tmp_path / "root-only"
    secret.mkdir()
    (secret / "key").write_bytes(b"root's secret")
    source = tmp_path / "snap"
    (source / "base").mkdir(parents=True)
    (source / "base" / "1").write_bytes(b"data")
    (source / "linked").symlink_to(secret)
    for path in (source, source / "base", source / "base" / "1"):
        os.lchown(path, tenant.uid, tenant.gid)
    (tmp_path / "bucket").mkdir()
    store = FileStore(tmp_path / "bucket")
    codec = Codec(None)
    bb.upload_snapshot(store, codec, bb.ChunkIndex(store), source, "b/1.json", {}, owner=tenant)
    manifest = bb.read_manifest(store, codec, "b/1.json")
    assert sorted(e["path"] for e in manifest["files"]) == ["base/1"]  # the link is not a file, not entered
    os.link(secret / "key", source / "base" / "2")
    with pytest.raises(UnsafePath, match="another user"):
        bb.upload_snapshot(store, codec, bb.ChunkIndex(store), source, "b/2.json", {}, owner=tenant)

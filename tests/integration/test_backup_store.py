"""The object store seam against a real S3-compatible server (moto's) and a directory: the same
behaviour from both, whole objects only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from argon.errors import ConfigError
from argon.storage.backup.store import FileStore, MissingObject, ObjectStore, StoreError, open_store
from tests.fixtures.s3 import S3Server


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return open_store(f"file://{tmp_path}/bucket")
    server: S3Server = request.getfixturevalue("s3_server")
    return open_store(f"s3://{server.new_bucket()}/some/prefix", s3_endpoint=server.endpoint)


def test_put_get_list_delete(store: ObjectStore) -> None:
    store.put("a/one", b"1")
    store.put("a/two", b"22")
    store.put("b/three", b"333")
    store.put("a/one", b"1 again")  # overwrite: the whole new object
    assert store.get("a/one") == b"1 again"
    assert [(o.key, o.size) for o in store.list("a/")] == [("a/one", 7), ("a/two", 2)]
    assert [o.key for o in store.list("")] == ["a/one", "a/two", "b/three"]
    assert store.exists("b/three") and not store.exists("b/four")
    store.delete(["a/one", "a/missing"])
    with pytest.raises(MissingObject, match="a/one"):
        store.get("a/one")
    with pytest.raises(ValueError):
        store.put("../escape", b"x")


def test_file_store_never_shows_a_half_written_object(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put("wal/seg", b"whole")
    (tmp_path / "wal" / ".tmp-seg-dead").write_bytes(b"half")  # what a kill -9 mid-write leaves
    assert [o.key for o in store.list("wal/")] == ["wal/seg"]
    assert store.get("wal/seg") == b"whole"


def test_unreachable_store_is_a_retryable_error(tmp_path: Path) -> None:
    store = open_store("s3://bucket/p", s3_endpoint="http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(StoreError) as err:
        store.put("x", b"y")
    assert err.value.retryable
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(StoreError, match="cannot write"):
            FileStore(locked).put("x/y", b"z")


@pytest.mark.parametrize("url", ["ftp://x/y", "file://host/x", "file:///", "s3:///nobucket", "relative/path"])
def test_bad_urls_are_refused_clearly(url: str) -> None:
    with pytest.raises(ConfigError, match="ARGON_BACKUP_URL"):
        open_store(url)

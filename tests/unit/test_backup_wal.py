"""WAL shipping over synthetic segments (pages with real headers): order, the live `.partial`,
segments completed in pg_wal before the archiver copied them, gaps, and fetching back."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from argon.compute.osuser import OsUser
from argon.safefs import UnsafePath
from argon.storage.backup.objects import Codec
from argon.storage.backup.store import FileStore
from argon.storage.backup.wal import PAGE, ShipState, WalGap, fetch_epoch_wal, ship_epoch
from argon.storage.wal import segment_name

SEG = 1024 * 1024
TLI = 1
BASE = 5 * SEG


def pages(start: int, count: int, fill: int = 7) -> bytes:
    return b"".join(struct.pack("<HHIQ", 0xD118, 0, TLI, start + i * PAGE) + bytes([fill]) * (PAGE - 16)
                    for i in range(count))


def segment(start: int, valid_pages: int = SEG // PAGE, fill: int = 7) -> bytes:
    data = pages(start, valid_pages, fill)
    return data + pages(start + 64 * SEG, SEG // PAGE - valid_pages)  # the rest: a recycled file's old pages


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, FileStore]:
    archive, live = tmp_path / "archive", tmp_path / "pg_wal"
    archive.mkdir()
    live.mkdir()
    return archive, live, FileStore(tmp_path / "bucket")


def name(lsn: int) -> str:
    return segment_name(TLI, lsn, SEG)


def test_ship_in_order_then_partial_then_completion(dirs: tuple[Path, Path, FileStore], tmp_path: Path) -> None:
    archive, live, store = dirs
    codec = Codec("k")
    state = ShipState()
    saves: list[int] = []

    def ship() -> object:
        return ship_epoch(store, codec, "b/e/", archive, live, TLI, SEG, state, BASE, lambda s: saves.append(s.shipped_end))

    (archive / name(BASE)).write_bytes(segment(BASE))
    (live / name(BASE + SEG)).write_bytes(segment(BASE + SEG))  # full, archiver not done yet
    (live / name(BASE + 2 * SEG)).write_bytes(segment(BASE + 2 * SEG, valid_pages=3))  # being written
    (live / name(BASE + 3 * SEG)).write_bytes(segment(BASE + 3 * SEG, valid_pages=0))  # recycled, future name
    (archive / "00000001.history").write_bytes(b"history")
    result = ship()
    assert result.segments == 2 and result.partial  # type: ignore[attr-defined]
    assert result.shipped == result.head == BASE + 2 * SEG + 3 * PAGE  # type: ignore[attr-defined]
    keys = [o.key for o in store.list("b/e/wal/")]
    assert keys == ["b/e/wal/00000001.history", f"b/e/wal/{name(BASE)}", f"b/e/wal/{name(BASE + SEG)}",
                    f"b/e/wal/{name(BASE + 2 * SEG)}.partial"]
    assert saves == sorted(saves)  # never backwards

    unchanged = ship()  # nothing new: no upload
    assert not unchanged.partial and unchanged.segments == 0  # type: ignore[attr-defined]

    (live / name(BASE + 2 * SEG)).write_bytes(segment(BASE + 2 * SEG, valid_pages=5, fill=8))
    assert ship().partial  # type: ignore[attr-defined]

    out = tmp_path / "restored"
    end = fetch_epoch_wal(store, codec, "b/e/", out, TLI, SEG, BASE + 100)
    assert end == BASE + 2 * SEG + 5 * PAGE
    assert (out / name(BASE + SEG)).read_bytes() == segment(BASE + SEG)
    tail = (out / name(BASE + 2 * SEG)).read_bytes()
    assert len(tail) == SEG and tail[:5 * PAGE] == pages(BASE + 2 * SEG, 5, 8) and not any(tail[5 * PAGE:])
    assert (out / "00000001.history").read_bytes() == b"history"

    (live / name(BASE + 2 * SEG)).write_bytes(segment(BASE + 2 * SEG, fill=9))  # full now
    (live / name(BASE + 3 * SEG)).write_bytes(segment(BASE + 3 * SEG, valid_pages=1))  # the next one began
    result = ship()
    assert result.segments == 1 and result.partial  # type: ignore[attr-defined]
    keys = [o.key for o in store.list("b/e/wal/")]
    assert f"b/e/wal/{name(BASE + 2 * SEG)}.partial" not in keys and f"b/e/wal/{name(BASE + 2 * SEG)}" in keys

    # A restart resumes from the saved state: nothing is uploaded twice.
    state.save(tmp_path / "state.json")
    state = ShipState.load(tmp_path / "state.json")
    again = ship()
    assert again.segments == 0 and not again.partial  # type: ignore[attr-defined]


def test_gap_is_reported_and_fetch_names_the_missing_segment(dirs: tuple[Path, Path, FileStore],
                                                              tmp_path: Path) -> None:
    archive, _live, store = dirs
    codec = Codec(None)
    for lsn in (BASE, BASE + SEG, BASE + 3 * SEG):  # BASE + 2 * SEG was pruned before it was shipped
        (archive / name(lsn)).write_bytes(segment(lsn))
    state = ShipState()
    result = ship_epoch(store, codec, "p/", archive, None, TLI, SEG, state, BASE, lambda s: None)
    assert result.gap == name(BASE + 2 * SEG) and result.segments == 3
    with pytest.raises(WalGap, match=name(BASE + 2 * SEG)):
        fetch_epoch_wal(store, codec, "p/", tmp_path / "out", TLI, SEG, BASE)
    with pytest.raises(WalGap, match=name(BASE - SEG)):
        fetch_epoch_wal(store, codec, "p/", tmp_path / "out2", TLI, SEG, BASE - SEG)


def test_pg_wal_wins_over_an_older_archived_copy(dirs: tuple[Path, Path, FileStore], tmp_path: Path) -> None:
    """A branch's archive starts with copies of its parent's segments (ADR 0010); the branch goes on
    writing the last of them. Its own version in pg_wal is the one to ship."""
    archive, live, store = dirs
    codec = Codec(None)
    (archive / name(BASE)).write_bytes(segment(BASE, valid_pages=SEG // PAGE, fill=1))  # the parent's, as copied
    (live / name(BASE)).write_bytes(segment(BASE, valid_pages=10, fill=2))  # the branch's own, being written
    state = ShipState()
    result = ship_epoch(store, codec, "p/", archive, live, TLI, SEG, state, BASE, lambda s: None)
    assert result.segments == 0 and result.partial
    assert [o.key for o in store.list("p/")] == [f"p/wal/{name(BASE)}.partial"]
    out = tmp_path / "out"
    fetch_epoch_wal(store, codec, "p/", out, TLI, SEG, BASE)
    assert (out / name(BASE)).read_bytes()[:10 * PAGE] == pages(BASE, 10, 2)


def test_a_switched_segment_is_complete_once_the_next_began(dirs: tuple[Path, Path, FileStore]) -> None:
    """pg_switch_wal (backups, archive_timeout) ends a segment early; its rest is never written."""
    archive, live, store = dirs
    switched = pages(BASE, 20) + bytes(SEG - 20 * PAGE)
    (live / name(BASE)).write_bytes(switched)
    state = ShipState()
    first = ship_epoch(store, Codec(None), "p/", archive, live, TLI, SEG, state, BASE, lambda s: None)
    assert first.segments == 0 and first.partial  # still the current segment
    (live / name(BASE + SEG)).write_bytes(segment(BASE + SEG, valid_pages=2))
    second = ship_epoch(store, Codec(None), "p/", archive, live, TLI, SEG, state, BASE, lambda s: None)
    assert second.segments == 1 and second.partial and second.shipped == BASE + SEG + 2 * PAGE
    assert Codec(None).open(f"p/wal/{name(BASE)}", store.get(f"p/wal/{name(BASE)}")) == switched
    # While the first one was the current segment, the head was measured in it.
    assert first.head == BASE + 20 * PAGE


def test_lag_counts_wal_written_past_a_stuck_segment(dirs: tuple[Path, Path, FileStore]) -> None:
    archive, live, store = dirs
    (live / name(BASE)).write_bytes(segment(BASE, valid_pages=3))
    (live / name(BASE + 2 * SEG)).write_bytes(segment(BASE + 2 * SEG, valid_pages=4))  # written past a missing one
    result = ship_epoch(store, Codec(None), "p/", archive, live, TLI, SEG, ShipState(), BASE, lambda s: None)
    assert result.shipped == BASE + 3 * PAGE and result.head == BASE + 2 * SEG + 4 * PAGE


@pytest.mark.skipif(os.geteuid() != 0, reason="a tenant's uid other than ours needs root")
def test_a_tenants_links_and_other_users_files_are_never_shipped(tmp_path: Path) -> None:
    """As root, the shipper must not follow a link a compute's uid planted (into another project's
    WAL) nor ship a file of another user that appears in the compute's pg_wal (a hard link)."""
    tenant = OsUser(65534, 65534)
    theirs = tmp_path / "p1" / "pg_wal"  # another project's WAL
    theirs.mkdir(parents=True)
    (theirs / name(BASE)).write_bytes(segment(BASE, valid_pages=3))
    pgdata = tmp_path / "p2" / "pgdata"
    pgdata.mkdir(parents=True)
    os.chown(pgdata, tenant.uid, tenant.gid)  # the compute's uid owns its pgdata
    (pgdata / "pg_wal").symlink_to(theirs)
    archive = tmp_path / "archive"
    archive.mkdir()
    (tmp_path / "bucket").mkdir()
    store = FileStore(tmp_path / "bucket")
    with pytest.raises(UnsafePath):
        ship_epoch(store, Codec(None), "p/", archive, pgdata / "pg_wal", TLI, SEG, ShipState(), BASE, lambda s: None,
                   owner=tenant)
    (pgdata / "pg_wal").unlink()
    (pgdata / "pg_wal").mkdir()
    os.chown(pgdata / "pg_wal", tenant.uid, tenant.gid)
    os.link(theirs / name(BASE), pgdata / "pg_wal" / name(BASE))  # root's file, not the tenant's
    with pytest.raises(UnsafePath):
        ship_epoch(store, Codec(None), "p/", archive, pgdata / "pg_wal", TLI, SEG, ShipState(), BASE, lambda s: None,
                   owner=tenant)
    assert not [o for o in store.list("") if "/wal/" in o.key]

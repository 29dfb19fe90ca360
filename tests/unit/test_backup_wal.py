"""WAL shipping over synthetic segments (pages with real headers): order, the live `.partial`,
segments completed in pg_wal before the archiver copied them, gaps, and fetching back."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from argon.storage.backup.objects import Codec
from argon.storage.backup.store import FileStore
from argon.storage.backup.wal import PAGE, ShipState, WalGap, fetch_epoch_wal, ship_epoch
from argon.storage.history import segment_name

SEG = 1024 * 1024
TLI = 1
BASE = 5 * SEG


def pages(start: int, count: int, fill: int = 7) -> bytes:
    return b"".join(struct.pack("<HHIQ", 0xD118, 0, TLI, start + i * PAGE) + bytes([fill]) * (PAGE - 16)
                    for i in range(count))


def segment(start: int, valid_pages: int = SEG // PAGE, fill: int = 7) -> bytes:
    data = pages(start, valid_pages, fill)
    return data + pages(start - 7 * SEG, SEG // PAGE - valid_pages)  # the rest: a recycled file's old pages


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

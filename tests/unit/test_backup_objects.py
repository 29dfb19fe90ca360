"""The backup object format: round trips, and every kind of damage is refused with the object's name."""

from __future__ import annotations

import pytest

from argon.storage.backup.objects import Codec, CorruptObject, WrongKey
from argon.storage.backup.wal import PAGE, valid_prefix

DATA = b"some wal bytes " * 1000


@pytest.mark.parametrize("secret", [None, "correct horse battery staple"])
def test_round_trip_compressed_and_encrypted(secret: str | None) -> None:
    codec = Codec(secret)
    blob = codec.seal("wal/seg", DATA)
    assert len(blob) < len(DATA)  # compressed
    assert (DATA[:30] in blob) is False  # compressed or encrypted: not stored as is
    assert codec.open("wal/seg", blob) == DATA
    incompressible = bytes(range(256)) * 3
    assert codec.open("x", codec.seal("x", incompressible)) == incompressible


@pytest.mark.parametrize("secret", [None, "k"])
def test_every_flipped_byte_is_detected(secret: str | None) -> None:
    codec = Codec(secret)
    blob = codec.seal("chunks/ab/abc", DATA)
    for position in (0, 5, 6, 20, len(blob) // 2, len(blob) - 1):
        damaged = bytearray(blob)
        damaged[position] ^= 0x40
        with pytest.raises(CorruptObject, match="chunks/ab/abc"):
            codec.open("chunks/ab/abc", bytes(damaged))


def test_truncated_object_is_refused() -> None:
    codec = Codec(None)
    blob = codec.seal("meta/1", DATA)
    for cut in (0, 3, 10, len(blob) - 1):
        with pytest.raises(CorruptObject, match="meta/1"):
            codec.open("meta/1", blob[:cut])


def test_wrong_key_moved_object_and_missing_key() -> None:
    blob = Codec("right").seal("a/b", DATA)
    with pytest.raises(CorruptObject, match="does not decrypt"):
        Codec("wrong").open("a/b", blob)
    with pytest.raises(CorruptObject, match="does not decrypt"):
        Codec("right").open("a/c", blob)  # the key is authenticated: no swapping objects around
    with pytest.raises(WrongKey, match="ARGON_BACKUP_KEY"):
        Codec(None).open("a/b", blob)
    with pytest.raises(CorruptObject, match="not encrypted"):
        Codec("right").open("a/b", Codec(None).seal("a/b", DATA))


def test_format_1_zlib_objects_are_still_read() -> None:
    """A bucket written before zstd (object format 1: zlib) stays restorable, keyed or not."""
    import hashlib
    import os
    import zlib

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    inner = hashlib.sha256(DATA).digest() + zlib.compress(DATA, 1)
    assert Codec(None).open("wal/old", b"ARGB" + bytes((1, 1)) + inner) == DATA
    keyed = Codec("k")
    header, nonce = b"ARGB" + bytes((1, 1 | 2)), os.urandom(12)
    assert keyed._aead is not None
    blob = header + nonce + AESGCM.encrypt(keyed._aead, nonce, inner, header + b"wal/old")
    assert keyed.open("wal/old", blob) == DATA
    assert Codec(None).seal("wal/new", DATA)[4:6] == bytes((2, 4))  # new objects: format 2, zstd


def test_a_zstd_frame_without_a_size_or_with_an_impossible_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decompression allocates what the frame's header claims: only frames that say, within bounds."""
    import hashlib

    import zstandard

    from argon.storage.backup import objects

    unsized = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(DATA)
    blob = b"ARGB" + bytes((2, 4)) + hashlib.sha256(DATA).digest() + unsized
    with pytest.raises(CorruptObject, match=r"wal/unsized.*no size"):
        Codec(None).open("wal/unsized", blob)
    sealed = Codec(None).seal("wal/huge", DATA)
    monkeypatch.setattr(objects, "MAX_PLAINTEXT", len(DATA) - 1)
    with pytest.raises(CorruptObject, match=r"wal/huge.*impossible"):
        Codec(None).open("wal/huge", sealed)


def test_chunk_ids_hide_content_under_a_key() -> None:
    import hashlib

    assert Codec(None).chunk_id(DATA) == hashlib.sha256(DATA).hexdigest()
    keyed = Codec("k").chunk_id(DATA)
    assert keyed != hashlib.sha256(DATA).hexdigest() and keyed == Codec("k").chunk_id(DATA)
    assert keyed != Codec("other").chunk_id(DATA)


def test_bucket_key_check() -> None:
    info = Codec("k").bucket_info()
    Codec("k").check_bucket_info(info, "s3://b")
    with pytest.raises(WrongKey, match="not the key"):
        Codec("other").check_bucket_info(info, "s3://b")
    with pytest.raises(WrongKey, match="is encrypted"):
        Codec(None).check_bucket_info(info, "s3://b")
    with pytest.raises(WrongKey, match="without ARGON_BACKUP_KEY"):
        Codec("k").check_bucket_info(Codec(None).bucket_info(), "s3://b")


def _page(addr: int) -> bytes:
    import struct

    return struct.pack("<HHIQ", 0xD118, 0, 1, addr) + bytes(PAGE - 16)


def test_valid_prefix_stops_at_a_recycled_page() -> None:
    start = 16 * 1024 * 1024
    written = _page(start) + _page(start + PAGE) + _page(start + 2 * PAGE)
    stale = _page(start - 1024 * 1024 + 3 * PAGE)  # an older segment's page left in a recycled file
    assert valid_prefix(written + stale + _page(start + 4 * PAGE), start) == 3 * PAGE
    assert valid_prefix(stale + written, start) == 0
    assert valid_prefix(bytes(4 * PAGE), start) == 0


@pytest.mark.parametrize("secret", [None, "k"])
def test_a_chunk_must_be_what_its_name_says(secret: str | None) -> None:
    """A chunk is opened only under its own name: without a key the checksum is the name; with one,
    the name is authenticated, so another chunk copied under it does not decrypt."""
    codec = Codec(secret)
    a, b = b"chunk a" * 100, b"chunk b" * 100
    name_a, name_b = codec.chunk_id(a), codec.chunk_id(b)
    blob_b = codec.seal(f"chunks/{name_b[:2]}/{name_b}", b)
    assert codec.open_chunk(f"chunks/{name_b[:2]}/{name_b}", blob_b, name_b) == b
    key_a = f"chunks/{name_a[:2]}/{name_a}"
    forged = codec.seal(key_a, b) if secret is None else blob_b  # b's content under a's name
    with pytest.raises(CorruptObject):
        codec.open_chunk(key_a, forged, name_a)

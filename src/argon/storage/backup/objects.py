"""The format of every backup object: checksummed, compressed, optionally encrypted.

    "ARGB" | version (1 byte) | flags (1 byte: 1 = zlib, 2 = AES-256-GCM, 4 = zstd) | body
    body  = inner                                      (no key)
          = nonce (12 bytes) | AES-GCM(inner)          (ARGON_BACKUP_KEY set; the header and the
                                                        object's key are the associated data)
    inner = SHA-256(plaintext) (32 bytes) | payload    (payload: zstd(plaintext), or plaintext when that
                                                        is not smaller; zlib in format 1's objects)

Format 2 writes zstd, which decompresses two to three times faster than zlib and compresses faster
too: a restore of 5 GB spent most of its download decompressing zlib. Format 1's objects (zlib)
are still read, so a bucket written before stays usable; an older Argon refuses format 2's
objects as written by a newer one.

Reading checks everything (magic, authentication, decompression, the checksum of the plaintext)
and raises `CorruptObject` naming the object on any failure: a partial or damaged object is never
used. Because the object's key is authenticated, an object copied or moved to another key does not
decrypt either.

`Codec.chunk_id` names content-addressed chunks: SHA-256 of the plaintext, or with a key an
HMAC-SHA-256 under a key derived from it, so chunk names say nothing about their content.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import zlib

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from argon.errors import ArgonError, ErrorKind

MAGIC = b"ARGB"
VERSION = 2
READABLE = (1, 2)  # format 1: zlib
F_ZLIB = 1
F_AESGCM = 2
F_ZSTD = 4
MAX_PLAINTEXT = 1 << 30  # no object is near this (chunks, WAL segments, metadata): a frame claiming more is damaged
_HEADER = 6
_SALT = b"argon-backup-v1"


class CorruptObject(ArgonError):
    kind = ErrorKind.STORAGE

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"backup object {key!r} is unusable: {why}")
        self.key = key


class WrongKey(ArgonError):
    kind = ErrorKind.USER


def _derive(secret: str, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(secret.encode())


def _unzstd(key: str, payload: bytes) -> bytes:
    """One zstd frame, whose size is in its header (`compress` writes it), within MAX_PLAINTEXT."""
    try:
        size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise CorruptObject(key, f"it does not decompress ({exc})") from None
    if size < 0 or size > MAX_PLAINTEXT:
        raise CorruptObject(key, "it does not decompress (its zstd frame has no size, or an impossible one)")
    try:
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CorruptObject(key, f"it does not decompress ({exc})") from None


class Codec:
    """Seals and opens objects with one (optional) key."""

    def __init__(self, secret: str | None, *, level: int = 1) -> None:
        self.encrypted = bool(secret)
        self.level = level
        self._aead = AESGCM(_derive(secret, b"encrypt")) if secret else None
        self._name_key = _derive(secret, b"name") if secret else None

    # --- naming --------------------------------------------------------------------------------------

    def chunk_id(self, data: bytes) -> str:
        if self._name_key is None:
            return hashlib.sha256(data).hexdigest()
        return hmac.new(self._name_key, data, hashlib.sha256).hexdigest()

    def key_check(self) -> str:
        """A value that tells whether a bucket was written with this key (not the key itself)."""
        if self._name_key is None:
            return ""
        return hmac.new(self._name_key, b"argon backup key check", hashlib.sha256).hexdigest()

    # --- objects -------------------------------------------------------------------------------------

    def seal(self, key: str, plaintext: bytes, *, compress: bool = True) -> bytes:
        flags = 0
        payload = plaintext
        if compress:
            packed = zstandard.ZstdCompressor(level=self.level).compress(plaintext)
            if len(packed) < len(plaintext):
                payload, flags = packed, F_ZSTD
        inner = hashlib.sha256(plaintext).digest() + payload
        if self._aead is not None:
            flags |= F_AESGCM
            header = MAGIC + bytes((VERSION, flags))
            nonce = os.urandom(12)
            return header + nonce + self._aead.encrypt(nonce, inner, header + key.encode())
        return MAGIC + bytes((VERSION, flags)) + inner

    def open_chunk(self, key: str, blob: bytes, chunk_id: str) -> bytes:
        """`open` for a content-addressed chunk, also checking that its content is what its name
        says, without hashing it twice: with a key the name is authenticated (the object's key is
        the associated data, and only the key's holder writes those); without, the checksum `open`
        verifies is the chunk's name itself."""
        plaintext = self.open(key, blob)
        if self._name_key is None and blob[_HEADER:_HEADER + 32].hex() != chunk_id:
            raise CorruptObject(key, "its content does not match its name")
        return plaintext

    def open(self, key: str, blob: bytes) -> bytes:
        if len(blob) < _HEADER + 32 or blob[:4] != MAGIC:
            raise CorruptObject(key, "not an Argon backup object (truncated or overwritten)")
        version, flags = blob[4], blob[5]
        if version not in READABLE:
            raise CorruptObject(key, f"written by a newer Argon (object format {version})")
        if flags & ~(F_ZLIB | F_AESGCM | F_ZSTD) or (flags & F_ZLIB and flags & F_ZSTD):
            raise CorruptObject(key, f"unknown flags {flags:#x} (damaged)")
        header, body = blob[:_HEADER], blob[_HEADER:]
        if flags & F_AESGCM:
            if self._aead is None:
                raise WrongKey(f"backup object {key!r} is encrypted: set ARGON_BACKUP_KEY to the key it was written with")
            try:
                inner = self._aead.decrypt(body[:12], body[12:], header + key.encode())
            except InvalidTag:
                raise CorruptObject(key, "it does not decrypt (wrong ARGON_BACKUP_KEY, or the object was "
                                         "damaged or moved)") from None
        else:
            if self._aead is not None:
                raise CorruptObject(key, "it is not encrypted, but ARGON_BACKUP_KEY is set (refusing an object "
                                         "anyone could have written)")
            inner = body
        digest, payload = inner[:32], inner[32:]
        if flags & F_ZSTD:
            plaintext = _unzstd(key, payload)
        elif flags & F_ZLIB:
            try:
                plaintext = zlib.decompress(payload)
            except zlib.error as exc:
                raise CorruptObject(key, f"it does not decompress ({exc})") from None
        else:
            plaintext = payload
        if hashlib.sha256(plaintext).digest() != digest:
            raise CorruptObject(key, "its checksum does not match its content")
        return plaintext

    # --- the bucket's identity ---------------------------------------------------------------------------

    def bucket_info(self) -> bytes:
        return json.dumps({"format": VERSION, "encrypted": self.encrypted, "key_check": self.key_check()},
                          indent=1).encode()

    def check_bucket_info(self, raw: bytes, url: str) -> None:
        """Refuse a bucket written with another key (or none) than ours."""
        try:
            info = json.loads(raw)
            encrypted, check = bool(info["encrypted"]), str(info.get("key_check", ""))
        except (ValueError, KeyError, TypeError):
            raise CorruptObject("argon-backup.json", "unreadable") from None
        if encrypted and not self.encrypted:
            raise WrongKey(f"the backup at {url} is encrypted: set ARGON_BACKUP_KEY to its key")
        if not encrypted and self.encrypted:
            raise WrongKey(f"the backup at {url} was written without ARGON_BACKUP_KEY; unset it, or use a new "
                           "backup location for encrypted backups")
        if encrypted and not hmac.compare_digest(check, self.key_check()):
            raise WrongKey(f"ARGON_BACKUP_KEY is not the key the backup at {url} was written with "
                           "(argon-backup.json's key check does not match)")

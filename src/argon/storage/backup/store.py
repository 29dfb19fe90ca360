"""The object store seam: put, get, list and delete whole objects under one prefix.

Two implementations: `FileStore` (`file:///path`: a mounted disk or NFS; a temp file, fsync,
rename, so an object is whole or absent) and `S3Store` (`s3://bucket/prefix`: boto3 with the
standard AWS credential chain, `endpoint_url` for MinIO, R2, Ceph, moto; a PUT is atomic). Keys are
relative, `/`-separated, and never contain `..`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from argon.errors import ArgonError, ConfigError, ErrorKind


class StoreError(ArgonError):
    """The object store could not be reached or refused a request (retryable: shipping catches up)."""

    kind = ErrorKind.UNAVAILABLE
    retryable = True


class MissingObject(ArgonError):
    kind = ErrorKind.NOT_FOUND

    def __init__(self, key: str) -> None:
        super().__init__(f"backup object {key!r} is missing from the bucket")
        self.key = key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[ObjectInfo]: ...
    def delete(self, keys: list[str]) -> None: ...


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return key


class FileStore:
    """Objects as files under a directory. Writes go to a hidden temp name, are fsynced, then
    renamed (and the directory fsynced): a crash leaves the old object, the new one, or a temp
    file that listings skip."""

    def __init__(self, root: Path, url: str = "") -> None:
        self.root = root
        self.url = url or f"file://{root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(Exception):
                tmp.unlink(missing_ok=True)  # type: ignore[possibly-undefined]
            raise StoreError(f"cannot write {key} to {self.url}: {exc.strerror or exc}") from None

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise MissingObject(key) from None
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.url}: {exc.strerror or exc}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self.root
        found: list[ObjectInfo] = []
        start = base / prefix.rsplit("/", 1)[0] if "/" in prefix else base
        if not start.is_dir():
            if not base.exists():
                raise StoreError(f"{self.url} does not exist (is the disk mounted?)")
            return []
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(base).as_posix()
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        found.append(ObjectInfo(key, path.stat().st_size))
        return sorted(found, key=lambda o: o.key)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()


class S3Store:
    """Objects in an S3 bucket under a prefix. Credentials: boto3's standard chain
    (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles); region AWS_REGION."""

    def __init__(self, bucket: str, prefix: str, *, endpoint: str | None = None, url: str = "") -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = url or f"s3://{bucket}/{self.prefix}"
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30,
                        max_pool_connections=16)
        session = boto3.session.Session()
        self._client: Any = session.client("s3", endpoint_url=endpoint or None, config=config,
                                           region_name=session.region_name or "us-east-1")

    def _error(self, what: str, key: str, exc: Exception) -> StoreError:
        return StoreError(f"cannot {what} {key} at {self.url}: {exc}")

    def put(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + _check_key(key), Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("write", key, exc) from None

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self.prefix + _check_key(key))
            return bytes(response["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise MissingObject(key) from None
            raise self._error("read", key, exc) from None
        except BotoCoreError as exc:
            raise self._error("read", key, exc) from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self.prefix + _check_key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise self._error("look up", key, exc) from None
        except BotoCoreError as exc:
            raise self._error("look up", key, exc) from None

    def list(self, prefix: str) -> list[ObjectInfo]:
        from botocore.exceptions import BotoCoreError, ClientError

        found: list[ObjectInfo] = []
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    found.append(ObjectInfo(item["Key"][len(self.prefix):], int(item["Size"])))
        except (BotoCoreError, ClientError) as exc:
            raise self._error("list", prefix or "/", exc) from None
        return sorted(found, key=lambda o: o.key)

    def delete(self, keys: list[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        for start in range(0, len(keys), 1000):
            batch = [{"Key": self.prefix + _check_key(k)} for k in keys[start:start + 1000]]
            try:
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except (BotoCoreError, ClientError) as exc:
                raise self._error("delete", batch[0]["Key"], exc) from None


def open_store(url: str, *, s3_endpoint: str | None = None) -> ObjectStore:
    """`s3://bucket/prefix` or `file:///absolute/path` (ARGON_BACKUP_URL)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"ARGON_BACKUP_URL {url!r}: a file URL names a local path, file:///path")
        path = Path(unquote(parsed.path))
        if not path.is_absolute() or str(path) == "/":
            raise ConfigError(f"ARGON_BACKUP_URL {url!r}: give an absolute directory, e.g. file:///mnt/backup/argon")
        return FileStore(path, url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"ARGON_BACKUP_URL {url!r}: name the bucket, e.g. s3://my-bucket/argon")
        try:
            import boto3  # noqa: F401
        except ImportError:
            raise ConfigError("s3:// backups need boto3: pip install boto3") from None
        return S3Store(parsed.netloc, unquote(parsed.path), endpoint=s3_endpoint, url=url)
    raise ConfigError(f"ARGON_BACKUP_URL {url!r}: use s3://bucket/prefix or file:///path")

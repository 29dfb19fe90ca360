"""Platform secrets kept in the data directory (0600 files in a 0700 directory).

- `server.key`: 32 random bytes; derives mock SCRAM salts (unknown roles look like real ones) and
  signs console sessions.
- `passwords.key`: the Fernet key that encrypts role passwords at rest, so `reveal_password` can
  answer while the database file alone reveals nothing.
"""

from __future__ import annotations

import os
import secrets as _secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken


def _read_or_create(path: Path, make: bytes) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(make)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return make


class Secrets:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.server_key = _read_or_create(directory / "server.key", _secrets.token_bytes(32))
        self._fernet = Fernet(_read_or_create(directory / "passwords.key", Fernet.generate_key()))

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str | None:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            return None

"""API keys: random bearer tokens stored only as SHA-256 hashes, checked from memory."""

from __future__ import annotations

import hmac
import secrets
from typing import TYPE_CHECKING

from argon import model
from argon.metadata.store import Store

if TYPE_CHECKING:
    from argon.control.plane import ControlPlane

KEY_PREFIX = "argon_"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32).replace("-", "a").replace("_", "b")


class ApiKeys:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self._hashes: dict[str, model.ApiKey] = {}

    async def load(self) -> None:
        for key in await self.plane.db(self.plane.store.list_api_keys):
            self._hashes[key.key_hash] = key

    def check(self, token: str) -> bool:
        digest = Store.hash_key(token)
        # The dict lookup is by hash of a high-entropy secret; compare_digest keeps it constant-time anyway.
        found = self._hashes.get(digest)
        return found is not None and hmac.compare_digest(found.key_hash, digest)

    @property
    def empty(self) -> bool:
        return not self._hashes

    async def ensure(self, token: str, name: str) -> None:
        if not self.check(token):
            key = await self.plane.db(self.plane.store.add_api_key, name, token)
            self._hashes[key.key_hash] = key

    async def create(self, name: str) -> tuple[model.ApiKey, str]:
        token = new_key()
        key = await self.plane.db(self.plane.store.add_api_key, name, token)
        self._hashes[key.key_hash] = key
        return key, token

    def list(self) -> list[model.ApiKey]:
        return sorted(self._hashes.values(), key=lambda k: k.id)

    async def revoke(self, key_id: int) -> model.ApiKey | None:
        for digest, key in list(self._hashes.items()):
            if key.id == key_id:
                revoked = model.ApiKey(**{**key.__dict__, "revoked": True})
                await self.plane.db(self.plane.store.put, revoked)
                del self._hashes[digest]
                return revoked
        return None

"""API keys: random bearer tokens stored only as SHA-256 hashes, checked from memory.

A successful check records when the key was last used. That happens on every API request, often
on a worker thread (FastAPI runs plain dependencies in its thread pool), so the time is kept in
memory at once and written to the store at most once a minute per key, by a task scheduled on
the event loop the keys were loaded on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import secrets
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from argon import ids, model
from argon.control.plane import ControlPlane
from argon.errors import Forbidden, NotFound, Unauthorized
from argon.metadata.store import Store

KEY_PREFIX = "argon_"
USE_WRITE_EVERY = timedelta(seconds=60)  # last_used_at is written at most this often per key
USE_RESOLUTION = timedelta(seconds=1)  # last_used_at in memory moves at most this often per key


_ACCOUNT_READS = frozenset({"/api/v2/users/me", "/api/v2/users/me/organizations", "/api/v2/auth", "/api/v2/regions"})


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32).replace("-", "a").replace("_", "b")


class ApiKeys:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self._hashes: dict[str, model.ApiKey] = {}
        self._written: dict[int, datetime | None] = {}  # key id -> last_used_at as the store has it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_pending = False
        self._lock = threading.Lock()  # checks run on worker threads too: a revoked key must stay gone
        self.on_revoke: list[Callable[[int], object]] = []  # e.g. the console signs out its sessions

    async def load(self) -> None:
        self._loop = asyncio.get_running_loop()
        for key in await self.plane.db(self.plane.store.list_api_keys):
            self._hashes[key.key_hash] = key
            self._written[key.id] = key.last_used_at

    def _lookup(self, token: str) -> model.ApiKey | None:
        digest = Store.hash_key(token)
        # The dict lookup is by hash of a high-entropy secret; compare_digest keeps it constant-time anyway.
        found = self._hashes.get(digest)
        return found if found is not None and hmac.compare_digest(found.key_hash, digest) else None

    def find(self, token: str) -> model.ApiKey | None:
        """The live key this token is, its use recorded; None for an unknown or revoked token."""
        found = self._lookup(token)
        if found is not None:
            self._used(found)
        return found

    def check(self, token: str) -> bool:
        return self.find(token) is not None

    def authorize(self, header: str) -> model.ApiKey:
        """The key an `Authorization: Bearer <key>` header names (the API's, the console's); raises
        `Unauthorized` with what to do otherwise."""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("authentication required: send 'Authorization: Bearer <API key>' "
                               "(the key is printed by `argon up`; `argon api-keys create` makes more)")
        key = self.find(token.strip())
        if key is None:
            raise Unauthorized("invalid API key")
        return key

    @staticmethod
    def allows(key: model.ApiKey, method: str, path: str) -> None:
        """Raise Forbidden unless `key` may make this API request. An unscoped key may do anything; a
        project-scoped one (Neon's project-scoped keys, for CI and Terraform) reaches its project's
        resources, but not the project's deletion or recovery, other projects, the project list, or
        the keys; and the account reads clients make first (users/me, auth, organizations, regions)."""
        if key.project_id is None:
            return
        base = f"/api/v2/projects/{key.project_id}"
        if path.startswith(base + "/") and path != base + "/recover":
            return
        if path == base and method != "DELETE":
            return
        if method == "GET" and path in _ACCOUNT_READS:
            return
        raise Forbidden(f"this API key is limited to project {key.project_id}: {method} {path} is outside it")

    @property
    def empty(self) -> bool:
        return not self._hashes

    async def ensure(self, token: str, name: str) -> None:
        if self._lookup(token) is None:
            key = await self.plane.db(self.plane.store.add_api_key, name, token)
            self._hashes[key.key_hash] = key
            self._written[key.id] = None

    async def create(self, name: str, project_id: str | None = None) -> tuple[model.ApiKey, str]:
        """A new key (its token is returned once); with `project_id`, one that reaches only that
        project (`allows`)."""
        name = ids.check_display_name(name.strip(), "API key")
        if project_id is not None:
            self.plane.project(project_id)  # 404 for an unknown project
        token = new_key()
        key = await self.plane.db(self.plane.store.add_api_key, name, token, project_id)
        self._hashes[key.key_hash] = key
        self._written[key.id] = None
        return key, token

    def list(self) -> list[model.ApiKey]:
        return sorted(self._hashes.values(), key=lambda k: k.id)

    def get(self, key_id: int) -> model.ApiKey:
        for key in self._hashes.values():
            if key.id == key_id:
                return key
        raise NotFound(f"API key {key_id} not found (it may have been revoked)")

    async def revoke(self, key_id: int) -> model.ApiKey | None:
        for digest, key in list(self._hashes.items()):
            if key.id == key_id:
                # Forget it before writing: a usage flush running meanwhile must not write it back unrevoked.
                with self._lock:
                    del self._hashes[digest]
                self._written.pop(key_id, None)
                revoked = dataclasses.replace(key, revoked=True)
                await self.plane.db(self.plane.store.put, revoked)
                for hook in self.on_revoke:
                    hook(key_id)
                return revoked
        return None

    # Last use ----------------------------------------------------------------------------------------

    def _used(self, key: model.ApiKey) -> None:
        now = model.utcnow()
        if key.last_used_at is not None and now - key.last_used_at < USE_RESOLUTION:
            return  # a burst of requests: the record need not be copied for each
        with self._lock:
            if key.key_hash not in self._hashes:  # revoked since it was looked up
                return
            self._hashes[key.key_hash] = dataclasses.replace(key, last_used_at=now)
        written = self._written.get(key.id)
        if written is not None and now - written < USE_WRITE_EVERY:
            return
        loop = self._loop
        if loop is None or loop.is_closed() or self._flush_pending:
            return
        self._flush_pending = True
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a worker thread: hand the write to the loop
            loop.call_soon_threadsafe(self._schedule_flush)
        else:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        self.plane.spawn(self.flush(), "recording API key use")

    async def flush(self) -> None:
        """Write the last-use times that changed since they were last written."""
        self._flush_pending = False
        for key in list(self._hashes.values()):
            if key.last_used_at is None or self._written.get(key.id, None) == key.last_used_at:
                continue
            current = self._hashes.get(key.key_hash)
            if current is None:  # revoked meanwhile: its revocation is the last word
                continue
            self._written[key.id] = current.last_used_at
            await self.plane.db(self.plane.store.put, current)

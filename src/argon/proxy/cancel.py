"""Cancel keys: the proxy's own BackendKeyData, mapped to the compute backend it stands for.

Each session gets a random (pid, secret) from the proxy (real pids are small and collide between
computes). A CancelRequest carrying such a key — in plaintext or inside TLS, on any connection —
is forwarded to the compute's socket with the real key. A pooled client's key stands for no fixed
backend: its target (`Canceller`) asks the transaction pooler which server it holds at that moment. Nothing is ever answered to the
canceller, and unknown keys are ignored silently (protocol rule; also leaks nothing). Entries live
as long as their session. In-memory for now; several proxies will share them through the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass
from typing import Protocol

from argon.wire import codec

log = logging.getLogger(__name__)

_FORWARD_TIMEOUT = 5.0


@dataclass(frozen=True)
class CancelTarget:
    socket_path: str
    pid: int
    secret: int


class Canceller(Protocol):
    async def cancel(self) -> bool:
        """Deliver the cancel; False if there was nothing to cancel."""


class CancelMap:
    def __init__(self) -> None:
        self._targets: dict[tuple[int, int], CancelTarget | Canceller] = {}

    def __len__(self) -> int:
        return len(self._targets)

    def register(self, target: CancelTarget | Canceller) -> tuple[int, int]:
        """A fresh random key (both halves positive 31-bit) for `target`."""
        while True:
            key = (secrets.randbelow(2**31 - 1) + 1, secrets.randbelow(2**31 - 1) + 1)
            if key not in self._targets:
                self._targets[key] = target
                return key

    def unregister(self, key: tuple[int, int]) -> None:
        self._targets.pop(key, None)

    def lookup(self, pid: int, secret: int) -> CancelTarget | Canceller | None:
        return self._targets.get((pid, secret))

    async def cancel(self, pid: int, secret: int) -> bool:
        """Forward a cancel for the proxy key (pid, secret). False if the key is unknown."""
        target = self.lookup(pid, secret)
        if target is None:
            return False
        if not isinstance(target, CancelTarget):
            return await target.cancel()
        try:
            await asyncio.wait_for(_send_cancel(target), _FORWARD_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            log.info("cancel request to %s failed: %s", target.socket_path, exc)
            return False
        return True


async def send_cancel(target: CancelTarget) -> None:
    """Send a CancelRequest to a compute backend and wait until Postgres has signalled it."""
    try:
        await asyncio.wait_for(_send_cancel(target), _FORWARD_TIMEOUT)
    except (TimeoutError, OSError) as exc:
        log.info("cancel request to %s failed: %s", target.socket_path, exc)


async def _send_cancel(target: CancelTarget) -> None:
    reader, writer = await asyncio.open_unix_connection(target.socket_path)
    try:
        writer.write(codec.cancel_request(target.pid, target.secret))
        await writer.drain()
        await reader.read(1)  # Postgres closes the connection once it has signalled the backend
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

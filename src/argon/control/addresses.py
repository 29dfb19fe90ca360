"""Each endpoint's own loopback addresses (ADR 0031): pure arithmetic, no sockets.

Where the Neon-form names (`ep-….argon.localhost`) do not resolve, `endpoint.host` is an address of
the endpoint's own instead, so that the strings Neon's clients build from it work with no DNS: all of
127.0.0.0/8 reaches `lo` on Linux, and binding an address in it needs no privilege.

An endpoint's *slot* `s` (0 ≤ s < `SLOTS`) gives two addresses: the direct one `127.1.X.Y` and the
pooled one `127.2.X.Y` (the `-pooler` host), with `X = s // 254` and `Y = s % 254 + 1` (never .0 or
.255, which tools treat as special). The direct address is what the metadata stores; the pooled one
follows from it. 127.0.x.x is left alone (127.0.0.1, Debian's 127.0.1.1, resolvers on 127.0.0.53).
"""

from __future__ import annotations

from collections.abc import Collection

from argon.errors import UserError

DIRECT_OCTET = 1
POOLED_OCTET = 2
_PER_X = 254
SLOTS = 256 * _PER_X  # 65,024 endpoints


def address_of(slot: int) -> str:
    """The direct address of `slot`."""
    if not 0 <= slot < SLOTS:
        raise ValueError(f"address slot {slot} is outside 0..{SLOTS - 1}")
    return f"127.{DIRECT_OCTET}.{slot // _PER_X}.{slot % _PER_X + 1}"


def slot_of(address: str | None) -> int | None:
    """The slot of a direct (or pooled) address; None for any other text."""
    if not address:
        return None
    parts = address.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        return None
    a, b, x, y = (int(p) for p in parts)
    if a != 127 or b not in (DIRECT_OCTET, POOLED_OCTET) or not (x <= 255 and 1 <= y <= _PER_X):
        return None
    return x * _PER_X + y - 1


def pooled_address(address: str) -> str:
    """The pooled (`-pooler`) address that goes with a direct one."""
    slot = slot_of(address)
    if slot is None:
        raise ValueError(f"{address!r} is not an endpoint address")
    return f"127.{POOLED_OCTET}.{slot // _PER_X}.{slot % _PER_X + 1}"


def listen_map(endpoint_id: str, address: str) -> dict[str, str]:
    """What the proxy serves for one endpoint: address -> the endpoint id a connection there names."""
    return {address: endpoint_id, pooled_address(address): endpoint_id + "-pooler"}


def next_slot(taken: Collection[int], start: int) -> int:
    """The first slot from `start` on (wrapping round once) that no live endpoint holds.

    Callers pass one past the highest slot given so far, so a deleted endpoint's address is not
    given again until the slots have gone round (a stale connection string then finds nothing
    rather than another endpoint). Raises `UserError` when every slot is taken."""
    if len(taken) >= SLOTS:
        raise UserError(f"every endpoint address is taken ({SLOTS} endpoints): delete endpoints you no longer use")
    slot = start % SLOTS
    while slot in taken:
        slot = (slot + 1) % SLOTS
    return slot

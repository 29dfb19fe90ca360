"""Postgres settings that follow from a compute's size (compute units), after Neon's figures.

One CU is 1 vCPU and 4 GB in Neon; `max_connections` scales with memory (0.25 CU -> 104,
1 CU -> 419, capped at 4000, as Neon documents). A local compute does not reserve the memory, so
`shared_buffers` stays modest: Postgres only touches the pages it uses.

`shared_buffers` is fixed at start while autoscaling moves the memory limit between the endpoint's
minimum and maximum, so it is also kept to a quarter of the memory at the minimum (Postgres's advice
for a dedicated server): a compute scaled down to its minimum still holds all of its buffers with
room for its backends, and the kernel's page cache (which it drops at the limit) is the part of the
cache that follows the size, as Neon's Local File Cache does.
"""

from __future__ import annotations

import math

MAX_CONNECTIONS_PER_CU = 419.5
MAX_CONNECTIONS_CAP = 4000


def max_connections(cu: float) -> int:
    return max(10, min(MAX_CONNECTIONS_CAP, math.floor(cu * MAX_CONNECTIONS_PER_CU + 1e-9)))


def shared_buffers_mb(cu: float, min_memory_bytes: int | None = None) -> int:
    """`shared_buffers` for a compute of at most `cu`, and at most a quarter of `min_memory_bytes`
    (the memory limit at its minimum size, when limits are enforced): never under 16 MB."""
    mb = min(1024, max(32, 128 * cu))
    if min_memory_bytes is not None:
        mb = min(mb, max(16, min_memory_bytes // 4 // 2**20))
    return int(mb)


def gucs_for_cu(cu: float, min_memory_bytes: int | None = None) -> dict[str, str]:
    """Settings for a compute whose autoscaling maximum is `cu` and whose memory limit at its
    minimum is `min_memory_bytes` (None: not limited)."""
    return {
        "max_connections": str(max_connections(cu)),
        "shared_buffers": f"{shared_buffers_mb(cu, min_memory_bytes)}MB",
        "max_worker_processes": str(max(8, math.ceil(cu * 2))),
        "effective_cache_size": f"{max(128, int(cu * 3072))}MB",
    }

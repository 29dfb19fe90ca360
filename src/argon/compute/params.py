"""Postgres settings that follow from a compute's size (compute units), after Neon's figures.

One CU is 1 vCPU and 4 GB in Neon; `max_connections` scales with memory (0.25 CU -> 104,
1 CU -> 419, capped at 4000, as Neon documents). A local compute does not reserve the memory, so
`shared_buffers` stays modest: Postgres only touches the pages it uses.
"""

from __future__ import annotations

import math

MAX_CONNECTIONS_PER_CU = 419.5
MAX_CONNECTIONS_CAP = 4000


def max_connections(cu: float) -> int:
    return max(10, min(MAX_CONNECTIONS_CAP, math.floor(cu * MAX_CONNECTIONS_PER_CU + 1e-9)))


def shared_buffers_mb(cu: float) -> int:
    return int(min(1024, max(32, 128 * cu)))


def gucs_for_cu(cu: float) -> dict[str, str]:
    """Settings for a compute whose autoscaling maximum is `cu`."""
    return {
        "max_connections": str(max_connections(cu)),
        "shared_buffers": f"{shared_buffers_mb(cu)}MB",
        "max_worker_processes": str(max(8, math.ceil(cu * 2))),
        "effective_cache_size": f"{max(128, int(cu * 3072))}MB",
    }

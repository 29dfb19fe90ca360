"""Neon API v2 shapes derived from the model (one place, used by the API, the CLI and the console).

Field names, enum values and required fields follow reference/neon-api.md §2: the `neon-api`
Python package validates required fields and enums, so every required one is always present.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from argon import model
from argon.compute.extensions import ExtensionSupport
from argon.control.connection import ConnectionParameters, endpoint_host
from argon.control.figures import BranchFigures
from argon.control.metrics import Usage
from argon.settings import Settings

PROVISIONER = "k8s-pod"
PLATFORM_ID = "local"
CREATION_SOURCE = "argon"


def ts(value: datetime | None) -> str | None:
    """RFC 3339 with second precision and Z, as Neon emits."""
    if value is None:
        return None
    return _ts(value)


@functools.lru_cache(maxsize=8192)  # the same records' times, list after list (1,000 projects: 2,000 of them)
def _ts(value: datetime) -> str:
    return value.isoformat(timespec="seconds")[:19] + "Z"  # strftime's format, 5x faster (lists of 400)


def project_view(settings: Settings, p: model.Project, *, full: bool = True,
                 compute_last_active_at: datetime | None = None, storage_bytes: int = 0,
                 written_bytes: int = 0, usage: Usage | None = None) -> dict[str, Any]:
    """Consumption fields come from the metrics sampler over its retention window (the consumption
    period); `data_transfer_bytes` is not measured and stays 0."""
    usage = usage or Usage()
    out: dict[str, Any] = {
        "id": p.id,
        "platform_id": PLATFORM_ID,
        "region_id": p.region_id,
        "name": p.name,
        "provisioner": PROVISIONER,
        "default_endpoint_settings": {
            "autoscaling_limit_min_cu": p.default_endpoint_settings.autoscaling_limit_min_cu,
            "autoscaling_limit_max_cu": p.default_endpoint_settings.autoscaling_limit_max_cu,
            "suspend_timeout_seconds": p.default_endpoint_settings.suspend_timeout_seconds,
        },
        "settings": {"allowed_ips": {"ips": list(p.settings.allowed_ips),
                                     "protected_branches_only": p.settings.protected_branches_only},
                     "enable_logical_replication": p.settings.enable_logical_replication,
                     "quota": ({"logical_size_bytes": p.settings.logical_size_limit_bytes}
                               if p.settings.logical_size_limit_bytes else {})},
        "pg_version": p.pg_version,
        "proxy_host": settings.cert_domain,
        "branch_logical_size_limit": p.settings.logical_size_limit_bytes // 2**20,  # MiB, as Neon's
        "branch_logical_size_limit_bytes": p.settings.logical_size_limit_bytes,
        "store_passwords": p.store_passwords,
        "active_time": usage.active_seconds,
        "cpu_used_sec": usage.cpu_seconds,
        "creation_source": CREATION_SOURCE,
        "history_retention_seconds": p.history_retention_seconds,
        "created_at": ts(p.created_at),
        "updated_at": ts(p.updated_at),
        "synthetic_storage_size": storage_bytes,
        "owner_id": "local",
        "org_id": None,
    }
    if compute_last_active_at is not None:
        out["compute_last_active_at"] = ts(compute_last_active_at)
    if full:
        out.update({
            "data_storage_bytes_hour": usage.storage_byte_hours, "data_transfer_bytes": 0,
            "written_data_bytes": written_bytes, "compute_time_seconds": usage.cpu_seconds,
            "active_time_seconds": usage.active_seconds,
            "consumption_period_start": ts(max(p.created_at, usage.period_start or p.created_at)),
            "consumption_period_end": ts(max(p.created_at, usage.period_end or p.created_at)),
        })
    return out


def branch_view(b: model.Branch, figures: BranchFigures | None = None, usage: Usage | None = None) -> dict[str, Any]:
    figures = figures or BranchFigures(logical_size=b.logical_size)
    usage = usage or Usage()
    return {
        "id": b.id,
        "project_id": b.project_id,
        "parent_id": b.parent_id,
        "parent_lsn": b.parent_lsn,
        "parent_timestamp": ts(b.parent_timestamp),
        "name": b.name,
        "current_state": b.state.value,
        "state_changed_at": ts(b.updated_at),
        "logical_size": figures.logical_size,
        "creation_source": CREATION_SOURCE,
        "default": b.default,
        "primary": b.default,
        "protected": b.protected,
        "cpu_used_sec": usage.cpu_seconds,
        "compute_time_seconds": usage.cpu_seconds,
        "active_time_seconds": usage.active_seconds,
        "written_data_bytes": figures.written_data_bytes,
        "data_transfer_bytes": 0,
        "init_source": b.init_source,
        "expires_at": ts(b.expires_at),
        "created_at": ts(b.created_at),
        "updated_at": ts(b.updated_at),
        **({"restored_from": b.restored_from} if b.restored_from else {}),
        **({"restore_status": b.restore_status} if b.restore_status else {}),
    }


def endpoint_view(settings: Settings, e: model.Endpoint) -> dict[str, Any]:
    out: dict[str, Any] = {
        "host": endpoint_host(settings, e),
        "id": e.id,
        "project_id": e.project_id,
        "branch_id": e.branch_id,
        "autoscaling_limit_min_cu": e.autoscaling_limit_min_cu,
        "autoscaling_limit_max_cu": e.autoscaling_limit_max_cu,
        "region_id": model.REGION_ID,
        "type": e.type.value,
        "current_state": e.current_state.value,
        "settings": {"pg_settings": dict(e.pg_settings)},
        "pooler_enabled": True,  # the -pooler host is a transaction pooler (ADR 0017)
        "pooler_mode": "transaction",
        "disabled": e.disabled,
        "passwordless_access": False,
        "creation_source": CREATION_SOURCE,
        "created_at": ts(e.created_at),
        "updated_at": ts(e.updated_at),
        "proxy_host": settings.cert_domain,
        "suspend_timeout_seconds": e.suspend_timeout_seconds,
        "provisioner": PROVISIONER,
    }
    if e.pending_state is not None:
        out["pending_state"] = e.pending_state.value
    for name in ("last_active", "started_at", "suspended_at"):
        value = getattr(e, name)
        if value is not None:
            out[name] = ts(value)
    if e.name:
        out["name"] = e.name
    return out


def role_view(r: model.Role, password: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "branch_id": r.branch_id,
        "name": r.name,
        "protected": r.protected,
        "authentication_method": "password" if r.login else "no_login",
        "created_at": ts(r.created_at),
        "updated_at": ts(r.updated_at),
    }
    if password is not None:
        out["password"] = password
    return out


def database_view(d: model.Database) -> dict[str, Any]:
    return {"id": d.id, "branch_id": d.branch_id, "name": d.name, "owner_name": d.owner_name,
            "created_at": ts(d.created_at), "updated_at": ts(d.updated_at)}


def operation_view(o: model.Operation) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": o.id, "project_id": o.project_id, "action": o.action.value, "status": o.status.value,
        "failures_count": o.failures_count, "created_at": ts(o.created_at), "updated_at": ts(o.updated_at),
        "total_duration_ms": o.total_duration_ms,
    }
    if o.branch_id:
        out["branch_id"] = o.branch_id
    if o.endpoint_id:
        out["endpoint_id"] = o.endpoint_id
    if o.error:
        out["error"] = o.error
    return out


def connection_details(params: ConnectionParameters, pooler: ConnectionParameters) -> dict[str, Any]:
    return {
        "connection_uri": params.uri,
        "connection_parameters": {
            "database": params.database, "password": params.password, "role": params.role,
            "host": params.sni_host or params.host, "pooler_host": pooler.sni_host or pooler.host,
            "port": params.port, "options": params.options,
        },
    }


def event_view(ev: model.Event) -> dict[str, Any]:
    return {"endpoint_id": ev.endpoint_id, "kind": ev.kind.value, "at": ev.at.isoformat(),
            "duration_ms": ev.duration_ms, "detail": ev.detail}


def extensions_view(pg_version: int, support: ExtensionSupport | None,
                    every: Mapping[int, ExtensionSupport] | None = None) -> dict[str, Any]:
    """What `CREATE EXTENSION` a project's roles can run (an Argon addition; Neon documents a list),
    and for each allow-listed one it cannot, the server's other versions that have it."""
    offered = support.offered if support is not None else ()
    missing = list(support.missing) if support is not None else []
    return {
        "pg_version": pg_version,
        "extensions": [{"name": o.name, "default_version": o.default_version, "comment": o.comment,
                        "trusted_by": o.trusted_by, "preloaded": o.preloaded} for o in offered],
        "not_available": missing,
        "other_versions": {name: versions for name in missing
                           if (versions := sorted(v for v, s in (every or {}).items() if name in s.names()))},
    }


def pool_view(database: str, role: str, stats: Any) -> dict[str, Any]:
    """One transaction pool, with PgBouncer's SHOW POOLS / SHOW STATS names (wait times in µs)."""
    return {
        "database": database, "user": role, "pool_mode": "transaction", "pool_size": stats.size,
        "cl_active": stats.cl_active, "cl_waiting": stats.cl_waiting, "cl_idle": stats.cl_idle,
        "sv_active": stats.sv_active, "sv_idle": stats.sv_idle, "sv_used": stats.sv_used, "sv_login": stats.sv_login,
        "maxwait": int(stats.maxwait), "maxwait_us": int(stats.maxwait * 1e6) % 1_000_000,
        "total_xact_count": stats.xact_count, "total_query_count": stats.query_count,
        "total_wait_time": int(stats.wait_time * 1e6),
        "avg_wait_time": int(stats.wait_time * 1e6 / stats.wait_count) if stats.wait_count else 0,
        "paused": stats.paused,
    }

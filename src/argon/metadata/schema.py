"""The metadata tables (SQLAlchemy Core), one per model aggregate. Alembic migrations create them.

Columns carry the model's field names; enums are stored by value, timestamps as UTC ISO text (the
same in SQLite and PostgreSQL), small nested values (endpoint settings, pg_settings) as JSON.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes stored as ISO-8601 text with microseconds (sortable, portable)."""

    impl = String(32)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> str | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the metadata store")
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def process_result_value(self, value: str | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


metadata = MetaData()

projects = Table(
    "projects", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("region_id", String(64), nullable=False),
    Column("pg_version", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("history_retention_seconds", Integer, nullable=False),
    Column("default_endpoint_settings", JSON, nullable=False),
    Column("os_uid", Integer, nullable=True, unique=True),
    Column("store_passwords", Boolean, nullable=False),
    Column("settings", JSON, nullable=False),
)

branches = Table(
    "branches", metadata,
    Column("id", String(64), primary_key=True),
    Column("project_id", String(64), nullable=False, index=True),
    Column("name", String(256), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("default", Boolean, nullable=False),
    Column("protected", Boolean, nullable=False),
    Column("state", String(16), nullable=False),
    Column("parent_id", String(64)),
    Column("parent_lsn", String(32)),
    Column("parent_timestamp", UTCDateTime),
    Column("expires_at", UTCDateTime),
    Column("init_source", String(32), nullable=False),
    Column("logical_size", Integer, nullable=False),
    Column("restored_from", String(64)),
    Column("restore_status", String(16)),
    Column("restore_target", String(64)),
    Column("backup_schedule", JSON),
)

snapshots = Table(
    "snapshots", metadata,
    Column("id", String(64), primary_key=True),
    Column("project_id", String(64), nullable=False, index=True),
    Column("name", String(256), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("source_branch_id", String(64)),
    Column("lsn", String(32)),
    Column("timestamp", UTCDateTime),
    Column("expires_at", UTCDateTime),
    Column("manual", Boolean, nullable=False),
    Column("full_size", BigInteger, nullable=False),
)

endpoints = Table(
    "endpoints", metadata,
    Column("id", String(64), primary_key=True),
    Column("project_id", String(64), nullable=False, index=True),
    Column("branch_id", String(64), nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("type", String(16), nullable=False),
    Column("autoscaling_limit_min_cu", Float, nullable=False),
    Column("autoscaling_limit_max_cu", Float, nullable=False),
    Column("suspend_timeout_seconds", Integer, nullable=False),
    Column("disabled", Boolean, nullable=False),
    Column("current_state", String(16), nullable=False),
    Column("pending_state", String(16)),
    Column("last_active", UTCDateTime),
    Column("started_at", UTCDateTime),
    Column("suspended_at", UTCDateTime),
    Column("pg_settings", JSON, nullable=False),
    Column("name", String(64)),
    Column("address", String(15)),  # the endpoint's own loopback address, 127.1.X.Y (ADR 0031)
    Index("ix_endpoints_address", "address", unique=True),
)

roles = Table(
    "roles", metadata,
    Column("branch_id", String(64), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("verifier", Text),
    Column("password_enc", Text),
    Column("protected", Boolean, nullable=False),
    Column("login", Boolean, nullable=False),
)

databases = Table(
    "databases", metadata,
    Column("id", Integer, primary_key=True),
    Column("branch_id", String(64), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("owner_name", String(128), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

operations = Table(
    "operations", metadata,
    Column("id", String(64), primary_key=True),
    Column("project_id", String(64), nullable=False, index=True),
    Column("action", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False, index=True),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("branch_id", String(64)),
    Column("endpoint_id", String(64)),
    Column("error", Text),
    Column("failures_count", Integer, nullable=False),
    Column("total_duration_ms", Integer, nullable=False),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(256), nullable=False),
    Column("key_hash", String(128), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_used_at", UTCDateTime),
    Column("revoked", Boolean, nullable=False),
    Column("project_id", String(64), nullable=True),
)

events = Table(
    "events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("endpoint_id", String(64), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("duration_ms", Float),
    Column("detail", Text, nullable=False),
)

# Monitoring samples (argon.control.metrics), kept for `metrics_retention_hours`. A row with an
# endpoint_id is a compute sample (connections, queries/s, WAL position, CPU and running time since
# the previous sample); a row without one is a branch's storage sample (bytes on disk, logical size).
metric_samples = Table(
    "metric_samples", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False, index=True),
    Column("project_id", String(64), nullable=False, index=True),
    Column("branch_id", String(64), nullable=False),
    Column("endpoint_id", String(64)),
    Column("connections", Integer),
    Column("xacts", BigInteger),
    Column("qps", Float),
    Column("wal_lsn", BigInteger),
    Column("cpu_seconds", Float),
    Column("active_seconds", Float),
    Column("storage_bytes", BigInteger),
    Column("logical_bytes", BigInteger),
    Index("ix_metric_samples_branch_at", "branch_id", "at"),
)

# Every OS uid ever given to a project's computes (when Argon runs as root). A uid is never given
# again, even after its project is deleted: a process or file it left anywhere on the host must not
# reach a new project (ADR 0016).
compute_uids = Table(
    "compute_uids", metadata,
    Column("uid", Integer, primary_key=True, autoincrement=False),
    Column("project_id", String(64), nullable=False),
    Column("allocated_at", UTCDateTime, nullable=False),
    Column("released_at", UTCDateTime),
)

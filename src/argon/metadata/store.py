"""The metadata store: the model's persistence (desired state), in SQLite (`<data>/argon.db`).

Synchronous SQLAlchemy Core. The control plane calls it from one dedicated worker thread
(`argon.control.plane`), so SQLite is never touched on the event loop and writes are serialised.
`transaction()` groups several writes atomically; outside one, each call is its own transaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import re
import threading
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Table, create_engine, event, func, select

from argon import model
from argon.metadata import schema

T = TypeVar("T")


@dataclass(frozen=True)
class MetricSample:
    """One row of `metric_samples`: a compute sample (with `endpoint_id`) or a branch's storage sample."""

    at: datetime
    project_id: str
    branch_id: str
    endpoint_id: str | None = None
    connections: int | None = None
    xacts: int | None = None  # commits + rollbacks, all databases (a counter)
    qps: float | None = None  # transactions per second since the previous sample
    wal_lsn: int | None = None  # the WAL position as a byte offset
    cpu_seconds: float | None = None  # CPU the compute used since the previous sample
    active_seconds: float | None = None  # time the compute ran since the previous sample
    storage_bytes: int | None = None  # allocated bytes of the branch's directory
    logical_bytes: int | None = None  # the size of the branch's databases


@dataclass(frozen=True)
class MetricTotals:
    """Sums over a time window: per endpoint CPU and running seconds, per branch storage samples."""

    cpu_seconds: dict[str, float]
    active_seconds: dict[str, float]
    storage_sums: dict[str, tuple[int, int]]  # branch -> (sum of storage_bytes, number of samples)

_TABLE_OF: dict[type, Table] = {
    model.Project: schema.projects,
    model.Branch: schema.branches,
    model.Endpoint: schema.endpoints,
    model.Role: schema.roles,
    model.Database: schema.databases,
    model.Operation: schema.operations,
    model.ApiKey: schema.api_keys,
    model.Snapshot: schema.snapshots,
}
_KEYS: dict[type, tuple[str, ...]] = {
    model.Role: ("branch_id", "name"),
}


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(model))


_HINTS = {cls: _resolved_types(cls) for cls in _TABLE_OF}


def _base_type(hint: Any) -> Any:
    """`X | None` -> X."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _to_row(obj: Any) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        row[f.name] = value
    return row


def _from_row(cls: type[T], row: Any) -> T:
    hints = _HINTS[cls]
    values: dict[str, Any] = {}
    mapping = row._mapping
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = mapping[f.name]
        base = _base_type(hints[f.name])
        if value is not None and isinstance(base, type):
            if issubclass(base, enum.Enum):
                value = base(value)
            elif dataclasses.is_dataclass(base):
                value = base(**value)
        values[f.name] = value
    return cls(**values)


_REVISION_LINE = re.compile(r'^(down_revision|revision)\s*=\s*["\']([^"\']+)["\']', re.MULTILINE)


def newest_revision() -> str | None:
    """The head of the migration chain, read from the revision files' text without Alembic.

    None when the chain does not have exactly one head (then `migrate` leaves it to Alembic).
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (Path(__file__).parent / "migrations" / "versions").glob("*.py"):
        found = dict(m.groups() for m in _REVISION_LINE.finditer(path.read_text()))
        if "revision" in found:
            revisions.add(found["revision"])
        if "down_revision" in found:
            parents.add(found["down_revision"])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url, future=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._local = threading.local()

    @classmethod
    def sqlite(cls, path: Path) -> Store:
        return cls(f"sqlite:///{path}")

    # Schema ----------------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent); the next release adds revisions.

        A store already at the newest revision (every start but the first after an upgrade) is
        told so by one query: Alembic, a second or more of CPU to import, is loaded only when
        there is something to upgrade.
        """
        if self.schema_revision() == newest_revision():
            return
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def schema_revision(self) -> str | None:
        with self.engine.connect() as conn:
            try:
                return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
            except Exception:
                return None

    def close(self) -> None:
        self.engine.dispose()

    # Transactions ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if getattr(self._local, "conn", None) is not None:
            yield
            return
        with self.engine.begin() as conn:
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Connection]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
        else:
            with self.engine.begin() as conn:
                yield conn

    # Generic access ----------------------------------------------------------------------------------

    def put(self, obj: Any) -> None:
        """Insert or replace one model object."""
        cls = type(obj)
        table = _TABLE_OF[cls]
        keys = _KEYS.get(cls, ("id",))
        row = _to_row(obj)
        where = [table.c[k] == row[k] for k in keys]
        with self._conn() as conn:
            updated = conn.execute(table.update().where(*where).values(**row)).rowcount
            if not updated:
                conn.execute(table.insert().values(**row))

    def delete(self, obj: Any) -> None:
        cls = type(obj)
        table = _TABLE_OF[cls]
        keys = _KEYS.get(cls, ("id",))
        with self._conn() as conn:
            conn.execute(table.delete().where(*[table.c[k] == getattr(obj, k) for k in keys]))

    def _get(self, cls: type[T], **where: Any) -> T | None:
        table = _TABLE_OF[cls]
        with self._conn() as conn:
            row = conn.execute(select(table).where(*[table.c[k] == v for k, v in where.items()])).first()
        return _from_row(cls, row) if row is not None else None

    def _list(self, cls: type[T], *conditions: Any, order: Any = None, limit: int | None = None) -> list[T]:
        table = _TABLE_OF[cls]
        query = select(table).where(*conditions)
        if order is not None:
            query = query.order_by(*order) if isinstance(order, tuple) else query.order_by(order)
        if limit is not None:
            query = query.limit(limit)
        with self._conn() as conn:
            return [_from_row(cls, row) for row in conn.execute(query)]

    # Projects ------------------------------------------------------------------------------------------

    def get_project(self, project_id: str) -> model.Project | None:
        return self._get(model.Project, id=project_id)

    def list_projects(self, *, limit: int | None = None, after: tuple[datetime, str] | None = None,
                      search: str | None = None) -> list[model.Project]:
        t = schema.projects
        cond = []
        if after is not None:
            ts, pid = after
            cond.append((t.c.created_at > ts) | ((t.c.created_at == ts) & (t.c.id > pid)))
        if search:
            like = f"%{search}%"
            cond.append(t.c.name.like(like) | t.c.id.like(like))
        return self._list(model.Project, *cond, order=(t.c.created_at, t.c.id), limit=limit)

    def used_uids(self) -> set[int]:
        with self._conn() as conn:
            return {r[0] for r in conn.execute(select(schema.projects.c.os_uid)) if r[0] is not None}

    def allocate_uid(self, base: int, count: int, project_id: str, now: datetime) -> int | None:
        """The next uid of [base, base + count), above every uid of the range ever given to a project
        (and every one a project holds: data from before uids were recorded), recorded as given to
        `project_id`; None when the range is used up. A uid is never given twice (ADR 0016)."""
        t = schema.compute_uids
        with self.transaction(), self._conn() as conn:
            recorded = conn.execute(select(func.max(t.c.uid)).where(t.c.uid >= base, t.c.uid < base + count)).scalar()
            p = schema.projects.c.os_uid  # the highest one held, in SQL: not every project's row per create
            held = conn.execute(select(func.max(p)).where(p >= base, p < base + count)).scalar()
            uid = max([base, *(u + 1 for u in (recorded, held) if u is not None)])
            if uid >= base + count:
                return None
            conn.execute(t.insert().values(uid=uid, project_id=project_id, allocated_at=now))
            return uid

    def release_uid(self, uid: int, now: datetime) -> None:
        """Note that `uid`'s project is gone (the uid stays taken)."""
        t = schema.compute_uids
        with self._conn() as conn:
            conn.execute(t.update().where(t.c.uid == uid).values(released_at=now))

    # Branches, endpoints ---------------------------------------------------------------------------------

    def get_branch(self, branch_id: str) -> model.Branch | None:
        return self._get(model.Branch, id=branch_id)

    def load_view(self) -> tuple[list[model.Project], list[model.Branch], list[model.Role], list[model.Endpoint]]:
        """Every project, branch, role and endpoint: one query per table (the control plane's view
        at start-up), each oldest first."""
        with self.transaction():  # one snapshot of the four tables
            return (self.list_projects(),
                    self._list(model.Branch, order=(schema.branches.c.created_at, schema.branches.c.id)),
                    self._list(model.Role, order=(schema.roles.c.created_at, schema.roles.c.name)),
                    self._list(model.Endpoint, order=(schema.endpoints.c.created_at, schema.endpoints.c.id)))

    def list_branches(self, project_id: str) -> list[model.Branch]:
        t = schema.branches
        return self._list(model.Branch, t.c.project_id == project_id, order=(t.c.created_at, t.c.id))

    def get_endpoint(self, endpoint_id: str) -> model.Endpoint | None:
        return self._get(model.Endpoint, id=endpoint_id)

    def list_endpoints(self, project_id: str | None = None, branch_id: str | None = None) -> list[model.Endpoint]:
        t = schema.endpoints
        cond = []
        if project_id is not None:
            cond.append(t.c.project_id == project_id)
        if branch_id is not None:
            cond.append(t.c.branch_id == branch_id)
        return self._list(model.Endpoint, *cond, order=(t.c.created_at, t.c.id))

    # Roles, databases -------------------------------------------------------------------------------------

    def get_role(self, branch_id: str, name: str) -> model.Role | None:
        return self._get(model.Role, branch_id=branch_id, name=name)

    def list_roles(self, branch_id: str) -> list[model.Role]:
        t = schema.roles
        return self._list(model.Role, t.c.branch_id == branch_id, order=(t.c.created_at, t.c.name))

    def get_database(self, branch_id: str, name: str) -> model.Database | None:
        return self._get(model.Database, branch_id=branch_id, name=name)

    def list_databases(self, branch_id: str) -> list[model.Database]:
        t = schema.databases
        return self._list(model.Database, t.c.branch_id == branch_id, order=(t.c.created_at, t.c.id))

    def next_database_id(self) -> int:
        with self._conn() as conn:
            current = conn.execute(select(func.max(schema.databases.c.id))).scalar()
        return int(current or 0) + 1

    # Operations ---------------------------------------------------------------------------------------------

    def get_operation(self, operation_id: str) -> model.Operation | None:
        return self._get(model.Operation, id=operation_id)

    def list_operations(self, project_id: str, *, limit: int | None = None,
                        before: tuple[datetime, str] | None = None) -> list[model.Operation]:
        """Newest first; `before` is the (created_at, id) of the last item of the previous page."""
        t = schema.operations
        cond = [t.c.project_id == project_id]
        if before is not None:
            ts, oid = before
            cond.append((t.c.created_at < ts) | ((t.c.created_at == ts) & (t.c.id < oid)))
        return self._list(model.Operation, *cond, order=(t.c.created_at.desc(), t.c.id.desc()), limit=limit)

    def unfinished_operations(self) -> list[model.Operation]:
        t = schema.operations
        return self._list(model.Operation, t.c.status.in_(["scheduling", "running", "cancelling"]))

    def list_snapshots(self, project_id: str) -> list[model.Snapshot]:
        t = schema.snapshots
        return self._list(model.Snapshot, t.c.project_id == project_id, order=(t.c.created_at, t.c.id))

    def list_all_snapshots(self) -> list[model.Snapshot]:
        t = schema.snapshots
        return self._list(model.Snapshot, order=(t.c.created_at, t.c.id))

    def get_snapshot(self, snapshot_id: str) -> model.Snapshot | None:
        return self._get(model.Snapshot, id=snapshot_id)

    def delete_branch_rows(self, branch_id: str) -> None:
        """Remove a branch with its roles, databases, endpoints and their events (metadata only)."""
        with self._conn() as conn:
            endpoint_ids = [r[0] for r in conn.execute(
                select(schema.endpoints.c.id).where(schema.endpoints.c.branch_id == branch_id))]
            if endpoint_ids:
                conn.execute(schema.events.delete().where(schema.events.c.endpoint_id.in_(endpoint_ids)))
            conn.execute(schema.metric_samples.delete().where(schema.metric_samples.c.branch_id == branch_id))
            conn.execute(schema.endpoints.delete().where(schema.endpoints.c.branch_id == branch_id))
            conn.execute(schema.roles.delete().where(schema.roles.c.branch_id == branch_id))
            conn.execute(schema.databases.delete().where(schema.databases.c.branch_id == branch_id))
            conn.execute(schema.branches.delete().where(schema.branches.c.id == branch_id))

    def delete_project_rows(self, project_id: str) -> None:
        """Remove a project and everything under it (metadata only)."""
        with self._conn() as conn:
            branch_ids = [r[0] for r in conn.execute(
                select(schema.branches.c.id).where(schema.branches.c.project_id == project_id))]
            endpoint_ids = [r[0] for r in conn.execute(
                select(schema.endpoints.c.id).where(schema.endpoints.c.project_id == project_id))]
            if branch_ids:
                conn.execute(schema.roles.delete().where(schema.roles.c.branch_id.in_(branch_ids)))
                conn.execute(schema.databases.delete().where(schema.databases.c.branch_id.in_(branch_ids)))
            if endpoint_ids:
                conn.execute(schema.events.delete().where(schema.events.c.endpoint_id.in_(endpoint_ids)))
            conn.execute(schema.metric_samples.delete().where(schema.metric_samples.c.project_id == project_id))
            conn.execute(schema.endpoints.delete().where(schema.endpoints.c.project_id == project_id))
            conn.execute(schema.branches.delete().where(schema.branches.c.project_id == project_id))
            conn.execute(schema.snapshots.delete().where(schema.snapshots.c.project_id == project_id))
            conn.execute(schema.operations.delete().where(schema.operations.c.project_id == project_id))
            conn.execute(schema.projects.delete().where(schema.projects.c.id == project_id))

    # API keys -------------------------------------------------------------------------------------------------

    @staticmethod
    def hash_key(key: str) -> str:
        """API keys are high-entropy random strings, so a plain SHA-256 is a sufficient at-rest hash."""
        return hashlib.sha256(key.encode()).hexdigest()

    def add_api_key(self, name: str, key: str, project_id: str | None = None) -> model.ApiKey:
        with self._conn() as conn:
            current = conn.execute(select(func.max(schema.api_keys.c.id))).scalar()
            api_key = model.ApiKey(id=int(current or 0) + 1, name=name, key_hash=self.hash_key(key),
                                   created_at=model.utcnow(), project_id=project_id)
            conn.execute(schema.api_keys.insert().values(**_to_row(api_key)))
        return api_key

    def find_api_key(self, key: str) -> model.ApiKey | None:
        found = self._get(model.ApiKey, key_hash=self.hash_key(key))
        return found if found is not None and not found.revoked else None

    def list_api_keys(self) -> list[model.ApiKey]:
        t = schema.api_keys
        return self._list(model.ApiKey, t.c.revoked.is_(False), order=t.c.id)

    def get_api_key(self, key_id: int) -> model.ApiKey | None:
        return self._get(model.ApiKey, id=key_id)

    # Events ---------------------------------------------------------------------------------------------------

    def add_event(self, ev: model.Event) -> None:
        self.add_events([ev])

    def add_events(self, events: list[model.Event]) -> None:
        """Append events, all in one statement (one transaction)."""
        if not events:
            return
        with self._conn() as conn:
            conn.execute(schema.events.insert(), [
                {"endpoint_id": ev.endpoint_id, "kind": ev.kind.value, "at": ev.at, "duration_ms": ev.duration_ms,
                 "detail": ev.detail} for ev in events])

    def list_events(self, endpoint_id: str, limit: int = 200) -> list[model.Event]:
        t = schema.events
        with self._conn() as conn:
            rows = conn.execute(select(t).where(t.c.endpoint_id == endpoint_id).order_by(t.c.seq.desc()).limit(limit))
            return [model.Event(endpoint_id=r.endpoint_id, kind=model.EventKind(r.kind), at=r.at,
                                duration_ms=r.duration_ms, detail=r.detail) for r in rows]


    def events_since(self, endpoint_ids: Sequence[str], since: datetime) -> list[model.Event]:
        """The events of these endpoints at or after `since`, oldest first."""
        t = schema.events
        if not endpoint_ids:
            return []
        with self._conn() as conn:
            rows = conn.execute(select(t).where(t.c.endpoint_id.in_(list(endpoint_ids)), t.c.at >= since)
                                .order_by(t.c.at, t.c.seq))
            return [model.Event(endpoint_id=r.endpoint_id, kind=model.EventKind(r.kind), at=r.at,
                                duration_ms=r.duration_ms, detail=r.detail) for r in rows]

    # Monitoring samples -----------------------------------------------------------------------------------

    def add_metric_samples(self, samples: Sequence[MetricSample]) -> None:
        if samples:
            with self._conn() as conn:
                conn.execute(schema.metric_samples.insert(), [dataclasses.asdict(s) for s in samples])

    def metric_samples(self, project_id: str, since: datetime) -> list[MetricSample]:
        """A project's samples at or after `since`, oldest first."""
        t = schema.metric_samples
        names = [f.name for f in dataclasses.fields(MetricSample)]
        with self._conn() as conn:
            rows = conn.execute(select(*(t.c[n] for n in names))
                                .where(t.c.project_id == project_id, t.c.at >= since).order_by(t.c.at, t.c.seq))
            return [MetricSample(**r._asdict()) for r in rows]

    def latest_storage_samples(self) -> dict[str, MetricSample]:
        """Each branch's newest storage sample (the sampler resumes from them after a restart)."""
        t = schema.metric_samples
        names = [f.name for f in dataclasses.fields(MetricSample)]
        newest = select(func.max(t.c.seq)).where(t.c.endpoint_id.is_(None)).group_by(t.c.branch_id)
        with self._conn() as conn:
            rows = conn.execute(select(*(t.c[n] for n in names)).where(t.c.seq.in_(newest.scalar_subquery())))
            return {r.branch_id: MetricSample(**r._asdict()) for r in rows}

    def metric_totals(self, since: datetime) -> MetricTotals:
        t = schema.metric_samples
        with self._conn() as conn:
            per_endpoint = conn.execute(
                select(t.c.endpoint_id, func.sum(t.c.cpu_seconds), func.sum(t.c.active_seconds))
                .where(t.c.at >= since, t.c.endpoint_id.is_not(None)).group_by(t.c.endpoint_id)).all()
            per_branch = conn.execute(
                select(t.c.branch_id, func.sum(t.c.storage_bytes), func.count(t.c.storage_bytes))
                .where(t.c.at >= since, t.c.endpoint_id.is_(None)).group_by(t.c.branch_id)).all()
        return MetricTotals(cpu_seconds={r[0]: float(r[1] or 0) for r in per_endpoint},
                            active_seconds={r[0]: float(r[2] or 0) for r in per_endpoint},
                            storage_sums={r[0]: (int(r[1] or 0), int(r[2] or 0)) for r in per_branch})

    def delete_metric_samples_before(self, cutoff: datetime) -> int:
        with self._conn() as conn:
            return int(conn.execute(schema.metric_samples.delete().where(schema.metric_samples.c.at < cutoff)).rowcount)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; survives kill -9
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()

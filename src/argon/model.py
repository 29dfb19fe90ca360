"""THE data model: projects, branches, endpoints, roles, databases, operations, API keys, events.

Frozen dataclasses; the API shapes (Neon's), CLI output and console views are derived from these in
`argon.api.views`, never redeclared. States are Enums with Neon's stable string values, and state
changes of an endpoint go through `ComputeState.check_transition`.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

DEFAULT_SUSPEND_TIMEOUT = 300  # seconds; Neon's default (0 in the API means "use this")
MAX_SUSPEND_TIMEOUT = 604800  # one week
DEFAULT_HISTORY_RETENTION = 86400
MAX_HISTORY_RETENTION = 2592000
DEFAULT_BRANCH_NAME = "main"
DEFAULT_DATABASE_NAME = "neondb"
DEFAULT_CU = 0.25
PLATFORM_ROLE = "cloud_admin"  # the platform's own superuser; never listed, never reachable via the proxy
NEON_SUPERUSER = "neon_superuser"  # the group of the roles made through the API (Neon's name); never listed
REGION_ID = "local"  # one region per installation; its id is a setting in a later release


def utcnow() -> datetime:
    return datetime.now(UTC)


class ComputeState(enum.Enum):
    """Neon's endpoint states: `init` (never started), `active` (running), `idle` (suspended)."""

    INIT = "init"
    ACTIVE = "active"
    IDLE = "idle"

    def check_transition(self, new: ComputeState) -> ComputeState:
        if new is ComputeState.INIT and self is not ComputeState.INIT:
            raise ValueError(f"an endpoint cannot go back to init from {self.value}")
        return new


class BranchState(enum.Enum):
    INIT = "init"
    READY = "ready"
    RESETTING = "resetting"
    ARCHIVED = "archived"


class EndpointType(enum.Enum):
    READ_WRITE = "read_write"
    READ_ONLY = "read_only"


class OperationAction(enum.Enum):
    """Only values the `neon-api` Python package accepts (22 of them); we use a handful."""

    CREATE_COMPUTE = "create_compute"
    CREATE_TIMELINE = "create_timeline"
    START_COMPUTE = "start_compute"
    SUSPEND_COMPUTE = "suspend_compute"
    APPLY_CONFIG = "apply_config"
    CHECK_AVAILABILITY = "check_availability"
    DELETE_TIMELINE = "delete_timeline"
    CREATE_BRANCH = "create_branch"
    APPLY_STORAGE_CONFIG = "apply_storage_config"
    SYNC_DBS_AND_ROLES_FROM_COMPUTE = "sync_dbs_and_roles_from_compute"


class OperationStatus(enum.Enum):
    SCHEDULING = "scheduling"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    ERROR = "error"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def terminal(self) -> bool:
        return self not in (OperationStatus.SCHEDULING, OperationStatus.RUNNING, OperationStatus.CANCELLING)


class EventKind(enum.Enum):
    WAKE = "wake"
    SUSPEND = "suspend"
    START_FAILED = "start_failed"
    ADOPTED = "adopted"
    AUTOSCALE = "autoscale"  # its CPU and memory limits moved (autoscaling, or a PATCH of its limits)
    OOM_KILL = "oom_kill"  # the kernel killed one of its processes at its memory limit
    WRITES_REFUSED = "writes_refused"  # at its project's size limit, or the platform's disk at its reserve
    WRITES_ALLOWED = "writes_allowed"  # back under the limit and above the reserve


@dataclass(frozen=True)
class EndpointSettings:
    """Compute settings a project gives its new endpoints (Neon's `default_endpoint_settings`)."""

    autoscaling_limit_min_cu: float = DEFAULT_CU
    autoscaling_limit_max_cu: float = DEFAULT_CU
    suspend_timeout_seconds: int = 0


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_allowed_ip(entry: str) -> tuple[IpAddress, IpAddress]:
    """One `allowed_ips` entry as the first and last address it admits: a single address
    (`203.0.113.7`), a range (`203.0.113.1-203.0.113.9`) or a CIDR network (`203.0.113.0/24`), as
    Neon takes them. Raises ValueError with a sentence for the user."""
    text = entry.strip()
    try:
        if "/" in text:
            net = ipaddress.ip_network(text, strict=False)
            return net[0], net[-1]
        if "-" in text:
            a, b = (ipaddress.ip_address(part.strip()) for part in text.split("-", 1))
            if a.version != b.version or a > b:
                raise ValueError
            return a, b
        one = ipaddress.ip_address(text)
        return one, one
    except ValueError:
        raise ValueError(f"{entry!r} is not an IP address, a range (a-b) or a CIDR network") from None


def ip_allowed(entries: tuple[str, ...], peer_ip: str) -> bool:
    """Whether `peer_ip` is admitted by an allow-list (an empty list admits everyone). An IPv4
    address mapped into IPv6 (`::ffff:a.b.c.d`) counts as the IPv4 address; a zone id is dropped."""
    if not entries:
        return True
    try:
        ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return False  # not an address (a Unix socket peer): no entry can name it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for entry in entries:
        lo, hi = parse_allowed_ip(entry)
        if lo.version == ip.version and lo <= ip <= hi:  # type: ignore[operator]
            return True
    return False


@dataclass(frozen=True)
class ProjectSettings:
    """Neon's `project.settings` that Argon acts on (the API refuses the others with a 400).

    `allowed_ips`: single addresses, `a-b` ranges or CIDR networks the proxy lets in (empty = all);
    with `protected_branches_only` the list guards only the endpoints of protected branches.
    `enable_logical_replication`: computes run with `wal_level = logical` (once on, never off).
    `logical_size_limit_bytes` (Neon's `quota.logical_size_bytes`): each branch's logical size at
    which its compute refuses writes (0: no limit; ADR 0025)."""

    allowed_ips: tuple[str, ...] = ()
    protected_branches_only: bool = False
    enable_logical_replication: bool = False
    logical_size_limit_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_ips", tuple(self.allowed_ips))  # JSON gives a list

    def guards(self, branch: Branch) -> tuple[str, ...]:
        """The allow-list in force for the endpoints of `branch` (empty: everyone may connect)."""
        if self.protected_branches_only and not branch.protected:
            return ()
        return self.allowed_ips


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    region_id: str
    pg_version: int
    created_at: datetime
    updated_at: datetime
    history_retention_seconds: int = DEFAULT_HISTORY_RETENTION
    default_endpoint_settings: EndpointSettings = field(default_factory=EndpointSettings)
    os_uid: int | None = None  # the OS user its computes run as (None: argon's own user)
    store_passwords: bool = True
    settings: ProjectSettings = field(default_factory=ProjectSettings)

    def replace(self, **changes: Any) -> Project:
        return dataclasses.replace(self, updated_at=utcnow(), **changes)


@dataclass(frozen=True)
class Branch:
    id: str
    project_id: str
    name: str
    created_at: datetime
    updated_at: datetime
    default: bool = False
    protected: bool = False
    state: BranchState = BranchState.READY
    parent_id: str | None = None
    parent_lsn: str | None = None
    parent_timestamp: datetime | None = None
    expires_at: datetime | None = None
    init_source: str = "parent-data"
    logical_size: int = 0
    restored_from: str | None = None  # the snapshot this branch's data came from (Neon's field)
    restore_status: str | None = None  # "restored" (a preview, until finalized) or "finalized"
    restore_target: str | None = None  # a preview: the branch `finalize_restore` swaps it in for
    backup_schedule: list[dict[str, Any]] | None = None  # Neon's BackupSchedule items (`argon.control.schedules`)

    def replace(self, **changes: Any) -> Branch:
        return dataclasses.replace(self, updated_at=utcnow(), **changes)


@dataclass(frozen=True)
class Snapshot:
    """A named, restorable copy of a branch at one point (Neon's snapshots, ADR 0028)."""

    id: str
    project_id: str
    name: str
    created_at: datetime
    updated_at: datetime
    source_branch_id: str | None = None
    lsn: str | None = None
    timestamp: datetime | None = None
    expires_at: datetime | None = None
    manual: bool = True
    full_size: int = 0

    def replace(self, **changes: Any) -> Snapshot:
        return dataclasses.replace(self, updated_at=utcnow(), **changes)


@dataclass(frozen=True)
class Endpoint:
    id: str
    project_id: str
    branch_id: str
    created_at: datetime
    updated_at: datetime
    type: EndpointType = EndpointType.READ_WRITE
    autoscaling_limit_min_cu: float = DEFAULT_CU
    autoscaling_limit_max_cu: float = DEFAULT_CU
    suspend_timeout_seconds: int = 0  # 0 = platform default, -1 = never
    disabled: bool = False
    current_state: ComputeState = ComputeState.INIT
    pending_state: ComputeState | None = None
    last_active: datetime | None = None
    started_at: datetime | None = None
    suspended_at: datetime | None = None
    pg_settings: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    address: str | None = None  # its own loopback address, 127.1.X.Y (ADR 0031); given at creation, kept for life

    def replace(self, **changes: Any) -> Endpoint:
        if "current_state" in changes:
            self.current_state.check_transition(changes["current_state"])
        return dataclasses.replace(self, updated_at=utcnow(), **changes)

    def effective_suspend_timeout(self, platform_default: int) -> int | None:
        """Seconds of idleness before suspend, or None for never."""
        if self.suspend_timeout_seconds < 0:
            return None
        return self.suspend_timeout_seconds or platform_default


@dataclass(frozen=True)
class Role:
    branch_id: str
    name: str
    created_at: datetime
    updated_at: datetime
    verifier: str | None = None  # SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>, as in pg_authid
    password_enc: str | None = None  # the password, encrypted at rest (None: unknown, e.g. set via SQL)
    protected: bool = False
    login: bool = True

    def replace(self, **changes: Any) -> Role:
        return dataclasses.replace(self, updated_at=utcnow(), **changes)


@dataclass(frozen=True)
class Database:
    id: int
    branch_id: str
    name: str
    owner_name: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Operation:
    id: str
    project_id: str
    action: OperationAction
    status: OperationStatus
    created_at: datetime
    updated_at: datetime
    branch_id: str | None = None
    endpoint_id: str | None = None
    error: str | None = None
    failures_count: int = 0
    total_duration_ms: int = 0

    def replace(self, **changes: Any) -> Operation:
        return dataclasses.replace(self, updated_at=utcnow(), **changes)


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    key_hash: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked: bool = False
    project_id: str | None = None  # a project-scoped key reaches only that project's resources


@dataclass(frozen=True)
class Event:
    """Something that happened to a compute, kept for the console's charts and `argon logs`."""

    endpoint_id: str
    kind: EventKind
    at: datetime
    duration_ms: float | None = None
    detail: str = ""

"""The Postgres settings a tenant may give a compute (Neon's endpoint `settings.pg_settings`).

An allow-list, each entry with the values it takes: what tunes the tenant's own queries, sessions,
planner, logging and autovacuum. Nothing that reaches the host or the platform is on it (paths,
`archive_command`, `shared_preload_libraries`, `ssl_*`, listen addresses, authentication, WAL and
replication, `max_connections`/`shared_buffers`/`temp_file_limit`, which follow the compute's size,
`default_transaction_read_only`, which backups use): those are refused with a 400 naming them.

Values are checked here, not by the compute, because a value Postgres rejects in `postgresql.conf`
stops the compute from starting; a running compute reads the file back (`pg_file_settings`) before
it is reloaded, as a second check. `live` settings take effect at a reload (`user`, `superuser`
and `sighup` contexts in `pg_settings`); the rest (`postmaster`) at the compute's next start.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from argon.compute.binaries import PgInstall

INT_MAX = 2147483647
_MEMORY_UNITS = {"B": 1 / 1024, "kB": 1, "MB": 1024, "GB": 1024**2, "TB": 1024**3}
_TIME_UNITS = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_BOOLS = {"on", "off", "true", "false", "yes", "no", "1", "0"}


@dataclass(frozen=True)
class Setting:
    kind: str  # memory | time | int | real | bool | enum | timezone
    live: bool = True  # False: applied at the compute's next start (postmaster context)
    low: float = 0
    high: float = INT_MAX
    unit: str = ""  # the unit of a bare number: kB, 8kB, ms, s
    choices: tuple[str, ...] = ()

    def check(self, name: str, value: str) -> str:
        """The value as it goes into postgresql.conf, or ValueError saying what the setting takes."""
        if self.kind == "bool":
            if value.lower() not in _BOOLS:
                raise ValueError(f"{name} must be on or off, not {value!r}")
            return value.lower()
        if self.kind == "enum":
            if value.lower() not in self.choices:
                raise ValueError(f"{name} must be one of {', '.join(self.choices)}, not {value!r}")
            return value.lower()
        if self.kind == "timezone":
            if value not in _timezones():
                raise ValueError(f"{name} must be a time zone name such as UTC or Europe/Berlin, not {value!r}")
            return value
        match = _NUMBER.match(value)
        if match is None:
            raise ValueError(f"{name} must be a number{self._units_hint()}, not {value!r}")
        number, unit = float(match.group(1)), match.group(2)
        if self.kind in ("int", "real"):
            if unit:
                raise ValueError(f"{name} takes a plain number, not {value!r}")
            if self.kind == "int" and not number.is_integer():
                raise ValueError(f"{name} must be a whole number, not {value!r}")
            base = number
        else:
            units = _MEMORY_UNITS if self.kind == "memory" else _TIME_UNITS
            if unit and unit not in units:
                raise ValueError(f"{name}: unknown unit {unit!r}; use {', '.join(units)}")
            base = self._in_base_unit(number, unit, units)
        if not self.low <= base <= self.high:
            raise ValueError(f"{name} must be between {self._show(self.low)} and {self._show(self.high)}, "
                             f"not {value!r}")
        return value.strip()

    def _in_base_unit(self, number: float, unit: str, units: Mapping[str, float]) -> float:
        per_unit = {"8kB": 8, "kB": 1, "ms": 1, "s": 1000}[self.unit]
        return number if not unit else number * units[unit] / per_unit

    def _show(self, base: float) -> str:
        if base < 0 or self.kind in ("int", "real"):
            return f"{base:g}"
        if self.kind == "memory":
            kb = base * (8 if self.unit == "8kB" else 1)
            return f"{kb / 1024**2:g}GB" if kb >= 1024**2 else f"{kb / 1024:g}MB" if kb >= 1024 else f"{kb:g}kB"
        ms = base * (1000 if self.unit == "s" else 1)
        return f"{ms / 3_600_000:g}h" if ms >= 3_600_000 else f"{ms / 1000:g}s" if ms >= 1000 else f"{ms:g}ms"

    def _units_hint(self) -> str:
        return {"memory": " with a unit (kB, MB, GB)", "time": " with a unit (ms, s, min, h, d)"}.get(self.kind, "")


def _memory(low_kb: float, high_kb: float, unit: str = "kB", live: bool = True) -> Setting:
    per = 8 if unit == "8kB" else 1
    return Setting("memory", live, low_kb / per, high_kb / per, unit)


def _time(low: float = 0, high: float = INT_MAX, unit: str = "ms", live: bool = True) -> Setting:
    return Setting("time", live, low, high, unit)


_GB = 1024**2  # in kB
TENANT_SETTINGS: dict[str, Setting] = {
    # Memory of the tenant's own queries (the compute's cgroup bounds what they can take).
    "work_mem": _memory(64, 2 * _GB),
    "maintenance_work_mem": _memory(1024, 2 * _GB),
    "temp_buffers": _memory(800, 1 * _GB, "8kB"),
    "hash_mem_multiplier": Setting("real", low=1, high=1000),
    # Timeouts.
    "statement_timeout": _time(),
    "lock_timeout": _time(),
    "idle_in_transaction_session_timeout": _time(),
    "idle_session_timeout": _time(),
    "deadlock_timeout": _time(1),
    # Locale-free formatting.
    "timezone": Setting("timezone"),
    "datestyle": Setting("enum", choices=tuple(f"{o}, {d}" for o in ("iso", "sql", "postgres", "german")
                                               for d in ("mdy", "dmy", "ymd"))),
    "intervalstyle": Setting("enum", choices=("postgres", "postgres_verbose", "sql_standard", "iso_8601")),
    # Planner.
    "random_page_cost": Setting("real", high=1e10),
    "seq_page_cost": Setting("real", high=1e10),
    "effective_cache_size": _memory(8, 64 * 1024 * _GB, "8kB"),
    "default_statistics_target": Setting("int", low=1, high=10000),
    "jit": Setting("bool"),
    "max_parallel_workers_per_gather": Setting("int", high=64),
    # Transactions.
    "synchronous_commit": Setting("enum", choices=("on", "off", "local", "remote_write", "remote_apply")),
    "default_transaction_isolation": Setting("enum", choices=("serializable", "repeatable read", "read committed",
                                                              "read uncommitted")),
    # Logging into the compute's own log.
    "log_min_duration_statement": _time(-1),
    "log_statement": Setting("enum", choices=("none", "ddl", "mod", "all")),
    "log_lock_waits": Setting("bool"),
    "log_temp_files": _memory(-1, INT_MAX),
    "track_io_timing": Setting("bool"),
    "track_functions": Setting("enum", choices=("none", "pl", "all")),
    "pg_stat_statements.track": Setting("enum", choices=("none", "top", "all")),
    # Autovacuum.
    "autovacuum_vacuum_scale_factor": Setting("real", high=100),
    "autovacuum_analyze_scale_factor": Setting("real", high=100),
    "autovacuum_naptime": _time(1, 2147483, "s"),
    "autovacuum_vacuum_cost_limit": Setting("int", low=-1, high=10000),
    # At the next start: shared memory of the tenant's own compute, within bounds.
    "max_prepared_transactions": Setting("int", live=False, high=1000),
    "max_locks_per_transaction": Setting("int", live=False, low=10, high=10000),
    "pg_stat_statements.max": Setting("int", live=False, low=100, high=100000),
}


@cache
def _timezones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones() | {"UTC", "GMT"})


def check(settings: Mapping[str, Any] | None) -> dict[str, str]:
    """Validated `pg_settings` (names lower-cased, values as strings). ValueError names the first
    setting that is not on the list or has a value its setting does not take."""
    out: dict[str, str] = {}
    for raw, value in (settings or {}).items():
        name = str(raw).strip().lower()
        setting = TENANT_SETTINGS.get(name)
        if setting is None:
            raise ValueError(f"{raw}: Argon does not let a compute's settings change this parameter; "
                             f"the ones it takes: {', '.join(sorted(TENANT_SETTINGS))}")
        if isinstance(value, bool):
            value = "on" if value else "off"
        if not isinstance(value, str | int | float):
            raise ValueError(f"{raw} must be a string or a number")
        out[name] = setting.check(name, str(value))
    return out


SYSTEM_ZONES = Path("/usr/share/zoneinfo")  # a build --with-system-tzdata (Debian's) reads these


def zone_dir(install: PgInstall) -> Path | None:
    """The time zone files `install` reads: its own `share/timezone`, else the system's."""
    for candidate in (install.bindir.parent / "share" / "timezone", SYSTEM_ZONES):
        if candidate.is_dir():
            return candidate
    return None


def check_for(settings: Mapping[str, str], install: PgInstall) -> None:
    """What only the installation can say: that it has the time zone (Python's database, which
    `check` uses, may hold a zone a Postgres build lacks, and an unknown zone stops a start)."""
    name = settings.get("timezone")
    zones = zone_dir(install) if name is not None else None
    if name is not None and zones is not None and not (zones / name).is_file():
        raise ValueError(f"timezone: PostgreSQL {install.major} on this server has no time zone {name!r}")


def split_live(names: list[str]) -> tuple[list[str], list[str]]:
    """(the ones a reload applies, the ones that wait for the next start)."""
    return ([n for n in names if TENANT_SETTINGS[n].live], [n for n in names if not TENANT_SETTINGS[n].live])


# A hot standby refuses to run with less of these than its primary has (Postgres checks at start and
# on the primary's parameter-change WAL record): a replica gets at least its primary's.
STANDBY_AT_LEAST = {"max_prepared_transactions": 0, "max_locks_per_transaction": 64}  # Postgres' defaults


def for_standby(own: Mapping[str, str], primary: Mapping[str, str]) -> dict[str, str]:
    """A read replica's pg_settings: its own, with the primary's where a standby needs at least those."""
    out = dict(own)
    for name, default in STANDBY_AT_LEAST.items():
        if name in own or name in primary:
            out[name] = str(max(int(own.get(name, default)), int(primary.get(name, default))))
    return out

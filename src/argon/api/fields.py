"""Request bodies take only what Argon acts on (issue 15: every setting the API accepts takes effect).

A field of Neon's API that Argon would store and ignore is refused with a 400 naming it, and so is
a value Argon cannot honour (`provisioner: k8s-neonvm`, `hipaa: true`, ...); a value that is what
Argon does anyway (`hipaa: false`, `pooler_mode: transaction`) is accepted. Unknown fields are
refused too (`Strict`), except where a client is known to send one with nothing in it.
`tests/integration/test_api_fields.py` walks the writable fields of Neon's OpenAPI document.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from argon import model
from argon.compute import tenant_settings
from argon.errors import UserError

PROVISIONER = "k8s-pod"  # what Argon reports; computes are processes, not VMs that scale


class Strict(BaseModel):
    """A request object: unknown fields are a 400 (`app._validation_error` words it)."""

    model_config = ConfigDict(extra="forbid")


def only(value: Any, allowed: Any, why: str) -> Any:
    """`value` if it is None or `allowed`, else a ValueError (a 400 naming the field) saying `why`."""
    if value is not None and value != allowed:
        raise ValueError(why)
    return value


def check_provisioner(value: str | None) -> str | None:
    return only(value, PROVISIONER, f"Argon computes are '{PROVISIONER}' (no autoscaling VMs)")


def check_pg_settings(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A project's default pg_settings: refused (endpoints take their own)."""
    if value:
        raise ValueError("Argon takes pg_settings per endpoint (endpoint.settings.pg_settings), not as a "
                         "project default")
    return value


def check_endpoint_pg_settings(value: dict[str, Any] | None) -> dict[str, str] | None:
    """An endpoint's pg_settings: only the tenant allow-list (`argon.compute.tenant_settings`)."""
    return None if value is None else tenant_settings.check(value)


def check_pgbouncer_settings(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value:
        raise ValueError("pgbouncer_settings are not supported by Argon")
    return value


class PreloadLibraries(Strict):
    use_defaults: bool | None = None
    enabled_libraries: list[str] | None = None

    @field_validator("use_defaults")
    @classmethod
    def _defaults(cls, v: bool | None) -> bool | None:
        return only(v, True, "Argon preloads the libraries its extensions need (use_defaults: true)")

    @field_validator("enabled_libraries")
    @classmethod
    def _libraries(cls, v: list[str] | None) -> list[str] | None:
        if v:
            raise ValueError("Argon preloads the libraries its allow-listed extensions need; others cannot be added")
        return v


class EndpointSettingsData(Strict):
    pg_settings: dict[str, Any] | None = None
    pgbouncer_settings: dict[str, Any] | None = None
    preload_libraries: PreloadLibraries | None = None

    _pg = field_validator("pg_settings")(check_endpoint_pg_settings)
    _bouncer = field_validator("pgbouncer_settings")(check_pgbouncer_settings)


class AllowedIps(Strict):
    ips: list[str] | None = None
    protected_branches_only: bool | None = None

    @field_validator("ips")
    @classmethod
    def _ips(cls, v: list[str] | None) -> list[str] | None:
        for entry in v or ():
            model.parse_allowed_ip(entry)  # its ValueError names the entry
        return v


class QuotaData(Strict):
    """Neon's `project.settings.quota`: the logical size limit of each branch acts (ADR 0025); the
    consumption quotas (active time, compute time, written and transferred bytes) are not in it, so
    they are refused as unknown fields."""

    logical_size_bytes: int | None = None

    @field_validator("logical_size_bytes")
    @classmethod
    def _size(cls, v: int | None) -> int | None:
        if v is not None and not (v == 0 or 2**20 <= v <= 2**62):
            raise ValueError("must be 0 (no limit) or at least 1048576 bytes (1 MiB)")
        return v


class ProjectSettingsData(Strict):
    """Neon's `project.settings`: the allow-list, logical replication and the branch size limit
    act; the rest is refused unless it asks for what Argon does anyway."""

    allowed_ips: AllowedIps | None = None
    enable_logical_replication: bool | None = None
    block_public_connections: bool | None = None
    block_vpc_connections: bool | None = None
    hipaa: bool | None = None
    preload_libraries: PreloadLibraries | None = None
    quota: QuotaData | None = None

    @field_validator("block_public_connections")
    @classmethod
    def _public(cls, v: bool | None) -> bool | None:
        return only(v, False, "not supported by Argon; use allowed_ips to limit who may connect")

    @field_validator("block_vpc_connections")
    @classmethod
    def _vpc(cls, v: bool | None) -> bool | None:
        return only(v, False, "Argon has no VPC endpoints")

    @field_validator("hipaa")
    @classmethod
    def _hipaa(cls, v: bool | None) -> bool | None:
        return only(v, False, "Argon makes no HIPAA arrangements")

    def apply(self, current: model.ProjectSettings) -> model.ProjectSettings:
        """The project's settings with these changes (absent fields keep their values)."""
        ips = current.allowed_ips
        only_protected = current.protected_branches_only
        if self.allowed_ips is not None:
            if self.allowed_ips.ips is not None:
                ips = tuple(e.strip() for e in self.allowed_ips.ips)
            if self.allowed_ips.protected_branches_only is not None:
                only_protected = self.allowed_ips.protected_branches_only
        logical = current.enable_logical_replication
        if self.enable_logical_replication is not None:
            if current.enable_logical_replication and not self.enable_logical_replication:
                raise UserError("enable_logical_replication cannot be turned off once enabled (as on Neon)")
            logical = self.enable_logical_replication
        size_limit = current.logical_size_limit_bytes
        if self.quota is not None and self.quota.logical_size_bytes is not None:
            size_limit = self.quota.logical_size_bytes
        return model.ProjectSettings(allowed_ips=ips, protected_branches_only=only_protected,
                                     enable_logical_replication=logical, logical_size_limit_bytes=size_limit)

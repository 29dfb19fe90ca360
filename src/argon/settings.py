"""Typed settings: defaults < config file < ARGON_* environment < command-line flags, validated once.

`argon config check` prints the effective values and where each came from. Every field here has an
`ARGON_<NAME>` variable; the names of `ARGON_DATA_DIR`, `ARGON_HTTP_PORT`, `ARGON_PROXY_PORT`,
`ARGON_DOMAIN` and `ARGON_API_KEY` are a public contract (scripts and deployments rely on them).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from argon.errors import ConfigError


def default_data_dir() -> Path:
    """Root keeps data outside its 0700 home (compute uids could not reach it); users keep it in XDG."""
    if os.geteuid() == 0:
        return Path("/var/lib/argon")
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "argon"


def default_config_file() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "argon" / "config.toml"


class Settings(BaseSettings):
    """What `argon up` runs with. Field docs double as `--help` and `config check` text."""

    model_config = SettingsConfigDict(env_prefix="ARGON_", extra="ignore", frozen=True)

    data_dir: Path = Field(default_factory=default_data_dir, description="Where projects, metadata and certificates live")
    run_dir: Path | None = Field(None, description="Directory for compute Unix sockets (must be short: 107-byte socket path limit); default: one per data directory under /run/argon (root) or the user runtime dir")
    http_host: str = Field("127.0.0.1", description="Address the API and console listen on")
    http_port: int = Field(4444, ge=0, le=65535, description="Port of the API (/api/v2) and the console (/)")
    proxy_host: str = Field("127.0.0.1", description="Address the Postgres proxy listens on")
    proxy_port: int = Field(5432, ge=0, le=65535, description="Port of the Postgres proxy")
    domain: str | None = Field(None, description="Wildcard DNS domain: endpoints become <endpoint-id>.<domain> (Neon form, SNI routing)")
    endpoint_hosts: Literal["auto", "names", "addresses"] = Field(
        "auto", description="What endpoint.host is: names (<endpoint-id>.<domain>, Neon's form, routed by TLS SNI), "
        "addresses (each endpoint's own loopback address 127.1.X.Y, for machines where those names do not resolve), "
        "or auto (names when ARGON_DOMAIN is set or the names resolve here, else addresses)")
    public_host: str | None = Field(None, description="Host name put in connection strings (default: the proxy address)")
    api_key: str | None = Field(None, description="Preset API key (otherwise one is generated on first start)")
    tls_cert: Path | None = Field(None, description="Certificate (PEM) for the proxy; default: generated with a local CA")
    tls_key: Path | None = Field(None, description="Private key (PEM) for --tls-cert")
    plaintext: Literal["loopback", "always", "never"] = Field(
        "loopback", description="Accept Postgres connections without TLS: from loopback only, always, or never")
    pg_bindirs: Annotated[dict[int, Path], NoDecode] = Field(default_factory=dict, description="Explicit Postgres bin dirs per major, e.g. 15=/usr/lib/postgresql/15/bin,18=/opt/pg18/bin")
    default_pg_version: int | None = Field(None, description="Postgres major for new projects (default: the newest found)")
    suspend_timeout: int = Field(300, ge=1, le=604800, description="Seconds of inactivity before a compute suspends, when an endpoint says 0")
    clone_backend: Literal["auto", "reflink", "copy"] = Field("auto", description="How branches and projects copy data")
    compute_uid_base: int = Field(200000, ge=1000, le=2**31 - 2, description="When run as root: first OS uid for "
                                  "project computes (each project gets its own, never given again)")
    compute_uid_count: int = Field(100000, ge=1, le=2**31 - 1000, description="When run as root: how many uids from "
                                   "ARGON_COMPUTE_UID_BASE on are Argon's (none may belong to a user, a group or a "
                                   "/etc/subuid or /etc/subgid range)")
    spare_clusters: int = Field(2, ge=0, le=20, description="Template copies kept ready per Postgres version, "
                                "so a new project is a rename (0 turns the pool off)")
    metrics_interval: float = Field(15.0, gt=0, le=3600, description="Seconds between monitoring samples of running "
                                    "computes (connections, queries/s, WAL); storage is measured every 5th sample")
    metrics_retention_hours: float = Field(168.0, gt=0, le=24 * 366, description="Hours of monitoring samples kept "
                                           "(the console's charts and the API's consumption figures)")
    proxy_relay: Literal["auto", "native", "python"] = Field(
        "auto", description="How the proxy relays bytes after login: native (a C thread, built at install when a "
        "C compiler is present), python, or auto (native when built)")
    backup_url: str | None = Field(None, description="Continuous backup to object storage: s3://bucket/prefix or "
                                   "file:///path (WAL, base backups and metadata; restore with `argon restore`)")
    backup_s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL for s3:// backups (MinIO, "
                                           "R2, Ceph); credentials come from the standard AWS variables and profiles")
    backup_key: str | None = Field(None, description="Encrypt every backup object (AES-256-GCM) with a key derived "
                                   "from this secret; without it, the bucket can decrypt the stored role passwords")
    backup_retention: str = Field("7d", description="How long the bucket keeps history: point in time and restore "
                                  "reach back this far (e.g. 7d, 36h, 90m)")
    backup_interval: float = Field(0.5, gt=0, le=300, description="Seconds between WAL shipping ticks: the "
                                   "RPO is about one tick plus one upload (5 for slow object stores)")
    backup_max_lag: str = Field("1GB", description="Unshipped WAL per branch kept locally while the object store "
                                "is unreachable; past it, writes are refused with a clear error until it catches up")
    restore_parallel: int = Field(2, ge=1, le=64, description="Branches a lazy `argon restore` brings back from "
                                  "the bucket at once in the background after `argon up` (a wake's branch never waits "
                                  "for them)")
    compute_limits: Literal["auto", "off"] = Field(
        "auto", description="Enforce each compute's CPU and memory (its compute units) with cgroups: auto (when "
        "run as root on a host with the cpu and memory controllers, v2 or v1) or off")
    compute_memory_per_cu: float = Field(4.0, gt=0, le=1024, description="GiB of memory one compute unit may use "
                                         "(Neon's is 4; lower it on a small machine)")
    compute_temp_files_per_cu: float = Field(5.0, ge=0, le=1 << 20, description="GiB of temporary files (sorts, "
                                             "hashes) one compute unit of an endpoint's maximum may write at once: "
                                             "Postgres's temp_file_limit, which tenants cannot raise (0: no limit)")
    autoscaling_interval: float = Field(1.0, gt=0, le=60, description="Seconds between autoscaling looks at each "
                                        "running compute's CPU and memory")
    autoscaling_quiet_seconds: float = Field(30.0, gt=0, le=3600, description="Seconds a compute must need less "
                                             "before autoscaling moves it down")
    disk_reserve: str = Field("2GB", description="Free space kept on the data directory's filesystem for Argon's "
                              "metadata, WAL and history (at most a tenth of the filesystem): below it every compute "
                              "refuses writes and no project or branch is created until space is freed (0: none)")
    disk_check_interval: float = Field(1.0, gt=0, le=60, description="Seconds between looks at the data directory's "
                                       "free space and at each running compute's size against its project's limit")
    forward_all_params: bool = Field(False, description="Forward every startup parameter to computes (default: Neon's filtered set)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity")
    log_format: Literal["auto", "text", "json"] = Field(
        "auto", description="Log lines as text (for people) or one JSON object per line (for log pipelines); "
        "auto: text on a terminal, JSON otherwise")
    metrics_token: str | None = Field(None, description="A bearer token that may read /metrics and nothing else "
                                      "(Prometheus' credentials); any API key may read it too")
    config_file: Path | None = Field(None, description="TOML file with any of these settings (default ~/.config/argon/config.toml)")

    @field_validator("pg_bindirs", mode="before")
    @classmethod
    def _parse_bindirs(cls, value: Any) -> Any:
        if isinstance(value, str):
            result: dict[int, str] = {}
            for part in filter(None, (p.strip() for p in value.split(","))):
                major, sep, path = part.partition("=")
                if not sep or not major.strip().isdigit():
                    raise ValueError(f"expected MAJOR=PATH pairs separated by commas, got {part!r}")
                result[int(major)] = path.strip()
            return result
        return value

    @field_validator("backup_retention")
    @classmethod
    def _check_retention(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("disk_reserve")
    @classmethod
    def _check_reserve(cls, value: str) -> str:
        if str(value).strip() != "0":
            parse_size(value)
        return value

    @property
    def disk_reserve_bytes(self) -> int:
        return 0 if str(self.disk_reserve).strip() == "0" else parse_size(self.disk_reserve)

    @field_validator("backup_max_lag")
    @classmethod
    def _check_max_lag(cls, value: str) -> str:
        parse_size(value)
        return value

    @field_validator("backup_url")
    @classmethod
    def _check_backup_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("s3://", "file:///")):
            raise ValueError("must be s3://bucket/prefix or file:///absolute/path")
        return value.strip()

    @property
    def backup_retention_seconds(self) -> float:
        return parse_duration(self.backup_retention)

    @property
    def backup_max_lag_bytes(self) -> int:
        return parse_size(self.backup_max_lag)

    @field_validator("domain")
    @classmethod
    def _check_domain(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        value = value.strip().lower().rstrip(".")
        labels = value.split(".")
        if len(labels) < 2 or not all(label and all(c.isalnum() or c == "-" for c in label) for label in labels):
            raise ValueError("must be a DNS name with at least two labels, e.g. db.example.com "
                             "(a wildcard certificate for *.localhost fails OpenSSL's hostname check)")
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))

    # Derived values -------------------------------------------------------------------------------

    @property
    def cert_domain(self) -> str:
        """The domain the generated certificate covers (SNI routing works only under a real domain)."""
        return self.domain or "argon.localhost"

    @property
    def connect_host(self) -> str:
        if self.public_host:
            return self.public_host
        return "127.0.0.1" if self.proxy_host in ("0.0.0.0", "::", "") else self.proxy_host

    @property
    def api_url(self) -> str:
        host = "127.0.0.1" if self.http_host in ("0.0.0.0", "::", "") else self.http_host
        return f"http://{host}:{self.http_port}"


def parse_duration(text: str) -> float:
    """'7d', '36h', '90m', '45s' or plain seconds -> seconds (> 0)."""
    value = str(text).strip().lower()
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    try:
        seconds = float(value[:-1]) * units[value[-1]] if value and value[-1] in units else float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration; use e.g. 7d, 36h, 90m") from None
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def parse_size(text: str) -> int:
    """'1GB', '512MB', '100kB' or plain bytes -> bytes (> 0)."""
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
    try:
        size = int(float(value[:-1]) * units[value[-1]]) if value and value[-1] in units else int(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a size; use e.g. 1GB, 512MB") from None
    if size <= 0:
        raise ValueError("must be more than 0")
    return size


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the config file named by ARGON_CONFIG_FILE (or the default path) if it exists."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return read_config_file()[1]


def read_config_file() -> tuple[Path, dict[str, Any]]:
    """The config file in effect (ARGON_CONFIG_FILE or the default path) and its values; none when
    it does not exist."""
    path = Path(os.environ.get("ARGON_CONFIG_FILE") or default_config_file())
    if not path.is_file():
        return path, {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    return path, {k.replace("-", "_"): v for k, v in data.items()}


# ARGON_* variables that are not settings but are read elsewhere (the CLI's server and its config file;
# failpoints, a test facility read by argon.failpoints).
OTHER_VARIABLES = frozenset({"ARGON_API_URL", "ARGON_CONFIG_FILE", "ARGON_FAILPOINTS"})


def unknown_names(config_path: Path, config_values: dict[str, Any]) -> list[str]:
    """ARGON_* variables and keys of the config file (as `read_config_file` returned it) that are no
    setting (typos are silently ignored when the settings load), each with the closest real name."""
    import difflib

    fields = set(Settings.model_fields)
    env_names = {f"ARGON_{f.upper()}" for f in fields}
    out = []
    for name in sorted(os.environ):
        if name.startswith("ARGON_") and name not in env_names | OTHER_VARIABLES and not name.startswith("ARGON_TEST_"):
            near = difflib.get_close_matches(name, sorted(env_names), n=1)
            out.append(f"{name} is not a setting" + (f" (did you mean {near[0]}?)" if near else ""))
    for key in sorted(set(config_values) - fields):
        near = difflib.get_close_matches(key, sorted(fields), n=1)
        out.append(f"{key!r} in {config_path} is not a setting" + (f" (did you mean {near[0]!r}?)" if near else ""))
    return out


def load(**overrides: Any) -> Settings:
    """Build settings from flags (overrides; None means "not given"), environment and file."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            problems.append(f"ARGON_{name.upper()} (--{name.replace('_', '-')}): {err['msg']}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems)) from None
    except SettingsError as exc:
        raise ConfigError(f"invalid settings: {exc}") from None

"""The allow-list of a compute's `pg_settings`: names, values and units, checked before any compute sees them."""

from __future__ import annotations

from pathlib import Path

import pytest

from argon.compute import tenant_settings
from argon.compute.binaries import PgInstall


def test_accepted_values_are_normalised() -> None:
    assert tenant_settings.check({"Work_Mem": "64MB", "statement_timeout": 5000, "jit": True,
                                  "TimeZone": "Europe/Berlin", "DateStyle": "ISO, DMY"}) == {
        "work_mem": "64MB", "statement_timeout": "5000", "jit": "on", "timezone": "Europe/Berlin",
        "datestyle": "iso, dmy"}


@pytest.mark.parametrize("name", ["archive_command", "shared_preload_libraries", "data_directory", "ssl_key_file",
                                  "max_connections", "shared_buffers", "temp_file_limit", "wal_level",
                                  "default_transaction_read_only", "listen_addresses", "dynamic_library_path",
                                  "session_preload_libraries", "log_directory", "unix_socket_directories"])
def test_platform_and_host_settings_are_refused_by_name(name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}: Argon does not let"):
        tenant_settings.check({name: "x"})


@pytest.mark.parametrize(("name", "value", "why"), [
    ("work_mem", "lots", "must be a number"),
    ("work_mem", "1 parsec", "unknown unit"),
    ("work_mem", "10kB", "between 64kB and 2GB"),
    ("work_mem", "3GB", "between"),
    ("statement_timeout", "-1", "between"),
    ("statement_timeout", "5 fortnights", "unknown unit"),
    ("jit", "maybe", "on or off"),
    ("timezone", "Mars/Olympus", "time zone"),
    ("timezone", "UTC'\nshared_preload_libraries='x", "time zone"),
    ("log_statement", "everything", "one of"),
    ("max_prepared_transactions", "1.5", "whole number"),
    ("max_prepared_transactions", "100000", "between"),
    ("random_page_cost", "4ms", "plain number"),
    ("work_mem", ["1MB"], "string or a number"),
])
def test_bad_values_are_refused_naming_the_setting(name: str, value: object, why: str) -> None:
    with pytest.raises(ValueError, match=why) as err:
        tenant_settings.check({name: value})
    assert name in str(err.value)


def test_bare_numbers_are_in_the_settings_own_unit() -> None:
    assert tenant_settings.check({"temp_buffers": "100"}) == {"temp_buffers": "100"}  # 100 * 8kB >= 800kB
    with pytest.raises(ValueError):
        tenant_settings.check({"temp_buffers": "99"})  # 792kB
    assert tenant_settings.check({"autovacuum_naptime": "30"})["autovacuum_naptime"] == "30"  # seconds


def test_live_and_start_only() -> None:
    assert tenant_settings.split_live(["work_mem", "max_prepared_transactions"]) == (
        ["work_mem"], ["max_prepared_transactions"])


def test_a_standby_gets_at_least_its_primarys_shared_memory_settings() -> None:
    assert tenant_settings.for_standby({"work_mem": "8MB"}, {"max_prepared_transactions": "5"}) == {
        "work_mem": "8MB", "max_prepared_transactions": "5"}
    assert tenant_settings.for_standby({"max_locks_per_transaction": "200"}, {"max_locks_per_transaction": "100"}) == {
        "max_locks_per_transaction": "200"}
    assert tenant_settings.for_standby({}, {"work_mem": "1GB"}) == {}


def test_the_installation_must_have_the_time_zone(tmp_path: Path) -> None:
    """A zone Python knows but the Postgres build lacks would stop the compute's start: refused."""
    (tmp_path / "bin").mkdir()
    zones = tmp_path / "share" / "timezone"
    (zones / "Europe").mkdir(parents=True)
    (zones / "Europe" / "Berlin").write_bytes(b"TZif")
    install = PgInstall(18, "18.1", tmp_path / "bin", "explicit")
    tenant_settings.check_for({"timezone": "Europe/Berlin", "work_mem": "1MB"}, install)
    with pytest.raises(ValueError, match="timezone: PostgreSQL 18 on this server has no time zone 'Asia/Tokyo'"):
        tenant_settings.check_for({"timezone": "Asia/Tokyo"}, install)

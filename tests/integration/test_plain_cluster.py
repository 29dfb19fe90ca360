"""A compute behaves like a plain cluster: `SHOW ALL` of a fresh compute against a fresh `initdb`
cluster of the same version (same initdb arguments, its postgresql.conf untouched) differs only in
the settings Argon means to change, each listed below with its reason."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from argon.compute import template
from argon.compute.binaries import PgInstall
from argon.compute.osuser import chown_tree, popen_kwargs, template_user
from argon.model import PLATFORM_ROLE
from tests.fixtures.platform import RunningPlatform, short_tmpdir

pytestmark = [pytest.mark.pg, pytest.mark.slow]

# Every setting in which a compute differs from a plain cluster, and why. A name ending in "." stands
# for every setting with that prefix (an extension's own settings).
MEANT: dict[str, str] = {
    # Where things are: another data directory, a private socket per compute, no TCP listener.
    "data_directory": "each compute has its own data directory",
    "config_file": "inside that data directory",
    "hba_file": "inside that data directory",
    "ident_file": "inside that data directory",
    "unix_socket_directories": "a private socket directory per compute (the test's plain cluster has its own)",
    "unix_socket_permissions": "0700: only the compute's OS user reaches the socket; clients come through the proxy",
    "listen_addresses": "no TCP listener: the proxy is the only way in",
    "port": "the plain cluster here takes a free port; a compute's socket is always .s.PGSQL.5432",
    # Size: compute units decide memory and connections (params.py, after Neon's figures).
    "max_connections": "scales with the compute size (Neon: 0.25 CU -> 104)",
    "shared_buffers": "scales with the compute size",
    "effective_cache_size": "scales with the compute size",
    "max_worker_processes": "scales with the compute size",
    "temp_file_limit": "capped per compute unit of the maximum (ARGON_COMPUTE_TEMP_FILES_PER_CU), so one tenant's "
                       "temporary files cannot fill the platform's filesystem",
    "shared_memory_size": "follows from the sizes above",
    "shared_memory_size_in_huge_pages": "follows from the sizes above",
    "num_os_semaphores": "follows from the sizes above",
    "commit_timestamp_buffers": "18: sized from shared_buffers",
    "subtransaction_buffers": "18: sized from shared_buffers",
    "transaction_buffers": "18: sized from shared_buffers",
    "io_max_concurrency": "18: sized from shared_buffers and max_connections",
    "max_wal_size": "1 GB as with 16 MB segments: the 1 MB segments keep copies small, initdb scales this to 64 MB",
    "wal_recycle": "off: segments a checkpoint no longer needs are removed, not kept on disk in every suspended "
                   "project",
    # Logging: one stderr log per compute, read by `argon logs`.
    "log_line_prefix": "time, pid, role@database in every compute log line",
    # Behaviour the platform needs.
    "huge_pages": "off: many small computes on one host; huge pages would be reserved per compute",
    "jit": "off: cold starts and short queries; JIT compilation costs more than it saves there",
    "archive_mode": "on: WAL goes to the branch's history for point-in-time branches",
    "archive_command": "copies each segment into the branch's history",
    "archive_timeout": "explicitly 0: segments switch when the platform snapshots, not on a timer",
    # Extensions (compute/extensions.py, ADR 0015).
    "shared_preload_libraries": "libraries the allow-listed extensions need at start (and pgextwlist on 15)",
    "extension_control_path": "18: the platform's directory of allow-listed extensions comes first",
    "dynamic_library_path": "18: and their modules",
    "extwlist.": "15: pgextwlist's allow-list and scripts",
    "pg_stat_statements.": "pg_stat_statements is preloaded: its settings exist",
    "cron.": "pg_cron is preloaded where installed: its settings exist",
}


def differences(compute: dict[str, str], plain: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    return {name: (compute.get(name), plain.get(name)) for name in sorted(set(compute) | set(plain))
            if compute.get(name) != plain.get(name)}


def meant(name: str) -> bool:
    return name in MEANT or any(key.endswith(".") and name.startswith(key) for key in MEANT)


def show_all(conn: psycopg.Connection[Any]) -> dict[str, str]:
    return {name.lower(): setting for name, setting, _ in conn.execute("show all").fetchall()}


@contextlib.contextmanager
def plain_cluster(install: PgInstall) -> Iterator[Path]:
    """`initdb` with the template's arguments and its postgresql.conf as written; started with only a
    free port and its own socket directory on the command line. Yields its socket."""
    root = short_tmpdir("pc")
    user = template_user()
    data, sock = root / "data", root / "s"
    sock.mkdir()
    if user is not None:
        chown_tree(root, user)
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"}
    subprocess.run([str(install.bin("initdb")), "-D", str(data), "-U", PLATFORM_ROLE, *template.INITDB_ARGS,
                    "--auth-local=trust"], check=True, capture_output=True, env=env, cwd=root, **popen_kwargs(user))
    with socket_free_port() as port:
        proc = subprocess.Popen([str(install.bin("postgres")), "-D", str(data), "-c", f"port={port}",
                                 "-c", f"unix_socket_directories={sock}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env, cwd=root, **popen_kwargs(user))
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([str(install.bin("pg_isready")), "-q", "-h", str(sock), "-p", str(port)]).returncode:
            assert proc.poll() is None and time.monotonic() < deadline, "the plain cluster did not start"
            time.sleep(0.05)
        yield sock / f".s.PGSQL.{port}"
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def socket_free_port() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    yield port


def connect_plain(sock: Path) -> psycopg.Connection[Any]:
    port = sock.name.rsplit(".", 1)[1]
    return psycopg.connect(host=str(sock.parent), port=port, user=PLATFORM_ROLE, dbname="postgres",
                           application_name="compare", autocommit=True)


def connect_compute(platform: RunningPlatform, endpoint_id: str) -> psycopg.Connection[Any]:
    return psycopg.connect(host=str(platform.plane.layout.socket_dir(endpoint_id)), port="5432", user=PLATFORM_ROLE,
                           dbname="postgres", application_name="compare", autocommit=True)


@pytest.mark.parametrize("version", [15, 18])
def test_compute_differs_from_a_plain_cluster_only_where_meant(platform: RunningPlatform, version: int) -> None:
    if version not in platform.plane.installs:
        pytest.skip(f"PostgreSQL {version} is not installed here")
    created = platform.create_project(pg_version=version, name=f"plain{version}")
    try:
        endpoint_id = created["endpoints"][0]["id"]
        psycopg.connect(platform.dsn(created)).close()  # running, spec applied
        with connect_compute(platform, endpoint_id) as conn:
            compute = show_all(conn)
        with plain_cluster(platform.plane.installs[version]) as sock, connect_plain(sock) as conn:
            plain = show_all(conn)
        diff = differences(compute, plain)
        unexplained = {name: values for name, values in diff.items() if not meant(name)}
        assert unexplained == {}, "settings that differ from a plain cluster without a reason (compute, plain)"
        # What initdb chose for the locale is kept, not replaced by a default.
        assert compute["default_text_search_config"] == plain["default_text_search_config"] == "pg_catalog.english"
        assert {n: compute[n] for n in ("lc_messages", "lc_monetary", "lc_numeric", "lc_time", "datestyle", "timezone")} \
            == {n: plain[n] for n in ("lc_messages", "lc_monetary", "lc_numeric", "lc_time", "datestyle", "timezone")}
    finally:
        platform.delete_project(created["project"]["id"])


def test_a_project_made_before_keeps_initdb_settings(platform: RunningPlatform) -> None:
    """Projects made from a template built before initdb's settings were kept (their data directory
    has no copy of them) get them at their next start: they come from the version, not the project."""
    created = platform.create_project(name="older")
    try:
        plane = platform.plane
        project_id, branch_id = created["project"]["id"], created["branch"]["id"]
        endpoint_id = created["endpoints"][0]["id"]
        platform.call(platform.control.computes.stop(endpoint_id, reason="test", mode="fast"))
        (plane.layout.pgdata(project_id, branch_id) / template.INITDB_SETTINGS).unlink()
        with psycopg.connect(platform.dsn(created)) as conn:
            assert conn.execute("show default_text_search_config").fetchone() == ("pg_catalog.english",)
            assert conn.execute("select to_tsvector('running dogs')::text").fetchone() == ("'dog':2 'run':1",)
    finally:
        platform.delete_project(created["project"]["id"])


def test_an_older_template_is_rebuilt_with_initdb_settings() -> None:
    """A template built by an earlier Argon (no kept settings, an older stamp) is rebuilt on start."""
    from argon.compute.binaries import discover

    installs = discover(None, None)
    if not installs:
        pytest.skip("no PostgreSQL here")
    install = installs[max(installs)]
    root = short_tmpdir("tp")
    try:
        os.chmod(root, 0o755)
        built = template.ensure_template(install, root, setup_sql=[], argon_os_user=pwd.getpwuid(os.geteuid()).pw_name)
        settings = template.initdb_settings(built)
        assert settings["default_text_search_config"] == "pg_catalog.english"
        assert settings["lc_monetary"] == "C" and "max_wal_size" in settings
        (built / template.INITDB_SETTINGS).unlink()
        (built / template.STAMP).write_text(f"{install.version} 0123456789abcdef\n")
        rebuilt = template.ensure_template(install, root, setup_sql=[], argon_os_user=pwd.getpwuid(os.geteuid()).pw_name)
        assert template.initdb_settings(rebuilt) == settings
    finally:
        shutil.rmtree(root, ignore_errors=True)

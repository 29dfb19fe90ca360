"""A pristine, initialised cluster per Postgres major version, so that projects never run initdb.

Built once (about a second): `initdb` as a named user (`nobody` when Argon is root), our config,
one start to run the setup SQL (the default owner role and database every project gets), a clean
fast shutdown, then an atomic rename into place. A stamp records the version and the setup SQL,
so a change to either rebuilds the template; existing projects are untouched.

The settings `initdb` wrote into `postgresql.conf` for this version and locale (text search
configuration, `lc_*`, `datestyle`, WAL sizes, ...) are kept beside the stamp before Argon's own
configuration replaces that file, and every compute of the version starts from them
(`initdb_settings`), so a compute behaves like a plain cluster, projects made before included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from argon.compute import postmaster
from argon.compute.admin import connect_admin_sync
from argon.compute.binaries import PgInstall
from argon.compute.osuser import chown_tree, popen_kwargs, template_user
from argon.compute.pgconf import write_config
from argon.compute.postmaster import ComputeStartError
from argon.model import PLATFORM_ROLE

log = logging.getLogger(__name__)

STAMP = "ARGON_TEMPLATE"
INITDB_SETTINGS = "ARGON_INITDB_SETTINGS"  # JSON: what initdb wrote into postgresql.conf
FORMAT = "2"  # 2: the template keeps initdb's settings; a change rebuilds every template


# 1 MB WAL segments instead of 16: a fresh cluster carries one segment, so every project and branch
# copy is 15 MB smaller, and a forced segment switch (archiving for point-in-time restore) wastes
# at most 1 MB.
INITDB_ARGS = ("-E", "UTF8", "--locale=C", "--wal-segsize=1", "--auth-local=peer", "--auth-host=reject",
               "--no-sync", "--no-instructions")


def _stamp(install: PgInstall, setup_sql: list[str]) -> str:
    digest = hashlib.sha256("\n".join([FORMAT, *INITDB_ARGS, *setup_sql]).encode()).hexdigest()[:16]
    return f"{install.version} {digest}\n"


def ensure_template(install: PgInstall, templates_dir: Path, *, setup_sql: list[str], argon_os_user: str) -> Path:
    """The template's pgdata for `install`, building it if missing or stale."""
    target = templates_dir / f"pg{install.major}"
    stamp = _stamp(install, setup_sql)
    with_stamp = target / STAMP
    if (with_stamp.exists() and with_stamp.read_text() == stamp and (target / "PG_VERSION").exists()
            and (target / INITDB_SETTINGS).exists()):
        return target
    log.info("building the PostgreSQL %s template", install.version)
    staging = templates_dir / f".pg{install.major}.building"
    shutil.rmtree(staging, ignore_errors=True)
    user = template_user()
    work = Path(tempfile.mkdtemp(prefix="argon-tpl-", dir="/tmp"))  # short: the socket lives here
    try:
        staging.mkdir(mode=0o700)
        if user is not None:
            os.chown(staging, user.uid, user.gid)
            os.chown(work, user.uid, user.gid)
        result = subprocess.run(
            [str(install.bin("initdb")), "-D", str(staging), "-U", PLATFORM_ROLE, *INITDB_ARGS],
            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"},
            cwd=str(work), **popen_kwargs(user))
        if result.returncode != 0:
            raise ComputeStartError(f"initdb for PostgreSQL {install.version} failed: "
                                    f"{(result.stderr or result.stdout).strip()[-2000:]}")
        _keep_initdb_settings(staging)
        write_config(staging, work, initdb_settings(staging), argon_os_user)
        if user is not None:
            chown_tree(staging, user)
        log_file = work / "postgres.log"
        pm = postmaster.start(install, staging, log_file, user)
        try:
            pm.wait_ready_sync()
            with connect_admin_sync(work) as conn:
                for statement in setup_sql:
                    conn.execute(statement.encode())
        finally:
            pm.stop_sync("fast")
        for leftover in ("postmaster.pid", "postmaster.opts"):
            (staging / leftover).unlink(missing_ok=True)
        (staging / STAMP).write_text(stamp)
        if user is not None:
            os.chown(staging / STAMP, user.uid, user.gid)
            os.chown(staging / INITDB_SETTINGS, user.uid, user.gid)
        os.sync()
        old = templates_dir / f".pg{install.major}.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


# `name = value`, the value quoted ('...', '' for a quote) or bare up to a comment or blank.
_CONF_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=?\s*('(?:[^']|'')*'|[^\s#']+)")


def parse_conf(text: str) -> dict[str, str]:
    """The active settings of a postgresql.conf as initdb writes it (commented lines are defaults)."""
    settings: dict[str, str] = {}
    for line in text.splitlines():
        match = _CONF_LINE.match(line)
        if match is None:
            continue
        value = match.group(2)
        if value.startswith("'"):
            value = value[1:-1].replace("''", "'")
        settings[match.group(1).lower()] = value
    return settings


def _keep_initdb_settings(pgdata: Path) -> None:
    settings = parse_conf((pgdata / "postgresql.conf").read_text())
    (pgdata / INITDB_SETTINGS).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")


def initdb_settings(template: Path) -> dict[str, str]:
    """What initdb wrote for the template's version and locale: every compute of that version
    starts from these (Argon's own settings then override what it means to change)."""
    try:
        loaded = json.loads((template / INITDB_SETTINGS).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}

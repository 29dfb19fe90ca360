"""A pristine, initialised cluster per Postgres major version, so that projects never run initdb.

Built once (about a second): `initdb` as a named user (`nobody` when Argon is root), our config,
one start to run the setup SQL (the default owner role and database every project gets), a clean
fast shutdown, then an atomic rename into place. A stamp records the version and the setup SQL,
so a change to either rebuilds the template; existing projects are untouched.
"""

from __future__ import annotations

import hashlib
import logging
import os
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


# 1 MB WAL segments instead of 16: a fresh cluster carries one segment, so every project and branch
# copy is 15 MB smaller, and a forced segment switch (archiving for point-in-time restore) wastes
# at most 1 MB.
INITDB_ARGS = ("-E", "UTF8", "--locale=C", "--wal-segsize=1", "--auth-local=peer", "--auth-host=reject",
               "--no-sync", "--no-instructions")


def _stamp(install: PgInstall, setup_sql: list[str]) -> str:
    digest = hashlib.sha256("\n".join([*INITDB_ARGS, *setup_sql]).encode()).hexdigest()[:16]
    return f"{install.version} {digest}\n"


def ensure_template(install: PgInstall, templates_dir: Path, *, setup_sql: list[str], argon_os_user: str) -> Path:
    """The template's pgdata for `install`, building it if missing or stale."""
    target = templates_dir / f"pg{install.major}"
    stamp = _stamp(install, setup_sql)
    with_stamp = target / STAMP
    if with_stamp.exists() and with_stamp.read_text() == stamp and (target / "PG_VERSION").exists():
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
        write_config(staging, work, {}, argon_os_user)
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

"""A pristine, initialised cluster per Postgres major version, so that projects never run initdb.

Built once (about a second): `initdb` as a named user (`nobody` when Argon is root: initdb needs a
passwd entry), our config, one start to run the setup SQL (the default owner role and database
every project gets), a clean fast shutdown, then an atomic rename into place. A stamp records the
version and the setup SQL, so a change to either rebuilds the template; existing projects are
untouched.

The settings `initdb` wrote into `postgresql.conf` for this version and locale (text search
configuration, `lc_*`, `datestyle`, WAL sizes, ...) are kept beside the stamp before Argon's own
configuration replaces that file, and every compute of the version starts from them
(`initdb_settings`), so a compute behaves like a plain cluster, projects made before included.

As root the finished template belongs to root (0700): every project is a copy of it, so whoever
could write it (any process running as `nobody`) could plant a superuser in every future project.
The build happens in a directory of a random name under the root-owned templates dir; a template
that is not root's (one built by an older Argon) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import stat
import subprocess
import tempfile
from pathlib import Path

from argon import safefs
from argon.compute import postmaster
from argon.compute.admin import connect_admin_sync
from argon.compute.binaries import PgInstall
from argon.compute.osuser import OsUser, popen_kwargs, template_user
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


def _current(target: Path, stamp: str) -> bool:
    """Whether `target` is a finished template of this stamp, owned by us (root as root)."""
    try:
        st = os.lstat(target)
        if not stat.S_ISDIR(st.st_mode) or not all(safefs.lexists(target / name)
                                                   for name in ("PG_VERSION", INITDB_SETTINGS)):
            return False
        if st.st_uid != os.geteuid():
            log.warning("rebuilding the template %s: it belongs to uid %d, not to Argon's user", target, st.st_uid)
            return False
        return safefs.read_file(target / STAMP, limit=4096).decode(errors="replace") == stamp
    except OSError:
        return False


def ensure_template(install: PgInstall, templates_dir: Path, *, setup_sql: list[str], argon_os_user: str) -> Path:
    """The template's pgdata for `install`, building it if missing or stale."""
    target = templates_dir / f"pg{install.major}"
    stamp = _stamp(install, setup_sql)
    if _current(target, stamp):
        return target
    log.info("building the PostgreSQL %s template", install.version)
    for leftover in templates_dir.glob(f".pg{install.major}.building*"):
        safefs.rmtree(leftover)
    staging = templates_dir / f".pg{install.major}.building-{secrets.token_hex(8)}"
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
            cwd="/", **popen_kwargs(user))  # Popen's chdir runs as root, in a directory of nobody's
        if result.returncode != 0:
            raise ComputeStartError(f"initdb for PostgreSQL {install.version} failed: "
                                    f"{(result.stderr or result.stdout).strip()[-2000:]}")
        _keep_initdb_settings(staging, user)
        write_config(staging, work, initdb_settings(staging), argon_os_user, user)
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
            safefs.unlink(staging / leftover)
        if user is not None:  # from now on nobody but root writes it
            safefs.chown_tree(staging, OsUser(os.geteuid(), os.getegid()))
        safefs.write_file(staging / STAMP, stamp)
        os.sync()
        old = templates_dir / f".pg{install.major}.old"
        safefs.rmtree(old)
        if os.path.lexists(target):
            os.rename(target, old)
        os.rename(staging, target)
        _retire(old, templates_dir)
        return target
    finally:
        safefs.rmtree(work)
        safefs.rmtree(staging)


RETIRED = "retired"  # templates since rebuilt: retired/<hash of its stamp>/pg<major>


def retired_path(templates_dir: Path, name: str, stamp_hash: str) -> Path:
    """Where a rebuilt template named `name` whose stamp hashed to `stamp_hash` is kept."""
    return templates_dir / RETIRED / stamp_hash / name


def _retire(old: Path, templates_dir: Path) -> None:
    """Keep a rebuilt template (a finished one: it has its stamp) rather than delete it: projects
    made from it keep it as their history's base snapshot, unmaterialized (ADR 0022). About 30 MB
    per rebuild, i.e. per Argon upgrade that changes the template."""
    try:
        stamp = safefs.read_file(old / STAMP, limit=4096)
    except OSError:
        safefs.rmtree(old)
        return
    name = old.name.removeprefix(".").removesuffix(".old")
    kept = retired_path(templates_dir, name, hashlib.sha256(stamp).hexdigest()[:12])
    if safefs.lexists(kept):
        safefs.rmtree(old)
        return
    kept.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    os.rename(old, kept)


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


def _keep_initdb_settings(pgdata: Path, owner: OsUser | None) -> None:
    """(The build directory is `nobody`'s until the template is done: read and written by safefs.)"""
    settings = parse_conf(safefs.read_file(pgdata / "postgresql.conf", limit=1 << 20).decode(errors="replace"))
    safefs.write_file(pgdata / INITDB_SETTINGS, json.dumps(settings, indent=1, sort_keys=True) + "\n", owner=owner)


def initdb_settings(template: Path) -> dict[str, str]:
    """What initdb wrote for the template's version and locale: every compute of that version
    starts from these (Argon's own settings then override what it means to change)."""
    try:
        loaded = json.loads(safefs.read_file(template / INITDB_SETTINGS, limit=1 << 20))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}

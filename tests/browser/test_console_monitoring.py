"""The Monitoring tab in a real browser: charts drawn from real samples of a compute that served
queries, was suspended and woke again; the range selector; an idle compute's empty state; laptop and
phone widths (screenshots in test-artifacts/console/)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.helpers import shot, signed_in_page
from tests.fixtures.platform import RunningPlatform

pytestmark = [pytest.mark.browser, pytest.mark.pg]


@pytest.fixture(scope="module")
def manual_sampler(platform: RunningPlatform) -> Iterator[Any]:
    """The shared platform's sampler, paused: this module takes its samples itself, when it wants them."""
    sampler = platform.control.metrics
    platform.call(sampler.stop())
    try:
        yield sampler
    finally:
        platform.loop.call_soon_threadsafe(sampler.start)


def _sample(platform: RunningPlatform, sampler: Any, times: int = 1) -> None:
    for _ in range(times):
        platform.call(sampler.tick())
        time.sleep(0.25)


@pytest.fixture
def busy(platform: RunningPlatform, manual_sampler: Any) -> Iterator[dict[str, Any]]:
    created = platform.create_project(name="monitored")
    pid, ep = created["project"]["id"], created["endpoints"][0]["id"]
    with psycopg.connect(platform.dsn(created), autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 100000) g")
        for _ in range(6):
            for _ in range(50):
                conn.execute("SELECT count(*) FROM t")
            _sample(platform, manual_sampler)
    assert platform.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200
    with psycopg.connect(platform.dsn(created), autocommit=True) as conn:  # wakes it: a cold start
        conn.execute("SELECT 1")
        _sample(platform, manual_sampler, 5)
    yield created
    platform.delete_project(pid)


def _open_monitoring(page: Page, pid: str) -> None:
    page.goto(f"/projects/{pid}")
    page.get_by_role("navigation", name="Project").get_by_role("link", name="Monitoring").click()
    expect(page.get_by_role("heading", name="Monitoring", exact=True)).to_be_visible()


def test_monitoring_tab_charts_a_busy_compute(chromium: Browser, platform: RunningPlatform,
                                              busy: dict[str, Any]) -> None:
    pid, ep = busy["project"]["id"], busy["endpoints"][0]["id"]
    page = signed_in_page(chromium, platform)
    _open_monitoring(page, pid)
    expect(page).to_have_url(f"{platform.api_url}/projects/{pid}/monitoring")
    tab = page.get_by_role("navigation", name="Project").get_by_role("link", name="Monitoring")
    expect(tab).to_have_attribute("aria-current", "page")

    panel = page.locator(f"section[data-endpoint='{ep}']")
    expect(panel.get_by_role("heading", name=ep)).to_be_visible()
    for name in (f"Connections of {ep}", f"Queries per second on {ep}", f"Wakes and suspends of {ep}"):
        expect(panel.get_by_role("img", name=name)).to_be_visible()
    expect(panel.get_by_role("img", name=f"Storage of branch main ({ep})")).to_be_visible()
    assert panel.locator("svg.chart polyline.line").count() >= 2  # lines, not just dots
    assert panel.locator("svg.chart rect.wake").count() >= 1 and panel.locator("svg.chart line.suspend").count() >= 1
    expect(panel.locator(".stats-inline")).to_contain_text("MB")  # data size and disk, measured
    panel.get_by_text("Recent wakes and suspends").click()
    expect(panel.locator("tbody tr").filter(has_text="wake").first).to_contain_text("ms")
    color = panel.locator("svg.chart polyline.line").first.evaluate("el => getComputedStyle(el).stroke")
    assert color not in ("none", "")  # the stylesheet reaches the SVG (no inline styles under the CSP)
    shot(page, "monitoring")

    # The range selector is a set of links; the choice is kept in the URL.
    page.get_by_role("navigation", name="Time range").get_by_role("link", name="7 days").click()
    expect(page).to_have_url(f"{platform.api_url}/projects/{pid}/monitoring?range=7d")
    expect(page.get_by_role("navigation", name="Time range").get_by_role("link", name="7 days")).to_have_attribute(
        "aria-current", "page")
    expect(panel.get_by_role("img", name=f"Connections of {ep}")).to_be_visible()
    page.goto(f"/projects/{pid}/monitoring?range=nonsense")  # unknown: the last hour, no error page
    expect(page.get_by_role("navigation", name="Time range").get_by_role("link", name="1 hour")).to_have_attribute(
        "aria-current", "page")

    # Phone width: one chart per row, nothing wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways at phone width ({width}px)"
    box = panel.get_by_role("img", name=f"Connections of {ep}").bounding_box()
    assert box is not None and box["width"] <= 390
    shot(page, "monitoring-phone")
    page.context.close()


def test_monitoring_tab_empty_state_of_an_idle_compute(chromium: Browser, platform: RunningPlatform,
                                                       manual_sampler: Any) -> None:
    created = platform.create_project(name="quiet")
    pid, ep = created["project"]["id"], created["endpoints"][0]["id"]
    try:
        assert platform.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200
        page = signed_in_page(chromium, platform)
        _open_monitoring(page, pid)
        panel = page.locator(f"section[data-endpoint='{ep}']")
        expect(panel.locator(".state")).to_have_text("Idle")
        expect(panel.get_by_text("No samples in the last 1 hour.")).to_be_visible()
        expect(panel.get_by_text("The compute is idle, and Argon samples only running computes")).to_be_visible()
        expect(panel.get_by_text("Not measured yet")).to_be_visible()
        expect(panel.get_by_role("img", name=f"Wakes and suspends of {ep}")).to_be_visible()
        shot(page, "monitoring-empty")
        page.context.close()
    finally:
        platform.delete_project(pid)


def test_monitoring_tab_shows_the_transaction_pools(chromium: Browser, platform: RunningPlatform) -> None:
    created = platform.create_project(name="pooled")
    pid, ep = created["project"]["id"], created["endpoints"][0]["id"]
    pooled = platform.dsn(created).replace(f"endpoint%3D{ep}", f"endpoint%3D{ep}-pooler")
    conns = [psycopg.connect(pooled, autocommit=True) for _ in range(3)]
    try:
        for conn in conns:
            conn.execute("SELECT 1")
        page = signed_in_page(chromium, platform)
        _open_monitoring(page, pid)
        table = page.get_by_role("table", name=f"Transaction pools of {ep}-pooler")
        expect(table).to_be_visible()
        row = table.locator("tbody tr").first
        expect(row).to_contain_text("neondb")
        expect(row).to_contain_text("neondb_owner")
        assert row.locator("td").nth(4).inner_text() == "3"  # three idle clients
        assert row.locator("td").nth(7).inner_text() == "93"  # the pool size for 0.25 CU
        shot(page, "monitoring-pools")
        page.context.close()
    finally:
        for conn in conns:
            conn.close()
        platform.delete_project(pid)

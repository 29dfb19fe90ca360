"""What the console's browser tests share: a signed-in page on a live platform, and screenshots."""

from __future__ import annotations

import os
from pathlib import Path

from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.fixtures.platform import RunningPlatform

CHROMIUM = "/usr/bin/chromium"  # Debian's package; never a downloaded browser
SHOTS = Path(os.environ.get("ARGON_TEST_ARTIFACTS", "test-artifacts")) / "console"


def browser_page(browser: Browser, platform: RunningPlatform) -> Page:
    context: BrowserContext = browser.new_context(base_url=platform.api_url,
                                                  permissions=["clipboard-read", "clipboard-write"],
                                                  viewport={"width": 1280, "height": 860})
    return context.new_page()


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in_link(platform: RunningPlatform) -> str:
    resp = platform.api.post("/console/sign_in_links")
    assert resp.status_code == 201, resp.text
    return str(resp.json()["url"])


def signed_in_page(browser: Browser, platform: RunningPlatform) -> Page:
    page = browser_page(browser, platform)
    page.goto(sign_in_link(platform))
    expect(page).to_have_url(platform.api_url + "/")
    return page

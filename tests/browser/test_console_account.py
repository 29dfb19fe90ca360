"""The console's API keys page in a real browser: list, create (shown once, copied), revoke.

The outcome is checked where it matters: the new key authenticates against the API, its last use
shows up, and after the revocation the API refuses it and the browser that signed in with it is
signed out.
"""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.helpers import browser_page, shot, signed_in_page
from tests.fixtures.platform import RunningPlatform

pytestmark = [pytest.mark.browser, pytest.mark.pg]


def _api_status(platform: RunningPlatform, key: str) -> int:
    return httpx.get(platform.api_url + "/api/v2/projects", headers={"Authorization": f"Bearer {key}"}).status_code


def _sign_in_with_key(browser: Browser, platform: RunningPlatform, key: str) -> Page:
    page = browser_page(browser, platform)
    page.goto("/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(platform.api_url + "/")
    return page


def test_api_keys_create_copy_and_revoke(chromium: Browser, platform: RunningPlatform) -> None:
    page = signed_in_page(chromium, platform)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="API keys").click()
    expect(page.get_by_role("heading", name="API keys", exact=True)).to_be_visible()
    expect(page.get_by_role("navigation", name="Main").get_by_role("link", name="API keys")).to_have_attribute(
        "aria-current", "page")
    # The platform's own key is listed, and it has been used (the fixture calls the API with it).
    expect(page.locator("tr[data-key='ARGON_API_KEY']")).to_be_visible()
    expect(page.locator("tr[data-key='ARGON_API_KEY'] td").nth(2)).not_to_have_text("never")

    # Create: the key is shown once, with a copy button and a "save it now" note.
    page.get_by_label("Key name").fill("ci-key")
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("heading", name="Save your key now")).to_be_visible()
    expect(page.get_by_text("cannot be shown again")).to_be_visible()
    token = page.locator("#new-key").inner_text().strip()
    assert token.startswith("argon_") and token not in page.url
    page.get_by_role("button", name="Copy").click()
    expect(page.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == token
    shot(page, "api-keys-new")
    row = page.locator("tr[data-key='ci-key']")
    expect(row.locator("td").nth(2)).to_have_text("never")

    # The key works against the API; its last use is recorded and shown.
    assert _api_status(platform, token) == 200
    listed = {k["name"]: k for k in platform.api.get("/api_keys").json()}
    assert listed["ci-key"]["last_used_at"] is not None
    page.reload()
    expect(page.get_by_role("heading", name="Save your key now")).to_have_count(0)
    expect(row.locator("td").nth(2)).to_have_text("just now")
    shot(page, "api-keys")

    # A browser signed in with the key shows it as "this browser".
    other = _sign_in_with_key(chromium, platform, token)
    other.goto("/account/api-keys")
    expect(other.locator("tr[data-key='ci-key']")).to_contain_text("this browser")

    # A blank name comes back as a message, not an error page.
    page.get_by_label("Key name").fill("   ")
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("alert")).to_contain_text("name must be a non-empty string")

    # Revoke, after a confirmation; Cancel keeps it.
    page.goto("/account/api-keys")
    row.get_by_role("link", name="Revoke ci-key").click()
    expect(page.get_by_role("heading", name="Revoke the API key ci-key")).to_be_visible()
    expect(page.get_by_role("button", name="Revoke key")).to_be_focused()
    shot(page, "api-key-revoke-confirm")
    page.get_by_role("link", name="Cancel").click()
    assert _api_status(platform, token) == 200
    row.get_by_role("link", name="Revoke ci-key").click()
    page.get_by_role("button", name="Revoke key").click()
    expect(page.get_by_role("status").filter(has_text="API key ci-key was revoked.")).to_be_visible()
    expect(row).to_have_count(0)
    assert _api_status(platform, token) == 401
    assert "ci-key" not in {k["name"] for k in platform.api.get("/api_keys").json()}

    # The browser that signed in with the revoked key is signed out; the key no longer signs in.
    other.goto("/account/api-keys")
    expect(other).to_have_url(platform.api_url + "/login?next=%2Faccount%2Fapi-keys")
    other.get_by_label("API key").fill(token)
    other.get_by_role("button", name="Sign in").click()
    expect(other.get_by_role("alert")).to_contain_text("not valid")
    other.context.close()

    # An unknown key id is a human page.
    page.goto("/account/api-keys/99999/revoke")
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    page.context.close()

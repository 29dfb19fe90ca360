"""Every console page at laptop and phone widths: nothing overflows sideways (wide tables scroll
inside their card), every form control has a label, focus is visible, and no page loads more than
about 200 KB. Screenshots of each page at both widths go to test-artifacts/console/layout-*.png.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Response, expect

from tests.browser.helpers import browser_page, shot, signed_in_page
from tests.fixtures.platform import RunningPlatform

pytestmark = [pytest.mark.browser, pytest.mark.pg]

LAPTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
MAX_BYTES = 200_000

UNLABELLED = """() => [...document.querySelectorAll('main input, main select, main textarea')]
  .filter(el => el.type !== 'hidden' && el.type !== 'submit' && !el.closest('[hidden]') && el.offsetParent !== null)
  .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.getAttribute('aria-labelledby'))
  .map(el => el.outerHTML)"""


@pytest.fixture(scope="module")
def site(platform: RunningPlatform) -> Iterator[dict[str, Any]]:
    """A project with a child branch and a long-named one, so tables have rows to lay out."""
    created = platform.create_project(name="layout-with-a-rather-long-project-name")
    pid = created["project"]["id"]
    for name in ("dev", "feature-with-a-long-descriptive-branch-name"):
        resp = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"name": name}})
        assert resp.status_code == 201, resp.text
    branches = {b["name"]: b["id"] for b in platform.api.get(f"/projects/{pid}/branches").json()["branches"]}
    yield {"pid": pid, "branches": branches, "created": created}
    platform.delete_project(pid)


def _pages(site: dict[str, Any]) -> list[tuple[str, str]]:
    pid, dev = site["pid"], site["branches"]["dev"]
    base = f"/projects/{pid}"
    return [("projects", "/"), ("new-project", "/projects/new"), ("dashboard", base),
            ("branches", f"{base}/branches"), ("roles", f"{base}/roles"), ("sql", f"{base}/sql"),
            ("monitoring", f"{base}/monitoring"), ("operations", f"{base}/operations"),
            ("settings", f"{base}/settings"), ("restore", f"{base}/branches/{dev}/restore"),
            ("branch-delete", f"{base}/branches/{dev}/delete"), ("project-delete", f"{base}/delete"),
            ("api-keys", "/account/api-keys"), ("not-found", "/no/such/page")]


OVERFLOWING = """() => [...document.querySelectorAll('body *')]
  .filter(el => el.getBoundingClientRect().right > window.innerWidth + 1 && !(el.parentElement && el.parentElement.closest('.table-scroll, .tabs')))
  .slice(0, 5).map(el => el.tagName + '.' + el.className + ' ' + Math.round(el.getBoundingClientRect().right))"""


def _check(page: Page, name: str, width: str) -> None:
    where = f"{name} at {width}"
    fits = page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert fits, (where, page.evaluate(OVERFLOWING))
    assert page.evaluate("document.querySelector('.topbar-inner').scrollWidth "
                         "<= document.querySelector('.topbar-inner').clientWidth"), where
    assert page.evaluate(UNLABELLED) == [], where
    shot(page, f"layout-{name}-{width}")


def test_every_page_fits_laptop_and_phone(chromium: Browser, platform: RunningPlatform,
                                          site: dict[str, Any]) -> None:
    page = signed_in_page(chromium, platform)
    responses: list[Response] = []
    page.on("response", lambda response: responses.append(response))
    for size, width in ((LAPTOP, "laptop"), (PHONE, "phone")):
        page.set_viewport_size(size)
        for name, path in _pages(site):
            responses.clear()
            page.goto(path)
            page.wait_for_load_state("load")
            expect(page.locator("h1").first).to_be_visible()
            _check(page, name, width)
            if width == "laptop":
                weight = sum(len(r.body()) for r in responses if r.status < 300)
                assert weight < MAX_BYTES, (name, {r.url: len(r.body()) for r in responses})
    page.context.close()

    signed_out = browser_page(chromium, platform)
    for size, width in ((LAPTOP, "laptop"), (PHONE, "phone")):
        signed_out.set_viewport_size(size)
        signed_out.goto("/login")
        _check(signed_out, "login", width)
    signed_out.context.close()


def test_phone_tables_scroll_inside_their_card_and_tabs_stay_reachable(
        chromium: Browser, platform: RunningPlatform, site: dict[str, Any]) -> None:
    page = signed_in_page(chromium, platform)
    page.set_viewport_size(PHONE)
    page.goto(f"/projects/{site['pid']}/branches")
    scroller = page.locator(".table-scroll").first
    assert scroller.evaluate("el => el.scrollWidth > el.clientWidth")  # the table is wider than the phone...
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # ...but the page is not
    # The project tabs scroll sideways, with the current one in view.
    page.goto(f"/projects/{site['pid']}/settings")
    current = page.get_by_role("navigation", name="Project").get_by_role("link", name="Settings")
    expect(current).to_have_attribute("aria-current", "page")
    expect(current).to_be_in_viewport()
    page.context.close()


def test_keyboard_reaches_content_with_visible_focus(chromium: Browser, platform: RunningPlatform,
                                                     site: dict[str, Any]) -> None:
    page = signed_in_page(chromium, platform)
    page.goto(f"/projects/{site['pid']}/branches")
    # The first Tab shows the skip link; following it puts focus on the content.
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    expect(skip).to_be_in_viewport()
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()
    # Tabbing on reaches links and buttons, each drawn with a visible focus ring.
    seen = 0
    for _ in range(12):
        page.keyboard.press("Tab")
        style = page.evaluate("""() => { const el = document.activeElement, s = getComputedStyle(el);
            return [el.tagName, s.outlineStyle, s.outlineWidth]; }""")
        assert style[0] in ("A", "BUTTON", "INPUT", "SELECT", "TEXTAREA", "PRE"), style
        assert style[1] != "none" and style[2] != "0px", style
        seen += 1
    assert seen == 12
    # A form is usable from the keyboard alone: rename a branch.
    page.goto(f"/projects/{site['pid']}/branches/{site['branches']['dev']}/rename")
    expect(page.get_by_label("New name")).to_be_focused()
    page.keyboard.press("Control+A")
    page.keyboard.type("dev-renamed")
    page.keyboard.press("Enter")
    expect(page.get_by_role("status").filter(has_text="Branch renamed to dev-renamed.")).to_be_visible()
    shot(page, "keyboard-rename")
    page.context.close()

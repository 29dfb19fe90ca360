"""The browser tests' Chromium: Debian's package, started once per module; failing, never skipping."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Playwright, sync_playwright

from tests.browser.helpers import CHROMIUM


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with sync_playwright() as pw:
        browser = _launch(pw)
        yield browser
        browser.close()


def _launch(pw: Playwright) -> Browser:
    try:
        return pw.chromium.launch(executable_path=CHROMIUM)
    except Exception as exc:  # a browser test that cannot run a browser must fail, never skip
        pytest.fail(f"Chromium ({CHROMIUM}) could not start; install Debian's chromium package: {exc}")

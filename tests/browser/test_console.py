"""The web console in a real browser: Debian's Chromium driven by Playwright against a live platform.

The journey is the product's first one: sign in with the link, create a project, copy the Django
snippet and connect with its values, suspend and start the compute. The security tests check what
keeps the console private: CSRF tokens, sign-in redirects, single-use links, Bearer-only API.
Every page visited is saved as a full-page screenshot in test-artifacts/console/.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, Response, expect

from argon.cli.connect import render_connection
from tests.browser.helpers import browser_page, shot, sign_in_link, signed_in_page
from tests.fixtures.platform import API_KEY, RunningPlatform, short_tmpdir

pytestmark = [pytest.mark.browser, pytest.mark.pg]

STATE_TIMEOUT = 30_000  # ms for a compute to change state and the page to show it


@pytest.fixture(scope="module")
def pristine() -> Iterator[RunningPlatform]:
    """A platform of its own, for the projects page's empty state."""
    root = short_tmpdir()
    try:
        running = RunningPlatform(root)
        try:
            yield running
        finally:
            running.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def parse_django(snippet: str) -> dict[str, Any]:
    name, _, value = snippet.partition("=")
    assert name.strip() == "DATABASES", snippet
    databases: dict[str, Any] = ast.literal_eval(value.strip())
    return dict(databases["default"])


# The journey ------------------------------------------------------------------------------------------


def test_first_project_journey(chromium: Browser, pristine: RunningPlatform) -> None:
    page = browser_page(chromium, pristine)

    # The sign-in link opens the console and leaves no token in the address bar.
    page.goto(sign_in_link(pristine))
    expect(page).to_have_url(pristine.api_url + "/")
    cookie = next(c for c in page.context.cookies() if c["name"] == "argon_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/"
    expect(page.get_by_role("heading", name="Create your first project")).to_be_visible()
    shot(page, "projects-empty")

    # New Project: the newest Postgres is preselected.
    page.get_by_role("link", name="New Project").click()
    expect(page.get_by_role("heading", name="New Project")).to_be_visible()
    newest = max(pristine.plane.installs)
    expect(page.get_by_label("Postgres version")).to_have_value(str(newest))
    expect(page.get_by_label("Region")).to_have_value("local")
    shot(page, "new-project")
    page.get_by_label("Project name").fill("journey")
    page.get_by_role("button", name="Create project").click()

    # The dashboard shows the password once, never in the URL.
    expect(page.get_by_role("heading", name="journey", exact=True)).to_be_visible()
    expect(page.get_by_role("heading", name="Save your password now")).to_be_visible()
    password = page.locator("#new-password").inner_text().strip()
    assert password.startswith("npg_") and password not in page.url
    expect(page.locator("[data-compute-label]")).to_have_text("Active", timeout=STATE_TIMEOUT)
    shot(page, "dashboard-new-project")

    # The Django snippet: masked until revealed, copied whole, and its values connect.
    page.get_by_label("Show as").select_option("django")
    django = page.locator("#snippet-django")
    expect(django).to_be_visible()
    expect(django.locator(".secret")).to_be_hidden()
    page.get_by_role("button", name="Reveal password").click()
    expect(django.locator(".secret")).to_be_visible()
    shown = django.locator("pre").inner_text()
    django.get_by_role("button", name="Copy").click()
    expect(django.get_by_role("button", name="Copied")).to_be_visible()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == shown
    shot(page, "dashboard-django-snippet")

    db = parse_django(copied)
    assert db["ENGINE"] == "django.db.backends.postgresql"
    journey = next(p for p in pristine.api.get("/projects").json()["projects"] if p["name"] == "journey")
    host = pristine.api.get(f"/projects/{journey['id']}/endpoints").json()["endpoints"][0]["host"]
    assert (db["HOST"], db["PORT"]) == (host, str(pristine.proxy_port))  # its own address (ADR 0031), or the name
    assert db["PASSWORD"] == password
    uri = page.locator("#copy-uri").input_value()
    assert copied == render_connection({"uri": uri}, "django")  # what `argon connection-string --format django` prints
    with psycopg.connect(host=db["HOST"], port=db["PORT"], dbname=db["NAME"], user=db["USER"],
                         password=db["PASSWORD"], sslmode=db["OPTIONS"]["sslmode"],
                         options=db["OPTIONS"]["options"]) as conn:
        assert conn.execute("select current_user, current_database()").fetchone() == (db["USER"], db["NAME"])

    # The password is not shown again on the next visit.
    page.reload()
    expect(page.get_by_role("heading", name="Save your password now")).to_have_count(0)

    # Suspend, then Start, from the compute card.
    page.get_by_role("button", name="Suspend").click()
    expect(page.locator("[data-compute-label]")).to_have_text("Idle", timeout=STATE_TIMEOUT)
    expect(page.get_by_role("status").filter(has_text="suspended")).to_be_visible()
    shot(page, "dashboard-suspended")
    page.get_by_role("button", name="Start").click()
    expect(page.locator("[data-compute-label]")).to_have_text("Active", timeout=STATE_TIMEOUT)
    shot(page, "dashboard-started")

    # The live indicator follows a suspend made elsewhere (the API), without a reload.
    project_id = page.url.split("/projects/")[1].split("?")[0]
    endpoint_id = page.locator("#compute .facts dd.mono").inner_text()
    assert pristine.api.post(f"/projects/{project_id}/endpoints/{endpoint_id}/suspend").status_code == 200
    expect(page.locator("[data-compute-label]")).to_have_text("Idle", timeout=STATE_TIMEOUT)
    expect(page.get_by_role("button", name="Start")).to_be_enabled()

    # The suspend timeout is editable.
    page.get_by_label("Suspend after idle for").select_option(label="1 minute")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_text("Suspend timeout saved.")).to_be_visible()
    assert pristine.endpoint(project_id, endpoint_id)["suspend_timeout_seconds"] == 60

    # The projects page lists it; at phone width nothing overflows sideways.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Projects").click()
    row = page.get_by_role("row").filter(has_text="journey")
    expect(row).to_contain_text(f"{newest}")
    expect(row).to_contain_text("Idle")
    shot(page, "projects-list")
    page.set_viewport_size({"width": 390, "height": 844})
    for path, name in ((f"/projects/{project_id}", "dashboard-phone"), ("/", "projects-phone")):
        page.goto(path)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
        shot(page, name)

    # Sign out ends the session.
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(pristine.api_url + "/login")
    page.goto("/")
    expect(page).to_have_url(pristine.api_url + "/login")
    shot(page, "signed-out")
    page.context.close()


def test_pages_stay_small(chromium: Browser, platform: RunningPlatform) -> None:
    created = platform.create_project(name="weight")
    page = signed_in_page(chromium, platform)
    responses: list[Response] = []
    page.on("response", lambda response: responses.append(response))
    page.goto(f"/projects/{created['project']['id']}")
    expect(page.get_by_role("heading", name="Connection Details")).to_be_visible()
    sizes = {r.url: len(r.body()) for r in responses}
    assert len(sizes) >= 3 and sum(sizes.values()) < 200_000, sizes
    page.context.close()
    platform.delete_project(created["project"]["id"])


def test_the_projects_page_is_paged_and_searchable(chromium: Browser, platform: RunningPlatform,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A page of projects, newest first, with Older and Newest links that keep the search (at 1,000
    projects the page renders 50 rows, not 1,000); a search by name or by id."""
    from argon.console import paging

    monkeypatch.setattr(paging, "PAGE_SIZE", 2)
    created = [platform.create_project(name=f"pagedzz{i}")["project"]["id"] for i in range(3)]
    page = signed_in_page(chromium, platform)
    page.get_by_label("Search projects by name or id").fill("PAGEDZZ")
    page.get_by_role("button", name="Search").click()
    rows = page.get_by_role("row").filter(has_text="pagedzz")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("pagedzz2")
    expect(rows.nth(1)).to_contain_text("pagedzz1")
    expect(page.get_by_text("3 projects match")).to_be_visible()
    page.get_by_role("link", name="Older").click()
    expect(rows).to_have_count(1)
    expect(rows.nth(0)).to_contain_text("pagedzz0")
    expect(page.get_by_role("link", name="Older")).to_have_count(0)
    page.get_by_role("link", name="Newest").click()
    expect(rows.nth(0)).to_contain_text("pagedzz2")
    page.goto(f"/?search={created[1]}")  # by id
    expect(rows).to_have_count(1)
    expect(rows.nth(0)).to_contain_text("pagedzz1")
    page.goto("/?before=garbage")
    expect(page.get_by_text("start again from the newest")).to_be_visible()
    page.context.close()
    for project_id in created:
        platform.delete_project(project_id)


# Security --------------------------------------------------------------------------------------------


def test_signed_out_visits_redirect_to_login(chromium: Browser, platform: RunningPlatform) -> None:
    page = browser_page(chromium, platform)
    page.goto("/projects/new")
    expect(page).to_have_url(platform.api_url + "/login?next=%2Fprojects%2Fnew")
    expect(page.get_by_role("heading", name="Sign in to Argon")).to_be_visible()
    shot(page, "login")

    page.get_by_label("API key").fill("argon_wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    shot(page, "login-wrong-key")

    page.get_by_label("API key").fill(API_KEY)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(platform.api_url + "/projects/new")
    page.context.close()

    for path in ("/", "/projects/new", "/projects/whatever", "/projects/whatever/compute.json"):
        resp = httpx.get(platform.api_url + path)
        assert resp.status_code in (303, 401), (path, resp.status_code)
        if resp.status_code == 303:
            assert resp.headers["location"].startswith("/login"), path


def test_forms_need_the_sessions_csrf_token(chromium: Browser, platform: RunningPlatform) -> None:
    page = signed_in_page(chromium, platform)
    before = len(platform.api.get("/projects", params={"limit": 400}).json()["projects"])

    for form in ({"name": "no-token"}, {"name": "wrong-token", "csrf_token": "forged"}):
        resp = page.request.post("/projects/new", form=form, max_redirects=0)
        assert resp.status == 403
        assert resp.headers["content-type"].startswith("text/html")
        assert "This form has expired" in resp.text()

    # A form whose token was tampered with, submitted from the page itself, gets the same human page.
    page.goto("/projects/new")
    page.locator("main input[name=csrf_token]").evaluate("el => el.value = 'tampered'")
    page.get_by_label("Project name").fill("tampered")
    page.get_by_role("button", name="Create project").click()
    expect(page.get_by_role("heading", name="This form has expired")).to_be_visible()
    shot(page, "csrf-rejected")
    assert len(platform.api.get("/projects", params={"limit": 400}).json()["projects"]) == before

    resp = page.request.post("/logout", form={"csrf_token": "forged"}, max_redirects=0)
    assert resp.status == 403
    page.context.close()


def test_a_sign_in_link_works_once(chromium: Browser, platform: RunningPlatform) -> None:
    link = sign_in_link(platform)
    first = browser_page(chromium, platform)
    first.goto(link)
    expect(first).to_have_url(platform.api_url + "/")

    second = browser_page(chromium, platform)
    second.goto(link)
    expect(second.get_by_role("alert")).to_contain_text("already been used or has expired")
    assert not any(c["name"] == "argon_session" for c in second.context.cookies())
    shot(second, "link-used")
    first.context.close()
    second.context.close()


def test_argon_up_and_argon_console_print_working_links(chromium: Browser, pristine: RunningPlatform) -> None:
    """The link `argon up` printed at its start (valid 15 minutes: this module's own platform, not the
    session's, which may have started longer ago) and one from `argon console`."""
    from click.testing import CliRunner

    from argon.cli.main import cli

    result = CliRunner().invoke(cli, ["--api-url", pristine.api_url, "--api-key", API_KEY, "console"])
    assert result.exit_code == 0, result.output
    printed = result.stdout.strip()
    for link in (pristine.platform.info.sign_in_url, printed):
        assert link.startswith(pristine.api_url + "/login?token=")
        page = browser_page(chromium, pristine)
        page.goto(link)
        expect(page).to_have_url(pristine.api_url + "/")
        page.context.close()


def test_the_api_stays_bearer_only(chromium: Browser, platform: RunningPlatform) -> None:
    page = signed_in_page(chromium, platform)
    resp = page.request.get("/api/v2/projects")
    assert resp.status == 401 and resp.json()["message"].startswith("authentication required")
    assert httpx.post(platform.api_url + "/api/v2/console/sign_in_links").status_code == 401
    page.context.close()


def test_new_project_errors_come_back_in_the_form(chromium: Browser, platform: RunningPlatform) -> None:
    page = signed_in_page(chromium, platform)
    page.goto("/projects/new")
    token = page.locator("main input[name=csrf_token]").input_value()
    resp = page.request.post("/projects/new", form={"csrf_token": token, "name": "old", "pg_version": "9"})
    assert resp.status == 400
    page.set_content(resp.text())
    expect(page.get_by_role("alert")).to_contain_text("PostgreSQL 9 is not available on this server")
    expect(page.get_by_label("Project name")).to_have_value("old")
    page.context.close()


def test_unknown_pages_and_missing_projects_are_human(chromium: Browser, platform: RunningPlatform) -> None:
    page = signed_in_page(chromium, platform)
    page.goto("/projects/no-such-project")
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    expect(page.get_by_text("project 'no-such-project' not found")).to_be_visible()
    shot(page, "project-not-found")
    page.goto("/no/such/page")
    expect(page.get_by_role("heading", name="Page not found")).to_be_visible()
    page.context.close()

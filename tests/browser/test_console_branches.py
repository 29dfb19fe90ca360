"""The console's second slice in a real browser: Branches, Roles & Databases, SQL Editor, Operations.

Each test drives the pages as a person would (forms, confirmation pages) and checks the outcome
through the API or a real psycopg connection through the proxy. Screenshots of every new page go
to test-artifacts/console/.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.helpers import shot, signed_in_page
from tests.fixtures.platform import RunningPlatform

pytestmark = [pytest.mark.browser, pytest.mark.pg]

SLOW = 60_000  # ms: a branch copy or a compute wake can take a few seconds on a busy machine


@pytest.fixture(scope="module")
def shop(platform: RunningPlatform) -> Iterator[dict[str, Any]]:
    created = platform.create_project(name="shop")
    yield created
    platform.delete_project(created["project"]["id"])


def _branches(platform: RunningPlatform, pid: str) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in platform.api.get(f"/projects/{pid}/branches").json()["branches"]}


def _row(page: Page, attr: str, name: str) -> Any:
    return page.locator(f"tr[{attr}='{name}']")


def test_branches_create_rename_reset_and_delete(chromium: Browser, platform: RunningPlatform,
                                                  shop: dict[str, Any]) -> None:
    pid = shop["project"]["id"]
    page = signed_in_page(chromium, platform)
    page.goto(f"/projects/{pid}")
    page.get_by_role("navigation", name="Project").get_by_role("link", name="Branches").click()
    expect(page.get_by_role("heading", name="Branches", exact=True)).to_be_visible()
    expect(_row(page, "data-branch", "main")).to_contain_text("default")
    expect(page.get_by_label("Head (the parent's current data)")).to_be_checked()

    # Create: dev from main, then a child of dev; the tree indents it.
    page.get_by_label("Branch name").fill("dev")
    page.get_by_role("button", name="Create branch").click()
    expect(page.get_by_role("status").filter(has_text="Branch dev is ready.")).to_be_visible(timeout=SLOW)
    assert _branches(platform, pid)["dev"]["parent_id"] == shop["branch"]["id"]
    page.get_by_label("Branch name").fill("feature")
    page.get_by_label("Parent", exact=True).select_option(label="dev")
    page.get_by_role("button", name="Create branch").click()
    expect(page.get_by_role("status").filter(has_text="Branch feature is ready.")).to_be_visible(timeout=SLOW)
    branches = _branches(platform, pid)
    assert branches["feature"]["parent_id"] == branches["dev"]["id"]
    expect(_row(page, "data-branch", "feature").locator(".tree-name")).to_have_class("tree-name depth-2")
    indent = _row(page, "data-branch", "feature").locator(".tree-name").evaluate(
        "el => getComputedStyle(el).paddingLeft")
    assert indent != "0px"
    link = _row(page, "data-branch", "dev").get_by_role("link", name="dev", exact=True)
    assert link.get_attribute("href") == f"/projects/{pid}?branch={branches['dev']['id']}"
    expect(_row(page, "data-branch", "dev").locator(".state")).to_have_text("Active", timeout=SLOW)
    page.reload()
    shot(page, "branches")

    # Its Connection Details show on the dashboard.
    _row(page, "data-branch", "dev").get_by_role("link", name="dev", exact=True).click()
    expect(page.get_by_label("Branch")).to_have_value(branches["dev"]["id"])
    page.go_back()

    # Rename feature, through its form page.
    _row(page, "data-branch", "feature").get_by_role("link", name="Rename feature").click()
    shot(page, "branch-rename")
    page.get_by_label("New name").fill("feature-2")
    page.get_by_role("button", name="Rename").click()
    expect(page.get_by_role("status").filter(has_text="Branch renamed to feature-2.")).to_be_visible()
    assert "feature-2" in _branches(platform, pid)

    # Reset dev from main, keeping its data as a branch; the change made on main shows up on dev.
    with psycopg.connect(platform.dsn(shop)) as conn:
        conn.execute("create table reset_marker (x int)")
    _row(page, "data-branch", "dev").get_by_role("link", name="Reset dev from parent").click()
    expect(page.get_by_role("heading", name="Reset dev from main")).to_be_visible()
    shot(page, "branch-reset-confirm")
    page.get_by_label("Keep the current data as a branch named").fill("dev-before-reset")
    page.get_by_role("button", name="Reset from parent").click()
    expect(page.get_by_role("status").filter(has_text="dev was reset from its parent")).to_be_visible(timeout=SLOW)
    branches = _branches(platform, pid)
    assert branches["dev"]["parent_id"] == branches["dev-before-reset"]["id"]
    dev_ep = platform.api.get(f"/projects/{pid}/branches/{branches['dev']['id']}/endpoints").json()["endpoints"][0]
    with psycopg.connect(platform.dsn(shop).replace(shop["endpoints"][0]["id"], dev_ep["id"])) as conn:
        assert conn.execute("select to_regclass('reset_marker') is not null").fetchone() == (True,)

    # Set as default, and back.
    _row(page, "data-branch", "dev").get_by_role("button", name="Set dev as default").click()
    expect(_row(page, "data-branch", "dev")).to_contain_text("default")
    assert _branches(platform, pid)["dev"]["default"] is True
    _row(page, "data-branch", "main").get_by_role("button", name="Set main as default").click()
    assert _branches(platform, pid)["main"]["default"] is True

    # Delete, with a confirmation step reachable from the keyboard; Cancel keeps the branch.
    _row(page, "data-branch", "feature-2").get_by_role("link", name="Delete feature-2").click()
    expect(page.get_by_role("heading", name="Delete feature-2")).to_be_visible()
    shot(page, "branch-delete-confirm")
    page.get_by_role("link", name="Cancel").click()
    assert "feature-2" in _branches(platform, pid)
    _row(page, "data-branch", "feature-2").get_by_role("link", name="Delete feature-2").click()
    expect(page.get_by_role("button", name="Delete branch")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_role("status").filter(has_text="Branch feature-2 was deleted.")).to_be_visible(timeout=SLOW)
    assert "feature-2" not in _branches(platform, pid)

    # A refused action comes back as an error notice: dev has a child.
    page.goto(f"/projects/{pid}/branches/{branches['dev-before-reset']['id']}/delete")
    page.get_by_role("button", name="Delete branch").click()
    expect(page.get_by_role("alert")).to_contain_text("has child branches")
    page.context.close()


def test_roles_and_databases(chromium: Browser, platform: RunningPlatform, shop: dict[str, Any]) -> None:
    pid = shop["project"]["id"]
    main = shop["branch"]["id"]
    page = signed_in_page(chromium, platform)
    page.goto(f"/projects/{pid}/roles?branch={main}")
    expect(page.get_by_role("heading", name="Roles", exact=True)).to_be_visible()
    expect(page.locator("tr[data-role='cloud_admin']")).to_have_count(0)

    page.get_by_label("Role name").fill("app_user")
    page.get_by_role("button", name="Create role").click()
    expect(page.get_by_role("heading", name="Save your password now")).to_be_visible(timeout=SLOW)
    first = page.locator("#new-password").inner_text().strip()
    assert first.startswith("npg_") and first not in page.url
    shot(page, "roles-new-role")

    page.get_by_label("Database name").fill("app")
    page.get_by_label("Owner", exact=True).select_option("app_user")
    page.get_by_role("button", name="Create database").click()
    expect(page.get_by_role("status").filter(has_text="Database app was created.")).to_be_visible(timeout=SLOW)
    expect(_row(page, "data-database", "app")).to_contain_text("app_user")
    dbs = platform.api.get(f"/projects/{pid}/branches/{main}/databases").json()["databases"]
    assert {"name": "app", "owner_name": "app_user"}.items() <= next(d for d in dbs if d["name"] == "app").items()

    # Reset the password: confirm, the new one is shown once and connects through the proxy.
    page.get_by_role("link", name="Reset the password of app_user").click()
    shot(page, "role-reset-confirm")
    page.get_by_role("button", name="Reset password").click()
    expect(page.get_by_role("heading", name="Save your password now")).to_be_visible(timeout=SLOW)
    second = page.locator("#new-password").inner_text().strip()
    assert second != first
    params = platform.params(shop)
    with psycopg.connect(**{**params, "user": "app_user", "password": second, "dbname": "app"}) as conn:
        assert conn.execute("select current_user, current_database()").fetchone() == ("app_user", "app")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**{**params, "user": "app_user", "password": first, "dbname": "app"}).close()
    page.reload()
    expect(page.get_by_role("heading", name="Save your password now")).to_have_count(0)
    shot(page, "roles")

    # Delete the database, then the role, each after a confirmation page.
    page.get_by_role("link", name="Delete the database app").click()
    shot(page, "database-delete-confirm")
    page.get_by_role("button", name="Delete database").click()
    expect(page.get_by_role("status").filter(has_text="Database app was deleted.")).to_be_visible(timeout=SLOW)
    page.get_by_role("link", name="Delete the role app_user").click()
    page.get_by_role("button", name="Delete role").click()
    expect(page.get_by_role("status").filter(has_text="Role app_user was deleted.")).to_be_visible(timeout=SLOW)
    roles = platform.api.get(f"/projects/{pid}/branches/{main}/roles").json()["roles"]
    assert "app_user" not in {r["name"] for r in roles}
    page.context.close()


def test_sql_editor(chromium: Browser, platform: RunningPlatform, shop: dict[str, Any]) -> None:
    pid = shop["project"]["id"]
    page = signed_in_page(chromium, platform)
    page.goto(f"/projects/{pid}/sql")
    expect(page.get_by_role("heading", name="SQL Editor")).to_be_visible()
    roles = page.get_by_label("Role", exact=True).locator("option").all_inner_texts()
    assert "cloud_admin" not in roles and roles

    page.get_by_label("Query", exact=True).fill("select 1 as one, null as nothing")
    page.get_by_role("button", name="Run").click()
    table = page.locator("[data-sql-result]")
    expect(table).to_be_visible(timeout=SLOW)
    assert table.locator("thead th").all_inner_texts() == ["one", "nothing"]
    assert table.locator("tbody td").first.inner_text() == "1"
    expect(table.locator("tbody td .null")).to_have_text("NULL")
    expect(page.locator("[data-sql-status]")).to_contain_text("SELECT 1")
    shot(page, "sql-result")

    page.get_by_label("Query", exact=True).fill("select 1;\nselect nope from nowhere")
    page.get_by_label("Query", exact=True).press("Control+Enter")
    error = page.get_by_role("alert")
    expect(error).to_contain_text('relation "nowhere" does not exist', timeout=SLOW)
    expect(error).to_contain_text("42P01")
    expect(error).to_contain_text("At line 2")
    shot(page, "sql-error")

    # Long values are truncated with the whole value in the title; more than 1000 rows are cut.
    page.get_by_label("Query", exact=True).fill("select repeat('x', 500) as long, g from generate_series(1, 1500) g")
    page.get_by_role("button", name="Run").click()
    expect(page.get_by_text("Showing the first 1000 of 1500 rows.")).to_be_visible(timeout=SLOW)
    first_cell = page.locator("[data-sql-result] tbody td").first
    assert first_cell.get_attribute("title") == "x" * 500 and len(first_cell.inner_text()) < 500

    # The history keeps the queries, newest first, and reopens one in the editor.
    history = page.get_by_role("heading", name="History").locator("..").get_by_role("link")
    expect(history).to_have_count(3)
    history.last.click()
    expect(page.get_by_label("Query", exact=True)).to_have_value("select 1 as one, null as nothing")
    page.context.close()


def test_operations_log(chromium: Browser, platform: RunningPlatform, shop: dict[str, Any]) -> None:
    pid = shop["project"]["id"]
    resp = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "ops-check"}})
    assert resp.status_code == 201, resp.text
    page = signed_in_page(chromium, platform)
    page.goto(f"/projects/{pid}")
    page.get_by_role("navigation", name="Project").get_by_role("link", name="Operations").click()
    expect(page.get_by_role("heading", name="Operations", exact=True)).to_be_visible()
    row = page.locator("tr[data-action='create_branch']").filter(has_text="ops-check")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("finished")
    shot(page, "operations")

    # Enough operations for a second page: the "Older" link follows the store's cursor.
    total = len(platform.api.get(f"/projects/{pid}/operations", params={"limit": 1000}).json()["operations"])
    if total > 25:
        page.get_by_role("link", name="Older").click()
        expect(page.locator("tbody tr")).to_have_count(min(total - 25, 25))
        shot(page, "operations-older")
    page.context.close()


def test_the_branch_tree_is_paged_and_searchable(chromium: Browser, platform: RunningPlatform,
                                                 shop: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The tree a page at a time, in tree order (each parent before its children), and a search by
    name or id; a project with hundreds of branches renders one page of them."""
    from argon.console import paging

    pid = shop["project"]["id"]
    made = []
    for name in ("pg-a", "pg-b"):
        resp = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"name": name}})
        assert resp.status_code == 201, resp.text
        made.append(resp.json()["branch"]["id"])
    names: list[str | None] = []
    monkeypatch.setattr(paging, "PAGE_SIZE", 1)
    page = signed_in_page(chromium, platform)
    page.goto(f"/projects/{pid}/branches")
    expect(page.locator("tbody tr")).to_have_count(1)
    expect(_row(page, "data-branch", "main")).to_be_visible()  # the root comes first
    parent = page.get_by_label("Parent", exact=True)
    expect(parent.locator("option")).to_have_text(["main"])  # the New branch form picks among the page's
    while page.get_by_role("link", name="Next").count():
        page.get_by_role("link", name="Next").click()
        expect(page.locator("tbody tr")).to_have_count(1)
        names.append(page.locator("tbody tr").get_attribute("data-branch"))
    assert names.index("pg-a") < names.index("pg-b"), names  # siblings oldest first
    page.get_by_label("Search branches by name or id").fill("PG-B")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("tbody tr")).to_have_count(1)
    expect(_row(page, "data-branch", "pg-b")).to_be_visible()
    expect(page.get_by_text("1 branch matches")).to_be_visible()
    expect(parent.locator("option")).to_have_text(["main", "pg-b"])  # the default stays chosen, first
    expect(parent).to_have_value(shop["branch"]["id"])
    page.goto(f"/projects/{pid}/branches?search={made[0]}")
    expect(_row(page, "data-branch", "pg-a")).to_be_visible()
    shot(page, "branches-search")
    page.context.close()
    for branch_id in made:
        platform.api.delete(f"/projects/{pid}/branches/{branch_id}")


def _count(platform: RunningPlatform, created: dict[str, Any], pid: str, branch_id: str) -> int:
    ep = platform.api.get(f"/projects/{pid}/branches/{branch_id}/endpoints").json()["endpoints"][0]
    with psycopg.connect(platform.dsn(created).replace(created["endpoints"][0]["id"], ep["id"])) as conn:
        row = conn.execute("select count(*) from t").fetchone()
        assert row is not None
        return int(row[0])


def test_point_in_time_branches_and_restore(chromium: Browser, platform: RunningPlatform) -> None:
    created = platform.create_project(name="pit")
    pid = created["project"]["id"]
    main = created["branch"]["id"]
    # Row 1, an LSN, row 2, a whole second (the form's resolution), row 3.
    with psycopg.connect(platform.dsn(created), autocommit=True) as conn:
        conn.execute("create table t (v int)")
        conn.execute("insert into t values (1)")
        lsn = str(conn.execute("select pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]
        conn.execute("insert into t values (2)")
        after_two = conn.execute("select extract(epoch from clock_timestamp())").fetchone()[0]  # type: ignore[index]
        second = math.ceil(float(after_two))
        time.sleep(max(0.0, second - float(after_two)) + 0.5)
        conn.execute("insert into t values (3)")
    moment = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")

    page = signed_in_page(chromium, platform)
    page.goto(f"/projects/{pid}/branches")
    expect(page.get_by_text("Any moment in the last 1 day")).to_be_visible()
    lsn_input = page.get_by_label("LSN", exact=True)
    expect(lsn_input).to_be_hidden()  # only the chosen option's input shows

    # A bad LSN comes back as a message in the filled-in form, not a traceback.
    page.get_by_label("Branch name").fill("at-lsn")
    page.get_by_label("An LSN").check()
    expect(lsn_input).to_be_visible()
    lsn_input.fill("zz")
    page.get_by_role("button", name="Create branch").click()
    expect(page.get_by_role("alert")).to_contain_text("'zz' is not an LSN")
    expect(page.get_by_label("Branch name")).to_have_value("at-lsn")
    expect(page.get_by_label("An LSN")).to_be_checked()
    shot(page, "branch-pitr-error")

    # At an LSN: only row 1.
    lsn_input.fill(lsn)
    page.get_by_role("button", name="Create branch").click()
    expect(page.get_by_role("status").filter(has_text=f"Branch at-lsn is ready at LSN {lsn}.")).to_be_visible(
        timeout=SLOW)
    assert _count(platform, created, pid, _branches(platform, pid)["at-lsn"]["id"]) == 1

    # At a time (UTC, seconds): rows 1 and 2.
    page.get_by_label("Branch name").fill("at-time")
    page.get_by_label("A point in time").check()
    expect(page.get_by_text("Times are in UTC")).to_be_visible()
    page.get_by_label("Date and time (UTC)").fill(moment)
    shot(page, "branch-pitr-form")
    page.get_by_role("button", name="Create branch").click()
    expect(page.get_by_role("status").filter(has_text="Branch at-time is ready as of")).to_be_visible(timeout=SLOW)
    at_time = _branches(platform, pid)["at-time"]
    assert at_time["parent_id"] == main
    assert _count(platform, created, pid, at_time["id"]) == 2

    # Restore main to its own past, keeping its current state as a branch.
    _row(page, "data-branch", "main").get_by_role("link", name="Restore main").click()
    expect(page.get_by_role("heading", name="Restore main")).to_be_visible()
    page.get_by_label("An LSN").check()
    page.get_by_label("LSN", exact=True).fill("0/zz")
    page.get_by_role("button", name="Restore branch").click()
    expect(page.get_by_role("alert")).to_contain_text("is not an LSN")
    page.get_by_label("LSN", exact=True).fill(lsn)
    page.get_by_label("Keep the current state as branch").fill("main-before-restore")
    shot(page, "branch-restore")
    page.get_by_role("button", name="Restore branch").click()
    expect(page.get_by_role("status").filter(has_text=f"main was restored to LSN {lsn}")).to_be_visible(
        timeout=SLOW)
    branches = _branches(platform, pid)
    assert _count(platform, created, pid, main) == 1
    kept = branches["main-before-restore"]
    resp = platform.api.post(f"/projects/{pid}/endpoints",
                             json={"endpoint": {"branch_id": kept["id"], "type": "read_write"}})
    assert resp.status_code == 201, resp.text
    assert _count(platform, created, pid, kept["id"]) == 3

    # Restore a child from its parent's head, through the same page.
    page.goto(f"/projects/{pid}/branches")
    _row(page, "data-branch", "at-time").get_by_role("link", name="Restore at-time").click()
    expect(page.get_by_label("The current data of its parent, main")).to_be_checked()
    page.get_by_role("button", name="Restore branch").click()
    expect(page.get_by_role("status").filter(has_text="at-time was restored from its parent's current data")
           ).to_be_visible(timeout=SLOW)
    assert _count(platform, created, pid, at_time["id"]) == 1
    page.context.close()
    platform.delete_project(pid)

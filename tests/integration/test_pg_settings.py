"""An endpoint's `pg_settings` take effect: live where a reload can, at the next start otherwise, the
PATCH saying which; anything off the tenant allow-list is a 400 naming it, with nothing changed."""

from __future__ import annotations

import psycopg
import pytest

from tests.fixtures.platform import RunningPlatform

pytestmark = [pytest.mark.pg, pytest.mark.slow]  # a compute restart: ~10 s


def show(uri: str, *names: str) -> list[str]:
    with psycopg.connect(uri, connect_timeout=30) as conn:
        return [str(conn.execute(f"show {n}").fetchone()[0]) for n in names]  # type: ignore[index]


def test_pg_settings_apply_live_or_at_next_start(platform: RunningPlatform) -> None:
    created = platform.create_project(name="pgsettings")
    pid, ep = created["project"]["id"], created["endpoints"][0]["id"]
    uri = platform.dsn(created)
    try:
        before = show(uri, "work_mem", "max_prepared_transactions")
        resp = platform.api.patch(f"/projects/{pid}/endpoints/{ep}", json={"endpoint": {"settings": {"pg_settings": {
            "work_mem": "12MB", "statement_timeout": "7s", "max_prepared_transactions": 5,
            "TimeZone": "Europe/Berlin"}}}})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["endpoint"]["settings"]["pg_settings"] == {
            "work_mem": "12MB", "statement_timeout": "7s", "max_prepared_transactions": "5", "timezone": "Europe/Berlin"}
        assert body["applied"] == {"now": ["pg_settings.statement_timeout", "pg_settings.timezone", "pg_settings.work_mem"],
                                   "next_start": ["pg_settings.max_prepared_transactions"]}
        assert show(uri, "work_mem", "statement_timeout", "max_prepared_transactions", "timezone") == [
            "12MB", "7s", before[1], "Europe/Berlin"]

        refused = platform.api.patch(f"/projects/{pid}/endpoints/{ep}", json={"endpoint": {"settings": {
            "pg_settings": {"work_mem": "16MB", "archive_command": "cp %p /tmp/x"}}}})
        assert refused.status_code == 400 and "archive_command" in refused.json()["message"], refused.text
        assert show(uri, "work_mem") == ["12MB"]
        assert platform.endpoint(pid, ep)["settings"]["pg_settings"]["work_mem"] == "12MB"

        assert platform.api.post(f"/projects/{pid}/endpoints/{ep}/restart").status_code == 200
        assert show(uri, "work_mem", "max_prepared_transactions") == ["12MB", "5"]

        # Removing a setting puts the platform's value back, live.
        resp = platform.api.patch(f"/projects/{pid}/endpoints/{ep}", json={"endpoint": {"settings": {"pg_settings": {
            "max_prepared_transactions": "5"}}}})
        assert resp.status_code == 200 and resp.json()["applied"]["now"] == [
            "pg_settings.statement_timeout", "pg_settings.timezone", "pg_settings.work_mem"]
        assert show(uri, "work_mem", "statement_timeout") == [before[0], "0"]
    finally:
        platform.delete_project(pid)

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


def test_settings_a_running_compute_refuses_leave_the_old_ones(platform: RunningPlatform,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The metadata is written before the compute is reconfigured (a kill -9 between them leaves
    settings the next start applies); a value the compute refuses then puts the old ones back."""
    from argon.errors import UserError

    created = platform.create_project(name="pgrefused")
    pid, ep = created["project"]["id"], created["endpoints"][0]["id"]
    try:
        assert platform.api.patch(f"/projects/{pid}/endpoints/{ep}", json={"endpoint": {"settings": {
            "pg_settings": {"work_mem": "12MB"}}}}).status_code == 200

        async def refuse(old: object, new: object) -> bool:
            raise UserError("pg_settings: the compute refused work_mem (invalid value)")

        monkeypatch.setattr(platform.control.computes, "reconfigure", refuse)
        resp = platform.api.patch(f"/projects/{pid}/endpoints/{ep}", json={"endpoint": {
            "suspend_timeout_seconds": 7, "settings": {"pg_settings": {"work_mem": "13MB"}}}})
        assert resp.status_code == 400 and "the compute refused work_mem" in resp.json()["message"], resp.text
        kept = platform.endpoint(pid, ep)
        assert kept["settings"]["pg_settings"] == {"work_mem": "12MB"}
        assert kept["suspend_timeout_seconds"] != 7  # the whole PATCH, not only its pg_settings
    finally:
        platform.delete_project(pid)

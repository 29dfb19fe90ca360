"""What a new user hit with journeys no other test spells out: Node's drivers with the connection
strings as printed, names a role or database already has through SQL, reserved names, and what the
CLI prints for roles and compute sizes. Real clients: node-postgres and postgres.js (npm), psql and
psycopg through the proxy, the `argon` CLI as a subprocess."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from argon.control.roles import roles_key
from tests.fixtures.npm import npm_install
from tests.fixtures.platform import API_KEY, RunningPlatform

pytestmark = pytest.mark.pg

PG_VERSION = "8.23.1"  # node-postgres
POSTGRES_JS_VERSION = "3.4.9"  # porsager's postgres

NODE_CLIENTS = """
import pg from 'pg';
import postgres from 'postgres';
const out = {};
for (const [name, url] of [['direct', process.env.DIRECT], ['pooled', process.env.POOLED]]) {
  try {  // node-postgres verifies the host for sslmode=require (its pg-connection-string says so)
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    out[`pg_${name}`] = (await client.query('select $1::int + 1 as x, current_user as u', [41])).rows[0];
    await client.end();
  } catch (e) { out[`pg_${name}`] = e.message; }
  try {
    const sql = postgres(url, { max: 2 });
    out[`postgres_${name}`] = (await sql`select ${41}::int + 1 as x, current_user as u`)[0];
    await sql.end();
  } catch (e) { out[`postgres_${name}`] = e.message; }
}
console.log(JSON.stringify(out));
"""


def _base(project: dict[str, Any]) -> str:
    return f"/projects/{project['project']['id']}/branches/{project['branch']['id']}"


def _connect(platform: RunningPlatform, project: dict[str, Any], **override: str) -> psycopg.Connection[Any]:
    return psycopg.connect(**{**platform.params(project), **override}, connect_timeout=15)


def _argon(platform: RunningPlatform, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ARGON_API_URL": platform.api_url, "ARGON_API_KEY": API_KEY, "NO_COLOR": "1",
           "HOME": str(platform.root)}
    out = subprocess.run([sys.executable, "-m", "argon", *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def test_api_create_of_a_name_made_through_sql_is_a_conflict(platform: RunningPlatform,
                                                             project: dict[str, Any]) -> None:
    """A role or database made with SQL a moment ago (the store has not synced it yet) is a 409 that
    names it, not a 500; the SQL role keeps its own password (the refused create leaves no intent
    that would put the API's password on it later)."""
    api, base = platform.api, _base(project)
    with _connect(platform, project, autocommit="1") as conn:  # type: ignore[arg-type]
        conn.execute("CREATE ROLE \"made o'sql\" LOGIN PASSWORD 'sql pässword'")
        conn.execute("CREATE DATABASE \"sql db\"")
        conn.execute("CREATE DATABASE \"sql db 2\"")
    resp = api.post(f"{base}/roles", json={"role": {"name": "made o'sql"}})
    assert resp.status_code == 409, resp.text
    assert resp.json()["message"] == (f"role \"made o'sql\" already exists on branch '{project['branch']['id']}'")
    assert not platform.plane.intents.has(roles_key(project["endpoints"][0]["id"]))
    resp = api.post(f"{base}/databases", json={"database": {"name": "sql db", "owner_name": "neondb_owner"}})
    assert resp.status_code == 409, resp.text
    assert "database \"sql db\" already exists" in resp.json()["message"]
    resp = api.post(f"{base}/databases", json={"database": {"name": "api db", "owner_name": "neondb_owner"}})
    assert resp.status_code == 201, resp.text
    resp = api.patch(f"{base}/databases/api%20db", json={"database": {"name": "sql db 2"}})
    assert resp.status_code == 409, resp.text
    with _connect(platform, project, user="made o'sql", password="sql pässword", dbname="sql db") as conn:
        assert conn.execute("select current_user, current_database()").fetchone() == ("made o'sql", "sql db")
    # the list takes them in, and the API's own check answers from then on
    assert "made o'sql" in {r["name"] for r in api.get(f"{base}/roles").json()["roles"]}
    assert api.post(f"{base}/roles", json={"role": {"name": "made o'sql"}}).status_code == 409


RESERVED = [
    ("role", {"role": {"name": "neon_superuser"}}, "role name 'neon_superuser' is reserved"),
    ("role", {"role": {"name": "public"}}, "role name 'public' is reserved"),
    ("project", {"branch": {"role_name": "neon_superuser"}}, "role name 'neon_superuser' is reserved"),
    ("project", {"branch": {"role_name": "public"}}, "role name 'public' is reserved"),
    ("project", {"branch": {"role_name": "current_user"}}, "role name 'current_user' is reserved"),
    ("project", {"branch": {"database_name": "template1"}}, "database name 'template1' is reserved"),
    ("project", {"branch": {"database_name": "postgres"}}, "database name 'postgres' is reserved"),
]


def test_reserved_names_are_refused_before_anything_is_made(platform: RunningPlatform,
                                                            project: dict[str, Any]) -> None:
    """Names Postgres or the platform holds: a 400 naming them, never a 500 or a project whose first
    role cannot be made (its compute then failed to start: "Control plane request failed")."""
    before = {p["id"] for p in platform.api.get("/projects", params={"limit": 400}).json()["projects"]}
    for where, body, message in RESERVED:
        if where == "role":
            resp = platform.api.post(f"{_base(project)}/roles", json=body)
        else:
            resp = platform.api.post("/projects", json={"project": body})
        assert (resp.status_code, resp.json()["message"]) == (400, message), (body, resp.text)
    after = {p["id"] for p in platform.api.get("/projects", params={"limit": 400}).json()["projects"]}
    assert after == before
    with _connect(platform, project) as conn:  # the project's compute is as it was
        assert conn.execute("select count(*) from pg_roles where rolname = 'neon_superuser'").fetchone() == (1,)


@pytest.mark.slow
def test_cli_prints_a_role_hint_that_runs_and_quarter_compute_units(platform: RunningPlatform,
                                                                    project: dict[str, Any]) -> None:
    """`argon roles create` names the command that prints the password again, quoted for the shell
    (a name with a quote or a space) and with the branch it was made on; running it as printed
    gives a string that logs in. `argon endpoints list` shows 0.25 CU as 0.25, not 0.2."""
    pid = project["project"]["id"]
    made = json.loads(_argon(platform, "-o", "json", "branches", "create", "--project-id", pid,
                             "--name", "dev").stdout)
    out = _argon(platform, "roles", "create", "o'brien app", "--project-id", pid, "--branch", "dev").stdout
    hint = out.split("`")[1]
    assert hint == f"argon connection-string --project-id {pid} --branch dev --role 'o'\"'\"'brien app'"
    args = shlex.split(hint)
    assert args[0] == "argon"
    uri = _argon(platform, *args[1:], "--database", "neondb").stdout.strip()
    assert out.strip().splitlines()[-1].strip() in uri  # the password printed once is the one it gives again
    with psycopg.connect(uri, connect_timeout=15) as conn:
        assert conn.execute("select current_user").fetchone() == ("o'brien app",)
    listed = _argon(platform, "endpoints", "list", "--project-id", pid).stdout
    row = next(line for line in listed.splitlines() if made["endpoints"][0]["id"] in line)
    assert " 0.25 " in row, listed


def test_node_drivers_with_the_printed_strings_and_the_ca(platform: RunningPlatform, project: dict[str, Any]) -> None:
    """node-postgres treats `sslmode=require` as verify-full: with Argon's CA trusted
    (NODE_EXTRA_CA_CERTS, as the console's snippet says) the printed strings, whose hosts are the
    endpoint's own addresses, must verify, direct and pooled; postgres.js too. libpq's
    `sslmode=verify-full` on those addresses works the same way, channel binding included."""
    prefix = npm_install(f"pg@{PG_VERSION}", "postgres/package.json", f"postgres@{POSTGRES_JS_VERSION}")
    script = prefix / "argon-new-user.mjs"
    script.write_text(NODE_CLIENTS)
    pid = project["project"]["id"]
    direct = platform.dsn(project)
    pooled = platform.api.get(f"/projects/{pid}/connection_uri", params={
        "pooled": "true", "role_name": "neondb_owner", "database_name": "neondb"}).json()["uri"]
    assert "@127.1." in direct and "@127.2." in pooled, (direct, pooled)  # the address form (the session platform's)
    ca = platform.platform.info.ca_cert
    assert ca is not None
    env = {**os.environ, "DIRECT": direct, "POOLED": pooled, "NODE_EXTRA_CA_CERTS": str(ca)}
    run = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    expected = {"x": 42, "u": "neondb_owner"}
    assert json.loads(run.stdout) == {f"{client}_{host}": expected for client in ("pg", "postgres")
                                      for host in ("direct", "pooled")}
    for uri in (direct, pooled):
        verified = f"{uri.replace('sslmode=require', 'sslmode=verify-full')}&sslrootcert={ca}&channel_binding=require"
        with psycopg.connect(verified, connect_timeout=15) as conn:
            assert conn.execute("select current_user").fetchone() == ("neondb_owner",)


@pytest.mark.slow
def test_dump_restored_into_a_new_branch_database(platform: RunningPlatform) -> None:
    """README's journey: `pg_dump -Fc` of a project through the proxy with the printed string,
    `pg_restore --no-owner` into a database made on a new branch, `\\copy` out and in (TLS on)."""
    install = platform.plane.installs.get(15)
    if install is None or install.source != "system":
        pytest.skip("needs PostgreSQL 15's client tools with TLS (Debian's postgresql-15)")
    created = platform.create_project(pg_version=15, name="dumps")
    pid = created["project"]["id"]
    try:
        source = platform.dsn(created)
        with psycopg.connect(source, connect_timeout=15) as conn:
            conn.execute("create table items (id int primary key, name text); "
                         "insert into items select g, 'item ' || g from generate_series(1, 500) g")
        dump = platform.root / f"{pid}.dump"
        subprocess.run([str(install.bin("pg_dump")), "-Fc", "-f", str(dump), source], check=True, timeout=120,
                       capture_output=True)
        branch = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "dev"},
                                                                       "endpoints": [{"type": "read_write"}]})
        assert branch.status_code == 201, branch.text
        bid = branch.json()["branch"]["id"]
        made = platform.api.post(f"/projects/{pid}/branches/{bid}/databases",
                                 json={"database": {"name": "restored db", "owner_name": "neondb_owner"}})
        assert made.status_code == 201, made.text
        target = platform.api.get(f"/projects/{pid}/connection_uri", params={
            "branch_id": bid, "role_name": "neondb_owner", "database_name": "restored db"}).json()["uri"]
        subprocess.run([str(install.bin("pg_restore")), "--no-owner", "-d", target, str(dump)], check=True,
                       timeout=120, capture_output=True)
        csv = platform.root / f"{pid}.csv"
        psql = [str(install.bin("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1", target, "-c"]
        subprocess.run([*psql, f"\\copy items to '{csv}' csv"], check=True, timeout=60, capture_output=True)
        subprocess.run([*psql, "create table copied (like items)"], check=True, timeout=60, capture_output=True)
        subprocess.run([*psql, f"\\copy copied from '{csv}' csv"], check=True, timeout=60, capture_output=True)
        with psycopg.connect(target, connect_timeout=15) as conn:
            assert conn.execute("select count(*), sum(id) from items").fetchone() == (500, 125250)
            assert conn.execute("select count(*) from copied").fetchone() == (500,)
    finally:
        platform.delete_project(pid)

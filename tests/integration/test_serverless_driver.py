"""Neon's serverless driver (`@neondatabase/serverless`, npm, pinned) against a live Argon, unchanged.

The driver runs in Node, configured as a user would for a local Argon (README): `fetchEndpoint`
and `wsProxy` point at the HTTP port, plain `ws://`, the `ws` package as WebSocket. `neon()` goes
over HTTP (`POST /sql`), `Pool`/`Client` over WebSockets with the default pipelined connect.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from tests.fixtures.npm import npm_install
from tests.fixtures.platform import RunningPlatform

pytestmark = [pytest.mark.pg, pytest.mark.slow]

SERVERLESS_VERSION = "1.2.0"  # @neondatabase/serverless
WS_VERSION = "8.23.0"  # Node 20 has no global WebSocket
FAILED = "password authentication failed for user 'neondb_owner'"

SCENARIOS = r"""
import { neon, neonConfig, Pool, Client, NeonDbError } from '@neondatabase/serverless';
import ws from 'ws';

const port = process.env.ARGON_HTTP_PORT;
neonConfig.fetchEndpoint = () => `http://127.0.0.1:${port}/sql`;
neonConfig.wsProxy = () => `127.0.0.1:${port}/v2`;
neonConfig.useSecureWebSocket = false;
neonConfig.webSocketConstructor = ws;

const dsn = process.env.DSN;
const out = {};

async function failure(fn) {
  try { await fn(); return null; } catch (e) {
    return { name: e.name, neon: e instanceof NeonDbError, message: e.message, code: e.code ?? null };
  }
}

// With the password pipelined, connect() resolves at once; a login error then fails the first
// query and is also emitted as an 'error' event (listened to, as applications do).
async function connectAndQuery(dsn) {
  const c = new Client(dsn);
  const emitted = new Promise((_, reject) => c.on('error', reject));
  await Promise.race([(async () => { await c.connect(); await c.query('SELECT 1'); await c.end(); })(), emitted]);
}

const scenarios = {
  async http() {
    const sql = neon(dsn);
    const [row] = await sql`SELECT ${1}::int AS i, ${'text'} AS t, ${null}::text AS n, ${9007199254740993n}::int8 AS big,
      ${{ k: [1, 2] }}::jsonb AS j, ${[1, 2, 3]}::int[] AS arr, ${['a', 'b"c', null]}::text[] AS strs,
      ${new Date('2024-01-02T03:04:05.678Z')}::timestamptz AS ts, ${Buffer.from([1, 2, 255])}::bytea AS b,
      true AS yes, 1.5::float8 AS f`;
    out.row = { ...row, ts: row.ts.toISOString(), b: [...row.b] };
    out.query = await sql.query('SELECT $1::text || $2::text AS s', ['x', 'y']);
    const full = await sql.query('SELECT 1 AS one', [], { fullResults: true });
    out.full = { command: full.command, rowCount: full.rowCount, fields: full.fields.map((f) => f.name), rows: full.rows };
    out.arrays = await neon(dsn, { arrayMode: true })`SELECT 1 AS a, 'two' AS b`;
    await sql`CREATE TABLE IF NOT EXISTS driver_t (v int)`;
    const tx = await sql.transaction([sql`INSERT INTO driver_t VALUES (1), (2)`, sql`SELECT count(*)::int AS n FROM driver_t`],
                                     { isolationLevel: 'Serializable' });
    out.tx = tx[1];
    out.sqlError = await failure(() => sql`SELECT 1/0`);
    out.multi = await failure(() => sql.query('SELECT 1; SELECT 2'));
    out.failedTx = await failure(() => sql.transaction([sql`INSERT INTO driver_t VALUES (3)`, sql`SELECT nope`]));
    out.afterTx = await sql`SELECT count(*)::int AS n FROM driver_t`;
  },
  async ws() {
    const pool = new Pool({ connectionString: dsn });
    out.pool = (await pool.query('SELECT $1::int + 1 AS n, current_user AS u', [41])).rows;
    const client = await pool.connect();
    try {
      await client.query('CREATE TABLE IF NOT EXISTS ws_t (v text)');
      await client.query('BEGIN');
      await client.query('INSERT INTO ws_t VALUES ($1)', ['in tx']);
      out.inTx = (await client.query('SELECT count(*)::int AS n FROM ws_t')).rows[0].n;
      await client.query('ROLLBACK');
      out.afterRollback = (await client.query('SELECT count(*)::int AS n FROM ws_t')).rows[0].n;
      out.sqlError = await failure(() => client.query('SELECT 1/0'));
      out.stillThere = (await client.query("SELECT 'ok' AS s")).rows[0].s;
    } finally {
      client.release();
    }
    await pool.end();
    const single = new Client(dsn);
    await single.connect();
    out.client = (await single.query('SELECT 2 AS two')).rows;
    await single.end();
  },
  async wrong() {
    const bad = process.env.BAD_DSN;
    out.http = await failure(() => neon(bad)`SELECT 1`);
    out.ws = await failure(() => connectAndQuery(bad));
    const noEndpoint = process.env.UNKNOWN_DSN;
    out.httpUnknown = await failure(() => neon(noEndpoint)`SELECT 1`);
    out.wsUnknown = await failure(() => connectAndQuery(noEndpoint));
  },
  async wakeHttp() {
    out.rows = await neon(dsn)`SELECT 'awake' AS s`;
  },
  async wakeWs() {
    const c = new Client(dsn);
    await c.connect();
    out.rows = (await c.query("SELECT 'awake' AS s")).rows;
    await c.end();
  },
};

await scenarios[process.argv[2]]();
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def driver() -> Path:
    prefix = npm_install(f"@neondatabase/serverless@{SERVERLESS_VERSION}", "ws/package.json", f"ws@{WS_VERSION}")
    script = prefix / "argon-scenarios.mjs"
    script.write_text(SCENARIOS)
    return script


@pytest.fixture(scope="module")
def created(platform: RunningPlatform) -> Any:
    project = platform.create_project(name="serverless-driver")
    yield project
    platform.delete_project(project["project"]["id"])


def run(platform: RunningPlatform, script: Path, scenario: str, **env: str) -> dict[str, Any]:
    full_env = {**os.environ, "ARGON_HTTP_PORT": str(platform.platform.http_port), **env}
    out = subprocess.run(["node", str(script), scenario], capture_output=True, text=True, timeout=120, env=full_env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def with_password(dsn: str, password: str) -> str:
    user_part, rest = dsn.split("@", 1)
    return user_part.rsplit(":", 1)[0] + ":" + quote(password, safe="") + "@" + rest


def test_neon_over_http(platform: RunningPlatform, created: Any, driver: Path) -> None:
    out = run(platform, driver, "http", DSN=platform.dsn(created))
    assert out["row"] == {"i": 1, "t": "text", "n": None, "big": "9007199254740993", "j": {"k": [1, 2]},
                          "arr": [1, 2, 3], "strs": ["a", 'b"c', None], "ts": "2024-01-02T03:04:05.678Z",
                          "b": [1, 2, 255], "yes": True, "f": 1.5}
    assert out["query"] == [{"s": "xy"}]
    assert out["full"] == {"command": "SELECT", "rowCount": 1, "fields": ["one"], "rows": [{"one": 1}]}
    assert out["arrays"] == [[1, "two"]]
    assert out["tx"] == [{"n": 2}]
    assert out["sqlError"] == {"name": "NeonDbError", "neon": True, "message": "division by zero", "code": "22012"}
    assert out["multi"]["code"] == "42601"  # one statement per query, as on Neon
    assert out["failedTx"]["code"] == "42703" and out["afterTx"] == [{"n": 2}]  # the batch was rolled back


def test_pool_and_client_over_websocket(platform: RunningPlatform, created: Any, driver: Path) -> None:
    out = run(platform, driver, "ws", DSN=platform.dsn(created))
    assert out["pool"] == [{"n": 42, "u": "neondb_owner"}]
    assert out["inTx"] == 1 and out["afterRollback"] == 0
    assert out["sqlError"]["code"] == "22012" and out["stillThere"] == "ok"
    assert out["client"] == [{"two": 2}]


def test_wrong_password_and_unknown_endpoint_look_the_same(platform: RunningPlatform, created: Any,
                                                           driver: Path) -> None:
    dsn = platform.dsn(created)
    bad = with_password(dsn, "wrong-password")
    unknown = dsn.replace(created["endpoints"][0]["id"], "ep-no-such-endpoint-000000")
    out = run(platform, driver, "wrong", BAD_DSN=bad, UNKNOWN_DSN=unknown)
    with pytest.raises(psycopg.OperationalError) as tcp:
        psycopg.connect(bad, connect_timeout=10).close()
    assert FAILED in str(tcp.value)  # the TCP proxy's text
    for key in ("http", "httpUnknown"):
        assert out[key] == {"name": "NeonDbError", "neon": True, "message": FAILED, "code": ""}, key
    for key in ("ws", "wsUnknown"):
        assert out[key]["message"] == FAILED, key


@pytest.mark.parametrize("scenario", ["wakeHttp", "wakeWs"])
def test_wake_from_suspended(platform: RunningPlatform, created: Any, driver: Path, scenario: str) -> None:
    pid, eid = created["project"]["id"], created["endpoints"][0]["id"]
    resp = platform.api.post(f"/projects/{pid}/endpoints/{eid}/suspend")
    assert resp.status_code == 200 and resp.json()["endpoint"]["current_state"] == "idle"
    out = run(platform, driver, scenario, DSN=platform.dsn(created))
    assert out["rows"] == [{"s": "awake"}]
    assert platform.endpoint(pid, eid)["current_state"] == "active"

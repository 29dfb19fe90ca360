"""Project settings that act (issue 15): the proxy enforces `allowed_ips` on every path, and
`enable_logical_replication` gives computes `wal_level = logical` and lets another project subscribe.

Clients come from 127.0.0.2 through `SourceForwarder` (a real TCP hop whose outgoing side is bound
to another loopback address), so one machine plays both an allowed and a refused client.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
from websockets.sync.client import connect as ws_connect

from argon.wire import codec
from tests.fixtures.platform import RunningPlatform

pytestmark = [pytest.mark.pg]

REFUSED = "is not allowed to connect to this endpoint"


class SourceForwarder:
    """Listens on 127.0.0.1 and relays each connection to `port`, connecting from `source`."""

    def __init__(self, port: int, source: str) -> None:
        self.target, self.source = port, source
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket()
            upstream.bind((self.source, 0))
            upstream.connect(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop = True
        self.server.close()


@contextlib.contextmanager
def forwarders(platform: RunningPlatform, source: str) -> Iterator[tuple[int, int]]:
    """(proxy port, HTTP port) as seen from `source`."""
    pg = SourceForwarder(platform.proxy_port, source)
    http = SourceForwarder(platform.platform.http_port, source)
    try:
        yield pg.port, http.port
    finally:
        pg.close()
        http.close()


def set_settings(platform: RunningPlatform, pid: str, **settings: Any) -> dict[str, Any]:
    resp = platform.api.patch(f"/projects/{pid}", json={"project": {"settings": settings}})
    assert resp.status_code == 200, resp.text
    return resp.json()


def login_error(dsn: str) -> str | None:
    """None if a login with `dsn` works, else the server's message."""
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            conn.execute("select 1")
        return None
    except psycopg.OperationalError as exc:
        return str(exc)


def sql_over_http(http_port: int, dsn: str) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{http_port}/sql", json={"query": "select 1 as one"},
                      headers={"Neon-Connection-String": dsn}, timeout=30)


def websocket_login(http_port: int, endpoint: str, user: str, password: str) -> bytes:
    """The serverless driver's pipelined login over a WebSocket; the first backend message type."""
    with ws_connect(f"ws://127.0.0.1:{http_port}/v2?address={endpoint}", open_timeout=10) as ws:
        ws.send(codec.startup_message({"user": user, "database": "neondb"}) + codec.password_message(password))
        data = b""
        while len(data) < 9:
            data += ws.recv(timeout=20)  # type: ignore[operator]
        while True:
            kind, length = data[:1], int.from_bytes(data[1:5], "big")
            if kind != b"R" or data[5:9] != b"\0\0\0\3":  # past the password request
                return kind + data[5:1 + length]
            data = data[1 + length:]
            while len(data) < 5:
                data += ws.recv(timeout=20)  # type: ignore[operator]


@pytest.mark.slow
def test_allowed_ips_on_every_path(platform: RunningPlatform) -> None:
    created = platform.create_project(name="allow")
    pid, ep = created["project"]["id"], created["endpoints"][0]["id"]
    params = platform.params(created)
    user, password = params["user"], params["password"]
    try:
        def dsn(port: int, *, pooled: bool = False) -> str:
            label = ep + ("-pooler" if pooled else "")
            return (f"postgresql://{user}:{quote(password)}@127.0.0.1:{port}/neondb?sslmode=require"
                    f"&options=endpoint%3D{label}")

        got = set_settings(platform, pid, allowed_ips={"ips": ["127.0.0.1", "10.0.0.0/8"]})
        assert got["project"]["settings"]["allowed_ips"] == {"ips": ["127.0.0.1", "10.0.0.0/8"],
                                                             "protected_branches_only": False}
        assert login_error(dsn(platform.proxy_port)) is None  # 127.0.0.1 is on the list
        with forwarders(platform, "127.0.0.2") as (pg_port, http_port):
            for target in (dsn(pg_port), dsn(pg_port, pooled=True),
                           # the password hack: the endpoint arrives with the password, after TLS
                           f"postgresql://{user}:{quote('endpoint=' + ep + ';' + password)}@127.0.0.1:{pg_port}"
                           "/neondb?sslmode=require"):
                error = login_error(target)
                assert error is not None and f"This IP address 127.0.0.2 {REFUSED}" in error, error
            resp = sql_over_http(http_port, f"postgresql://{user}:{quote(password)}@{ep}.localhost/neondb")
            assert resp.status_code == 400 and REFUSED in resp.json()["message"], resp.text
            first = websocket_login(http_port, ep, user, password)
            assert first[:1] == b"E" and REFUSED.encode() in first, first

            # A range that takes 127.0.0.2 in: every path lets it through.
            set_settings(platform, pid, allowed_ips={"ips": ["127.0.0.1", "127.0.0.2-127.0.0.9"]})
            assert login_error(dsn(pg_port)) is None
            assert login_error(dsn(pg_port, pooled=True)) is None
            resp = sql_over_http(http_port, f"postgresql://{user}:{quote(password)}@{ep}.localhost/neondb")
            assert resp.status_code == 200 and resp.json()["rows"] == [{"one": 1}], resp.text
            assert websocket_login(http_port, ep, user, password)[:1] == b"R"  # AuthenticationOk

            # protected_branches_only: main is not protected, so the list does not guard it ...
            set_settings(platform, pid, allowed_ips={"ips": ["127.0.0.1"], "protected_branches_only": True})
            assert login_error(dsn(pg_port)) is None
            # ... until it is.
            bid = created["branch"]["id"]
            assert platform.api.patch(f"/projects/{pid}/branches/{bid}",
                                      json={"branch": {"protected": True}}).status_code == 200
            error = login_error(dsn(pg_port))
            assert error is not None and REFUSED in error

            set_settings(platform, pid, allowed_ips={"ips": []})  # empty: everyone again
            assert login_error(dsn(pg_port)) is None
    finally:
        platform.delete_project(pid)


def test_allowed_ips_refused_before_a_wake(platform: RunningPlatform) -> None:
    """A refused address costs nothing: the compute stays suspended (Neon checks before the secret)."""
    created = platform.create_project(name="allow-idle")
    pid, ep = created["project"]["id"], created["endpoints"][0]["id"]
    params = platform.params(created)
    try:
        set_settings(platform, pid, allowed_ips={"ips": ["192.0.2.1"]})
        assert platform.api.post(f"/projects/{pid}/endpoints/{ep}/suspend").status_code == 200
        deadline = time.monotonic() + 30
        while platform.endpoint(pid, ep)["current_state"] != "idle" and time.monotonic() < deadline:
            time.sleep(0.2)
        error = login_error(f"postgresql://{params['user']}:{quote(params['password'])}@127.0.0.1:"
                            f"{platform.proxy_port}/neondb?sslmode=require&options=endpoint%3D{ep}")
        assert error is not None and f"This IP address 127.0.0.1 {REFUSED}" in error
        assert platform.endpoint(pid, ep)["current_state"] == "idle"
    finally:
        platform.delete_project(pid)


def test_allowed_ips_bad_entries_are_400(platform: RunningPlatform, project: dict[str, Any]) -> None:
    pid = project["project"]["id"]
    for bad in (["not-an-ip"], ["10.0.0.9-10.0.0.1"], ["10.0.0.0/33"]):
        resp = platform.api.patch(f"/projects/{pid}", json={"project": {"settings": {"allowed_ips": {"ips": bad}}}})
        assert resp.status_code == 400 and "project.settings.allowed_ips.ips" in resp.json()["message"], resp.text
    assert platform.api.get(f"/projects/{pid}").json()["project"]["settings"]["allowed_ips"]["ips"] == []


def wait_for(check: Any, timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


@pytest.mark.slow
def test_logical_replication_to_another_project(platform: RunningPlatform) -> None:
    """Neon's flow: enable it on the publisher (its computes restart with wal_level=logical), publish
    a table, subscribe from a branch of another project through the proxy, see rows arrive."""
    pub = platform.create_project(name="publisher")
    sub = platform.create_project(name="subscriber")
    pub_id, sub_id = pub["project"]["id"], sub["project"]["id"]
    try:
        with psycopg.connect(platform.dsn(pub), autocommit=True) as conn:
            assert conn.execute("show wal_level").fetchone() == ("replica",)
        changed = set_settings(platform, pub_id, enable_logical_replication=True)
        assert changed["project"]["settings"]["enable_logical_replication"] is True
        actions = [o["action"] for o in changed["operations"]]
        assert actions == ["apply_config", "suspend_compute", "start_compute"], actions  # it restarted
        with psycopg.connect(platform.dsn(pub), autocommit=True) as conn:
            assert conn.execute("show wal_level").fetchone() == ("logical",)
            conn.execute("create table items (id int primary key, name text)")
            conn.execute("insert into items values (1, 'one'), (2, 'two')")
            conn.execute("create publication items_pub for table items")

        # The subscriber: a branch of another project; its role may subscribe once the setting is on.
        set_settings(platform, sub_id, enable_logical_replication=True)
        resp = platform.api.post(f"/projects/{sub_id}/branches",
                                 json={"branch": {"name": "replica"}, "endpoints": [{"type": "read_write"}]})
        assert resp.status_code == 201, resp.text
        branch = resp.json()
        params = platform.params(pub)
        # The endpoint rides in the password (Neon's hack): a walreceiver replaces `options`. Plaintext:
        # the embedded Postgres has no TLS in its libpq, and the proxy takes plaintext from loopback.
        conninfo = (f"host=127.0.0.1 port={platform.proxy_port} dbname=neondb user={params['user']} "
                    f"password='endpoint={pub['endpoints'][0]['id']};{params['password']}'")
        with psycopg.connect(platform.dsn(branch), autocommit=True) as conn:
            conn.execute("create table items (id int primary key, name text)")
            conn.execute(f"create subscription items_sub connection '{conninfo.replace(chr(39), chr(39) * 2)}' "
                         "publication items_pub")
            wait_for(lambda: conn.execute("select count(*) from items").fetchone() == (2,), what="the initial copy")
            with psycopg.connect(platform.dsn(pub), autocommit=True) as source:
                source.execute("insert into items values (3, 'three')")
            wait_for(lambda: conn.execute("select name from items where id = 3").fetchone() == ("three",),
                     what="a streamed insert")
            conn.execute("drop subscription items_sub")

        resp = platform.api.patch(f"/projects/{pub_id}",
                                  json={"project": {"settings": {"enable_logical_replication": False}}})
        assert resp.status_code == 400 and "cannot be turned off" in resp.json()["message"], resp.text
    finally:
        platform.delete_project(sub_id)
        platform.delete_project(pub_id)


@pytest.mark.slow
def test_what_neon_clients_read_that_argon_lacks(platform: RunningPlatform, project: dict[str, Any]) -> None:
    """Resources Argon has no equivalent of list empty or say 'not available'; counts, recovery,
    preload libraries and the schema comparison answer Neon's shapes."""
    api, pid, main = platform.api, project["project"]["id"], project["branch"]["id"]
    branch = f"/projects/{pid}/branches/{main}"
    for kind in ("buckets", "functions", "triggers"):
        assert api.get(f"{branch}/{kind}").json() == {kind: []}
        refused = api.post(f"{branch}/{kind}", json={"name": "x"})
        assert refused.status_code == 400 and "Argon has no" in refused.json()["message"]
    credentials = api.get(f"{branch}/credentials")
    assert credentials.status_code == 404 and "not available" in credentials.json()["message"]
    assert api.get(f"/projects/{pid}/permissions").json() == {"project_permissions": []}
    assert api.post(f"/projects/{pid}/permissions", json={"email": "a@example.com"}).status_code == 400
    assert api.get(f"/projects/{pid}/branches/count").json() == {"count": 1}
    assert api.post(f"/projects/{pid}/recover").status_code == 400  # not deleted
    assert api.post(f"{branch}/recover").status_code == 400
    assert api.post(f"/projects/{pid}/branches/br-gone-branch-00000000/recover").status_code == 404
    assert api.get("/projects", params={"recoverable": "true"}).json()["projects"] == []
    libraries = {lib["library_name"] for lib in api.get(f"/projects/{pid}/available_preload_libraries").json()["libraries"]}
    assert "pg_stat_statements" in libraries

    child = api.post(f"/projects/{pid}/branches", json={"branch": {"name": "changed"},
                                                      "endpoints": [{"type": "read_write"}]}).json()
    with psycopg.connect(platform.dsn(child), autocommit=True) as conn:
        conn.execute("create table only_on_child (id int)")
    diff = api.get(f"/projects/{pid}/branches/{child['branch']['id']}/compare_schema", params={"db_name": "neondb"})
    assert diff.status_code == 200, diff.text
    assert "+CREATE TABLE public.only_on_child" in diff.json()["diff"], diff.json()
    same = api.get(f"/projects/{pid}/branches/{child['branch']['id']}/compare_schema",
                   params={"db_name": "neondb", "base_branch_id": child["branch"]["id"]})
    assert same.json() == {"diff": ""}

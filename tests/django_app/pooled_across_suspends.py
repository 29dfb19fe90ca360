"""Django with persistent connections (CONN_MAX_AGE=None, no health checks) on the pooled host,
unchanged otherwise (Django turns psycopg's prepared statements off; with
OPTIONS prepare_threshold and server_side_binding they are on): requests and ORM writes across several
suspends, through the real request cycle. The one connection Django opened is never closed, never
replaced, and never sees an error: an idle pooled client holds no server connection for a suspend
to close. Prints "ok <n>" on success."""

import json
import os
import sys
import time
import urllib.request
import wsgiref.util

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "seedsite.settings")
import django

django.setup()
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from notes.models import Note  # noqa: E402

app = get_wsgi_application()

api_url, api_key, project_id, endpoint_id, suspends = sys.argv[1:6]


def state() -> dict:
    req = urllib.request.Request(f"{api_url}/api/v2/projects/{project_id}/endpoints/{endpoint_id}",
                                 headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req) as resp:
        return json.load(resp)["endpoint"]


def get(path: str) -> tuple[str, bytes]:
    environ: dict[str, object] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    wsgiref.util.setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    return status[0], body


def wait_for_suspend(previous: str | None) -> str:
    deadline = time.monotonic() + 60
    while True:
        ep = state()
        if ep["current_state"] == "idle" and ep.get("suspended_at") != previous:
            return ep["suspended_at"]
        if time.monotonic() > deadline:
            sys.exit("the endpoint did not suspend")
        time.sleep(0.2)


first = None
suspended_at = None
for round_ in range(int(suspends) + 1):
    for _ in range(7):  # more than psycopg's prepare_threshold: the count query runs prepared
        code, body = get("/count/")
        assert code.startswith("200"), (code, body)
    with transaction.atomic():
        Note.objects.create(title=f"round {round_}")
        assert Note.objects.filter(title=f"round {round_}").exists()
    if first is None:
        first = connection.connection
        assert first is not None, "CONN_MAX_AGE=None keeps the connection open"
    assert connection.connection is first and not first.closed, "the connection was never replaced"
    if round_ < int(suspends):
        suspended_at = wait_for_suspend(suspended_at)
if connection.connection.prepare_threshold is not None:
    assert connection.connection._prepared._names, "psycopg prepared statements on the pooled host"
print("ok", Note.objects.count())

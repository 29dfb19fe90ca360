"""Django's persistent connections across a suspend, through the real request cycle (where
CONN_HEALTH_CHECKS runs): request, wait for the compute to suspend, request again.

Requests go through the WSGI handler itself: django.test.Client disconnects `close_old_connections`
from `request_started`, so with it the health check would never run."""

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
from django.db import connection  # noqa: E402

app = get_wsgi_application()

api_url, api_key, project_id, endpoint_id = sys.argv[1:5]


def endpoint_state() -> str:
    req = urllib.request.Request(f"{api_url}/api/v2/projects/{project_id}/endpoints/{endpoint_id}",
                                 headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req) as resp:
        return json.load(resp)["endpoint"]["current_state"]


def get(path: str) -> tuple[str, bytes]:
    environ: dict[str, object] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    wsgiref.util.setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    return status[0], body


code, _ = get("/count/")
assert code.startswith("200"), code
first = connection.connection
assert first is not None, "CONN_MAX_AGE>0 keeps the connection open after the request"
deadline = time.monotonic() + 30
while endpoint_state() != "idle":
    if time.monotonic() > deadline:
        sys.exit("the endpoint did not suspend")
    time.sleep(0.2)
code, body = get("/count/")
assert code.startswith("200"), (code, body)
assert connection.connection is not first, "the health check replaced the dead connection"
print("ok", json.loads(body))

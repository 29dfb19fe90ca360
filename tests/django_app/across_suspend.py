"""Django's persistent connections across a suspend, through the request cycle (where
CONN_HEALTH_CHECKS runs): request, wait for the compute to suspend, request again."""

import json
import os
import sys
import time
import urllib.request

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "seedsite.settings")
import django

django.setup()
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402

api_url, api_key, project_id, endpoint_id = sys.argv[1:5]


def endpoint_state() -> str:
    req = urllib.request.Request(f"{api_url}/api/v2/projects/{project_id}/endpoints/{endpoint_id}",
                                 headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req) as resp:
        return json.load(resp)["endpoint"]["current_state"]


client = Client()
assert client.get("/count/").status_code == 200
first = connection.connection
assert first is not None, "CONN_MAX_AGE>0 keeps the connection open after the request"
deadline = time.monotonic() + 30
while endpoint_state() != "idle":
    if time.monotonic() > deadline:
        sys.exit("the endpoint did not suspend")
    time.sleep(0.2)
resp = client.get("/count/")
assert resp.status_code == 200, resp.content
assert connection.connection is not first, "the health check replaced the dead connection"
print("ok", resp.json())

"""Every writable field of Neon's API either takes effect on Argon or is refused with a 400 naming it.

The fields come from the OpenAPI document inside `@neondatabase/api-client` (npm, pinned): every
leaf of the request bodies of project, branch, endpoint, role and database create/update. A field
Argon acts on is listed in `ACCEPTED` with a value and the check that shows it took effect (read
back through the API); one request per operation sends them all together. Every other field,
and the values Argon cannot honour (`REFUSED_VALUES`), must come back 400 with the field's path in
the message, and nothing created. A new field in a newer document fails here until Argon decides.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import yaml

from tests.fixtures.npm import npm_install
from tests.fixtures.platform import RunningPlatform
from tests.integration.test_neon_clients import API_CLIENT_VERSION

pytestmark = [pytest.mark.pg, pytest.mark.slow]

REQUESTS = {  # request schema -> (method, path template, resource the read-back check gets)
    "ProjectCreateRequest": ("POST", "/projects", "project"),
    "ProjectUpdateRequest": ("PATCH", "/projects/{p}", "project"),
    "BranchCreateRequest": ("POST", "/projects/{p}/branches", "branch"),
    "BranchUpdateRequest": ("PATCH", "/projects/{p}/branches/{b}", "branch"),
    "EndpointCreateRequest": ("POST", "/projects/{p}/endpoints", "endpoint"),
    "EndpointUpdateRequest": ("PATCH", "/projects/{p}/endpoints/{e}", "endpoint"),
    "RoleCreateRequest": ("POST", "/projects/{p}/branches/{b}/roles", "role"),
    "DatabaseCreateRequest": ("POST", "/projects/{p}/branches/{b}/databases", "database"),
    "DatabaseUpdateRequest": ("PATCH", "/projects/{p}/branches/{b}/databases/{d}", "database"),
}

Check = Callable[[dict[str, Any]], bool] | None  # None: the value is what Argon does anyway
ELSEWHERE = object()  # accepted, and its effect is tested by its own test
# Sent in a second request of their operation: they would hide each other in one.
SECOND = {"ProjectCreateRequest": {".project.default_endpoint_settings.autoscaling_limit_min_cu",
                                   ".project.default_endpoint_settings.autoscaling_limit_max_cu"}}
SOON = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)

ACCEPTED: dict[str, dict[str, tuple[Any, Check]]] = {
    "ProjectCreateRequest": {
        ".project.name": ("walk", lambda r: r["project"]["name"] == "walk"),
        ".project.branch.name": ("trunk", lambda r: r["branch"]["name"] == "trunk"),
        ".project.branch.role_name": ("walker", lambda r: [x["name"] for x in r["roles"]] == ["walker"]),
        ".project.branch.database_name": ("walkdb", lambda r: [x["name"] for x in r["databases"]] == ["walkdb"]),
        ".project.branch.annotations": ({}, None),
        ".project.autoscaling_limit_min_cu": (0.5, lambda r: r["endpoint"]["autoscaling_limit_min_cu"] == 0.5),
        ".project.autoscaling_limit_max_cu": (1, lambda r: r["endpoint"]["autoscaling_limit_max_cu"] == 1),
        ".project.provisioner": ("k8s-pod", lambda r: r["project"]["provisioner"] == "k8s-pod"),
        ".project.region_id": ("local", lambda r: r["project"]["region_id"] == "local"),
        ".project.default_endpoint_settings.pg_settings": ({}, None),
        ".project.default_endpoint_settings.pgbouncer_settings": ({}, None),
        ".project.default_endpoint_settings.suspend_timeout_seconds": (
            120, lambda r: r["endpoint"]["suspend_timeout_seconds"] == 120),
        ".project.default_endpoint_settings.autoscaling_limit_min_cu": (
            1, lambda r: r["second"]["project"]["default_endpoint_settings"]["autoscaling_limit_min_cu"] == 1),
        ".project.default_endpoint_settings.autoscaling_limit_max_cu": (
            2, lambda r: r["second"]["endpoints"][0]["autoscaling_limit_max_cu"] == 2),
        ".project.pg_version": ("DEFAULT", lambda r: r["project"]["pg_version"] == r["default_pg_version"]),
        ".project.store_passwords": (True, lambda r: r["password"] is not None),
        ".project.history_retention_seconds": (3600, lambda r: r["project"]["history_retention_seconds"] == 3600),
        ".project.settings.allowed_ips.ips[]": ("127.0.0.0/8",
                                                lambda r: r["project"]["settings"]["allowed_ips"]["ips"] == ["127.0.0.0/8"]),
        ".project.settings.allowed_ips.protected_branches_only": (
            True, lambda r: r["project"]["settings"]["allowed_ips"]["protected_branches_only"] is True),
        ".project.settings.enable_logical_replication": (True, lambda r: r["wal_level"] == "logical"),
        ".project.settings.quota.logical_size_bytes": (
            2**30, lambda r: r["project"]["settings"]["quota"]["logical_size_bytes"] == 2**30
            and r["project"]["branch_logical_size_limit"] == 1024),
        ".project.settings.block_public_connections": (False, None),
        ".project.settings.block_vpc_connections": (False, None),
        ".project.settings.hipaa": (False, None),
        ".project.settings.preload_libraries.use_defaults": (True, None),
        ".project.settings.preload_libraries.enabled_libraries[]": ([], None),
    },
    "ProjectUpdateRequest": {
        ".project.name": ("walked", lambda r: r["project"]["name"] == "walked"),
        ".project.default_endpoint_settings.autoscaling_limit_min_cu": (
            0.5, lambda r: r["project"]["default_endpoint_settings"]["autoscaling_limit_min_cu"] == 0.5),
        ".project.default_endpoint_settings.autoscaling_limit_max_cu": (
            2, lambda r: r["project"]["default_endpoint_settings"]["autoscaling_limit_max_cu"] == 2),
        ".project.default_endpoint_settings.suspend_timeout_seconds": (
            60, lambda r: r["project"]["default_endpoint_settings"]["suspend_timeout_seconds"] == 60),
        ".project.default_endpoint_settings.pg_settings": ({}, None),
        ".project.default_endpoint_settings.pgbouncer_settings": ({}, None),
        ".project.history_retention_seconds": (7200, lambda r: r["project"]["history_retention_seconds"] == 7200),
        ".project.settings.allowed_ips.ips[]": ("10.1.2.3-10.1.2.9",
                                                lambda r: r["project"]["settings"]["allowed_ips"]["ips"] == ["10.1.2.3-10.1.2.9"]),
        ".project.settings.allowed_ips.protected_branches_only": (
            True, lambda r: r["project"]["settings"]["allowed_ips"]["protected_branches_only"] is True),
        ".project.settings.enable_logical_replication": (True, lambda r: r["wal_level"] == "logical"),
        ".project.settings.quota.logical_size_bytes": (
            2**31, lambda r: r["project"]["settings"]["quota"]["logical_size_bytes"] == 2**31
            and r["project"]["branch_logical_size_limit"] == 2048),
        ".project.settings.block_public_connections": (False, None),
        ".project.settings.block_vpc_connections": (False, None),
        ".project.settings.hipaa": (False, None),
        ".project.settings.preload_libraries.use_defaults": (True, None),
        ".project.settings.preload_libraries.enabled_libraries[]": ([], None),
    },
    "BranchCreateRequest": {
        ".branch.name": ("walk-branch", lambda r: r["branch"]["name"] == "walk-branch"),
        ".branch.parent_id": ("MAIN", lambda r: r["branch"]["parent_id"] == r["main_id"]),
        ".branch.parent_lsn": ("LSN", lambda r: r["branch"]["parent_lsn"] == r["lsn"]),
        ".branch.parent_timestamp": (ELSEWHERE, None),  # test_pitr (it cannot go with parent_lsn)
        ".branch.protected": (True, lambda r: r["branch"]["protected"] is True),
        ".branch.archived": (False, None),
        ".branch.init_source": ("parent-data", lambda r: r["branch"]["init_source"] == "parent-data"),
        ".branch.expires_at": (SOON.strftime("%Y-%m-%dT%H:%M:%SZ"),
                               lambda r: r["branch"]["expires_at"] == SOON.strftime("%Y-%m-%dT%H:%M:%SZ")),
        ".endpoints[].type": ("read_only", lambda r: r["endpoint"]["type"] == "read_only"),
        ".endpoints[].autoscaling_limit_min_cu": (0.5, lambda r: r["endpoint"]["autoscaling_limit_min_cu"] == 0.5),
        ".endpoints[].autoscaling_limit_max_cu": (2, lambda r: r["endpoint"]["autoscaling_limit_max_cu"] == 2),
        ".endpoints[].provisioner": ("k8s-pod", None),
        ".endpoints[].suspend_timeout_seconds": (90, lambda r: r["endpoint"]["suspend_timeout_seconds"] == 90),
        ".endpoints[].settings.pg_settings": ({"work_mem": "8MB"},
                                              lambda r: r["endpoint"]["settings"]["pg_settings"] == {"work_mem": "8MB"}),
        ".endpoints[].settings.pgbouncer_settings": ({}, None),
        ".endpoints[].settings.preload_libraries.use_defaults": (True, None),
        ".endpoints[].settings.preload_libraries.enabled_libraries[]": ([], None),
    },
    "BranchUpdateRequest": {
        ".branch.name": ("renamed", lambda r: r["branch"]["name"] == "renamed"),
        ".branch.protected": (True, lambda r: r["branch"]["protected"] is True),
        ".branch.expires_at": (None, lambda r: r["branch"]["expires_at"] is None),
    },
    "EndpointCreateRequest": {
        ".endpoint.branch_id": ("CHILD", lambda r: r["endpoint"]["branch_id"] == r["child_id"]),
        ".endpoint.region_id": ("local", lambda r: r["endpoint"]["region_id"] == "local"),
        ".endpoint.type": ("read_only", lambda r: r["endpoint"]["type"] == "read_only"),
        ".endpoint.autoscaling_limit_min_cu": (0.5, lambda r: r["endpoint"]["autoscaling_limit_min_cu"] == 0.5),
        ".endpoint.autoscaling_limit_max_cu": (1, lambda r: r["endpoint"]["autoscaling_limit_max_cu"] == 1),
        ".endpoint.provisioner": ("k8s-pod", lambda r: r["endpoint"]["provisioner"] == "k8s-pod"),
        ".endpoint.settings.pg_settings": ({"work_mem": "8MB"},  # their effect: test_pg_settings
                                           lambda r: r["endpoint"]["settings"]["pg_settings"] == {"work_mem": "8MB"}),
        ".endpoint.settings.pgbouncer_settings": ({}, None),
        ".endpoint.settings.preload_libraries.use_defaults": (True, None),
        ".endpoint.settings.preload_libraries.enabled_libraries[]": ([], None),
        ".endpoint.pooler_enabled": (True, lambda r: r["endpoint"]["pooler_enabled"] is True),
        ".endpoint.pooler_mode": ("transaction", lambda r: r["endpoint"]["pooler_mode"] == "transaction"),
        ".endpoint.disabled": (True, lambda r: r["endpoint"]["disabled"] is True and r["start_status"] == 400),
        ".endpoint.passwordless_access": (False, None),
        ".endpoint.suspend_timeout_seconds": (60, lambda r: r["endpoint"]["suspend_timeout_seconds"] == 60),
        ".endpoint.name": ("walk-ep", lambda r: r["endpoint"]["name"] == "walk-ep"),
    },
    "EndpointUpdateRequest": {
        ".endpoint.autoscaling_limit_min_cu": (1, lambda r: r["endpoint"]["autoscaling_limit_min_cu"] == 1),
        ".endpoint.autoscaling_limit_max_cu": (2, lambda r: r["endpoint"]["autoscaling_limit_max_cu"] == 2),
        ".endpoint.provisioner": ("k8s-pod", None),
        ".endpoint.settings.pg_settings": ({"statement_timeout": "9s"},
                                           lambda r: r["endpoint"]["settings"]["pg_settings"] == {"statement_timeout": "9s"}),
        ".endpoint.settings.pgbouncer_settings": ({}, None),
        ".endpoint.settings.preload_libraries.use_defaults": (True, None),
        ".endpoint.settings.preload_libraries.enabled_libraries[]": ([], None),
        ".endpoint.pooler_enabled": (True, None),
        ".endpoint.pooler_mode": ("transaction", None),
        ".endpoint.disabled": (False, lambda r: r["endpoint"]["disabled"] is False),
        ".endpoint.passwordless_access": (False, None),
        ".endpoint.suspend_timeout_seconds": (-1, lambda r: r["endpoint"]["suspend_timeout_seconds"] == -1),
        ".endpoint.name": ("walk-ep2", lambda r: r["endpoint"]["name"] == "walk-ep2"),
    },
    "RoleCreateRequest": {
        ".role.name": ("walk_role", lambda r: r["role"]["name"] == "walk_role"),
        ".role.no_login": (True, lambda r: r["role"]["authentication_method"] == "no_login"),
    },
    "DatabaseCreateRequest": {
        ".database.name": ("walk_db", lambda r: r["database"]["name"] == "walk_db"),
        ".database.owner_name": ("OWNER", lambda r: r["database"]["owner_name"] == r["owner"]),
    },
    "DatabaseUpdateRequest": {
        ".database.name": ("walk_db2", lambda r: r["database"]["name"] == "walk_db2"),
        ".database.owner_name": ("OWNER", lambda r: r["database"]["owner_name"] == r["owner"]),
    },
}

# Values of accepted fields that Argon cannot honour: each a 400 too.
REFUSED_VALUES: dict[str, Any] = {
    ".project.provisioner": "k8s-neonvm", ".endpoints[].provisioner": "k8s-neonvm",
    ".endpoint.provisioner": "k8s-neonvm", ".project.region_id": "aws-us-east-2", ".endpoint.region_id": "aws-us-east-2",
    ".project.store_passwords": False, ".project.branch.annotations": {"team": "x"},
    ".project.settings.block_public_connections": True, ".project.settings.block_vpc_connections": True,
    ".project.settings.hipaa": True, ".project.settings.allowed_ips.ips[]": "not-an-ip",
    ".project.default_endpoint_settings.pg_settings": {"work_mem": "8MB"},
    ".project.default_endpoint_settings.pgbouncer_settings": {"pool_mode": "session"},
    ".endpoints[].settings.pg_settings": {"archive_command": "x"}, ".endpoint.settings.pg_settings": {"work_mem": "a lot"},
    ".endpoint.settings.pgbouncer_settings": {"pool_mode": "session"},
    ".endpoints[].settings.pgbouncer_settings": {"pool_mode": "session"},
    ".project.settings.preload_libraries.use_defaults": False, ".endpoint.settings.preload_libraries.use_defaults": False,
    ".endpoints[].settings.preload_libraries.use_defaults": False,
    ".project.settings.preload_libraries.enabled_libraries[]": "timescaledb",
    ".endpoint.settings.preload_libraries.enabled_libraries[]": "timescaledb",
    ".endpoints[].settings.preload_libraries.enabled_libraries[]": "timescaledb",
    ".branch.archived": True, ".endpoint.pooler_enabled": False, ".endpoint.passwordless_access": True,
}


def spec_fields() -> dict[str, dict[str, dict[str, Any]]]:
    """{request schema: {field path: its schema}} for the leaves of each request body."""
    prefix = npm_install(f"@neondatabase/api-client@{API_CLIENT_VERSION}", "@neondatabase/api-client/package.json")
    doc = yaml.safe_load((prefix / "node_modules/@neondatabase/api-client/public-v2-for-users.gen.yaml").read_text())
    schemas = doc["components"]["schemas"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = schemas[node["$ref"].rsplit("/", 1)[1]]
        return node

    def walk(node: dict[str, Any], path: str, out: dict[str, dict[str, Any]]) -> None:
        node = resolve(node)
        if node.get("readOnly"):
            return
        if node.get("type") == "array":
            walk(node["items"], path + "[]", out)
        elif node.get("properties"):
            for name, sub in node["properties"].items():
                walk(sub, f"{path}.{name}", out)
        else:
            out[path] = node

    result = {}
    for name in REQUESTS:
        out: dict[str, dict[str, Any]] = {}
        walk(schemas[name], "", out)
        result[name] = out
    return result


def body_for(values: dict[str, Any]) -> dict[str, Any]:
    """A request body setting each field path to its value (`[]`: a one-element list)."""
    body: dict[str, Any] = {}
    for path, value in values.items():
        parts = path.lstrip(".").split(".")
        node = body
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part.endswith("[]"):
                key = part[:-2]
                if last:
                    node[key] = value if isinstance(value, list) else [value]
                    break
                node = node.setdefault(key, [{}])[0]
            elif last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    return body


def refused_sample(path: str, schema: dict[str, Any]) -> Any:
    if path in REFUSED_VALUES:
        return REFUSED_VALUES[path]
    if schema.get("enum"):
        return schema["enum"][0]
    return {"boolean": True, "integer": 1, "number": 1, "string": "x"}.get(schema.get("type", ""), {"x": "y"})


def named(message: str, path: str) -> bool:
    """Whether a 400's message names the field, or the object holding it when Argon refuses all of
    it (`project.settings.quota`), or, from a check past validation, by its own name; list indices
    and `[]` left out."""
    field = path.replace("[]", "").lstrip(".")
    if re.search(rf"\b{re.escape(field.rsplit('.', 1)[-1])}\b", message):
        return True
    for part in message.removeprefix("invalid request: ").split("; "):
        loc = re.sub(r"\.\d+", "", part.split(": ", 1)[0])
        if field == loc or field.startswith(loc + "."):
            return True
    return False


@pytest.fixture
def world(platform: RunningPlatform) -> Iterator[dict[str, Any]]:
    created = platform.create_project(name="fields")
    pid, main = created["project"]["id"], created["branch"]["id"]
    child = platform.api.post(f"/projects/{pid}/branches", json={"branch": {"name": "child"}}).json()["branch"]["id"]
    yield {"p": pid, "b": main, "child": child, "owner": created["roles"][0]["name"]}
    platform.delete_project(pid)


def test_every_writable_field_acts_or_is_refused(platform: RunningPlatform, world: dict[str, Any]) -> None:
    fields = spec_fields()
    assert sum(len(f) for f in fields.values()) > 80
    pid, main = world["p"], world["b"]
    unchecked = [f"{name}{path}" for name, paths in fields.items() for path in paths if path not in ACCEPTED[name]]
    stale = [f"{name}{path}" for name, paths in ACCEPTED.items() for path in paths if path not in fields[name]]
    assert not stale, f"ACCEPTED lists fields the document does not have: {stale}"

    # Refused: every field Argon does not act on, and the values it cannot honour.
    for name, paths in fields.items():
        method, template, _ = REQUESTS[name]
        for path, schema in paths.items():
            if path in ACCEPTED[name] and path not in REFUSED_VALUES:
                continue
            base = {"BranchCreateRequest": {".endpoints[].type": "read_write"} if path.startswith(".endpoints") else {},
                    "EndpointCreateRequest": {".endpoint.branch_id": main, ".endpoint.type": "read_only"},
                    "RoleCreateRequest": {".role.name": "refused_role"},
                    "DatabaseCreateRequest": {".database.name": "refused_db", ".database.owner_name": world["owner"]},
                    }.get(name, {})
            body = body_for({**base, path: refused_sample(path, schema)})
            resp = platform.api.request(method, template.format(p=pid, b=main, e="ep-none", d="neondb"), json=body)
            if resp.status_code == 201 and name == "ProjectCreateRequest":
                platform.delete_project(resp.json()["project"]["id"])
            assert resp.status_code == 400 and named(resp.json()["message"], path), \
                f"{name}{path} = {body}: {resp.status_code} {resp.text}"
    assert len(unchecked) >= 18  # quota (but its logical size), maintenance windows, audit logs, ... are refused, not ignored

    # Accepted: one request per operation with all of its fields; each shows its effect.
    with psycopg.connect(main_uri(platform, world), connect_timeout=30) as conn:
        lsn = conn.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]  # type: ignore[index]
    context = {"main_id": main, "child_id": world["child"], "owner": world["owner"], "lsn": lsn,
               "default_pg_version": platform.api.get(f"/projects/{pid}").json()["project"]["pg_version"]}
    substitutes = {"DEFAULT": context["default_pg_version"], "MAIN": main, "CHILD": world["child"], "LSN": lsn,
                   "OWNER": world["owner"]}
    for name in REQUESTS:
        accepted = {path: substitutes.get(v, v) if isinstance(v, str) else v for path, (v, _) in ACCEPTED[name].items()}
        accepted = {path: v for path, v in accepted.items() if v is not ELSEWHERE}
        second = {path: accepted.pop(path) for path in SECOND.get(name, ()) if path in accepted}
        if second:
            resp = platform.api.request(REQUESTS[name][0], REQUESTS[name][1], json=body_for(second))
            assert resp.status_code == 201, resp.text
            context["second"] = resp.json()
            platform.delete_project(context["second"]["project"]["id"])
        state = run_accepted(platform, world, name, accepted, context)
        for path, (_, check) in ACCEPTED[name].items():
            if check is not None and (path in accepted or path in second):
                assert check(state), f"{name}{path} did not take effect: {state}"


def run_accepted(platform: RunningPlatform, world: dict[str, Any], name: str, values: dict[str, Any],
                 context: dict[str, Any]) -> dict[str, Any]:
    """Send the accepted request; return what the checks read (the resource as the API shows it after)."""
    method, template, kind = REQUESTS[name]
    api, pid, main = platform.api, world["p"], world["b"]
    ids = {"p": pid, "b": main, "d": "neondb", "e": ""}
    if name == "EndpointUpdateRequest":
        ids["e"] = world["endpoint"]
    if name == "DatabaseUpdateRequest":
        ids["d"] = "walk_db"
    resp = api.request(method, template.format(**ids), json=body_for(values))
    assert resp.status_code in (200, 201), f"{name}: {resp.text}"
    out = {**context, **resp.json()}
    if name == "ProjectCreateRequest":
        new = out["project"]["id"]
        try:
            out["endpoint"] = out["endpoints"][0]
            out["password"] = out["roles"][0].get("password")
            out["wal_level"] = _wal_level(platform, out)
        finally:
            platform.delete_project(new)
    elif name == "ProjectUpdateRequest":
        out["project"] = api.get(f"/projects/{pid}").json()["project"]
        out["wal_level"] = _wal_level(platform, {"connection_uris": [{"connection_uri": main_uri(platform, world)}]})
    elif name == "BranchCreateRequest":
        out["branch"] = api.get(f"/projects/{pid}/branches/{out['branch']['id']}").json()["branch"]
        out["endpoint"] = out["endpoints"][0]
        world["walk_branch"] = out["branch"]["id"]
    elif name == "BranchUpdateRequest":
        out["branch"] = api.get(f"/projects/{pid}/branches/{main}").json()["branch"]
    elif name == "EndpointCreateRequest":
        world["endpoint"] = out["endpoint"]["id"]
        out["start_status"] = api.post(f"/projects/{pid}/endpoints/{world['endpoint']}/start").status_code
        out["endpoint"] = api.get(f"/projects/{pid}/endpoints/{world['endpoint']}").json()["endpoint"]
    elif name == "EndpointUpdateRequest":
        out["endpoint"] = api.get(f"/projects/{pid}/endpoints/{world['endpoint']}").json()["endpoint"]
    elif name == "RoleCreateRequest":
        out["role"] = api.get(f"/projects/{pid}/branches/{main}/roles/walk_role").json()["role"]
    else:
        db = values[".database.name"]
        out["database"] = api.get(f"/projects/{pid}/branches/{main}/databases/{db}").json()["database"]
    assert kind in out
    return out


def main_uri(platform: RunningPlatform, world: dict[str, Any]) -> str:
    return str(platform.api.get(f"/projects/{world['p']}/connection_uri",
                                params={"database_name": "neondb", "role_name": world["owner"]}).json()["uri"])


def _wal_level(platform: RunningPlatform, created: dict[str, Any]) -> str:
    with psycopg.connect(created["connection_uris"][0]["connection_uri"], connect_timeout=30) as conn:
        return str(conn.execute("show wal_level").fetchone()[0])  # type: ignore[index]

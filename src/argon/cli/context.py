"""The CLI's context (API URL, key, output format) and what several commands share: finding
the project, the endpoint's project and a branch from what the user typed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from argon.cli.client import ApiClient, CliError


@dataclass
class Context:
    api_url: str | None
    api_key: str | None
    output: str
    _client: ApiClient | None = None

    @property
    def api(self) -> ApiClient:
        if self._client is None:
            self._client = ApiClient(self.api_url, self.api_key)
        return self._client


pass_ctx = click.make_pass_decorator(Context)


def default_project(ctx: Context, project_id: str | None) -> str:
    if project_id:
        return project_id
    projects = ctx.api.get("/projects", params={"limit": 2})["projects"]
    if len(projects) == 1:
        return str(projects[0]["id"])
    raise CliError("which project? pass --project-id (there is " + ("no project yet: create one with "
                   "`argon projects create`)" if not projects else "more than one)"))


def all_projects(ctx: Context) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if cursor:
            params["cursor"] = cursor
        page = ctx.api.get("/projects", params=params)
        items += page["projects"]
        cursor = page.get("pagination", {}).get("cursor")
        if len(page["projects"]) < 100 or not cursor:
            return items


def endpoint_project(ctx: Context, project_id: str | None, endpoint_id: str) -> str:
    """The project of an endpoint: --project-id, else the only project, else the one that has it
    (endpoint ids are unique across projects, so the id alone is enough)."""
    if project_id:
        return project_id
    projects = all_projects(ctx)
    if len(projects) == 1:
        return str(projects[0]["id"])
    for project in projects:
        if any(ep["id"] == endpoint_id for ep in ctx.api.get(f"/projects/{project['id']}/endpoints")["endpoints"]):
            return str(project["id"])
    raise CliError(f"no endpoint {endpoint_id} in any project" if projects else
                   "there is no project yet: create one with `argon projects create`")


project_option = click.option("--project-id", help="Project id (optional when there is exactly one project)")


endpoint_project_option = click.option("--project-id", help="Project id (optional: found from the endpoint id)")


def resolve_branch(ctx: Context, pid: str, branch: str) -> dict[str, Any]:
    branches_ = ctx.api.get(f"/projects/{pid}/branches")["branches"]
    matches = [b for b in branches_ if branch in (b["id"], b["name"])]
    if not matches:
        names = ", ".join(b["name"] for b in branches_)
        raise CliError(f"branch {branch!r} not found in project {pid} (its branches: {names})")
    return matches[0]


branch_option = click.option("--branch", help="Branch name or id (default: the default branch)")


def branch_path(ctx: Context, project_id: str | None, branch: str | None) -> str:
    pid = default_project(ctx, project_id)
    if branch:
        bid = resolve_branch(ctx, pid, branch)["id"]
    else:
        bid = next(b["id"] for b in ctx.api.get(f"/projects/{pid}/branches")["branches"] if b["default"])
    return f"/projects/{pid}/branches/{bid}"

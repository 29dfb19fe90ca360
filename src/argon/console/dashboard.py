"""What the console's pages show, read from the control control's view: compute state, the
Connection Details choices, and suspend-timeout choices.

Kept apart from the routes so that each page's data is one function call, and so the compute
state a page renders and the state its live indicator polls come from the same `compute_view`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from argon import model
from argon.console import display
from argon.console.snippets import Snippet, snippets
from argon.control import connection
from argon.control.services import Control

SUSPEND_CHOICES = (0, 60, 300, 900, 3600, 86400, -1)  # seconds; 0 = platform default, -1 = never


@dataclass(frozen=True)
class ComputeView:
    endpoint: model.Endpoint | None
    state: str  # active | idle | starting | none: the indicator's CSS class
    label: str
    last_active: str
    size: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"state": self.state, "label": self.label, "last_active": self.last_active}


def primary_endpoint(control: Control, project_id: str, branch_id: str) -> model.Endpoint | None:
    eps = [e for e in control.plane.endpoints(project_id, branch_id) if e.type is model.EndpointType.READ_WRITE]
    return eps[0] if eps else None


def default_branch(control: Control, project_id: str) -> model.Branch:
    branches = control.plane.branches(project_id)
    return next((b for b in branches if b.default), branches[0])


def compute_view(control: Control, ep: model.Endpoint | None) -> ComputeView:
    if ep is None:
        return ComputeView(None, "none", "No compute", "never")
    busy = control.plane.endpoint_lock(ep.id).locked()
    if ep.current_state is model.ComputeState.ACTIVE:
        state, label = "active", "Active"
    elif busy or ep.pending_state is model.ComputeState.ACTIVE:
        state, label = "starting", "Starting"
    else:
        state, label = "idle", "Idle"
    return ComputeView(ep, state, label, display.ago(ep.last_active),
                       display.compute_units(ep.autoscaling_limit_min_cu, ep.autoscaling_limit_max_cu))


def project_compute(control: Control, project_id: str) -> ComputeView:
    """The state shown in the projects table: that of the default branch's compute."""
    return compute_view(control, primary_endpoint(control, project_id, default_branch(control, project_id).id))


def suspend_choices(settings_default: int, current: int) -> list[tuple[int, str]]:
    def label(seconds: int) -> str:
        if seconds == 0:
            return f"Default ({display.duration(settings_default)})"
        return "Never" if seconds < 0 else display.duration(seconds)

    values = list(SUSPEND_CHOICES) + ([] if current in SUSPEND_CHOICES else [current])
    return [(v, label(v)) for v in sorted(values, key=lambda v: (v < 0, v))]


@dataclass
class ConnectionWidget:
    """The Connection Details choices and, when a password is known, the snippets."""

    branches: list[model.Branch]
    branch: model.Branch
    databases: list[str]
    database: str | None
    roles: list[str]
    role: str | None
    pooled: bool
    endpoint: model.Endpoint | None
    snippets: list[Snippet] = field(default_factory=list)
    problem: str | None = None


def _pick(options: list[str], wanted: str | None) -> str | None:
    if wanted in options:
        return wanted
    return options[0] if options else None


async def connection_widget(control: Control, project_id: str, *, branch_id: str | None,
                            database: str | None, role: str | None, pooled: bool) -> ConnectionWidget:
    plane = control.plane
    branches = plane.branches(project_id)
    branch = next((b for b in branches if b.id == branch_id), None) or default_branch(control, project_id)
    dbs = [d.name for d in await plane.db(plane.store.list_databases, branch.id)]
    all_roles = await plane.db(plane.store.list_roles, branch.id)
    roles = {r.name: r for r in all_roles if r.login and r.name != model.PLATFORM_ROLE}
    widget = ConnectionWidget(branches, branch, dbs, _pick(dbs, database), list(roles), _pick(list(roles), role),
                              pooled, primary_endpoint(control, project_id, branch.id))
    if widget.endpoint is None:
        widget.problem = "This branch has no compute yet, so there is nothing to connect to."
    elif widget.database is None or widget.role is None:
        widget.problem = "This branch has no database or no role that can log in."
    else:
        secret = roles[widget.role].password_enc
        password = plane.secrets.decrypt(secret) if secret else None
        if password is None:
            widget.problem = (f"Argon does not know the password of {widget.role} (it was set with SQL). "
                              "Reset it with the API to get one that can be shown here.")
        else:
            params = connection.parameters(plane.settings, endpoint=widget.endpoint, role=widget.role,
                                           password=password, database=widget.database, pooled=pooled)
            widget.snippets = snippets(params)
    return widget

"""The console's account pages: API keys (list, create, revoke).

A new key is shown once: the POST keeps it in the session's one-time secrets and the next GET
pops it, so it never travels in a URL and a reload no longer shows it. Revoking a key also signs
out the browsers that signed in with it (`ConsoleAuth.close_sessions_of_key`, hooked to
`ApiKeys.on_revoke` by `mount_console`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, Response

from argon.console.web import ConsoleRoute, ControlDep, Posted, SignedIn, confirm, redirect, render
from argon.errors import ArgonError

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)

KEYS_URL = "/account/api-keys"
CRUMBS = (("Account", None), ("API keys", KEYS_URL))


@router.get(KEYS_URL)
async def api_keys_page(request: Request, session: SignedIn, control: ControlDep) -> Response:
    await control.api_keys.flush()
    name = session.pop_secret("api-key-name")
    token = session.pop_secret("api-key")
    return render(request, "api_keys.html", session=session, keys=list(reversed(control.api_keys.list())),
                  new_key=token, new_key_name=name, error=None, values={})


@router.post(KEYS_URL)
async def create_key(request: Request, session: Posted, control: ControlDep,
                     name: Annotated[str, Form()] = "") -> Response:
    try:
        key, token = await control.api_keys.create(name)
    except ArgonError as exc:
        return render(request, "api_keys.html", session=session, status=400, keys=list(reversed(control.api_keys.list())),
                      new_key=None, new_key_name=None, error=exc.user_message, values={"name": name})
    session.secrets["api-key-name"] = key.name
    session.secrets["api-key"] = token
    session.flash("success", f"API key {key.name} was created.")
    return redirect(KEYS_URL)


@router.get(KEYS_URL + "/{key_id}/revoke")
async def revoke_form(request: Request, session: SignedIn, control: ControlDep, key_id: int) -> Response:
    key = control.api_keys.get(key_id)
    notes = ["Scripts, CLIs and browsers using this key stop working at once, and browsers signed in with it "
             "are signed out."]
    if session.api_key_id == key.id:
        notes.append("That includes this browser.")
    if len(control.api_keys.list()) == 1:
        notes.append("It is the last key: the API and the CLI refuse every call until you create another one "
                     "here (or restart argon up, which makes a new one).")
    notes.append("This cannot be undone.")
    return confirm(request, session, None, crumbs=CRUMBS, title=f"Revoke the API key {key.name}",
                   message=" ".join(notes), action=f"{KEYS_URL}/{key.id}/revoke", button="Revoke key",
                   back=KEYS_URL)


@router.post(KEYS_URL + "/{key_id}/revoke")
async def revoke(session: Posted, control: ControlDep, key_id: int) -> Response:
    key = control.api_keys.get(key_id)
    await control.api_keys.revoke(key.id)
    session.flash("success", f"API key {key.name} was revoked.")
    return redirect(KEYS_URL)

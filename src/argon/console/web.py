"""The console's HTTP plumbing: sessions as dependencies, rendering, and HTML error pages.

The API's exception handlers answer with JSON; a browser deserves a page. `ConsoleRoute` catches
everything a console route raises and turns it into a human page (or a redirect to /login when
nobody is signed in), and adds the headers every console response carries. Routes stay small:
they get a checked `Session`, call the control plane, and `render()` a template.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from argon import __version__, model
from argon.console.auth import COOKIE_NAME, CSRF_FIELD, ConsoleAuth, Session
from argon.console.display import FILTERS
from argon.control.services import Control
from argon.errors import ArgonError, Forbidden

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "templates"


@functools.cache
def templates() -> Any:
    """The pages' Jinja environment, made at the first page rendered: an `argon up` nobody opens the
    console of (a service, the tests' hundreds of starts) does not import Jinja (~50 ms of its start)."""
    from fastapi.templating import Jinja2Templates

    made = Jinja2Templates(directory=TEMPLATE_DIR)
    made.env.filters.update(FILTERS)
    return made

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # pages can show passwords: never keep them in a cache
}


class SignInRequired(Exception):
    """Nobody is signed in (no cookie, or an expired session)."""


class CsrfRejected(Exception):
    """A form came back without this session's CSRF token."""


def console_auth(request: Request) -> ConsoleAuth:
    auth: ConsoleAuth = request.app.state.console_auth
    return auth


async def get_control(request: Request) -> Control:
    control: Control = request.app.state.control
    return control


async def authorized(request: Request) -> Control:
    """The console's one API route (sign-in links for the CLI) takes the API's Bearer key."""
    control: Control = request.app.state.control
    key = control.api_keys.authorize(request.headers.get("authorization", ""))
    if key.project_id is not None:  # the console shows every project
        raise Forbidden(f"this API key is limited to project {key.project_id}; the console needs an unscoped key")
    return control


def find_session(request: Request) -> Session:
    session = console_auth(request).session(request.cookies.get(COOKIE_NAME))
    if session is None:
        raise SignInRequired
    return session


async def posted_session(request: Request) -> Session:
    """The session of a form POST whose CSRF token matches it."""
    session = find_session(request)
    form = await request.form()
    token = form.get(CSRF_FIELD)
    if not session.csrf_ok(token if isinstance(token, str) else None):
        raise CsrfRejected
    return session


async def current_session(request: Request) -> Session:
    """The request's signed-in session (async, as every dependency here: memory only, so it runs on the
    event loop rather than in FastAPI's thread pool)."""
    return find_session(request)


SignedIn = Annotated[Session, Depends(current_session)]
Posted = Annotated[Session, Depends(posted_session)]
ControlDep = Annotated[Control, Depends(get_control)]
Authorized = Annotated[Control, Depends(authorized)]


def render(request: Request, template: str, *, session: Session | None = None, status: int = 200,
           **context: Any) -> HTMLResponse:
    context.update(session=session, flashes=session.pop_flashes() if session else [], csrf_field=CSRF_FIELD,
                   version=__version__)
    page: HTMLResponse = templates().TemplateResponse(request, template, context, status_code=status)
    return page


@dataclass(frozen=True)
class Field:
    """A text input on a confirmation page (e.g. the new name of a branch)."""

    name: str
    label: str
    value: str = ""
    help: str = ""
    required: bool = False


def confirm(request: Request, session: Session, project: model.Project | None, *, title: str, message: str,
            action: str, button: str, back: str, hidden: dict[str, str] | None = None,
            fields: tuple[Field, ...] = (), danger: bool = True, error: str | None = None,
            crumbs: tuple[tuple[str, str | None], ...] = (), status: int = 200) -> HTMLResponse:
    """A confirmation page: a plain form (keyboard and no-JavaScript friendly) in front of an action."""
    return render(request, "confirm.html", session=session, status=status, project=project, title=title,
                  message=message, action=action, button=button, back=back, hidden=hidden or {}, fields=fields,
                  danger=danger, error=error, crumbs=crumbs)


def error_page(request: Request, status: int, title: str, message: str) -> HTMLResponse:
    session = console_auth(request).session(request.cookies.get(COOKIE_NAME))
    return render(request, "error.html", session=session, status=status, title=title, message=message)


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


async def act(session: Session, action: Awaitable[object], success: str) -> bool:
    """Run a control-plane action; its outcome, good or bad, is shown on the page the browser goes back to."""
    try:
        await action
    except ArgonError as exc:
        session.flash("error", exc.user_message)
        return False
    session.flash("success", success)
    return True


def _to_login(request: Request) -> Response:
    if request.url.path.endswith(".json"):
        return JSONResponse({"message": "signed out: reload the page to sign in again"}, status_code=401)
    wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return redirect("/login" if wanted == "/" else f"/login?next={quote(wanted, safe='')}")


class ConsoleRoute(APIRoute):
    """A console route: never matches the API's paths; turns every failure into a page."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope.get("path", "").startswith("/api/"):
            return Match.NONE, {}
        return super().matches(scope)

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            response = await _answer(handler, request)
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return guarded


async def _answer(handler: Callable[[Request], Awaitable[Response]], request: Request) -> Response:
    try:
        return await handler(request)
    except SignInRequired:
        return _to_login(request)
    except CsrfRejected:
        return error_page(request, 403, "This form has expired",
                          "The page you sent it from is out of date or came from another site. "
                          "Go back, reload the page and try again.")
    except ArgonError as exc:
        if exc.http_status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc.user_message)
        return error_page(request, exc.http_status, _title(exc.http_status), exc.user_message)
    except RequestValidationError:
        return error_page(request, 400, "That request was not understood",
                          "Some of the values sent are missing or malformed. Go back and try again.")
    except Exception:
        log.exception("console: %s %s failed", request.method, request.url.path)
        return error_page(request, 500, "Something went wrong",
                          "Argon could not complete this request. The server log has the details.")


def _title(status: int) -> str:
    if status == 404:
        return "Not found"
    if status in (409, 412, 423):
        return "Not possible right now"
    return "Something went wrong" if status >= 500 else "That did not work"

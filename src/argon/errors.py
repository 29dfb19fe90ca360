"""The one error tree: every error has a kind (which maps to an HTTP status) and a message fit for users.

Internal details go to the log where the error is handled; only `user_message` reaches clients
(the API's body, a console page, or, through the proxy, an ErrorResponse's text: the proxy sends
every error of its own with SQLSTATE XX000, as Neon's does; kinds carry no SQLSTATE).
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    USER = "user"  # bad input
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"  # a valid key, outside what it may reach (a project-scoped key)
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    PRECONDITION = "precondition"
    LOCKED = "locked"  # another operation is running: retry later
    COMPUTE = "compute"  # Postgres failed to start or answer
    STORAGE = "storage"  # disk full, clone failed
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


HTTP_STATUS = {
    ErrorKind.USER: 400,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.PRECONDITION: 412,
    ErrorKind.LOCKED: 423,
    ErrorKind.COMPUTE: 500,
    ErrorKind.STORAGE: 507,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.INTERNAL: 500,
}


class ArgonError(Exception):
    """An error with a kind and a message that can be shown to a user as is."""

    kind: ErrorKind = ErrorKind.INTERNAL
    retryable: bool = False

    def __init__(self, user_message: str, *, kind: ErrorKind | None = None, code: str = "",
                 retryable: bool | None = None) -> None:
        super().__init__(user_message)
        self.user_message = user_message
        if kind is not None:
            self.kind = kind
        if retryable is not None:
            self.retryable = retryable
        self.code = code

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.kind]


class UserError(ArgonError):
    kind = ErrorKind.USER


class Unauthorized(ArgonError):
    kind = ErrorKind.UNAUTHORIZED


class Forbidden(ArgonError):
    kind = ErrorKind.FORBIDDEN


class NotFound(ArgonError):
    kind = ErrorKind.NOT_FOUND


class Conflict(ArgonError):
    kind = ErrorKind.CONFLICT


class Precondition(ArgonError):
    kind = ErrorKind.PRECONDITION


class Locked(ArgonError):
    kind = ErrorKind.LOCKED
    retryable = True


class ComputeError(ArgonError):
    kind = ErrorKind.COMPUTE
    retryable = True


class StorageError(ArgonError):
    kind = ErrorKind.STORAGE


class ConfigError(ArgonError):
    kind = ErrorKind.USER

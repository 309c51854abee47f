"""Failures that know what they mean to a client, raised where they happen.

Each carries the HTTP status it answers with, the request field it concerns (`param`)
and a machine-readable `code`; the router maps them to OpenAI's error shape in one place
(`router/errors.py`) and never needs to know which layer raised them. Pure: no HTTP here.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of every error a client may see; 500 unless a subclass or the raiser says otherwise."""

    status: int = 500
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None
    """Seconds after which a retry may work (sent as `Retry-After`)."""
    internal: bool = False
    """The message describes the server's insides (exception text, paths): when the status is a
    5xx, the client gets a reference to the log line that has it instead."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if param is not None:
            self.param = param

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class InvalidInput(ServingError):
    """The client asked for something that cannot be done as asked: 400, retrying will not help."""

    status = 400
    code = "invalid_request"


class NotFound(ServingError):
    """No such model (or route): 404."""

    status = 404
    code = "model_not_found"
    param = "model"


class Unavailable(ServingError):
    """It could not be done now (no room, an engine failed, shutting down): 503, a retry may work."""

    status = 503
    code = "unavailable"


class SchedulerError(ValueError):
    """A call the scheduler cannot accept (a budget that is not positive, a model registered twice...)."""

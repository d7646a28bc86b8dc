"""Domain errors. Each message tells the user what to do next; the API maps each class to one status.

Every error answer of the API has one body, `{"detail": ...}` (service/schemas.py `ErrorOut`): for a 422 a
list of `{"loc", "msg", "type"}` entries, one per offending field (`InvalidInput.errors`); for every other
status one message string.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthError",
    "Conflict",
    "DatabaseNotReady",
    "Forbidden",
    "InvalidInput",
    "LeaseLost",
    "NotFound",
    "StoreUnavailable",
    "TooLarge",
    "TunefleetError",
]


class TunefleetError(Exception):
    status_code = 500

    def __init__(self, message: str, detail: Any = None):
        super().__init__(message)
        self.message = message
        self.detail = detail if detail is not None else message


class NotFound(TunefleetError):
    status_code = 404


class Conflict(TunefleetError):
    """The request is valid but the object's state does not allow it (e.g. resuming a stopped study)."""

    status_code = 409


class LeaseLost(Conflict):
    """The trial is no longer leased to this worker (pruned, expired, finished): stop working on it."""


class InvalidInput(TunefleetError):
    """422. `detail` is the list of `{"loc", "msg", "type"}` entries when the raiser knows the fields; a
    message alone becomes one entry at `loc` (the request as a whole when empty)."""

    status_code = 422

    def __init__(self, message: str, detail: list[dict[str, Any]] | None = None, *,
                 loc: tuple[str | int, ...] = ()):
        super().__init__(message, detail)
        self.loc = loc

    def errors(self) -> list[dict[str, Any]]:
        """The 422's `detail`: always a list of `{"loc": [...], "msg": "...", "type": "..."}`."""
        if isinstance(self.detail, list) and self.detail:
            return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", self.message)),
                     "type": str(e.get("type", "value_error"))} if isinstance(e, dict) else
                    {"loc": list(self.loc), "msg": str(e), "type": "value_error"} for e in self.detail]
        return [{"loc": list(self.loc), "msg": self.message, "type": "value_error"}]


class TooLarge(TunefleetError):
    """413: a request body over the server's limit (e.g. an artifact over TUNEFLEET_MAX_ARTIFACT_MB)."""

    status_code = 413


class AuthError(TunefleetError):
    status_code = 401


class Forbidden(TunefleetError):
    status_code = 403


class StoreUnavailable(TunefleetError):
    """503: the object store (TUNEFLEET_STORE_URL) did not answer, or refused the server's credentials."""

    status_code = 503


class DatabaseNotReady(TunefleetError):
    """503: the database is unreachable, refuses connections, or is not at the latest schema. The answer
    carries `Retry-After`."""

    status_code = 503

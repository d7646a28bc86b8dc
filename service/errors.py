"""Domain errors. Each message tells the user what to do next; the API maps each class to one status."""

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
    status_code = 422


class AuthError(TunefleetError):
    status_code = 401


class Forbidden(TunefleetError):
    status_code = 403


class DatabaseNotReady(TunefleetError):
    status_code = 503

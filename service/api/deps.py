"""Typed dependencies shared by the routers: the backend, and who is calling with which role; and `errors`,
the documented error answers of a route (its OpenAPI `responses`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tunefleet.service.auth import ANONYMOUS_ADMIN, LEASE_TOKEN_HEADER, Principal, authenticate, require_role
from tunefleet.service.backend import Backend
from tunefleet.service.schemas import ErrorOut, ValidationErrorOut

__all__ = ["RETRY_AFTER_SECONDS", "Admin", "BackendDep", "LeaseToken", "Reader", "UserOrAdmin", "WorkerOrAdmin",
           "errors", "principal_for"]


def get_backend(request: Request) -> Backend:
    return request.app.state.backend


BackendDep = Annotated[Backend, Depends(get_backend)]


# Documents the bearer token in the OpenAPI (a security scheme, Swagger UI's "Authorize"); get_principal reads
# the header itself, so a missing or malformed one is our 401 with its fix.
_BEARER = HTTPBearer(auto_error=False, description="an API token (`tunefleet token create`); needed when auth is on")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]


def principal_for(backend: Backend, header: str | None) -> Principal:
    """Who an Authorization header names, from the identity cache or the database; AuthError (401) when no
    valid token."""
    cached = backend.principals.get(header)
    if cached is not None:
        return cached
    with backend.session() as session:
        principal = authenticate(session, header)
    backend.principals.put(header, principal)
    return principal


def get_principal(request: Request, backend: BackendDep, _: Bearer) -> Principal:
    if not request.app.state.auth_enabled:
        return ANONYMOUS_ADMIN
    return principal_for(backend, request.headers.get("authorization"))


def _role(*roles: str) -> Any:
    def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        require_role(principal, *roles)
        return principal

    return Depends(check)


Reader = Annotated[Principal, _role("user", "worker")]
UserOrAdmin = Annotated[Principal, _role("user")]
WorkerOrAdmin = Annotated[Principal, _role("worker")]
Admin = Annotated[Principal, _role("admin")]

# The secret of a trial's lease (from POST /leases): every call that changes the trial must send it.
LeaseToken = Annotated[str | None, Header(alias=LEASE_TOKEN_HEADER,
                                          description="the lease_token of POST /api/v1/leases for this trial")]


# ---- documented error answers ----------------------------------------------------------------------------

# What a 503 tells the caller to wait before trying again (the database is away or out of connections).
RETRY_AFTER_SECONDS = 2

_ERRORS: dict[int, tuple[str, dict[str, Any]]] = {
    401: ("No bearer token, or an invalid or revoked one (auth on).",
          {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}),
    403: ("The token's role may not do this, or a call on a trial came without its lease token (X-Lease-Token) "
          "or with another lease's.", {}),
    404: ("The study, trial, artifact, token or path does not exist.", {}),
    409: ("The resource's state forbids this (e.g. a stopped study, a duplicate name, a lease that ended).", {}),
    413: ("The body is over the server's limit.", {}),
    422: ("The request is malformed: `detail` lists every offending field (`loc`) with what fixes it.", {}),
    503: ("The database is unavailable (unreachable, out of connections, not migrated): retry after "
          "`Retry-After` seconds.",
          {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                           "schema": {"type": "integer", "minimum": 1}}}),
}

# The answers every route reading the database and checking the caller's role can give.
AUTHED = (401, 403, 503)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of these error statuses (plus 401, 403 and 503, which every API route can
    answer), each with its schema: `ValidationErrorOut` for 422, `ErrorOut` for the others."""
    answers: dict[int | str, dict[str, Any]] = {}
    for status in sorted({*AUTHED, *statuses}):
        description, headers = _ERRORS[status]
        answers[status] = {"model": ValidationErrorOut if status == 422 else ErrorOut, "description": description,
                           **({"headers": headers} if headers else {})}
    return answers

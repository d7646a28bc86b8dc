"""Typed dependencies shared by the routers: the backend, and who is calling with which role."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Request

from tunefleet.service.auth import ANONYMOUS_ADMIN, LEASE_TOKEN_HEADER, Principal, authenticate, require_role
from tunefleet.service.backend import Backend

__all__ = ["Admin", "BackendDep", "LeaseToken", "Reader", "UserOrAdmin", "WorkerOrAdmin"]


def get_backend(request: Request) -> Backend:
    return request.app.state.backend


BackendDep = Annotated[Backend, Depends(get_backend)]


def get_principal(request: Request, backend: BackendDep) -> Principal:
    if not request.app.state.auth_enabled:
        return ANONYMOUS_ADMIN
    header = request.headers.get("authorization")
    cached = backend.principals.get(header)
    if cached is not None:
        return cached
    with backend.session() as session:
        principal = authenticate(session, header)
    backend.principals.put(header, principal)
    return principal


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

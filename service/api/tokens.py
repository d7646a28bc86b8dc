"""Token routes (admin only): create, list, revoke."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Response, status

from tunefleet.service.api.deps import Admin, BackendDep, errors
from tunefleet.service.auth import issue_token, revoke_token
from tunefleet.service.schemas import TokenIn, TokenOut
from tunefleet.service.tables import Token

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TokenOut, responses=errors(404, 422))
def create_token(backend: BackendDep, _: Admin, body: TokenIn) -> TokenOut:
    """The plain token is in this answer only; the server keeps its hash."""
    with backend.session() as session:
        row, plain = issue_token(session, body.name, body.role, body.projects)
        return TokenOut(id=row.id, name=row.name, role=row.role, created_at=row.created_at, projects=body.projects,
                        token=plain)


@router.get("", response_model=list[TokenOut], responses=errors())
def list_tokens(backend: BackendDep, _: Admin) -> list[TokenOut]:
    with backend.session() as session:
        rows = session.scalars(sa.select(Token).order_by(Token.id))
        return [TokenOut(id=r.id, name=r.name, role=r.role, created_at=r.created_at, revoked=r.revoked_at is not None)
                for r in rows]


@router.delete("/{token_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 422))
def delete_token(backend: BackendDep, _: Admin, token_id: int) -> Response:
    with backend.session() as session:
        revoke_token(session, token_id)
    backend.principals.clear()
    return Response(status_code=status.HTTP_204_NO_CONTENT)

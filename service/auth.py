"""API tokens: random secrets shown once, stored as SHA-256 hashes, each with one role."""

from __future__ import annotations

import hashlib
import secrets

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from tunefleet.service.config import Settings
from tunefleet.service.db import make_engine, transaction
from tunefleet.service.errors import AuthError, Forbidden, InvalidInput, NotFound
from tunefleet.service.tables import Token, utcnow

__all__ = ["ROLES", "Principal", "authenticate", "create_token", "issue_token", "require_role", "revoke_token"]

ROLES = ("admin", "user", "worker")
TOKEN_PREFIX = "tf_"


class Principal:
    """Who is calling: a token's name and role (``admin`` with auth off)."""

    def __init__(self, name: str, role: str):
        self.name, self.role = name, role

    def __repr__(self) -> str:
        return f"Principal({self.name!r}, {self.role!r})"


ANONYMOUS_ADMIN = Principal("anonymous (auth off)", "admin")


def hash_token(token: str) -> str:
    # Tokens are 256-bit random secrets, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(session: Session, name: str, role: str) -> tuple[Token, str]:
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}: use one of {', '.join(ROLES)}",
                           [{"loc": ["body", "role"], "msg": f"use one of {', '.join(ROLES)}", "type": "value_error"}])
    plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = Token(name=name, role=role, token_hash=hash_token(plain))
    session.add(row)
    session.flush()
    return row, plain


def create_token(settings: Settings, name: str, role: str) -> str:
    """Create a token directly in the database (used by `tunefleet token create`); returns the secret."""
    engine = make_engine(settings.resolved_database_url)
    try:
        from tunefleet.service.db import check_database

        check_database(engine)
        with transaction(sessionmaker(engine)) as session:
            _, plain = issue_token(session, name, role)
        return plain
    finally:
        engine.dispose()


def revoke_token(session: Session, token_id: int) -> None:
    row = session.get(Token, token_id)
    if row is None:
        raise NotFound(f"token {token_id} does not exist")
    row.revoked_at = row.revoked_at or utcnow()


def authenticate(session: Session, header: str | None) -> Principal:
    """Map an Authorization header to a principal; raises AuthError (401) with the fix."""
    if not header or not header.lower().startswith("bearer "):
        raise AuthError("missing bearer token: send `Authorization: Bearer <token>` "
                        "(create one with `tunefleet token create`)")
    digest = hash_token(header.split(None, 1)[1].strip())
    row = session.scalar(sa.select(Token).where(Token.token_hash == digest))
    if row is None or row.revoked_at is not None:
        raise AuthError("invalid or revoked token: create a new one with `tunefleet token create`")
    return Principal(row.name, row.role)


def require_role(principal: Principal, *roles: str) -> None:
    if principal.role != "admin" and principal.role not in roles:
        raise Forbidden(f"token {principal.name!r} has role {principal.role}; this needs {' or '.join(roles)}")


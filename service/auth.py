"""API tokens (random secrets shown once, stored as SHA-256 hashes, each with one role) and lease tokens
(one per lease: only the lease holder may change its trial)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from tunefleet.service.config import Settings
from tunefleet.service.db import make_engine, transaction
from tunefleet.service.errors import AuthError, Forbidden, InvalidInput, NotFound
from tunefleet.service.tables import Lease, Token, utcnow

__all__ = ["LEASE_TOKEN_HEADER", "ROLES", "Principal", "authenticate", "check_lease_token", "create_token",
           "issue_token", "new_lease_token", "require_role", "revoke_token"]

ROLES = ("admin", "user", "worker")
TOKEN_PREFIX = "tf_"


class Principal:
    """Who is calling: a token's id, name and role (no id and role ``admin`` with auth off)."""

    def __init__(self, name: str, role: str, token_id: int | None = None):
        self.name, self.role, self.token_id = name, role, token_id

    def __repr__(self) -> str:
        return f"Principal({self.name!r}, {self.role!r}, token_id={self.token_id!r})"


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
    engine = make_engine(settings.resolved_database_url, settings)
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
    return Principal(row.name, row.role, row.id)


def require_role(principal: Principal, *roles: str) -> None:
    if principal.role != "admin" and principal.role not in roles:
        raise Forbidden(f"token {principal.name!r} has role {principal.role}; this needs {' or '.join(roles)}")


# ---- lease tokens: only a trial's lease holder may change it ---------------------------------------------

LEASE_TOKEN_HEADER = "X-Lease-Token"


def new_lease_token() -> tuple[str, str]:
    """A lease token and the SHA-256 stored for it."""
    token = secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).hexdigest()


def check_lease_token(record: Lease, token: str | None) -> None:
    """Raise Forbidden unless `token` is the lease token of `record` (compared in constant time)."""
    given = hashlib.sha256(token.encode()).hexdigest() if token else ""
    if not token or record.token_hash is None or not hmac.compare_digest(given, record.token_hash):
        what = "without a lease token" if not token else "with another lease's token"
        raise Forbidden(f"trial {record.trial_id} is leased to worker {record.worker_id!r}; this call came {what}. "
                        f"Only the lease holder may change a trial: send the `lease_token` of POST /api/v1/leases "
                        f"in the {LEASE_TOKEN_HEADER} header")

"""API tokens (random secrets shown once, stored as SHA-256 hashes, each with one role) and lease tokens
(one per lease: only the lease holder may change its trial)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from collections.abc import Iterator, Mapping

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from tunefleet.service.config import Settings
from tunefleet.service.db import check_database, make_engine, transaction
from tunefleet.service.errors import AuthError, Conflict, Forbidden, InvalidInput, NotFound
from tunefleet.service.tables import Grant, Lease, Project, Token, utcnow

__all__ = ["ACCESS", "LEASE_TOKEN_HEADER", "MIN_TOKEN_LENGTH", "ROLES", "Principal", "add_project", "authenticate",
           "check_lease_token", "create_project", "create_token", "issue_token", "new_lease_token", "new_token_secret",
           "project_id", "register_token", "require_role", "revoke_token"]

ROLES = ("admin", "user", "worker")
ACCESS = ("read", "write")
TOKEN_PREFIX = "tf_"
# A secret given to `register_token` (one an operator generated, e.g. `openssl rand -hex 32`) must be at
# least this long: 32 characters of hex carry 128 bits.
MIN_TOKEN_LENGTH = 32


class Principal:
    """Who is calling: a token's id, name, role and projects (no id and role ``admin`` with auth off).

    `projects` maps project ids to ``read`` or ``write``; None means no restriction (admins, and worker
    tokens without grants). A user token sees only the projects it was granted."""

    def __init__(self, name: str, role: str, token_id: int | None = None,
                 projects: Mapping[int, str] | None = None):
        self.name, self.role, self.token_id = name, role, token_id
        self.projects = None if role == "admin" else (dict(projects) if projects is not None else None)

    def can_read(self, project_id: int) -> bool:
        return self.projects is None or project_id in self.projects

    def can_write(self, project_id: int) -> bool:
        return self.projects is None or self.projects.get(project_id) == "write"

    def __repr__(self) -> str:
        return f"Principal({self.name!r}, {self.role!r}, token_id={self.token_id!r}, projects={self.projects!r})"


ANONYMOUS_ADMIN = Principal("anonymous (auth off)", "admin")


def hash_token(token: str) -> str:
    # Tokens are 256-bit random secrets, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(session: Session, name: str, role: str, projects: Mapping[str, str] | None = None,
                plain: str | None = None) -> tuple[Token, str]:
    """A new token with its grants (project name -> ``read`` or ``write``); returns the row and the secret
    (`plain`, when the caller brings one, else a new one)."""
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}: use one of {', '.join(ROLES)}",
                           [{"loc": ["body", "role"], "msg": f"use one of {', '.join(ROLES)}", "type": "value_error"}])
    # A user token without grants works in the shared project "default" (as tokens made before projects do).
    grants = _grants(session, role, projects or ({"default": "write"} if role == "user" else {}))
    plain = plain or new_token_secret()
    row = Token(name=name, role=role, token_hash=hash_token(plain))
    session.add(row)
    session.flush()
    session.add_all(Grant(token_id=row.id, project_id=project_id, access=access) for project_id, access in grants)
    return row, plain


def new_token_secret() -> str:
    """A new API token secret (256 random bits), not yet stored anywhere."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _grants(session: Session, role: str, projects: Mapping[str, str]) -> list[tuple[int, str]]:
    if projects and role == "admin":
        msg = "admin tokens see every project: grant projects to user or worker tokens"
        raise InvalidInput(msg, [{"loc": ["body", "projects"], "msg": msg, "type": "value_error"}])
    grants = []
    for name, access in projects.items():
        if access not in ACCESS:
            raise InvalidInput(f"access {access!r} to project {name!r}: use read or write",
                               [{"loc": ["body", "projects", name], "msg": "use read or write", "type": "value_error"}])
        grants.append((project_id(session, name), access))
    return grants


def project_id(session: Session, name: str) -> int:
    """The id of the project called `name`; NotFound (with how to create it) when there is none."""
    found = _find_project(session, name)
    if found is None:
        raise NotFound(f"project {name!r} does not exist: an admin creates it with `tunefleet project create {name}`")
    return found


def _find_project(session: Session, name: str) -> int | None:
    return session.scalar(sa.select(Project.id).where(Project.name == name))


def create_project(session: Session, name: str) -> Project:
    """A new project; Conflict when the name is taken."""
    if _find_project(session, name) is not None:
        raise Conflict(f"project {name!r} exists already")
    row = Project(name=name)
    session.add(row)
    session.flush()
    return row


@contextlib.contextmanager
def _direct_session(settings: Settings) -> Iterator[Session]:
    """One transaction on the configured database, checked first, without a server (the CLI's admin
    commands: the first admin token must be made before any server can check one)."""
    engine = make_engine(settings.resolved_database_url, settings)
    try:
        check_database(engine)
        with transaction(sessionmaker(engine)) as session:
            yield session
    finally:
        engine.dispose()


def create_token(settings: Settings, name: str, role: str, projects: Mapping[str, str] | None = None) -> str:
    """Create a token (with grants: project name -> read or write) directly in the database, as
    `tunefleet token create` does, so the first admin token can be made; returns the secret."""
    with _direct_session(settings) as session:
        _, plain = issue_token(session, name, role, projects)
    return plain


def register_token(settings: Settings, name: str, role: str, plain: str) -> bool:
    """Make the database accept `plain` (a secret made elsewhere: a token file, a Kubernetes Secret) as a
    token of `role`, directly, as `tunefleet token bootstrap` does; True when it was added, False when it
    was there already. Idempotent, so a bootstrap step can run at every start.

    Raises InvalidInput for an unknown role or a secret shorter than MIN_TOKEN_LENGTH, and Conflict when the
    database knows the secret with another role or as revoked: a revoked token is never brought back."""
    if len(plain) < MIN_TOKEN_LENGTH or any(c.isspace() for c in plain):
        raise InvalidInput(f"a token must be one word of at least {MIN_TOKEN_LENGTH} characters (e.g. "
                           "`openssl rand -hex 32`)")
    try:
        with _direct_session(settings) as session:
            return _register(session, name, role, plain)
    except sa.exc.IntegrityError:  # another bootstrap registered the same secret between our read and write
        with _direct_session(settings) as session:
            return _register(session, name, role, plain)


def _register(session: Session, name: str, role: str, plain: str) -> bool:
    row = session.scalar(sa.select(Token).where(Token.token_hash == hash_token(plain)))
    if row is None:
        issue_token(session, name, role, plain=plain)
        return True
    if row.revoked_at is not None:
        raise Conflict(f"token {row.name!r} (id {row.id}) was revoked: write a new secret in its place")
    if row.role != role:
        raise Conflict(f"this secret is token {row.name!r} (id {row.id}) with role {row.role}, not {role}")
    return False


def add_project(settings: Settings, name: str) -> int:
    """Create a project directly in the database, as `tunefleet project create` does; returns its id."""
    with _direct_session(settings) as session:
        return create_project(session, name).id


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
    grants = dict(session.execute(sa.select(Grant.project_id, Grant.access).where(Grant.token_id == row.id)).all())
    # Users see only what they were granted; a worker token without grants serves every project.
    return Principal(row.name, row.role, row.id, grants if grants or row.role == "user" else None)


def require_role(principal: Principal, *roles: str) -> None:
    if principal.role != "admin" and principal.role not in roles:
        raise Forbidden(f"token {principal.name!r} has role {principal.role}; this needs {' or '.join(roles)}")


# ---- lease tokens: only a trial's lease holder may change it ---------------------------------------------

LEASE_TOKEN_HEADER = "X-Lease-Token"


def new_lease_token() -> tuple[str, str]:
    """A lease token and the SHA-256 stored for it."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def check_lease_token(record: Lease, token: str | None) -> None:
    """Raise Forbidden unless `token` is the lease token of `record` (compared in constant time)."""
    given = hash_token(token) if token else ""
    if not token or record.token_hash is None or not hmac.compare_digest(given, record.token_hash):
        what = "without a lease token" if not token else "with another lease's token"
        raise Forbidden(f"trial {record.trial_id} is leased to worker {record.worker_id!r}; this call came {what}. "
                        f"Only the lease holder may change a trial: send the `lease_token` of POST /api/v1/leases "
                        f"in the {LEASE_TOKEN_HEADER} header")

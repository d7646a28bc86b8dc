"""tunefleet's own tables. Optuna's tables (studies, trials, ...) are Optuna's and untouched here.

Every table is prefixed ``tf_`` so it never collides with Optuna's names, and alembic records our
revision in ``tf_alembic_version`` (Optuna's own alembic uses ``alembic_version``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["DEFAULT_PROJECT_ID", "Artifact", "Asset", "Base", "Grant", "Lease", "Project", "RungReport", "Study",
           "Token", "Worker", "utcnow"]

# The project every study belongs to unless its spec names another (made by migration 0003).
DEFAULT_PROJECT_ID = 1


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Project(Base):
    """A group of studies that tokens are granted (see `Grant`): users see only their projects' studies."""

    __tablename__ = "tf_projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Grant(Base):
    """A token's access to one project: ``read`` (see studies, trials, artifacts) or ``write`` (also create,
    pause, resume, stop and delete studies). A worker token with grants leases only from those projects."""

    __tablename__ = "tf_grants"

    token_id: Mapped[int] = mapped_column(ForeignKey("tf_tokens.id", ondelete="CASCADE"), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("tf_projects.id", ondelete="CASCADE"), primary_key=True)
    access: Mapped[str] = mapped_column(String(8))


class Study(Base):
    """A tunefleet study; ``id`` equals Optuna's ``study_id`` of the study with the same name."""

    __tablename__ = "tf_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # exactly as submitted
    project_id: Mapped[int] = mapped_column(ForeignKey("tf_projects.id"), index=True, default=DEFAULT_PROJECT_ID)
    state: Mapped[str] = mapped_column(String(16), default="running", index=True)
    baseline_trial_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    last_leased_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Lease(Base):
    """One attempt of one trial, by one worker at a time. ``trial_id`` is Optuna's trial id.

    A paused trial keeps its row (state ``paused``, no holder): resuming it hands the same row to the next
    worker with a new lease token, so one attempt may span several workers and segments of training."""

    __tablename__ = "tf_leases"
    __table_args__ = (UniqueConstraint("worker_id", "request_id", name="uq_tf_leases_worker_request"),)

    trial_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    study_id: Mapped[int] = mapped_column(ForeignKey("tf_studies.id", ondelete="CASCADE"), index=True)
    worker_id: Mapped[str] = mapped_column(String(200))
    # A lease request's idempotency key, unique per worker (two workers may pick the same key).
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # SHA-256 of the lease token: only its holder may change the trial. None: leased before tokens existed.
    token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The API token that leased it (None with auth off): a repeated request_id answers only to it.
    owner_token_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    retry_of: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # active | paused | complete | pruned | failed | expired
    state: Mapped[str] = mapped_column(String(16), default="active", index=True)
    requeued: Mapped[bool] = mapped_column(Boolean, default=False)
    # The current segment: from its lease (or resume) to its end (pause or finish).
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    deadline: Mapped[datetime] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    fail_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Seconds held in earlier segments of a paused and resumed trial (device time = this + the current one).
    held_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    # The rung (percent) of the report a paused trial was answered "pause" at; None when never paused.
    paused_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The last complete checkpoint: {"step", "sha256", "size", and "name" (an artifact of the trial) or
    # "node" and "path" (on that node's disk)}; None when there is none (a resume then restarts at 0).
    checkpoint: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Rungs up to here were decided and the trial promoted past them: a re-run's reports there continue.
    promoted_through: Mapped[int] = mapped_column(Integer, default=0)
    resumes: Mapped[int] = mapped_column(Integer, default=0)


class RungReport(Base):
    """One intermediate evaluation, and the pruner's answer to it, so a retried report gets the same answer."""

    __tablename__ = "tf_reports"

    trial_id: Mapped[int] = mapped_column(ForeignKey("tf_leases.trial_id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    value: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prune: Mapped[bool] = mapped_column(Boolean)  # action == "prune", kept for readers of the table
    action: Mapped[str] = mapped_column(String(8), default="continue")  # continue | prune | pause
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Worker(Base):
    __tablename__ = "tf_workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200), default="")
    device: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    first_seen: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
    trials_leased: Mapped[int] = mapped_column(Integer, default=0)


class Token(Base):
    """An API token; only the SHA-256 of the secret is stored."""

    __tablename__ = "tf_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Artifact(Base):
    __tablename__ = "tf_artifacts"
    __table_args__ = (UniqueConstraint("trial_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("tf_leases.trial_id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(Integer, index=True)
    name: Mapped[str] = mapped_column(String(500))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)  # full fine-tuning weights pass 2 GiB (migration 0006)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Asset(Base):
    """An uploaded data set or base model, one version: a tar in the store under `<kind>/<sha256>.tar`. The same
    content under one name is one row; another name for the same content is another row, one object."""

    __tablename__ = "tf_assets"
    __table_args__ = (UniqueConstraint("kind", "name", "sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # datasets or models
    name: Mapped[str] = mapped_column(String(200), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{name, size}] in name order
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

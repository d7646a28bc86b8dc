"""Pydantic schemas of the REST API, separate from table rows and Optuna objects."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ArtifactOut", "CompleteIn", "FailIn", "HeartbeatIn", "HeartbeatOut", "LeaseIn", "LeaseOut", "Page",
    "ReportIn", "ReportOut", "StudyOut", "TokenIn", "TokenOut", "TrialOut",
]

T = TypeVar("T")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class TrialOut(BaseModel):
    id: int
    study_id: int
    number: int
    state: str
    params: dict[str, Any]
    value: float | None = None
    values: list[float] | None = None
    intermediate_values: dict[int, float] = Field(default_factory=dict)
    validation_metrics: dict[str, Any] = Field(default_factory=dict)
    test_metrics: dict[str, Any] = Field(default_factory=dict)
    rung_metrics: dict[int, dict[str, Any]] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    user_attrs: dict[str, Any] = Field(default_factory=dict)
    is_baseline: bool = False
    attempt: int = 0
    retry_of: int | None = None
    worker_id: str | None = None
    fail_reason: str | None = None
    datetime_start: datetime | None = None
    datetime_complete: datetime | None = None


class StudyOut(BaseModel):
    id: int
    name: str
    state: str
    spec: dict[str, Any]
    created_at: datetime
    counts: dict[str, int]
    trials_used: int
    max_trials: int
    progress: float
    gpu_hours: float
    rungs: list[int]
    best_trial: TrialOut | None = None
    baseline_trial_id: int | None = None


class LeaseIn(_In):
    worker_id: str = Field(min_length=1, max_length=200)
    # Idempotency key of this request, unique per worker; a retry sends the same one. Printable ASCII.
    request_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[!-~]+$")
    device: dict[str, Any] = Field(default_factory=dict)
    hostname: str = ""


class LeaseOut(BaseModel):
    trial_id: int
    lease_token: str = Field(description="send it in the X-Lease-Token header of every call on this trial")
    study_id: int
    study_name: str
    number: int
    attempt: int
    params: dict[str, Any]
    spec: dict[str, Any]
    rungs: list[int]
    is_baseline: bool
    deadline: datetime
    lease_seconds: float
    heartbeat_interval: float


class HeartbeatIn(_In):
    worker_id: str = ""


class HeartbeatOut(BaseModel):
    stop: bool
    reason: str | None = None
    deadline: datetime | None = None


class ReportIn(_In):
    step: int = Field(ge=1, le=100, description="percent of the training budget")
    value: float
    metrics: dict[str, float] = Field(default_factory=dict)


class ReportOut(BaseModel):
    prune: bool


class CompleteIn(_In):
    value: float | None = None
    values: list[float] | None = None
    validation_metrics: dict[str, Any] = Field(default_factory=dict)
    test_metrics: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)


class FailIn(_In):
    reason: str = Field(min_length=1, max_length=10_000)
    retryable: bool = False


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    created_at: datetime


class TokenIn(_In):
    name: str = Field(min_length=1, max_length=200)
    role: str


class TokenOut(BaseModel):
    id: int
    name: str
    role: str
    created_at: datetime
    revoked: bool = False
    token: str | None = None

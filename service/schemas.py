"""Pydantic schemas of the REST API, separate from table rows and Optuna objects."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar, Generic, Literal, NamedTuple, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from tunefleet.service.spec import FailureKind, ReportAction, StudyTask

__all__ = [
    "AssetFile",
    "AssetOut",
    "ArtifactOut", "CheckpointRef", "CompleteIn", "EnqueueIn", "ErrorItem", "ErrorOut", "FailIn", "HeartbeatIn",
    "HeartbeatOut", "LeaseIn", "LeaseOut", "Page", "PauseIn", "Problem", "ReportIn", "ReportOut", "ResumeOut",
    "StudyOut", "TokenIn", "TokenOut", "TrialOut", "ValidationErrorOut", "printable", "storable_problems",
    "storable_text", "text_problem",
]

T = TypeVar("T")

# ---- values the database can store ------------------------------------------------------------------------
# Python's json (hence FastAPI) reads NaN, Infinity, -Infinity (and 1e309 as inf) and lone surrogates
# ("\ud800"); PostgreSQL stores neither NUL nor a lone surrogate in text or JSON, and JSON has no NaN. One
# walk over a whole request body refuses them all (422 naming each path) before anything is written.

MAX_PROBLEMS = 20  # a body full of bad values gets this many entries, not one per value
FAIL_INSTEAD = "fail the trial instead (POST /trials/{id}/fail with the reason)"


class Problem(NamedTuple):
    """One value the database cannot store: where (the path of keys and indexes), what, and the fix."""

    loc: tuple[str | int, ...]
    type: str
    msg: str
    input: Any  # the value made safe to send back as JSON

    def entry(self) -> dict[str, Any]:
        """As an entry of a 422's `detail`, like pydantic's (loc, msg, type)."""
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


def printable(text: str) -> str:
    """`text` with lone surrogates written as escapes (\\ud800), so it can be encoded and sent back."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def text_problem(text: str) -> tuple[str, str] | None:
    """(error type, message) when `text` holds a NUL or a lone surrogate; None when it is storable."""
    if "\x00" in text:
        return "nul_character", "contains a NUL character (\\u0000), which the database cannot store: remove it"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(text[exc.start])
            return "lone_surrogate", (f"contains a lone surrogate (\\u{code:04x}), which is not Unicode text: send "
                                      "valid UTF-8 (a surrogate escape needs its pair, as in \\ud83d\\ude00)")
    return None


def _not_finite(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def storable_problems(data: Any, loc: tuple[str | int, ...] = (),
                      labels: dict[str, tuple[str, str]] | None = None) -> list[Problem]:
    """Every string (dictionary keys too) holding a NUL or a lone surrogate and every NaN, Infinity or
    -Infinity in a parsed JSON value, in document order (at most MAX_PROBLEMS). `labels` names the top-level
    fields whose non-finite numbers need another fix: {field: (what it is, the fix)}."""
    problems: list[Problem] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [(loc, data)]  # no recursion: bodies may nest deep
    while stack and len(problems) < MAX_PROBLEMS:
        where, value = stack.pop()
        if isinstance(value, str):
            problem = text_problem(value)
            if problem:
                problems.append(Problem(where, *problem, printable(value)))
        elif isinstance(value, float):
            if not math.isfinite(value):
                token = _not_finite(value)
                label = (labels or {}).get(str(where[len(loc)])) if len(where) > len(loc) else None
                msg = (f"{label[0]} {token} is not finite: {label[1]}" if label else
                       f"{token} is not a finite number, which JSON cannot carry: send a finite number "
                       "(1e309 and beyond read as Infinity) or leave the value out")
                problems.append(Problem(where, "finite_number", msg, token))
        elif isinstance(value, dict):
            items = []
            for key, item in value.items():
                key_loc = where + (printable(key) if isinstance(key, str) else key,)
                problem = text_problem(key) if isinstance(key, str) else None
                if problem:
                    problems.append(Problem(key_loc, problem[0], f"key {problem[1]}", printable(key)))
                items.append((key_loc, item))
            stack.extend(reversed(items))
        elif isinstance(value, (list, tuple)):
            stack.extend(reversed([(where + (i,), item) for i, item in enumerate(value)]))
    return problems[:MAX_PROBLEMS]


def storable_text(value: str | None) -> str | None:
    """A pydantic validator of a text field outside a body (e.g. a query parameter): no NUL, no lone
    surrogate. `Annotated[str | None, Query(...), AfterValidator(storable_text)]`."""
    problem = text_problem(value) if value is not None else None
    if problem:
        raise PydanticCustomError(*problem)
    return value


class _In(BaseModel):
    """A request body. Before any field is read, the whole body is refused (422, one entry per path) if a
    string holds a NUL or a lone surrogate, or a number is NaN or infinite: nothing is written then."""

    model_config = ConfigDict(extra="forbid")
    # Top-level fields whose non-finite numbers need another fix than "send a finite number".
    not_finite_labels: ClassVar[dict[str, tuple[str, str]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        problems = storable_problems(data, labels=cls.not_finite_labels)
        if problems:
            errors = [InitErrorDetails(type=PydanticCustomError(p.type, p.msg), loc=p.loc, input=p.input)
                      for p in problems]
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data


# ---- error answers ----------------------------------------------------------------------------------------
# Every error answer is `{"detail": ...}`: a 422 lists every offending field (`ValidationErrorOut`), every
# other status carries one message saying what is wrong and what to do (`ErrorOut`).


class ErrorItem(BaseModel):
    """One offending field of a refused request."""

    model_config = ConfigDict(extra="forbid")

    loc: list[str | int] = Field(description="where: `body`, `query`, `path` or `header` then the field's path "
                                             "(a study spec's own field path for POST /studies); empty: the "
                                             "request as a whole")
    msg: str = Field(description="what is wrong, and what fixes it")
    type: str = Field(description="the kind of problem, e.g. `missing`, `value_error`, `nul_character`")


class ErrorOut(BaseModel):
    """The answer of every error status but 422: one message saying what is wrong and what to do."""

    model_config = ConfigDict(extra="forbid")

    detail: str


class ValidationErrorOut(BaseModel):
    """The answer of a 422: one entry per offending field."""

    model_config = ConfigDict(extra="forbid")

    detail: list[ErrorItem] = Field(min_length=1)


# ---- moments in answers ------------------------------------------------------------------------------------
# Every datetime of an answer carries its offset (RFC 3339, as the OpenAPI `date-time` format says). Naive ones
# come from Optuna (its local time) and from SQLite (which drops the zone of what was written as UTC).


def _local_if_naive(moment: datetime) -> datetime:
    return moment.astimezone() if moment.tzinfo is None else moment


def _utc_if_naive(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


OptunaTime = Annotated[datetime, AfterValidator(_local_if_naive)]
Moment = Annotated[datetime, AfterValidator(_utc_if_naive)]


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
    paused_at: int | None = Field(None, description="the rung (percent) a paused trial waits at; None unless "
                                  "paused (a paused trial is RUNNING in Optuna)")
    resumes: int = Field(0, description="how many times the trial was resumed from a checkpoint")
    constraints: dict[str, float] = Field(default_factory=dict, description="the spec's constraints on this "
                                          "completed trial, as Optuna's constraint values (`<metric>:max` = value "
                                          "- max, `<metric>:min` = min - value): > 0 is violated")
    feasible: bool | None = Field(None, description="whether the completed trial meets every constraint; None "
                                  "when the study has none or the trial has not completed")
    datetime_start: OptunaTime | None = None
    datetime_complete: OptunaTime | None = None


class StudyOut(BaseModel):
    id: int
    name: str
    project: str = "default"
    state: str
    spec: dict[str, Any]
    created_at: Moment
    counts: dict[str, int]
    trials_used: int
    max_trials: int
    progress: float
    gpu_hours: float
    rungs: list[int]
    best_trial: TrialOut | None = None
    best_trials: list[TrialOut] = Field(
        default_factory=list, description="the Pareto front (Optuna's `study.best_trials`): completed, feasible "
        "trials that no other such trial beats on every objective, best first by the first objective; for a "
        "single objective, the best trial")
    baseline_trial_id: int | None = None
    state_reason: str | None = Field(None, description="why the study paused itself (fix it, then resume it)")


class LeaseIn(_In):
    worker_id: str = Field(min_length=1, max_length=200)
    # Idempotency key of this request, unique per worker; a retry sends the same one. Printable ASCII.
    request_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[!-~]+$")
    device: dict[str, Any] = Field(default_factory=dict)
    devices: int = Field(1, ge=1, le=1024, description="devices this worker can train one trial on: no trial whose "
                         "study asks for more (resources.gpus_per_trial) is leased to it")
    hostname: str = Field("", max_length=200)
    tasks: list[StudyTask] | None = Field(
        None, min_length=1, description="the study tasks this worker runs (`tunefleet agent` sends [\"script\"]); "
        "it is leased trials of studies of these tasks only. Default: every built-in task, not script")


_SHA256 = r"^[0-9a-f]{64}$"


class CheckpointRef(_In):
    """Where a paused trial's checkpoint is: an uploaded artifact of the trial (`name`), or a folder on one
    node's disk (`node`, `path`); `step` is the rung (percent) it was taken at."""

    step: int = Field(ge=1, le=100)
    sha256: str = Field(pattern=_SHA256, description="SHA-256 of the uploaded file, or of the node's folder")
    size: int = Field(0, ge=0)
    name: str | None = Field(None, min_length=1, max_length=500, description="the trial's artifact holding it")
    node: str | None = Field(None, min_length=1, max_length=200, description="hostname of the node holding it")
    path: str | None = Field(None, min_length=1, max_length=4096, description="its folder on that node")

    @model_validator(mode="after")
    def _one_place(self) -> CheckpointRef:
        if (self.name is None) == (self.node is None) or (self.node is None) != (self.path is None):
            raise ValueError("give either name (an uploaded artifact) or node and path (a folder on a node)")
        return self


class PauseIn(_In):
    step: int = Field(ge=1, le=100, description="the rung (percent) whose report was answered pause")
    checkpoint: CheckpointRef | None = Field(None, description="None: no checkpoint (a resume restarts at 0)")


class ResumeOut(BaseModel):
    step: int = Field(description="where training continues: the checkpoint's rung (percent), 0 to restart")
    promoted_through: int = Field(description="reports up to this rung are answered continue")
    checkpoint: dict[str, Any] | None = Field(None, description="the checkpoint to load (see CheckpointRef)")


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
    deadline: Moment
    lease_seconds: float
    heartbeat_interval: float
    checkpoint_storage: Literal["upload", "node", "none"] = Field(
        "none", description="where to keep a checkpoint when a report is answered pause (the spec's "
        "checkpoints.storage, resolved for this trial)")
    resume: ResumeOut | None = Field(None, description="set when the trial was paused: continue from here")


class HeartbeatIn(_In):
    worker_id: str = Field("", max_length=200)


class HeartbeatOut(BaseModel):
    stop: bool
    reason: str | None = None
    deadline: Moment | None = None


class ReportIn(_In):
    not_finite_labels = {"value": ("report value", FAIL_INSTEAD)}

    step: int = Field(ge=1, le=100, description="percent of the training budget")
    value: float
    metrics: dict[str, float] = Field(default_factory=dict)


class ReportOut(BaseModel):
    action: ReportAction = Field(
        description="continue training; prune (stop for good); pause (save a checkpoint, upload it, POST "
        "/trials/{id}/pause, free the device: the trial may be resumed later, on any worker)")
    prune: bool = Field(description="action == prune (for clients that predate pause)")


class CompleteIn(_In):
    not_finite_labels = {"value": ("objective value", FAIL_INSTEAD), "values": ("objective value", FAIL_INSTEAD)}

    value: float | None = None
    values: list[float] | None = None
    validation_metrics: dict[str, Any] = Field(default_factory=dict)
    test_metrics: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)


class EnqueueIn(_In):
    params: dict[str, Any] = Field(description="values of searched parameters; the sampler fills the others")
    note: str = Field("", max_length=500, description="why it was enqueued (a user attribute of the trial)")


class FailIn(_In):
    reason: str = Field(min_length=1, max_length=10_000)
    retryable: bool = False
    kind: FailureKind = Field("trial", description="model, data or config: the study's own problem (several in "
                              "a row pause the study); memory, diverged, trial or crash: the parameters'")


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    created_at: Moment


class AssetFile(BaseModel):
    name: str
    size: int


class AssetOut(BaseModel):
    """An uploaded data set or base model, one version of it (a spec names it `tunefleet://NAME@VERSION`)."""

    kind: Literal["datasets", "models"]
    name: str
    version: str = Field(description="the first 12 hex digits of sha256")
    sha256: str = Field(description="SHA-256 of the uploaded tar, which holds the files in name order")
    size: int
    files: list[AssetFile]
    created_at: Moment


ProjectName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
Access = Literal["read", "write"]


class TokenIn(_In):
    name: str = Field(min_length=1, max_length=200)
    role: str
    projects: dict[ProjectName, Access] = Field(
        default_factory=dict, description="grants: project name -> read or write (user and worker tokens)")


class TokenOut(BaseModel):
    id: int
    name: str
    role: str
    created_at: Moment
    revoked: bool = False
    projects: dict[str, str] = Field(default_factory=dict)
    token: str | None = None


class ProjectIn(_In):
    name: ProjectName


class ProjectOut(BaseModel):
    id: int
    name: str
    access: Access = Field(description="what the calling token may do in this project")

"""Studies: create from a spec, list, show with progress and budget, pause/resume/stop, delete; trial views."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.orm import Session

from tunefleet.service.artifacts import delete_checkpoints
from tunefleet.service.assets import pin_inputs
from tunefleet.service.auth import ANONYMOUS_ADMIN, Principal, project_id
from tunefleet.service.backend import Backend, StudyRuntime
from tunefleet.service.errors import Conflict, Forbidden, InvalidInput, NotFound, StoreUnavailable
from tunefleet.service.scheduling import PausedTrial, policy_for
from tunefleet.service.schemas import StudyOut, TrialOut, storable_problems
from tunefleet.service.search import build_pruner, build_sampler, search_problems
from tunefleet.service.spec import (
    PAUSING_PRUNERS,
    STUDY_FAILURES,
    CategoricalParam,
    SpecError,
    StudySpec,
    validate_spec,
)
from tunefleet.service.storage import study_id_of_trial, study_storage_id, trial_storage_id
from tunefleet.service.tables import Lease, Project, RungReport, utcnow
from tunefleet.service.tables import Study as StudyRow

__all__ = [
    "Usage", "create_study", "delete_study", "get_study", "get_trial", "list_studies", "list_trials",
    "aware", "best_trials", "enqueue_trial", "feasible", "finish_paused", "maybe_complete", "pause_if_failing",
    "paused_trials",
    "set_study_state", "usage",
]

log = logging.getLogger(__name__)
STATES = ("running", "paused", "stopped", "completed")
# The study user attribute (shown by optuna-dashboard) that says why a study paused itself.
PAUSED_REASON = "paused_reason"
# Which state each action moves a study to, and from which states it may.
_TRANSITIONS = {
    "pause": ("paused", ("running",)),
    "resume": ("running", ("paused",)),
    "stop": ("stopped", ("running", "paused")),
}


@dataclass
class Usage:
    """How much of a study's budget is spent. A failed trial whose parameters were re-queued is not counted:
    its retry takes its place."""

    used: int
    running: int  # Optuna's RUNNING trials: leased, queued (asked ahead for a lease) and paused ones
    waiting: int
    gpu_hours: float
    paused: int = 0

    @property
    def active(self) -> int:
        """Trials a worker holds now or that are queued for the next lease (running and not paused)."""
        return self.running - self.paused

    def has_room(self, spec: StudySpec) -> bool:
        """Whether a new trial may start."""
        b = spec.budget
        if self.used >= b.max_trials and self.waiting == 0:
            return False
        if b.max_concurrent_trials is not None and self.active >= b.max_concurrent_trials:
            return False
        return not (b.max_gpu_hours is not None and self.gpu_hours >= b.max_gpu_hours)


def usage(session: Session, runtime: StudyRuntime, trials: list[FrozenTrial] | None = None) -> Usage:
    trials = trials if trials is not None else runtime.study.get_trials(deepcopy=False)
    n = Counter(t.state for t in trials)
    # Counted from Optuna's rows alone (each retry names the trial it replaces), so the budget stays exact
    # even when a fault lost our own row of a re-queue after Optuna's rows were written.
    requeued = len(retried_trial_ids(trials))
    used = n[TrialState.RUNNING] + n[TrialState.COMPLETE] + n[TrialState.PRUNED] + n[TrialState.FAIL] - requeued
    # Re-queued trials wait in Optuna's queue and are handed out even when the budget is reached.
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING and "retry_of" in t.user_attrs)
    # Device-hours are summed over leases (wall time a worker held each trial, pruned and failed ones too).
    hours = _lease_hours(session, runtime.id) if runtime.spec.budget.max_gpu_hours is not None else 0.0
    paused = 0
    if runtime.spec.search.pruner in PAUSING_PRUNERS:  # only pausing policies leave paused rows
        paused = session.scalar(sa.select(sa.func.count()).select_from(Lease).where(
            Lease.study_id == runtime.id, Lease.state == "paused")) or 0
    return Usage(used=used, running=n[TrialState.RUNNING], waiting=waiting, gpu_hours=hours, paused=paused)


def paused_trials(session: Session, study_id: int) -> list[tuple[int, int, dict[str, Any] | None]]:
    """(trial id, rung it paused at, checkpoint) of every paused trial of the study."""
    rows = session.execute(sa.select(Lease.trial_id, Lease.paused_at, Lease.checkpoint)
                           .where(Lease.study_id == study_id, Lease.state == "paused").order_by(Lease.trial_id))
    return [(tid, int(step or 0), checkpoint) for tid, step, checkpoint in rows]


def finish_paused(backend: Backend, runtime: StudyRuntime, session: Session, why: str) -> list[int]:
    """Tell every paused trial of the study PRUNED (it will not be resumed); returns their ids, whose uploaded
    checkpoints the caller deletes once its session committed (`delete_checkpoints`). Optuna's rows are
    written first, then ours (the caller's session; see the ordering rule in leases.py)."""
    ids = [tid for tid, _, _ in paused_trials(session, runtime.id)]
    for trial_id in ids:
        t = backend.storage.get_trial(trial_id)
        if not t.state.is_finished():
            runtime.study.tell(t.number, state=TrialState.PRUNED)
    if ids:
        session.execute(sa.update(Lease).where(Lease.trial_id.in_(ids), Lease.state == "paused")
                        .values(state="pruned", fail_reason=why))
        log.info("study %s: paused trials %s pruned: %s", runtime.id, ids, why)
    return ids


def _check_spec_size(backend: Backend, data: Any) -> None:
    """InvalidInput over TUNEFLEET_MAX_SPEC_KB: the spec is kept in memory and sent with every lease."""
    size = len(json.dumps(data, separators=(",", ":")).encode())
    limit_kb = backend.settings.max_spec_kb
    if size > limit_kb * 1024:
        msg = (f"the spec is {size / 1024:.0f} KB, over the {limit_kb} KB limit: keep data and long texts in "
               "files the spec names, or raise TUNEFLEET_MAX_SPEC_KB")
        raise InvalidInput(f"invalid study spec: {msg}", [{"loc": [], "msg": msg, "type": "value_error"}])


def _check_search_size(backend: Backend, spec: StudySpec) -> None:
    """InvalidInput over TUNEFLEET_MAX_SEARCH_PARAMS parameters or TUNEFLEET_MAX_SEARCH_CHOICES categorical
    choices: every ask reads the whole search space."""
    settings = backend.settings
    choices = sum(len(p.choices) for p in spec.search_space.values() if isinstance(p, CategoricalParam))
    errors = []
    if len(spec.search_space) > settings.max_search_params:
        errors.append(f"{len(spec.search_space)} parameters, over the limit of {settings.max_search_params}: "
                      "fix some in `fixed`, or raise TUNEFLEET_MAX_SEARCH_PARAMS")
    if choices > settings.max_search_choices:
        errors.append(f"{choices} categorical choices in all, over the limit of {settings.max_search_choices}: "
                      "use an int or float range instead of long lists, or raise TUNEFLEET_MAX_SEARCH_CHOICES")
    if errors:
        raise InvalidInput(f"invalid study spec: search_space has {errors[0]}",
                           [{"loc": ["search_space"], "msg": e, "type": "value_error"} for e in errors])


def retried_trial_ids(trials: list[FrozenTrial]) -> set[int]:
    """Ids of the trials whose parameters were re-queued: the `retry_of` of every retry."""
    return {int(t.user_attrs["retry_of"]) for t in trials if "retry_of" in t.user_attrs}


def create_study(backend: Backend, data: Any, principal: Principal = ANONYMOUS_ADMIN) -> StudyOut:
    """Validate and store a study in its project, enqueue its baseline; raises InvalidInput (422), NotFound
    (an unknown project, or one `principal` may not see), Forbidden (read-only access) or Conflict (409)."""
    # First what no table can store (NUL, lone surrogates, NaN/Infinity), anywhere in the spec: the spec is
    # stored as submitted, and the other checks would quote such values back.
    unstorable = storable_problems(data)
    if unstorable:
        first = unstorable[0]
        raise InvalidInput(f"invalid study spec: {'.'.join(map(str, first.loc))}: {first.msg}",
                           [p.entry() for p in unstorable])
    _check_spec_size(backend, data)
    try:
        spec = validate_spec(data)
    except SpecError as exc:
        raise InvalidInput(f"invalid study spec: {exc}", exc.errors) from None
    _check_search_size(backend, spec)
    problems = search_problems(spec)
    if problems:
        errors = [{"loc": list(loc), "msg": msg, "type": "value_error"} for loc, msg in problems]
        raise InvalidInput(f"invalid study spec: {problems[0][1]}", errors)
    data = pin_inputs(backend, data)  # uploaded data sets and models: the version they name now
    with backend.session() as session:
        project = _writable_project(session, principal, spec.project)
        if session.scalar(sa.select(StudyRow.id).where(StudyRow.name == spec.name)) is not None:
            raise Conflict(f"a study named {spec.name!r} exists: pick another name or delete it first")
    warm = _warm_start_configurations(backend, principal, spec)  # checked before anything is written
    try:
        study = optuna.create_study(storage=backend.storage, study_name=spec.name,
                                    directions=[o.direction for o in spec.objectives],
                                    sampler=build_sampler(spec), pruner=build_pruner(spec))
    except optuna.exceptions.DuplicatedStudyError:
        raise Conflict(f"an Optuna study named {spec.name!r} already exists in this database: "
                       "pick another name") from None
    try:
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and what optuna-dashboard shows
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([o.metric for o in spec.objectives])
        study.set_user_attr("tunefleet_spec", data)
        baseline_id = _enqueue_baseline(study, spec)
        for params, attrs in warm:
            study.enqueue_trial(params, user_attrs=attrs)
        with backend.session() as session:
            session.add(StudyRow(id=study_storage_id(study), name=spec.name, spec=data, state="running",
                                 project_id=project, baseline_trial_id=baseline_id))
    except BaseException:
        optuna.delete_study(study_name=spec.name, storage=backend.storage)
        raise
    log.info("study %s (%s) created: %s sampler, %s pruner, rungs %s", study_storage_id(study), spec.name,
             spec.search.sampler, spec.search.pruner, spec.rungs())
    return get_study(backend, study_storage_id(study))


def _warm_start_configurations(backend: Backend, principal: Principal, spec: StudySpec
                               ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The best `warm_start.top_k` completed configurations of the earlier study the spec names, best first,
    as (params, user attributes) to enqueue: each keeps the values the new search space accepts (the sampler
    fills the rest). InvalidInput (422, `warm_start.study`) when there is no such study `principal` may read,
    or it has several objectives."""
    if spec.warm_start is None:
        return []
    name = spec.warm_start.study
    with backend.session() as session:
        row = session.scalar(sa.select(StudyRow).where(StudyRow.name == name))
        if row is None or not principal.can_read(row.project_id):
            msg = f"no study named {name!r} that this token may read: `tunefleet study ls` lists studies"
            raise InvalidInput(f"invalid study spec: warm_start.study: {msg}",
                               [{"loc": ["warm_start", "study"], "msg": msg, "type": "value_error"}])
        earlier_id = row.id
    earlier = backend.runtime(earlier_id)
    if earlier.spec.multi_objective:
        msg = f"study {name!r} has several objectives: warm starts take the best of one objective"
        raise InvalidInput(f"invalid study spec: warm_start.study: {msg}",
                           [{"loc": ["warm_start", "study"], "msg": msg, "type": "value_error"}])
    maximize = earlier.spec.objectives[0].direction == "maximize"
    complete = [t for t in earlier.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and feasible(t)]  # as for its best trial: constraints met
    complete.sort(key=lambda t: float(t.value or 0.0), reverse=maximize)
    out = []
    for t in complete[:spec.warm_start.top_k]:
        params = {k: v for k, v in t.params.items() if not spec.param_problems({k: v}, ())}
        out.append((params, {"warm_start_from": name, "warm_start_trial": t.number, "warm_start_value": t.value}))
    return out


def _enqueue_baseline(study: optuna.Study, spec: StudySpec) -> int | None:
    if spec.baseline is None:
        return None
    params = {k: v for k, v in spec.baseline.items() if k in spec.search_space}
    study.enqueue_trial(params, user_attrs={"is_baseline": True, "attempt": 0})
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return trial_storage_id(waiting[-1])


def _writable_project(session: Session, principal: Principal, name: str) -> int:
    try:
        found = project_id(session, name)
    except NotFound:
        if principal.projects is not None:  # not an admin: do not tell which projects exist
            raise NotFound(f"project {name!r} does not exist or is not yours: ask an admin for access") from None
        raise
    if not principal.can_read(found):
        raise NotFound(f"project {name!r} does not exist or is not yours: ask an admin for access")
    if not principal.can_write(found):
        raise Forbidden(f"token {principal.name!r} may only read project {name!r}: ask an admin for write access")
    return found


def _row(session: Session, study_id: int, principal: Principal = ANONYMOUS_ADMIN, write: bool = False) -> StudyRow:
    """The study's row, if `principal` may see it (NotFound otherwise, as for an unknown id: other projects'
    studies stay invisible) and, with `write`, change it (Forbidden for read-only access)."""
    row = session.get(StudyRow, study_id)
    if row is None or not principal.can_read(row.project_id):
        raise NotFound(f"study {study_id} does not exist: `tunefleet study ls` lists studies")
    if write and not principal.can_write(row.project_id):
        raise Forbidden(f"token {principal.name!r} may only read study {study_id}'s project: ask an admin for "
                        "write access")
    return row


def check_study_access(backend: Backend, principal: Principal, study_id: int, write: bool = False) -> None:
    """NotFound unless `principal` may see the study; Forbidden when `write` and its access is read-only."""
    with backend.session() as session:
        _row(session, study_id, principal, write)


def check_trial_access(backend: Backend, principal: Principal, trial_id: int) -> None:
    """NotFound unless the trial exists and `principal` may see its study."""
    with backend.session() as session:
        study_id = _study_id_of_trial(backend, session, trial_id)
    try:
        check_study_access(backend, principal, study_id)
    except NotFound:
        raise NotFound(f"trial {trial_id} does not exist") from None


def get_study(backend: Backend, study_id: int) -> StudyOut:
    with backend.session() as session:
        row = _row(session, study_id)
        return _study_view(session, row, _current(backend, study_id))


def list_studies(backend: Backend, state: str | None, name: str | None, limit: int, offset: int,
                 principal: Principal = ANONYMOUS_ADMIN) -> tuple[list[StudyOut], int]:
    """One page of the studies `principal` may see, newest first, and how many there are in all."""
    with backend.session() as session:
        query = sa.select(StudyRow)
        if principal.projects is not None:
            query = query.where(StudyRow.project_id.in_(list(principal.projects)))
        if state:
            if state not in STATES:
                raise InvalidInput(f"unknown state {state!r}: use one of {', '.join(STATES)}")
            query = query.where(StudyRow.state == state)
        if name:
            query = query.where(StudyRow.name.contains(name))
        total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
        rows = session.scalars(query.order_by(StudyRow.id.desc()).limit(limit).offset(offset)).all()
        return [_study_view(session, row, _current(backend, row.id)) for row in rows], total


def _current(backend: Backend, study_id: int) -> StudyRuntime:
    """The study's runtime, its trial states brought up to date with other server processes (a light query),
    so a view never shows a study completed while its last trials still read as running."""
    runtime = backend.runtime(study_id)
    backend.storage.sync(study_id)
    return runtime


def _study_view(session: Session, row: StudyRow, runtime: StudyRuntime) -> StudyOut:
    trials = runtime.study.get_trials(deepcopy=False)
    held = _held_ids(session, row.id)
    counts = Counter(_view_state(t, held).lower() for t in trials)
    use = usage(session, runtime, trials)
    # A paused trial is RUNNING in Optuna and holds no worker: counted apart from the running ones.
    counts["running"], counts["paused"] = counts["running"] - use.paused, use.paused
    front = best_trials(runtime, trials)
    front_extras = _trial_extras(session, [trial_storage_id(t) for t in front])
    max_trials = runtime.spec.budget.max_trials
    project = session.get(Project, row.project_id)
    return StudyOut(
        id=row.id, name=row.name, project=project.name if project else "?", state=row.state, spec=row.spec,
        created_at=row.created_at,
        counts={s: counts.get(s, 0) for s in ("waiting", "queued", "running", "paused", "complete", "pruned",
                                              "fail")},
        # Queued trials hold a place in the budget, but no worker has them yet: not "used" in the view.
        trials_used=use.used - counts["queued"], max_trials=max_trials,
        progress=min(1.0, (use.used - counts["queued"]) / max_trials),
        gpu_hours=_lease_hours(session, row.id),
        rungs=runtime.rungs,
        best_trial=(_trial_view(front[0], row.id, *front_extras)
                    if front and not runtime.spec.multi_objective else None),
        best_trials=[_trial_view(t, row.id, *front_extras) for t in front],
        baseline_trial_id=row.baseline_trial_id,
        state_reason=runtime.study.user_attrs.get(PAUSED_REASON) if row.state == "paused" else None,
    )


def _lease_hours(session: Session, study_id: int) -> float:
    """Device-hours of the study: the time its leases were held (queued trials hold no device; earlier
    segments of paused and resumed trials are in `held_seconds`), summed in the database (one aggregate)."""
    now = utcnow()
    end = sa.func.coalesce(Lease.finished_at, now)
    seconds: sa.ColumnElement[Any]
    if session.get_bind().dialect.name == "postgresql":
        seconds = sa.func.extract("epoch", end - Lease.started_at)
    else:  # SQLite keeps datetimes as text; julianday counts days
        seconds = (sa.func.julianday(end) - sa.func.julianday(Lease.started_at)) * 86400.0
    total = session.scalar(sa.select(sa.func.sum(seconds + Lease.held_seconds))
                           .where(Lease.study_id == study_id, Lease.state != "queued"))
    return round(float(total or 0.0) / 3600.0, 6)


def _held_ids(session: Session, study_id: int) -> set[int]:
    """The study's trials a worker holds (an active lease) or that wait paused at a rung: not queued."""
    return set(session.scalars(sa.select(Lease.trial_id).where(Lease.study_id == study_id,
                                                               Lease.state.in_(("active", "paused")))))


def _view_state(t: FrozenTrial, held: set[int]) -> str:
    """A trial's state as the API shows it: Optuna's, except that a RUNNING trial no worker holds (and that is
    not paused) is QUEUED (asked ahead, see service/queue.py, or asked a moment ago and not leased yet).
    Queued trials count against the budget inside the server, but not in `trials_used`."""
    if t.state == TrialState.RUNNING and trial_storage_id(t) not in held:
        return "QUEUED"
    return t.state.name


def aware(moment: datetime) -> datetime:
    # SQLite returns naive datetimes even for timezone=True columns; they were written as UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def feasible(t: FrozenTrial) -> bool:
    """Whether a trial meets every constraint it was given (Optuna's rule: each constraint value <= 0)."""
    return all(v <= 0.0 for v in t.constraints.values())


def best_trials(runtime: StudyRuntime, trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The study's best trials with Optuna's `Study.best_trials` semantics: among COMPLETE trials (only the
    feasible ones when any trial carries constraints), those no other dominates (as good on every objective,
    better on one; equal values are all kept); best first by the first objective, then by number. For one
    objective that is the best value's trials; the view shows the first as `best_trial`.

    A sweep in that order compares each trial with the front so far only, since a trial can only be dominated by
    one sorted before it: one study view costs (trials × front size), not Optuna's copy of every trial."""
    signs = [-1.0 if o.direction == "maximize" else 1.0 for o in runtime.spec.objectives]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    if any(t.constraints for t in complete):
        complete = [t for t in complete if feasible(t)]
    scored = sorted(((tuple(s * v for s, v in zip(signs, t.values, strict=True)), t.number, t) for t in complete),
                    key=lambda item: item[:2])
    front: list[tuple[tuple[float, ...], FrozenTrial]] = []
    for loss, _, t in scored:
        if not any(_dominates(other, loss) for other, _ in front):
            front.append((loss, t))
    return [t for _, t in front]


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether losses `a` dominate `b`: no worse anywhere, better somewhere."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def set_study_state(backend: Backend, study_id: int, action: str) -> StudyOut:
    target, allowed = _TRANSITIONS[action]
    finished: list[int] = []
    with backend.session() as session:
        row = _row(session, study_id)
        if row.state != target:
            if row.state not in allowed:
                raise Conflict(f"study {study_id} is {row.state}; {action} works on a "
                               f"{' or '.join(allowed)} study")
            if target == "stopped":  # nothing will resume its paused trials
                finished = finish_paused(backend, backend.runtime(study_id), session, "the study was stopped")
            if action == "resume":
                backend.runtime(study_id).study.set_user_attr(PAUSED_REASON, None)
            row.state = target
    for trial_id in finished:
        delete_checkpoints(backend, trial_id)
    log.info("study %s: %s -> %s", study_id, action, target)
    return get_study(backend, study_id)


def delete_study(backend: Backend, study_id: int) -> None:
    with backend.session() as session:
        row = _row(session, study_id)
        name = row.name
        session.execute(sa.delete(RungReport).where(RungReport.trial_id.in_(
            sa.select(Lease.trial_id).where(Lease.study_id == study_id))))
        session.execute(sa.delete(Lease).where(Lease.study_id == study_id))
        session.delete(row)
    backend.forget(study_id)
    with contextlib.suppress(KeyError):  # already gone from Optuna's tables
        optuna.delete_study(study_name=name, storage=backend.storage)
    try:
        backend.store.delete_prefix(f"{study_id}/")
    except StoreUnavailable as exc:  # the study is gone; its files are unreferenced, never a record without them
        log.warning("study %s (%s) deleted, but not its files in the store: %s", study_id, name, exc.message)
        return
    log.info("study %s (%s) deleted", study_id, name)


def maybe_complete(backend: Backend, runtime: StudyRuntime) -> None:
    """Mark a running study completed once its budget is spent and nothing is left running, queued or to
    resume; paused trials its policy will not resume end PRUNED.

    Opens its own session: call it after the caller's session committed (see the ordering rule in leases.py).
    The study's trials are synced first: the last two trials may finish in two server processes at once, and
    each must see the other's as finished, or neither completes the study.
    """
    backend.storage.sync(runtime.id)
    with backend.session() as session:
        row = session.get(StudyRow, runtime.id)
        if row is None or row.state != "running":
            return
        trials = runtime.study.get_trials(deepcopy=False)
        use = usage(session, runtime, trials)
        b = runtime.spec.budget
        spent = use.used >= b.max_trials or (b.max_gpu_hours is not None and use.gpu_hours >= b.max_gpu_hours)
        if not spent or use.active or use.waiting:
            return
        policy = policy_for(runtime.spec)
        hours_left = b.max_gpu_hours is None or use.gpu_hours < b.max_gpu_hours
        if use.paused and policy is not None and hours_left:
            paused = [PausedTrial(tid, step) for tid, step, _ in paused_trials(session, runtime.id)]
            if policy.next_resume(trials, paused, can_start_new=False, any_active=False) is not None:
                return  # a free worker resumes it
        finished = finish_paused(backend, runtime, session,
                                 "the study's budget is spent and its policy did not promote it")
        row.state = "completed"
        log.info("study %s (%s) completed: %s trials used", runtime.id, runtime.name, use.used)
    for trial_id in finished:
        delete_checkpoints(backend, trial_id)


def enqueue_trial(backend: Backend, study_id: int, params: dict[str, Any], note: str = "") -> TrialOut:
    """Queue a configuration to run before the sampler's own (known-good settings, a warm start by hand):
    a WAITING trial with `params` (the sampler fills parameters left out). It counts against the budget when
    it runs, like any trial. InvalidInput (422) names each parameter that does not fit the search space;
    Conflict (409) when the study will not run it (stopped or completed)."""
    runtime = backend.runtime(study_id)
    problems = runtime.spec.param_problems(params, ("body", "params"))
    if problems:
        errors = [{"loc": list(loc), "msg": msg, "type": "value_error"} for loc, msg in problems]
        raise InvalidInput(f"params.{problems[0][0][-1]}: {problems[0][1]}", errors)
    with backend.session() as session:
        row = session.get(StudyRow, study_id)
        if row is None or row.state not in ("running", "paused"):
            raise Conflict(f"study {study_id} is {row.state if row else 'gone'}: it runs no more trials; "
                           "enqueue into a running or paused study")
    attrs: dict[str, Any] = {"enqueued": note or True}
    with backend.ask_lock(runtime):  # Optuna numbers trials in order: not beside a concurrent ask
        runtime.study.enqueue_trial(params, user_attrs=attrs)
        waiting = runtime.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    log.info("study %s: trial enqueued with %s", study_id, params)
    return get_trial(backend, trial_storage_id(waiting[-1]))


def pause_if_failing(backend: Backend, runtime: StudyRuntime) -> bool:
    """Pause a running study whose last `budget.max_consecutive_failures` finished trials all failed for one
    reason of the study's own (model, data, config): every further trial would fail alike and spend the
    budget. The reason goes to the study user attribute `paused_reason` (the API's `state_reason`)."""
    k = runtime.spec.budget.max_consecutive_failures
    finished = [t for t in runtime.study.get_trials(deepcopy=False) if t.state.is_finished()]
    last = sorted(finished, key=lambda t: (t.datetime_complete or datetime.min, t.number))[-k:]
    kinds = {t.user_attrs.get("fail_kind") for t in last}
    if len(last) < k or any(t.state != TrialState.FAIL for t in last) or len(kinds) != 1:
        return False
    kind = kinds.pop()
    if kind not in STUDY_FAILURES:
        return False
    reason = (f"the study paused itself: its last {k} trials failed alike ({kind}): "
              f"{last[-1].user_attrs.get('fail_reason', '?')} -- fix it, then `tunefleet study resume {runtime.id}`")
    with backend.session() as session:
        row = session.get(StudyRow, runtime.id)
        if row is None or row.state != "running":
            return False
        runtime.study.set_user_attr(PAUSED_REASON, reason)  # Optuna first (the ordering rule in leases.py)
        row.state = "paused"
    log.warning("study %s (%s) paused: %s", runtime.id, runtime.name, reason)
    return True


# ---- trial views -----------------------------------------------------------------------------------------

def _trial_extras(session: Session, trial_ids: list[int]
                  ) -> tuple[dict[int, Lease], dict[int, dict[int, dict[str, Any]]]]:
    leases = {lease.trial_id: lease for lease in session.scalars(sa.select(Lease).where(Lease.trial_id.in_(trial_ids)))}
    rung_metrics: dict[int, dict[int, dict[str, Any]]] = {}
    for rep in session.scalars(sa.select(RungReport).where(RungReport.trial_id.in_(trial_ids))):
        rung_metrics.setdefault(rep.trial_id, {})[rep.step] = rep.metrics
    return leases, rung_metrics


def _trial_view(t: FrozenTrial, study_id: int, leases: dict[int, Lease],
                rung_metrics: dict[int, dict[int, dict[str, Any]]]) -> TrialOut:
    lease = leases.get(trial_storage_id(t))
    state = _view_state(t, {lease.trial_id} if lease is not None and lease.state in ("active", "paused") else set())
    if state == "QUEUED":
        lease = None  # no worker holds it yet
    attrs = dict(t.user_attrs)
    return TrialOut(
        id=trial_storage_id(t), study_id=study_id, number=t.number, state=state,
        params=t.params or dict(t.system_attrs.get("fixed_params") or {}),  # a waiting trial: its enqueued values
        value=t.value if t.values is not None and len(t.values) == 1 else None,
        values=list(t.values) if t.values is not None else None,
        intermediate_values=dict(t.intermediate_values),
        validation_metrics=attrs.pop("validation_metrics", {}), test_metrics=attrs.pop("test_metrics", {}),
        extra=attrs.pop("extra", {}), rung_metrics=rung_metrics.get(trial_storage_id(t), {}), user_attrs=attrs,
        is_baseline=bool(attrs.get("is_baseline", False)), attempt=int(attrs.get("attempt", 0)),
        retry_of=attrs.get("retry_of"), worker_id=lease.worker_id if lease else None,
        fail_reason=(lease.fail_reason if lease else None) or attrs.get("fail_reason"),
        paused_at=lease.paused_at if lease and lease.state == "paused" else None,
        resumes=lease.resumes if lease else 0,
        constraints=dict(t.constraints),
        feasible=feasible(t) if t.constraints and t.state == TrialState.COMPLETE else None,
        datetime_start=t.datetime_start, datetime_complete=t.datetime_complete,
    )


def list_trials(backend: Backend, study_id: int, state: str | None, limit: int, offset: int
                ) -> tuple[list[TrialOut], int]:
    """One page of the study's trials by number, and how many match; without a state filter only the page
    is read."""
    _current(backend, study_id)
    if state is None:
        total = backend.storage.trial_count(study_id)
        page = backend.storage.trials_by_number(study_id, range(offset, min(offset + limit, total)))
        with backend.session() as session:
            extras = _trial_extras(session, [trial_storage_id(t) for t in page])
            return [_trial_view(t, study_id, *extras) for t in page], total
    wanted = _trial_state(state)
    with backend.session() as session:
        held = _held_ids(session, study_id)
        paused = {tid for tid, _, _ in paused_trials(session, study_id)}
        trials = [t for t in backend.runtime(study_id).study.get_trials(deepcopy=False)
                  if ("PAUSED" if trial_storage_id(t) in paused else _view_state(t, held)) == wanted]
        page = trials[offset: offset + limit]
        extras = _trial_extras(session, [trial_storage_id(t) for t in page])
        return [_trial_view(t, study_id, *extras) for t in page], len(trials)


def _trial_state(state: str) -> str:
    """The state name a trial filter asks for: one of Optuna's (RUNNING: held by a worker), QUEUED or PAUSED;
    InvalidInput otherwise."""
    names = [s.name for s in TrialState] + ["QUEUED", "PAUSED"]
    if state.upper() not in names:
        raise InvalidInput(f"unknown trial state {state!r}: use one of {', '.join(n.lower() for n in names)}")
    return state.upper()


def get_trial(backend: Backend, trial_id: int) -> TrialOut:
    with backend.session() as session:
        runtime = _current(backend, _study_id_of_trial(backend, session, trial_id))
        t = backend.storage.get_trial(trial_id)
        return _trial_view(t, runtime.id, *_trial_extras(session, [trial_id]))


def _study_id_of_trial(backend: Backend, session: Session, trial_id: int) -> int:
    """The study of a trial: its lease's, or (a waiting trial has no lease yet) Optuna's; NotFound."""
    lease = session.get(Lease, trial_id)
    if lease is not None:
        return lease.study_id
    study_id = study_id_of_trial(backend.engine, trial_id)
    if study_id is None:
        raise NotFound(f"trial {trial_id} does not exist")
    return study_id


def study_report(backend: Backend, study_id: int) -> dict[str, Any]:
    """The fidelity report of a study (see service/fidelity.py and docs/fidelity.md)."""
    from tunefleet.service.fidelity import fidelity_report

    runtime = _current(backend, study_id)
    trials = runtime.study.get_trials(deepcopy=False)
    baselines = [t for t in trials if t.user_attrs.get("is_baseline") and t.state == TrialState.COMPLETE]
    reports = [fidelity_report(runtime.study, direction=o.direction, rungs=runtime.rungs,
                               baseline_trial_number=baselines[-1].number if baselines else None,
                               objective_metric=o.metric)
               for o in runtime.spec.objectives]
    out = {"study_id": study_id, "study_name": runtime.name, **reports[0]}
    if runtime.spec.multi_objective:
        # The top-level fields are the first objective's, as for one objective; each objective has its own
        # report (best trial, tuned vs baseline), and the front is what a user chooses from.
        out["objectives"] = reports
        out["pareto_front"] = [_front_entry(t, runtime) for t in best_trials(runtime, trials)]
    return out


def _front_entry(t: FrozenTrial, runtime: StudyRuntime) -> dict[str, Any]:
    """A Pareto-optimal trial as the report lists it: its objective values by metric, params and test metrics
    (without per-example scores, as the report's trial summaries)."""
    from tunefleet.service.fidelity import PER_EXAMPLE_KEY

    test = {k: v for k, v in (t.user_attrs.get("test_metrics") or {}).items() if k != PER_EXAMPLE_KEY}
    return {"number": t.number, "trial_id": trial_storage_id(t), "params": dict(t.params),
            "values": {o.metric: v for o, v in zip(runtime.spec.objectives, t.values or [], strict=False)},
            "test_metrics": test, "is_baseline": bool(t.user_attrs.get("is_baseline"))}

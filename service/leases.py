"""The worker protocol: lease a trial, heartbeat, report (continue, prune or pause), pause, complete, fail; and
the reaper.

Ordering rule: inside one of our sessions, every Optuna call (tell, enqueue, reads too) comes before our
own rows are flushed. On SQLite both engines share one file lock; our session holding it while an Optuna
call waits on Optuna's cache lock, held by another thread that waits for the file lock, would deadlock until
the busy timeout. Sessions are made with autoflush off, and `maybe_complete` runs after the commit.

Only the holder of a lease may change its trial: a lease answer carries a secret lease token (only its
SHA-256 is stored), and every call on the trial (heartbeat, report, complete, fail, artifact upload) must
send it in the `X-Lease-Token` header. A call without it, or with another lease's token, is refused (403)
before anything is read or written; the holder of a lease that ended meanwhile gets 409 (`LeaseLost`).

Every call a worker makes is idempotent: a repeated lease request (the same `request_id` from the same
worker and API token) returns the same trial with a fresh lease token (the first answer never arrived),
a retried report returns the stored answer, a retried complete or fail returns the trial as it is. State
changes of one trial hold its lock (a process lock, and the lease row FOR UPDATE on PostgreSQL), so a
report racing a reaper or a duplicate never changes a trial twice.

Pausing (pruner `asha`, see scheduling.py): a report answered ``pause`` keeps the lease active until its
holder has stored a checkpoint and called `pause`; the trial then holds no lease and no device and never
expires. A lease request may resume it (the same trial, a new lease token, the checkpoint to start from).
A holder that dies before `pause` leaves a trial that pauses at its previous complete checkpoint (or at 0).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tunefleet.service.artifacts import delete_checkpoints, find_artifact
from tunefleet.service.auth import Principal, check_lease_token, new_lease_token
from tunefleet.service.backend import Backend, StudyRuntime
from tunefleet.service.errors import Conflict, InvalidInput, LeaseLost, NotFound
from tunefleet.service.queue import QUEUED, claim, wake
from tunefleet.service.scheduling import PausedTrial, policy_for
from tunefleet.service.schemas import (
    CompleteIn,
    FailIn,
    HeartbeatOut,
    LeaseIn,
    LeaseOut,
    PauseIn,
    ReportIn,
    ResumeOut,
    TrialOut,
)
from tunefleet.service.spec import (
    BUILTIN_TASKS,
    STUDY_FAILURES,
    ReportAction,
    checkpoint_storage,
    constraint_violations,
)
from tunefleet.service.storage import optuna_now, trial_storage_id, unleased_running_trials
from tunefleet.service.studies import (
    aware,
    get_trial,
    maybe_complete,
    pause_if_failing,
    paused_trials,
    retried_trial_ids,
    usage,
)
from tunefleet.service.tables import Lease, RungReport, Worker, utcnow
from tunefleet.service.tables import Study as StudyRow

__all__ = ["complete", "fail", "heartbeat", "lease", "pause", "reap_expired", "reap_orphans", "report",
           "require_holder"]

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def lease_deadline(backend: Backend) -> datetime:
    """A lease's deadline from now; every call from the lease holder moves it here."""
    return utcnow() + timedelta(seconds=backend.settings.lease_seconds)


# ---- lease -----------------------------------------------------------------------------------------------

def lease(backend: Backend, body: LeaseIn, principal: Principal) -> LeaseOut | None:
    """Hand the worker a trial of the running study that has the fewest trials in flight; None when no study
    has work. A repeated ``request_id`` of the same worker returns the lease it created, with a new token."""
    if body.request_id:
        repeated = _repeated_lease(backend, body, principal)
        if repeated is not None:
            return repeated
    with backend.session() as session:
        _touch_worker(session, body)
        in_flight = (sa.select(sa.func.count()).where(Lease.study_id == StudyRow.id, Lease.state == "active")
                     .scalar_subquery())
        running = sa.select(StudyRow.id).where(StudyRow.state == "running")
        if principal.projects is not None:  # a worker token limited to some projects serves only those
            running = running.where(StudyRow.project_id.in_(list(principal.projects)))
        candidates = session.scalars(
            running.order_by(in_flight, StudyRow.last_leased_at.asc().nulls_first(), StudyRow.id)
        ).all()
    served = set(body.tasks if body.tasks is not None else BUILTIN_TASKS)
    for study_id in candidates:
        try:
            runtime = backend.runtime(study_id)
        except NotFound:
            continue  # deleted meanwhile
        if runtime.spec.resources.gpus_per_trial > body.devices:
            continue  # its trials need more devices than this worker has (tunefleet worker --nproc)
        if runtime.spec.task not in served:
            continue  # a script study is for `tunefleet agent`, the built-in tasks for the worker
        leased = _resume_from(backend, runtime, body, principal) or _lease_from(backend, runtime, body, principal)
        if leased is not None:
            return leased
    return None


def _touch_worker(session: Session, body: LeaseIn) -> None:
    worker = session.get(Worker, body.worker_id)
    if worker is None:
        session.add(Worker(id=body.worker_id, hostname=body.hostname, device=body.device))
    else:
        worker.last_seen, worker.hostname, worker.device = utcnow(), body.hostname, body.device


def _repeated_lease(backend: Backend, body: LeaseIn, principal: Principal) -> LeaseOut | None:
    """The lease an earlier request with this worker's `request_id` created, with a new lease token (the
    caller never got the first answer); None when there was no such request."""
    with backend.session() as session:
        existing = session.scalar(sa.select(Lease).where(Lease.worker_id == body.worker_id,
                                                         Lease.request_id == body.request_id).with_for_update())
        if existing is None:
            return None
        if existing.owner_token_id != principal.token_id:
            raise Conflict(f"request_id {body.request_id!r} of worker {body.worker_id!r} was used with another "
                           "API token: send a new request_id for each lease request")
        token, existing.token_hash = new_lease_token()
        return _lease_out(backend, existing, token)


def _lease_from(backend: Backend, runtime: StudyRuntime, body: LeaseIn, principal: Principal) -> LeaseOut | None:
    """A trial of the study for the worker: the oldest of the study's lease queue (a claim: no sampler runs
    on the request path, see service/queue.py), or, when the queue is empty, one asked now; None when the
    study has no work left. Re-queued trials (and the baseline) wait in Optuna's own queue, which an ask
    empties first: while the study has some, leases ask, so they jump the queue of pre-asked trials."""
    if runtime.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return _ask_now(backend, runtime, body, principal)
    return _from_queue(backend, runtime, body, principal) or _ask_now(backend, runtime, body, principal)


def _from_queue(backend: Backend, runtime: StudyRuntime, body: LeaseIn, principal: Principal) -> LeaseOut | None:
    """Lease the oldest queued trial of the study; None when its queue is empty. Wakes the queue's filler."""
    token, token_hash = new_lease_token()
    try:
        with backend.session() as session:
            record = claim(session, runtime.id, _lease_values(backend, body, principal, token_hash))
            if record is not None:
                _count_lease(session, runtime.id, body.worker_id)
    except IntegrityError:
        # A concurrent retry of this request_id won (the trial stays queued): answer with its lease.
        return _repeated_lease(backend, body, principal)
    wake(backend, runtime)
    if record is None:
        return None
    log.info("trial %s (study %s) leased to %s from the queue", record.trial_id, runtime.name, body.worker_id,
             extra=_ids(record))
    return _lease_out(backend, record, token)


def _lease_values(backend: Backend, body: LeaseIn, principal: Principal, token_hash: str) -> dict[str, Any]:
    """The columns of a lease row that say who holds it and until when."""
    return {"worker_id": body.worker_id, "request_id": body.request_id, "token_hash": token_hash,
            "owner_token_id": principal.token_id, "deadline": lease_deadline(backend)}


def _count_lease(session: Session, study_id: int, worker_id: str) -> None:
    session.execute(sa.update(StudyRow).where(StudyRow.id == study_id).values(last_leased_at=utcnow()))
    session.execute(sa.update(Worker).where(Worker.id == worker_id).values(trials_leased=Worker.trials_leased + 1))


def _ask_now(backend: Backend, runtime: StudyRuntime, body: LeaseIn, principal: Principal) -> LeaseOut | None:
    """Ask a trial on the request path and lease it, unless no re-queued trial is waiting and the queue has
    one (the filler may have queued some while this request waited for the ask lock)."""
    with backend.ask_lock(runtime):
        backend.storage.sync(runtime.id)  # trials other server processes created or finished
        with backend.session() as session:
            row = session.get(StudyRow, runtime.id)
            if row is None or row.state != "running":
                return None
            use = usage(session, runtime)
        if not use.waiting or not use.has_room(runtime.spec):
            queued = _from_queue(backend, runtime, body, principal)
            if queued is not None:
                return queued
        if not use.has_room(runtime.spec):
            maybe_complete(backend, runtime)
            return None
        with backend.storage.batched_ask():
            trial = runtime.study.ask(runtime.distributions)
    # The lease row is written after the ask lock is released: the budget counts Optuna's RUNNING trials,
    # so the next ask already sees this one, and the reaper only looks at lease rows.
    token, token_hash = new_lease_token()
    try:
        with backend.session() as session:
            attrs = trial.user_attrs
            record = Lease(trial_id=trial_storage_id(trial), study_id=runtime.id, state="active",
                           attempt=int(attrs.get("attempt", 0)), retry_of=attrs.get("retry_of"),
                           **_lease_values(backend, body, principal, token_hash))
            session.add(record)
            _count_lease(session, runtime.id, body.worker_id)
    except IntegrityError:
        # The orphan reaper claimed this trial (its row is there: it fails and re-queues it), or a concurrent
        # retry of this request_id won. Then the trial goes back as the reaper would, so the budget stays
        # exact, and the worker gets the lease of its request.
        _claim_and_requeue(backend, runtime, trial_storage_id(trial), "a concurrent retry of the lease request won")
        return lease(backend, body, principal)
    except BaseException:
        # Give the trial back now; if even that fails (the database is away), the orphan reaper does it.
        with contextlib.suppress(Exception):
            _claim_and_requeue(backend, runtime, trial_storage_id(trial), "the lease could not be written")
        raise
    log.info("trial %s (study %s #%s) leased to %s: %s", trial_storage_id(trial), runtime.name, trial.number,
             body.worker_id, trial.params, extra=_ids(record))
    return _lease_out(backend, record, token)


def _resume_from(backend: Backend, runtime: StudyRuntime, body: LeaseIn, principal: Principal) -> LeaseOut | None:
    """A lease of the paused trial the study's policy promotes now, for this worker; None when there is none.
    Under the study's ask lock, like `ask`: two workers never resume the same trial."""
    policy = policy_for(runtime.spec)
    if policy is None:
        return None
    with backend.session() as session:  # the common case, nothing paused, without the study's ask lock
        if not paused_trials(session, runtime.id):
            return None
    with backend.ask_lock(runtime):
        with backend.session() as session:
            row = session.get(StudyRow, runtime.id)
            if row is None or row.state != "running":
                return None
            paused = paused_trials(session, runtime.id)
            if not paused:
                return None
            backend.storage.sync(runtime.id)
            trials = runtime.study.get_trials(deepcopy=False)
            use = usage(session, runtime, trials)
            b = runtime.spec.budget
            if (b.max_concurrent_trials is not None and use.active >= b.max_concurrent_trials) or (
                    b.max_gpu_hours is not None and use.gpu_hours >= b.max_gpu_hours):
                return None
            # A checkpoint on a node's disk is resumed on that node only.
            mine = [PausedTrial(tid, step) for tid, step, ckpt in paused
                    if (ckpt or {}).get("node") in (None, body.hostname)]
            trial_id = policy.next_resume(trials, mine, can_start_new=use.has_room(runtime.spec),
                                          any_active=use.active > 0)
        if trial_id is None:
            return None
        token, token_hash = new_lease_token()
        try:
            with backend.session() as session:
                record = session.get(Lease, trial_id, with_for_update=backend.is_postgres)
                if record is None or record.state != "paused":
                    return None
                now = utcnow()
                record.held_seconds += (aware(record.finished_at or now) - aware(record.started_at)).total_seconds()
                record.state, record.worker_id, record.request_id = "active", body.worker_id, body.request_id
                record.token_hash, record.owner_token_id = token_hash, principal.token_id
                record.started_at, record.finished_at, record.deadline = now, None, lease_deadline(backend)
                record.promoted_through, record.resumes = record.paused_at or 0, record.resumes + 1
                session.execute(sa.update(StudyRow).where(StudyRow.id == runtime.id).values(last_leased_at=now))
                session.execute(sa.update(Worker).where(Worker.id == body.worker_id)
                                .values(trials_leased=Worker.trials_leased + 1))
        except IntegrityError:
            return None  # this worker's request_id is on another lease: a retry raced; ask again
    backend.storage.set_trial_user_attr(trial_id, "paused_at", None)
    log.info("trial %s (study %s) resumed by %s from rung %s (checkpoint at %s)", trial_id, runtime.name,
             body.worker_id, record.paused_at, (record.checkpoint or {}).get("step", 0), extra=_ids(record))
    return _lease_out(backend, record, token)


def _lease_out(backend: Backend, record: Lease, token: str) -> LeaseOut:
    runtime = backend.runtime(record.study_id)
    t = backend.storage.get_trial(record.trial_id)
    if set(t.params) != set(runtime.distributions):
        # Another server process asked it (the lease queue): this process's copy can predate its parameters,
        # since sync follows state changes and the trial was RUNNING before and after they were written.
        t = backend.storage.reload_trial(record.trial_id)
    spec = runtime.spec.model_dump(mode="json")
    storage = checkpoint_storage(spec, t.params) if policy_for(runtime.spec) else "none"
    resume = None
    if record.resumes:
        checkpoint = record.checkpoint
        resume = ResumeOut(step=int(checkpoint["step"]) if checkpoint else 0,
                           promoted_through=record.promoted_through, checkpoint=checkpoint)
    return LeaseOut(
        trial_id=record.trial_id, lease_token=token, study_id=runtime.id, study_name=runtime.name, number=t.number,
        attempt=record.attempt, params=t.params, spec=spec, rungs=runtime.rungs,
        is_baseline=bool(t.user_attrs.get("is_baseline")), deadline=record.deadline,
        lease_seconds=backend.settings.lease_seconds, heartbeat_interval=max(1.0, backend.settings.lease_seconds / 6),
        checkpoint_storage=storage, resume=resume,
    )


# ---- per-trial calls -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked_lease(backend: Backend, trial_id: int, token: str | None,
                  holder_only: bool = True) -> Iterator[tuple[Session, Lease, StudyRuntime]]:
    """The trial's lease row, locked; with `holder_only`, Forbidden unless `token` is its lease token."""
    with backend.trial_lock(trial_id), backend.session() as session:
        record = _lease_row(session, trial_id, lock=backend.is_postgres)
        if holder_only:
            check_lease_token(record, token)
        yield session, record, backend.runtime(record.study_id)


def _lease_row(session: Session, trial_id: int, lock: bool = False) -> Lease:
    record = session.get(Lease, trial_id, with_for_update=lock)
    if record is None:
        raise NotFound(f"trial {trial_id} has no lease: lease trials with POST /api/v1/leases")
    return record


def require_holder(backend: Backend, trial_id: int, token: str | None) -> None:
    """Forbidden unless `token` is the trial's lease token; NotFound without a lease. A cheap check before
    a long upload; the write itself checks again under the trial's lock."""
    with backend.session() as session:
        check_lease_token(_lease_row(session, trial_id), token)


def heartbeat(backend: Backend, trial_id: int, token: str | None, worker_id: str = "") -> HeartbeatOut:
    """Extend the lease; answer stop=True when the worker should give the trial up."""
    with _locked_lease(backend, trial_id, token) as (session, record, _):
        if record.state != "active":
            return HeartbeatOut(stop=True, reason=f"trial {trial_id} is {record.state}")
        study = session.get(StudyRow, record.study_id)
        if study is None or study.state == "stopped":
            return HeartbeatOut(stop=True, reason=f"study {record.study_id} was stopped")
        record.deadline = lease_deadline(backend)
        if worker_id:
            session.execute(sa.update(Worker).where(Worker.id == worker_id).values(last_seen=utcnow()))
        return HeartbeatOut(stop=False, deadline=record.deadline)


def report(backend: Backend, trial_id: int, token: str | None, body: ReportIn) -> ReportAction:
    """Record an intermediate value and answer continue, prune or pause (the stored answer on a retry)."""
    if not math.isfinite(body.value):
        raise InvalidInput(f"report value {body.value} is not finite: fail the trial instead "
                           "(POST /trials/{id}/fail with the reason)")
    with _locked_lease(backend, trial_id, token) as (session, record, runtime):
        answered = sa.select(RungReport.step, RungReport.action).where(RungReport.trial_id == trial_id)
        answers: dict[int, str] = {step: action for step, action in session.execute(answered)}
        if body.step in answers:
            if body.step <= record.promoted_through:
                return "continue"  # a resumed trial re-running rungs it was promoted past
            return _action(answers[body.step])
        if record.state == "pruned":
            return "prune"
        if record.state != "active":
            raise LeaseLost(f"trial {trial_id} is {record.state}; its reports are closed: lease a new trial")
        action: ReportAction = "continue"
        if runtime.spec.rung_values:  # else the report is kept (tf_reports) for the record only
            if backend.reports_handled.get(trial_id, 0) != len(answers):
                # An earlier report went to another server process: our copy of the trial lags behind.
                backend.storage.reload_trial(trial_id)
            trial = optuna.Trial(runtime.study, trial_id)  # a fresh snapshot per request, never cached
            trial.report(body.value, body.step)
            action = _decide(backend, runtime, trial, body.step)
        if action == "prune":
            runtime.study.tell(trial.number, state=TrialState.PRUNED)
            record.state, record.finished_at = "pruned", utcnow()
        session.add(RungReport(trial_id=trial_id, step=body.step, value=body.value, metrics=body.metrics,
                               prune=action == "prune", action=action))
        # Set before the commit: a failed commit leaves a count that differs next time, hence a re-read.
        if action == "prune":
            backend.reports_handled.pop(trial_id, None)
        else:
            backend.reports_handled[trial_id] = len(answers) + 1
        record.deadline = lease_deadline(backend)  # any call from the worker shows it is alive
        if action != "continue":
            log.info("trial %s: %s at %s%% (value %.4g)", trial_id, action, body.step, body.value, extra=_ids(record))
    if action == "prune":
        backend.on_trial_finished("pruned")  # once: a retry or a later report returned above, unchanged
        delete_checkpoints(backend, trial_id)
        maybe_complete(backend, runtime)
    return action


def _decide(backend: Backend, runtime: StudyRuntime, trial: optuna.Trial, step: int) -> ReportAction:
    """The answer to a new report of a single-objective trial (already reported to Optuna)."""
    # The baseline always runs to the end, so "tuned vs default" is always measurable on test.
    if trial.user_attrs.get("is_baseline"):
        return "continue"
    policy = policy_for(runtime.spec)
    if policy is None:
        return "prune" if trial.should_prune() else "continue"
    action = policy.answer(runtime.study.get_trials(deepcopy=False), trial_storage_id(trial), step)
    if action == "pause" and checkpoint_storage(runtime.spec.model_dump(mode="json"), trial.params) == "none":
        return "prune"  # checkpoints.storage: none never pauses
    return action


def _action(stored: str) -> ReportAction:
    return "prune" if stored == "prune" else "pause" if stored == "pause" else "continue"


def pause(backend: Backend, trial_id: int, token: str | None, body: PauseIn) -> TrialOut:
    """The holder stored its checkpoint after a pause answer: release the lease, the trial waits paused.
    A repeat returns the trial as it is; the previous uploaded checkpoint is deleted (keep: final)."""
    with _locked_lease(backend, trial_id, token) as (session, record, runtime):
        if record.state == "paused" and record.paused_at == body.step:
            return get_trial(backend, trial_id)
        if record.state != "active":
            raise LeaseLost(f"trial {trial_id} is {record.state}{_reason(record)}; it was not paused")
        answer = session.get(RungReport, (trial_id, body.step))
        if answer is None or answer.action != "pause":
            raise Conflict(f"trial {trial_id}'s report at step {body.step} was not answered pause: pause only "
                           "after a report's action is pause")
        checkpoint = body.checkpoint.model_dump(exclude_none=True) if body.checkpoint else None
        if body.checkpoint and body.checkpoint.name:
            stored = find_artifact(session, trial_id, body.checkpoint.name)
            if stored is None or stored.sha256 != body.checkpoint.sha256:
                msg = (f"checkpoint {body.checkpoint.name!r} of trial {trial_id} is not uploaded with SHA-256 "
                       f"{body.checkpoint.sha256}: upload it (PUT /trials/{trial_id}/artifacts/{{name}}) first")
                raise InvalidInput(msg, [{"loc": ["body", "checkpoint"], "msg": msg, "type": "value_error"}])
        previous = (record.checkpoint or {}).get("name")
        backend.storage.set_trial_user_attr(trial_id, "paused_at", body.step)  # Optuna first (ordering rule)
        record.state, record.paused_at, record.finished_at = "paused", body.step, utcnow()
        record.checkpoint = checkpoint or record.checkpoint
        backend.reports_handled.pop(trial_id, None)
        log.info("trial %s paused at %s%% (checkpoint %s)", trial_id, body.step,
                 (checkpoint or {}).get("name") or (checkpoint or {}).get("path"), extra=_ids(record))
    if previous and runtime.spec.checkpoints.keep == "final" and previous != (checkpoint or {}).get("name"):
        delete_checkpoints(backend, trial_id, keep=(checkpoint or {}).get("name"))
    maybe_complete(backend, runtime)
    return get_trial(backend, trial_id)


def complete(backend: Backend, trial_id: int, token: str | None, body: CompleteIn) -> TrialOut:
    """Tell Optuna the trial's final value(s) with its metrics; a repeat returns the trial unchanged."""
    with _locked_lease(backend, trial_id, token) as (session, record, runtime):
        t = backend.storage.get_trial(trial_id)
        if record.state == "active" and t.state == TrialState.COMPLETE:
            record.state = "complete"  # told before a crash, recorded now
        told_now = record.state == "active"
        if told_now:
            values = _values(runtime, body)
            constraints = _constraints(runtime, body)
            for key, value in (("validation_metrics", body.validation_metrics),
                               ("test_metrics", body.test_metrics), ("extra", body.extra)):
                backend.storage.set_trial_user_attr(trial_id, key, value)
            if constraints:  # where samplers read them (TPE, GP, NSGA-II), set as Trial.set_constraint does
                trial = optuna.Trial(runtime.study, trial_id)
                for name, violation in constraints.items():
                    trial.set_constraint(name, violation)
            runtime.study.tell(t.number, values)
            record.state, record.finished_at = "complete", utcnow()
            backend.reports_handled.pop(trial_id, None)
            log.info("trial %s complete: %s", trial_id, values, extra=_ids(record))
        elif record.state != "complete":
            raise LeaseLost(f"trial {trial_id} is {record.state}{_reason(record)}; the result was not recorded")
    if runtime.spec.checkpoints.keep == "final":
        # Also on a repeat: a fault may have come between the tell and this. The final model stays.
        delete_checkpoints(backend, trial_id)
    if told_now:
        backend.on_trial_finished("complete")  # once: a repeat is told nothing
        maybe_complete(backend, runtime)
    return get_trial(backend, trial_id)


def _values(runtime: StudyRuntime, body: CompleteIn) -> list[float]:
    values = body.values if body.values is not None else ([body.value] if body.value is not None else None)
    n = len(runtime.spec.objectives)
    if values is None or len(values) != n:
        names = ", ".join(o.metric for o in runtime.spec.objectives)
        raise InvalidInput(f"complete needs {n} objective value(s) ({names}): send {'value' if n == 1 else 'values'}")
    if not all(math.isfinite(v) for v in values):
        raise InvalidInput(f"objective values {values} are not finite: fail the trial instead")
    return values


def _constraints(runtime: StudyRuntime, body: CompleteIn) -> dict[str, float]:
    """The spec's constraint values of a completing trial, from its validation metrics and, for cost metrics,
    its `extra`; InvalidInput (422) when a constraint metric is missing, naming it."""
    try:
        return constraint_violations(runtime.spec, {**body.extra, **body.validation_metrics})
    except KeyError as exc:
        metric = exc.args[0]
        msg = (f"constraint metric {metric!r} is missing or not a finite number: send it in validation_metrics "
               "(a task metric) or extra (a cost metric)")
        raise InvalidInput(msg, [{"loc": ["body", "validation_metrics", metric], "msg": msg,
                                  "type": "value_error"}]) from None


def _reason(record: Lease) -> str:
    return f" ({record.fail_reason})" if record.fail_reason else ""


def fail(backend: Backend, trial_id: int, token: str | None, body: FailIn) -> TrialOut:
    """Tell Optuna the trial failed; re-queue its parameters when retryable and attempts are left. A failure
    of the study's own kind (model, data, config) may pause the study (`pause_if_failing`)."""
    with _locked_lease(backend, trial_id, token) as (session, record, runtime):
        failed_now = record.state == "active"
        if failed_now:
            backend.storage.set_trial_user_attr(trial_id, "fail_kind", body.kind)
            _fail_and_maybe_requeue(backend, session, record, runtime, body.reason, body.retryable, "failed")
    if failed_now:
        backend.on_trial_finished("fail")
        if runtime.spec.checkpoints.keep == "final":
            delete_checkpoints(backend, trial_id)
        if not body.retryable and body.kind in STUDY_FAILURES:
            pause_if_failing(backend, runtime)
    maybe_complete(backend, runtime)
    return get_trial(backend, trial_id)


def _fail_and_maybe_requeue(backend: Backend, session: Session, record: Lease, runtime: StudyRuntime,
                            reason: str, retryable: bool, new_state: str) -> None:
    """Fail the lease's trial and, when retryable with attempts left, enqueue its parameters again.

    Safe to repeat after a fault at any point: the retry is enqueued *before* the trial is told FAIL, so
    no moment shows a failed trial without its retry (a study could be completed in between), and a trial
    that already has a retry gets no second one. A trial Optuna already holds as COMPLETE or PRUNED (told
    before a fault lost our row) keeps its result."""
    t = backend.storage.get_trial(record.trial_id)
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        record.state, record.finished_at = t.state.name.lower(), record.finished_at or utcnow()
        return
    study = session.get(StudyRow, record.study_id)
    attempts_left = record.attempt < runtime.spec.search.max_retries
    requeue = retryable and attempts_left and study is not None and study.state in ("running", "paused")
    if requeue and record.trial_id not in retried_trial_ids(runtime.study.get_trials(deepcopy=False)):
        attrs: dict[str, Any] = {"attempt": record.attempt + 1, "retry_of": record.trial_id}
        if t.user_attrs.get("is_baseline"):
            attrs["is_baseline"] = True
        runtime.study.enqueue_trial(t.params, user_attrs=attrs)
    if not t.state.is_finished():
        backend.storage.set_trial_user_attr(record.trial_id, "fail_reason", reason)
        runtime.study.tell(t.number, state=TrialState.FAIL)
    record.state, record.finished_at, record.fail_reason, record.requeued = new_state, utcnow(), reason, requeue
    backend.reports_handled.pop(record.trial_id, None)
    if requeue:
        log.warning("trial %s %s (%s); parameters re-queued, attempt %s of %s", record.trial_id, new_state, reason,
                    record.attempt + 1, runtime.spec.search.max_retries, extra=_ids(record))
    else:
        log.warning("trial %s %s: %s", record.trial_id, new_state, reason, extra=_ids(record))


def _ids(record: Lease) -> dict[str, Any]:
    """The ids a log line about a lease carries (JSON logs show them as fields; see docs/operations.md)."""
    return {"study_id": record.study_id, "trial_id": record.trial_id, "worker_id": record.worker_id or None}


# ---- reaper ----------------------------------------------------------------------------------------------

def reap_expired(backend: Backend) -> int:
    """Fail trials whose lease ran out (plus the grace period) and re-queue them; returns how many."""
    cutoff = utcnow()
    with backend.session() as session:
        rows = session.execute(sa.select(Lease.trial_id, Lease.deadline).where(Lease.state == "active")).all()
    grace = backend.settings.heartbeat_grace_seconds
    expired = [tid for tid, deadline in rows if (cutoff - aware(deadline)).total_seconds() > grace]
    reaped = 0
    for trial_id in expired:
        try:
            with _locked_lease(backend, trial_id, None, holder_only=False) as (session, record, runtime):
                late = (utcnow() - aware(record.deadline)).total_seconds()
                if record.state != "active" or late <= grace:
                    continue  # finished or heartbeated meanwhile
                reason = (f"lease expired: worker {record.worker_id} sent no heartbeat for {late:.0f} s "
                          "after its deadline")
                pausing_at = _pausing_at(session, record)
                if pausing_at is not None:
                    _pause_expired(backend, record, pausing_at, reason)
                else:
                    _fail_and_maybe_requeue(backend, session, record, runtime, reason, True, "expired")
                reaped += 1
            maybe_complete(backend, runtime)
        except NotFound:
            continue
    return reaped


def _pausing_at(session: Session, record: Lease) -> int | None:
    """The step of the trial's last report when it was answered pause (its holder died while storing the
    checkpoint); None otherwise."""
    last = session.execute(sa.select(RungReport.step, RungReport.action).where(RungReport.trial_id == record.trial_id)
                           .order_by(RungReport.step.desc()).limit(1)).first()
    return int(last[0]) if last is not None and last[1] == "pause" else None


def _pause_expired(backend: Backend, record: Lease, step: int, reason: str) -> None:
    """A holder that died between a pause answer and `pause`: the trial pauses at that rung, to be resumed from
    its previous complete checkpoint (or from the start), as the policy decides."""
    backend.storage.set_trial_user_attr(record.trial_id, "paused_at", step)
    record.state, record.paused_at, record.finished_at = "paused", step, utcnow()
    backend.reports_handled.pop(record.trial_id, None)
    log.warning("trial %s paused at %s%% (%s); it resumes from %s", record.trial_id, step, reason,
                f"its checkpoint at {record.checkpoint['step']}%" if record.checkpoint else "the start",
                extra=_ids(record))


def reap_orphans(backend: Backend) -> int:
    """Fail RUNNING trials that never got a lease row, once older than a lease plus the grace period, and
    re-queue their parameters as for an expired lease. They exist when a server process stopped between
    `ask` and writing the lease (the lease row is written after the ask lock is released). Also fails the
    queued trials of stopped studies (see service/queue.py)."""
    settings = backend.settings
    cutoff = optuna_now() - timedelta(seconds=settings.lease_seconds + settings.heartbeat_grace_seconds)
    query = unleased_running_trials(sa.select(Lease.trial_id), sa.select(StudyRow.id), cutoff)
    with backend.session() as session:
        orphans = session.execute(query).all()
    reaped = 0
    for trial_id, study_id in orphans:
        try:
            runtime = backend.runtime(study_id)
        except NotFound:
            continue
        reaped += _claim_and_requeue(backend, runtime, trial_id,
                                     "never leased: the server stopped between ask and writing the lease")
    _drain_stopped_queues(backend)  # not counted: these trials never had a worker
    return reaped


def _drain_stopped_queues(backend: Backend) -> None:
    """Fail the queued trials of stopped studies (never handed out, not re-queued).

    Safe to repeat after a fault: Optuna's FAIL comes first, and a trial already failed is only marked so in
    its row. Claims never race this: workers only lease from running studies, and a stop is final."""
    stopped = sa.select(StudyRow.id).where(StudyRow.state == "stopped")
    with backend.session() as session:
        queued = session.scalars(sa.select(Lease.trial_id).where(Lease.state == QUEUED,
                                                                 Lease.study_id.in_(stopped))).all()
    for trial_id in queued:
        with _locked_lease(backend, trial_id, None, holder_only=False) as (session, record, runtime):
            if record.state == QUEUED:
                _fail_and_maybe_requeue(backend, session, record, runtime, "the study was stopped before a "
                                        "worker leased this trial", False, "failed")


def _claim_and_requeue(backend: Backend, runtime: StudyRuntime, trial_id: int, reason: str) -> bool:
    """Fail a RUNNING trial that has no lease row and re-queue its parameters, so the budget stays exact;
    False when the trial was not running or a lease row was written for it first.

    The claim is a lease row of our own, committed before any Optuna call: a worker's lease and this claim
    cannot both win, whatever the timing. If the server stops after the claim, the claim's lease has
    already expired, and the expiry reaper finishes the job."""
    t = backend.storage.reload_trial(trial_id)
    if t.state != TrialState.RUNNING:
        return False
    attrs = t.user_attrs
    try:
        with backend.session() as session:
            session.add(Lease(trial_id=trial_id, study_id=runtime.id, worker_id="",
                              attempt=int(attrs.get("attempt", 0)), retry_of=attrs.get("retry_of"), state="active",
                              deadline=utcnow()))
    except IntegrityError:
        return False  # leased meanwhile: the trial is a worker's
    with _locked_lease(backend, trial_id, None, holder_only=False) as (session, record, _):
        if record.state == "active":
            _fail_and_maybe_requeue(backend, session, record, runtime, reason, True, "expired")
    maybe_complete(backend, runtime)
    return True

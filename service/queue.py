"""Leases from a queue: a few trials of each running study are asked ahead, so a lease is a claim, not an ask.

An ask runs the sampler (TPE: tens of milliseconds) and is serialised per study across every server process
(`Backend.ask_lock`), so when a lease asks, its latency is the ask plus the queue of leases waiting for the
same lock: seconds at 100 workers. Here a background thread in each server process asks ahead, and a lease
takes a trial that is already there.

**A queued trial** is an Optuna RUNNING trial with a lease row in state ``queued`` (no worker, no token).
Being RUNNING, it counts against the budget (`studies.usage` counts Optuna's RUNNING trials) and TPE's
constant liar sees it, so the trials of a queue are as diverse as those of concurrent asks. Having a lease
row, the orphan reaper leaves it alone, and the expiry reaper too (it only reads ``active`` rows).

**Exact across server processes.** The queue lives in the database, not in a process: a claim turns the
oldest ``queued`` row into the worker's ``active`` lease in one transaction (`SELECT ... FOR UPDATE SKIP
LOCKED`, then an update guarded by ``state = 'queued'``), so two processes never hand out the same trial,
and concurrent claims do not wait for each other. Filling holds the study's ask lock, syncs with the
database and checks the budget, as every ask does, so the queue never holds more than the budget allows.
When a server process dies, its queued trials stay queued and any other process (or its successor) hands
them out; a trial asked but not yet queued when it died is an orphan, failed and re-queued by the reaper.

**Filling.** A lease wakes this process's `QueueFiller`; once the study's queue is below half of its size
(`TUNEFLEET_LEASE_QUEUE_SIZE`, or a quarter of the study's leases in flight when more) the filler tops it
up within the budget. A lease that finds the queue empty asks on the request path, as with
`TUNEFLEET_LEASE_QUEUE_SIZE=0`; so does a lease while re-queued trials wait (an ask hands them out first,
so they jump the queue). A paused study keeps its queue; the queued trials of a stopped study are failed
by the reaper (`leases.reap_orphans`), never handed out. Studies with a device-hour budget have no queue
(see `queue_size`).
"""

from __future__ import annotations

import logging
import math
import threading
from datetime import datetime, timezone
from typing import Any

import optuna
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tunefleet.service.backend import Backend, StudyRuntime
from tunefleet.service.errors import NotFound
from tunefleet.service.spec import StudySpec
from tunefleet.service.storage import trial_storage_id
from tunefleet.service.studies import Usage, usage
from tunefleet.service.tables import Lease, utcnow
from tunefleet.service.tables import Study as StudyRow

__all__ = ["QUEUED", "QueueFiller", "claim", "depth", "fill", "queue_size", "wake"]

log = logging.getLogger(__name__)
QUEUED = "queued"
# A queued trial has no deadline (the column is required; only active leases expire).
NO_DEADLINE = datetime(9999, 1, 1, tzinfo=timezone.utc)
_IN_FLIGHT_SHARE = 4  # a queue holds at least a quarter of the study's trials in flight
_BATCH = 4  # asks per hold of the ask lock
_START_LOCK = threading.Lock()


def claim(session: Session, study_id: int, values: dict[str, Any]) -> Lease | None:
    """The oldest queued trial of the study, made an active lease with `values` (worker, token hash,
    deadline ...) in `session`; None when the queue is empty. Raises IntegrityError when the worker's
    `request_id` was used meanwhile (the caller's rollback leaves the trial queued)."""
    oldest = (sa.select(Lease.trial_id).where(Lease.study_id == study_id, Lease.state == QUEUED)
              .order_by(Lease.trial_id).limit(1).with_for_update(skip_locked=True))
    for _ in range(3):  # another claim took the row between the select and the update (SQLite: no row locks)
        trial_id = session.scalar(oldest)
        if trial_id is None:
            return None
        taken = session.scalar(sa.update(Lease).where(Lease.trial_id == trial_id, Lease.state == QUEUED)
                               .values(state="active", started_at=utcnow(), **values).returning(Lease.trial_id))
        if taken is not None:
            return session.get(Lease, trial_id, populate_existing=True)
    return None


def depth(backend: Backend, study_id: int) -> tuple[int, int]:
    """How many trials of the study are queued, and how many are leased to workers, across every server
    process."""
    with backend.session() as session:
        counts = dict(session.execute(sa.select(Lease.state, sa.func.count()).where(
            Lease.study_id == study_id, Lease.state.in_((QUEUED, "active"))).group_by(Lease.state)).all())
    return counts.get(QUEUED, 0), counts.get("active", 0)


def queue_size(backend: Backend, spec: StudySpec, in_flight: int = 0) -> int:
    """How many trials of a study are asked ahead: `TUNEFLEET_LEASE_QUEUE_SIZE`, or a quarter of its trials
    in flight when more (workers that start or finish together then rarely find it empty). None under a
    device-hour budget: time spent after a trial was queued could exhaust it, and a queued trial would then
    be handed out past the budget."""
    size = backend.settings.lease_queue_size
    if size == 0 or spec.budget.max_gpu_hours is not None:
        return 0
    return max(size, math.ceil(in_flight / _IN_FLIGHT_SHARE))


def wake(backend: Backend, runtime: StudyRuntime) -> None:
    """Ask this process's filler to top the study's queue up (starting the filler on first use)."""
    if queue_size(backend, runtime.spec) == 0:
        return
    with _START_LOCK:
        if backend.queue_filler is None:
            backend.queue_filler = QueueFiller(backend)
            backend.queue_filler.start()
    backend.queue_filler.wake(runtime.id)


def fill(backend: Backend, runtime: StudyRuntime) -> int:
    """Top the study's queue up to its size (`queue_size`) once fewer than half are left, within the budget;
    returns how many trials were queued. Asks `_BATCH` at a time, so lease requests waiting for the ask lock
    (an empty queue) get their turn in between."""
    queued, in_flight = depth(backend, runtime.id)
    target = queue_size(backend, runtime.spec, in_flight)
    if queued >= (target + 1) // 2:
        return 0
    added = 0
    while queued < target:
        with backend.ask_lock(runtime):
            queued, _ = depth(backend, runtime.id)  # again: another process may have filled it meanwhile
            backend.storage.sync(runtime.id)  # trials other server processes created or finished
            with backend.session() as session:
                row = session.get(StudyRow, runtime.id)
                if row is None or row.state != "running":
                    return added
                asks = min(target - queued, _BATCH, _slots(usage(session, runtime), runtime.spec))
            if asks <= 0:
                return added
            for _ in range(asks):
                with backend.storage.batched_ask():
                    trial = runtime.study.ask(runtime.distributions)
                added += _enqueue(backend, runtime, trial)
            queued += asks
    return added


def _slots(use: Usage, spec: StudySpec) -> int:
    """How many trials may still be asked (as many asks as `Usage.has_room` would allow one by one): the
    budget left, which already holds a place for each re-queued trial (its failed original is not counted),
    or the re-queued trials alone when nothing else is left; within the concurrency limit (queued trials
    are running ones)."""
    if not use.has_room(spec):
        return 0
    budget = spec.budget
    slots = max(budget.max_trials - use.used, use.waiting)
    if budget.max_concurrent_trials is not None:
        slots = min(slots, budget.max_concurrent_trials - use.running)
    return slots


def _enqueue(backend: Backend, runtime: StudyRuntime, trial: optuna.Trial) -> int:
    """Write the queued lease row of a trial just asked; 0 when the orphan reaper claimed it first (it then
    fails and re-queues it). If the write fails otherwise, the trial is an orphan: the reaper handles it."""
    attrs = trial.user_attrs
    try:
        with backend.session() as session:
            session.add(Lease(trial_id=trial_storage_id(trial), study_id=runtime.id, worker_id="", state=QUEUED,
                              attempt=int(attrs.get("attempt", 0)), retry_of=attrs.get("retry_of"),
                              deadline=NO_DEADLINE))
    except IntegrityError:
        return 0
    return 1


class QueueFiller(threading.Thread):
    """One per server process: fills the queues of the studies a lease woke it for, one study at a time,
    off the request path."""

    def __init__(self, backend: Backend):
        super().__init__(name="tunefleet-queue-filler", daemon=True)
        self.backend = backend
        self._wanted: set[int] = set()
        self._changed = threading.Condition()
        self._stopped = False

    def wake(self, study_id: int) -> None:
        with self._changed:
            self._wanted.add(study_id)
            self._changed.notify()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()
        self.join(timeout=30)

    def run(self) -> None:
        while True:
            with self._changed:
                while not self._wanted and not self._stopped:
                    self._changed.wait()
                if self._stopped:
                    return
                wanted, self._wanted = self._wanted, set()
            for study_id in sorted(wanted):
                try:
                    fill(self.backend, self.backend.runtime(study_id))
                except NotFound:
                    continue  # deleted meanwhile
                except Exception:  # a database blip: the next lease wakes us again
                    log.exception("filling the lease queue of study %s failed", study_id)

"""What every request needs, built once per server process: settings, sessions, the Optuna storage,
one Optuna ``Study`` per active study, and the locks that serialise work per study and per trial.

``ServerStorage`` keeps every trial of a loaded study in memory (running ones written through to the
database), so one storage object and one ``Study`` per study for the life of the process means a request
never reloads a study's trials. TPE and GP samplers of single-objective studies read a bounded history
(`BoundedHistorySampler`), so one ask does not grow with the study.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution
from sqlalchemy.orm import Session, sessionmaker

from tunefleet.service.config import Settings
from tunefleet.service.db import engine_kwargs, make_engine, transaction
from tunefleet.service.errors import NotFound
from tunefleet.service.search import GP_SAMPLERS, build_pruner, build_sampler, distributions
from tunefleet.service.spec import StudySpec
from tunefleet.service.storage import (
    BoundedHistorySampler,
    PriorTrialsSampler,
    ServerStorage,
    one_thread_for_gp,
    prior_trials,
)
from tunefleet.service.stores import Store, open_store
from tunefleet.service.tables import Lease
from tunefleet.service.tables import Study as StudyRow

# Samplers whose proposals read the study's completed trials, so a warm start's earlier trials inform them.
WARM_START_SAMPLERS = ("tpe", "gp")

if TYPE_CHECKING:
    from tunefleet.service.queue import QueueFiller

__all__ = ["Backend", "StudyRuntime"]

log = logging.getLogger(__name__)
_ADVISORY_NAMESPACE = 0x7466  # "tf": first key of pg_advisory_lock(int, int)
_TRIAL_LOCK_STRIPES = 256
# GPSampler changes process-wide torch thread settings while it optimises, and its asks run with one torch
# thread (`one_thread_for_gp`): one GP ask at a time.
_GP_LOCK = threading.Lock()


def _ignore(_state: str) -> None:
    pass


class PrincipalCache:
    """Who a bearer token is, remembered for `ttl` seconds so the workers' hot path skips a database lookup
    per call. Revoking through this server clears it at once; another replica notices within `ttl`."""

    def __init__(self, ttl: float = 10.0):
        self.ttl = ttl
        self._entries: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def get(self, header: str | None) -> Any:
        if not header:
            return None
        with self._lock:
            entry = self._entries.get(header)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, header: str | None, principal: object) -> None:
        if header:
            with self._lock:
                self._entries[header] = (time.monotonic() + self.ttl, principal)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


@dataclass
class StudyRuntime:
    """An active study's Optuna objects; ``lock`` serialises ``ask`` for it inside this process."""

    id: int
    name: str
    spec: StudySpec
    study: optuna.Study
    distributions: dict[str, BaseDistribution]
    rungs: list[int]
    lock: threading.Lock


class Backend:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = settings.resolved_database_url
        self.engine = make_engine(self.url, settings)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self.rdb = optuna.storages.RDBStorage(self.url, engine_kwargs=engine_kwargs(self.url, settings),
                                              skip_table_creation=True, skip_compatibility_check=True)
        self.storage = ServerStorage(self.rdb, refresh_seconds=settings.trial_cache_seconds)
        # Artifacts, checkpoints, data sets and models (service/stores.py).
        self.store: Store = open_store(settings)
        self._runtimes: dict[int, StudyRuntime] = {}
        self._runtimes_lock = threading.Lock()
        self._trial_locks = [threading.Lock() for _ in range(_TRIAL_LOCK_STRIPES)]
        self.principals = PrincipalCache()
        # trial id -> number of its reports this process has seen: a report that finds more in the database
        # knows another server process handled some, and re-reads the trial (see leases.report).
        self.reports_handled: dict[int, int] = {}
        # Called once for each trial this process moves to a final state ("pruned", ...), after the commit;
        # the API layer sets it to count them into Prometheus (the domain layer knows no metrics).
        self.on_trial_finished: Callable[[str], None] = _ignore
        # The thread that keeps lease queues filled, started by the first lease (see service/queue.py).
        self.queue_filler: QueueFiller | None = None

    def session(self) -> contextlib.AbstractContextManager[Session]:
        return transaction(self.sessions)

    def runtime(self, study_id: int) -> StudyRuntime:
        """The study's Optuna objects, loaded once; raises NotFound."""
        runtime = self._runtimes.get(study_id)
        if runtime is not None:
            return runtime
        with self._runtimes_lock:
            runtime = self._runtimes.get(study_id)
            if runtime is None:
                with self.session() as session:
                    row = session.get(StudyRow, study_id)
                    if row is None:
                        raise NotFound(f"study {study_id} does not exist: `tunefleet study ls` lists studies")
                    name, raw_spec = row.name, row.spec
                runtime = self._load(study_id, name, StudySpec.model_validate(raw_spec))
                self._runtimes[study_id] = runtime
        return runtime

    def _load(self, study_id: int, name: str, spec: StudySpec) -> StudyRuntime:
        study = optuna.load_study(study_name=name, storage=self.storage, sampler=self._sampler(spec),
                                  pruner=build_pruner(spec))
        return StudyRuntime(study_id, name, spec, study, distributions(spec), spec.rungs(), threading.Lock())

    def _sampler(self, spec: StudySpec) -> optuna.samplers.BaseSampler:
        """The spec's sampler; TPE and GP of a single objective over a bounded history of the study, and
        reading the earlier study's trials too when the spec warm-starts from one (`PriorTrialsSampler`)."""
        sampler = build_sampler(spec)
        if spec.warm_start is not None and spec.search.sampler in WARM_START_SAMPLERS and not spec.multi_objective:
            sampler = PriorTrialsSampler(sampler, lambda: self._warm_start_priors(spec))
        best, recent = self.settings.sampler_best_trials, self.settings.sampler_recent_trials
        if spec.search.sampler not in ("tpe", "gp") or spec.multi_objective or not (best or recent):
            return sampler
        return BoundedHistorySampler(sampler, best, recent)

    def _warm_start_priors(self, spec: StudySpec) -> list[optuna.trial.FrozenTrial]:
        """The completed, feasible trials of the study `spec` warm-starts from, in `spec`'s search space; none
        when it is gone or optimises another metric or direction (its values would mislead the sampler)."""
        assert spec.warm_start is not None
        name = spec.warm_start.study
        with self.session() as session:
            raw = session.scalar(sa.select(StudyRow.spec).where(StudyRow.name == name))
        if raw is None:
            return []
        earlier = StudySpec.model_validate(raw)
        mine, theirs = spec.objectives[0], earlier.objectives[0]
        if earlier.multi_objective or (mine.metric, mine.direction) != (theirs.metric, theirs.direction):
            log.info("warm start from %s: it optimises another objective; only its enqueued configurations "
                     "carry over", name)
            return []
        study_id = self.storage.get_study_id_from_name(name)
        trials = self.storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        feasible = [t for t in trials if all(v <= 0.0 for v in t.constraints.values())]
        return prior_trials(feasible, distributions(spec))

    def forget(self, study_id: int) -> None:
        with self._runtimes_lock:
            self._runtimes.pop(study_id, None)

    @contextlib.contextmanager
    def ask_lock(self, runtime: StudyRuntime) -> Iterator[None]:
        """Serialise `ask` for one study: a thread lock here, plus an advisory lock across server replicas
        on PostgreSQL, so two replicas never hand out the same trial or interleave sampler state."""
        gp = runtime.spec.search.sampler in GP_SAMPLERS
        with runtime.lock, (_GP_LOCK if gp else contextlib.nullcontext()), \
                (one_thread_for_gp() if gp else contextlib.nullcontext()):
            if not self.is_postgres:
                yield
                return
            with self.engine.connect() as conn:
                key = {"ns": _ADVISORY_NAMESPACE, "id": runtime.id}
                conn.execute(sa.text("SELECT pg_advisory_lock(:ns, :id)"), key)
                try:
                    yield
                finally:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:ns, :id)"), key)
                    conn.commit()

    def active_leases(self) -> int:
        """How many leases are active (trials handed to a worker and not finished), across every server
        process: counted in the database."""
        with self.session() as session:
            return session.scalar(sa.select(sa.func.count()).select_from(Lease).where(Lease.state == "active")) or 0

    def trial_lock(self, trial_id: int) -> threading.Lock:
        """A process-local lock for state changes of one trial (rows are also locked FOR UPDATE on PostgreSQL)."""
        return self._trial_locks[trial_id % _TRIAL_LOCK_STRIPES]

    def close(self) -> None:
        if self.queue_filler is not None:
            self.queue_filler.stop()
        self.rdb.remove_session()
        self.rdb.engine.dispose()
        self.engine.dispose()

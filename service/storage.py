"""The server's Optuna storage: Optuna's own `_CachedStorage`, extended to serve running trials from memory.

Optuna's cache keeps finished trials (they never change) and re-reads every unfinished trial from the
database on each `get_all_trials`, and every unfinished trial on each `get_trial`. In a server, every
report (Hyperband reads the study) and every ask (TPE with constant_liar reads running trials) would then
reload all running trials: with 100 workers, 100 trials per call, for each of the ~7 calls of a trial.

Here the server keeps its own copy of running trials as well:

- Writes go to the database first. Only after a write commits is the in-memory copy updated (a new
  `FrozenTrial` object, so a sampler iterating an earlier list never sees it change). Nothing is durable
  only in memory. On PostgreSQL and SQLite each write is one statement (see "writes in one statement"
  below) where RDBStorage spends an ORM session and three or four; other databases use Optuna's code.
- Reads come from memory. The running trials are re-read from the database when the copy is older than
  `refresh_seconds`, which only matters for writes made by someone else: another server process or
  replica, or a script using Optuna on the same database. With one server process, memory and database
  never differ.
- Before each ask, `sync` reads the ids and states of running, waiting and new trials (one light query)
  and loads those that changed, so the queue and the budget are exact across server processes. Only
  other processes' intermediate values of *other* trials may lag (the pruner's view of a rung); a report
  re-reads its own trial when another process took one of its earlier reports (`leases.report`).

## What a model-based sampler reads: a bounded history
TPE and GP read every trial of the study on each ask, so one ask grows with the study (TPE: ~25 ms empty,
~50 ms at 5,000 finished trials; GP: cubic). `BoundedHistorySampler` wraps such a sampler: while it runs,
`get_all_trials` of that study answers with the unfinished trials (constant liar needs every running one)
plus a bounded set of finished ones, the `best` best complete trials and the `recent` most recently
finished. `_History` keeps that set up to date as trials finish, touching only trials that changed since
the last ask, so an ask costs the same at 500 and at 50,000 finished trials. The rest of the server
(budget, views, pruners) reads the whole study as before.

## Optuna's private internals: every use is in this module
`optuna==5.0.0` is pinned because of them. No other tunefleet module imports an `optuna.*._*` name or
reads a private attribute of an Optuna object (a test checks it); they go through the helpers here.

- `optuna.storages._cached_storage._CachedStorage` and its state (`_studies`, `_StudyInfo`, `_lock`,
  `_trial_id_to_study_id_and_number`, `_backend`, `_add_trials_to_cache`,
  `_read_trials_from_remote_storage`): the base of `ServerStorage`, the cache Optuna itself uses.
- `RDBStorage._get_trials`: reads only the trials that changed, in `sync`.
- `optuna.storages._rdb.models` (`StudyModel`, `TrialModel`, the param, value, intermediate value and
  attribute models) and their `*_to_stored_repr` helpers: the tables written in one statement below, and
  the raw queries of `unleased_running_trials` and `study_id_of_trial`.
- The write semantics of `RDBStorage` re-implemented in SQL: trial numbering (count of the study's
  earlier trials, under the study row lock), naive local datetimes (`optuna_now`), rows written only
  while a trial is RUNNING or WAITING.
- `FrozenTrial._trial_id` and its private dicts (`trial_storage_id`, `_detached`), `Study._study_id`
  (`study_storage_id`): Optuna has no public accessor for the storage ids.
- `optuna._typing.JSONSerializable`: the type of system attributes.
- `OPTUNA_VERSION_TABLE` (`version_info`): the table whose presence means Optuna's schema exists.
- `optuna._gp.thread_limiting.limit_threads_in_optimization` (`one_thread_for_gp`): torch's intra-op threads
  set to 1, which Optuna applies only inside its GP fit and acquisition optimiser; the server applies it to
  the whole GP ask (the server itself never imports torch).
- `HyperbandPruner`'s bracket view of a study (`_BracketStudy._study`, `whole_study`): a sampler that models
  the whole study across fidelities (service/multifidelity.py) reads every bracket's trials.

`tests/test_storage.py` checks the writes here against RDBStorage's own reads (a differential test).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import heapq
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
import sqlalchemy as sa
from optuna import distributions
from optuna._gp.thread_limiting import limit_threads_in_optimization
from optuna._typing import JSONSerializable
from optuna.samplers import BaseSampler
from optuna.storages import RDBStorage
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._rdb.models import (
    StudyModel,
    TrialIntermediateValueModel,
    TrialModel,
    TrialParamModel,
    TrialSystemAttributeModel,
    TrialUserAttributeModel,
    TrialValueModel,
)
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.dialects import postgresql, sqlite

__all__ = ["OPTUNA_VERSION_TABLE", "BoundedHistorySampler", "PriorTrialsSampler", "prior_trials",
           "ServerStorage", "one_thread_for_gp", "optuna_now",
           "study_id_of_trial", "study_storage_id", "trial_storage_id", "unleased_running_trials", "whole_study"]

OPTUNA_VERSION_TABLE = "version_info"

_TRIALS = TrialModel.__table__
_STUDIES = StudyModel.__table__
_UPDATABLE = (TrialState.RUNNING, TrialState.WAITING)
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _state(value: Any) -> TrialState:
    return value if isinstance(value, TrialState) else TrialState[str(value)]


def one_thread_for_gp() -> contextlib.AbstractContextManager[None]:
    """Torch's intra-op threads (and OpenBLAS's) set to 1 until the block ends, then restored: wrap a whole
    `GPSampler` ask in it. Optuna limits threads only inside its GP fit and acquisition optimiser; the rest of
    the ask ran with torch's default threads competing with NumPy's, and on 2 shared cores a 100-trial GP study
    took over 10 minutes instead of 15-40 s. The setting is process-wide: hold one lock over every GP ask."""
    return limit_threads_in_optimization()


def whole_study(study: optuna.Study) -> optuna.Study:
    """The study a sampler was asked for: under `HyperbandPruner`, Optuna hands samplers a view holding only
    the asking trial's bracket; this returns the study behind it (any other study as it is)."""
    inner = getattr(study, "_study", None)
    return inner if isinstance(inner, optuna.Study) else study


def trial_storage_id(trial: FrozenTrial | optuna.Trial) -> int:
    """The storage id of a trial (Optuna exposes only its per-study `number`)."""
    return trial._trial_id


def study_storage_id(study: optuna.Study) -> int:
    """The storage id of a study."""
    return study._study_id


def study_id_of_trial(engine: sa.Engine, trial_id: int) -> int | None:
    """The id of the study holding a trial, read from Optuna's table (waiting trials have no lease row)."""
    with engine.connect() as conn:
        found = conn.scalar(sa.select(_TRIALS.c.study_id).where(_TRIALS.c.trial_id == trial_id))
    return None if found is None else int(found)


def optuna_now() -> datetime:
    """Now, as Optuna stores datetimes: naive local time."""
    return datetime.now()


def unleased_running_trials(leased: sa.Select[Any], studies: sa.Select[Any],
                            started_before: datetime) -> sa.Select[Any]:
    """A query of (trial_id, study_id) of the RUNNING trials of `studies` (a query of study ids) that started
    before `started_before` (see `optuna_now`) and whose id is not in `leased` (a query of trial ids)."""
    return (sa.select(_TRIALS.c.trial_id, _TRIALS.c.study_id)
            .where(_TRIALS.c.state == TrialState.RUNNING, _TRIALS.c.trial_id.not_in(leased),
                   _TRIALS.c.datetime_start < started_before, _TRIALS.c.study_id.in_(studies)))


def _detached(trial: FrozenTrial) -> FrozenTrial:
    """A copy whose dicts the caller may change (Optuna's `Trial` updates its snapshot in place)."""
    clone = copy.copy(trial)
    clone._params = dict(trial._params)
    clone._distributions = dict(trial._distributions)
    clone._user_attrs = dict(trial._user_attrs)
    clone._system_attrs = dict(trial._system_attrs)
    clone.intermediate_values = dict(trial.intermediate_values)
    return clone


class _History:
    """The finished trials of one single-objective study that a bounded sampler reads: the `best` best
    complete ones and the `recent` most recently finished (any state), plus every unfinished trial.

    Kept up to date by `advance`, which looks only at trials that are new or were unfinished last time:
    finished trials never change, so nothing else needs a second look. Guarded by the storage's lock."""

    def __init__(self, best: int, recent: int, maximize: bool):
        self.best, self.maximize = best, maximize
        self._next_number = 0  # every trial numbered below this one was seen
        self._unfinished: set[int] = set()  # numbers
        self._best: list[tuple[float, int]] = []  # min-heap of (score, number): the worst of the best on top
        self._recent: deque[int] = deque(maxlen=recent)

    def advance(self, trials: dict[int, FrozenTrial]) -> None:
        for number in [n for n in self._unfinished if trials[n].state.is_finished()]:
            self._unfinished.discard(number)
            self._add(trials[number])
        while self._next_number in trials:  # numbers are dense; a gap is filled by the next read
            trial = trials[self._next_number]
            if trial.state.is_finished():
                self._add(trial)
            else:
                self._unfinished.add(trial.number)
            self._next_number += 1

    def _add(self, trial: FrozenTrial) -> None:
        self._recent.append(trial.number)
        if trial.state != TrialState.COMPLETE or trial.values is None or not self.best:
            return
        score = trial.values[0] if self.maximize else -trial.values[0]
        if len(self._best) < self.best:
            heapq.heappush(self._best, (score, trial.number))
        else:
            heapq.heappushpop(self._best, (score, trial.number))

    def numbers(self) -> list[int]:
        """The numbers of the trials the sampler sees, in order (samplers rely on it)."""
        return sorted({n for _, n in self._best} | set(self._recent) | self._unfinished)


class BoundedHistorySampler(BaseSampler):
    """A sampler that reads a bounded history of its study: every unfinished trial, the `best` best complete
    trials and the `recent` most recently finished ones (see the module docstring). Every other call goes
    to the wrapped sampler unchanged. (GP asks run with one thread anyway: `one_thread_for_gp`, applied by
    `Backend.ask_lock`.)

    Single-objective studies only: "best" needs one objective. Other storages than `ServerStorage` (a
    script's) read the whole study."""

    def __init__(self, sampler: BaseSampler, best: int, recent: int):
        self.sampler, self.best, self.recent = sampler, best, recent
        self._history: _History | None = None

    def __str__(self) -> str:
        return f"BoundedHistorySampler({self.sampler}, best={self.best}, recent={self.recent})"

    @contextlib.contextmanager
    def _bounded(self, study: Study) -> Iterator[None]:
        storage = study._storage
        if self._history is None:
            self._history = _History(self.best, self.recent, study.direction == StudyDirection.MAXIMIZE)
        reads = (storage.bounded_reads(study._study_id, self._history) if isinstance(storage, ServerStorage)
                 else contextlib.nullcontext())
        with reads:
            yield

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        with self._bounded(study):
            return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        with self._bounded(study):
            return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: distributions.BaseDistribution) -> Any:
        with self._bounded(study):
            return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        with self._bounded(study):
            self.sampler.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        with self._bounded(study):
            self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


@dataclass
class _Batch:
    trials: set[int] = field(default_factory=set)
    rows: list[tuple[Any, dict[str, Any], tuple[str, ...] | None]] = field(default_factory=list)


class ServerStorage(_CachedStorage):
    """`_CachedStorage` that also keeps unfinished trials in memory, written through to the database."""

    def __init__(self, backend: RDBStorage, refresh_seconds: float = 1.0):
        super().__init__(backend)
        self.refresh_seconds = refresh_seconds
        self._read_at: dict[int, float] = {}  # study id -> time.monotonic() of its last database read
        self._refresh_locks: dict[int, threading.Lock] = {}
        self._ids_by_name: dict[str, int] = {}
        dialect = backend.engine.dialect.name
        self._fast = dialect in ("postgresql", "sqlite")
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self._local = threading.local()
        # Trials of an open `batched_ask`: memory is ahead of the database for them until the batch is
        # written, so no database read may replace their copy in memory (guarded by `self._lock`).
        self._pending: set[int] = set()

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._refresh_locks = {}
        self._local = threading.local()
        self._pending = set()

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("_local", None)
        return state

    @contextlib.contextmanager
    def batched_ask(self) -> Iterator[None]:
        """Around one `study.ask`: the parameters and attributes of the trial it creates are written in one
        transaction when the block ends, instead of one per value (five for four parameters and TPE's
        constant-liar note). The trial row itself is committed first, as always. Memory has the values at
        once; the database has them before the block returns, so before a worker hears of the trial. If
        the block fails, the trial is re-read from the database (a trial without parameters and without a
        lease is later failed by the reaper)."""
        batch = _Batch()
        self._local.batch = batch
        try:
            yield
            self._local.batch = None
            if batch.rows:
                self._flush(batch)
        except BaseException:
            self._release(batch)
            for trial_id in batch.trials:  # memory back to what the database holds
                self._forget_reads_of(trial_id)
                with contextlib.suppress(Exception):
                    self._read_trial(trial_id)
            raise
        finally:
            self._local.batch = None
            self._release(batch)

    def _release(self, batch: _Batch) -> None:
        with self._lock:
            self._pending -= batch.trials

    def _flush(self, batch: _Batch) -> None:
        with self._backend.engine.begin() as conn:  # one statement per row, one commit
            for table, row, conflict in batch.rows:
                conn.execute(self._upsert_statement(table, tuple(row), conflict), row)

    # ---- reads ---------------------------------------------------------------------------------------

    def get_study_id_from_name(self, study_name: str) -> int:
        # Hyperband builds a study object per prune call, and a study object looks its id up by name.
        study_id = self._ids_by_name.get(study_name)
        if study_id is None:
            study_id = self._ids_by_name[study_name] = super().get_study_id_from_name(study_name)
        return study_id

    def _fresh(self, study_id: int) -> bool:
        read_at = self._read_at.get(study_id)
        return read_at is not None and time.monotonic() - read_at < self.refresh_seconds

    def refresh(self, study_id: int) -> None:
        """Re-read the study's unfinished and new trials from the database (one reader per study at a time;
        a caller that waited for another's read uses it)."""
        lock = self._refresh_locks.setdefault(study_id, threading.Lock())
        requested = time.monotonic()
        with lock:
            if self._read_at.get(study_id, -1.0) >= requested:
                return
            started = time.monotonic()
            self._read_trials_from_remote_storage(study_id)
            self._read_at[study_id] = started

    def sync(self, study_id: int) -> int:
        """Bring memory up to date with trials someone else created or moved to another state (another
        server process or replica, a script), with one light query: the ids and states of the study's
        running and waiting trials and of trials newer than any in memory. Only trials that differ are read
        in full. Called under the ask lock, so the queue and the budget are exact across server processes.
        Returns how many trials were read; -1 when the study was not loaded yet and was read whole."""
        if study_id not in self._read_at:
            self.refresh(study_id)
            return -1
        with self._lock:
            trials = self._studies[study_id].trials
            states = {t._trial_id: t.state for t in trials.values()}
        newest = max(states, default=-1)
        query = sa.select(_TRIALS.c.trial_id, _TRIALS.c.state).where(
            _TRIALS.c.study_id == study_id, sa.or_(_TRIALS.c.state.in_(_UPDATABLE), _TRIALS.c.trial_id > newest))
        with self._backend.engine.connect() as conn:
            in_database = {trial_id: _state(state) for trial_id, state in conn.execute(query)}
        unfinished_here = {i for i, state in states.items() if not state.is_finished()}
        changed = {i for i, state in in_database.items() if states.get(i) != state}
        changed |= unfinished_here - set(in_database)  # finished by someone else
        if changed:
            with self._lock:  # read and install under the lock, so no write lands between them
                for trial in self._backend._get_trials(study_id, None, changed, 2**62):
                    self._trial_id_to_study_id_and_number[trial._trial_id] = (study_id, trial.number)
                    self._study_id_and_number_to_trial_id[(study_id, trial.number)] = trial._trial_id
                    self._install_locked(trial)
        return len(changed)

    def reload_trial(self, trial_id: int) -> FrozenTrial:
        """Read one trial from the database into memory, for a caller that knows another process wrote it."""
        return self._read_trial(trial_id)

    @contextlib.contextmanager
    def bounded_reads(self, study_id: int, history: _History) -> Iterator[None]:
        """Inside the block, this thread's `get_all_trials` of the study answers from `history` (a
        bounded sampler's view, see `BoundedHistorySampler`)."""
        outer = getattr(self._local, "history", None)
        self._local.history = (study_id, history)
        try:
            yield
        finally:
            self._local.history = outer

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if not self._fresh(study_id):
            self.refresh(study_id)
        bounded = getattr(self._local, "history", None)
        with self._lock:
            study = self._studies[study_id]
            if bounded is not None and bounded[0] == study_id:
                bounded[1].advance(study.trials)
                candidates = [study.trials[n] for n in bounded[1].numbers()]
            elif states is not None and not any(s in states for s in _FINISHED):
                # Waiting or running trials only (every ask looks for waiting ones): no need to scan the study.
                located = (self._trial_id_to_study_id_and_number[i] for i in study.unfinished_trial_ids)
                candidates = sorted((study.trials[n] for _, n in located), key=lambda t: t.number)
            else:
                candidates = sorted(study.trials.values(), key=lambda t: t.number)  # samplers rely on the order
            selected = [t for t in candidates if states is None or t.state in states]
            return copy.deepcopy(selected) if deepcopy else selected

    def trial_count(self, study_id: int) -> int:
        """How many trials of the study are in memory (all of them once it was read)."""
        if not self._fresh(study_id):
            self.refresh(study_id)
        with self._lock:
            return len(self._studies[study_id].trials)

    def trials_by_number(self, study_id: int, numbers: range) -> list[FrozenTrial]:
        """The study's trials with these numbers, in order (a page of a trial list, without the rest)."""
        if not self._fresh(study_id):
            self.refresh(study_id)
        with self._lock:
            trials = self._studies[study_id].trials
            return [trials[n] for n in numbers if n in trials]

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            located = self._trial_id_to_study_id_and_number.get(trial_id)
            if located is not None:
                study_id, number = located
                trial = self._studies[study_id].trials[number]
                if trial.state.is_finished():
                    return trial
                if self._fresh(study_id):
                    return _detached(trial)
        trial = self._read_trial(trial_id)
        return _detached(trial) if not trial.state.is_finished() else trial

    # ---- writes: the database first, then the copy in memory -------------------------------------------

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is not None or not self._fast:  # enqueue_trial and add_trial: Optuna's code
            trial_id = super().create_new_trial(study_id, template_trial)
        else:
            trial = self._create_running_trial(study_id)
            trial_id = trial._trial_id
            batch = getattr(self._local, "batch", None)
            with self._lock:
                self._studies.setdefault(study_id, _StudyInfo())
                self._add_trials_to_cache(study_id, [trial])
                if batch is not None:
                    batch.trials.add(trial_id)
                    self._pending.add(trial_id)
        with self._lock:
            study = self._studies[study_id]
            if not study.trials[self._trial_id_to_study_id_and_number[trial_id][1]].state.is_finished():
                study.unfinished_trial_ids.add(trial_id)
        return trial_id

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: distributions.BaseDistribution) -> None:
        external = distribution.to_external_repr(param_value_internal)

        def change(t: FrozenTrial) -> None:
            t._params = {**t._params, param_name: external}
            t._distributions = {**t._distributions, param_name: distribution}

        located = self._trial_id_to_study_id_and_number.get(trial_id)
        known = self._studies[located[0]].param_distribution.get(param_name) if located else None
        if known is None:  # the first value of this parameter: Optuna checks it against the study's past
            self._write(trial_id, change, super().set_trial_param, trial_id, param_name, param_value_internal,
                        distribution)
            return
        distributions.check_distribution_compatibility(known, distribution)
        row = {"trial_id": trial_id, "param_name": param_name, "param_value": param_value_internal,
               "distribution_json": distributions.distribution_to_json(distribution)}
        self._write(trial_id, change, self._insert_or_fallback, TrialParamModel, row, None,
                    super().set_trial_param, trial_id, param_name, param_value_internal, distribution)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        def change(t: FrozenTrial) -> None:
            t.intermediate_values = {**t.intermediate_values, step: intermediate_value}

        stored, kind = TrialIntermediateValueModel.intermediate_value_to_stored_repr(intermediate_value)
        row = {"trial_id": trial_id, "step": step, "intermediate_value": stored, "intermediate_value_type": kind}
        self._write(trial_id, change, self._insert_or_fallback, TrialIntermediateValueModel, row, ("trial_id", "step"),
                    super().set_trial_intermediate_value, trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._set_attr(TrialUserAttributeModel, "_user_attrs", super().set_trial_user_attr, trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: JSONSerializable) -> None:
        self._set_attr(TrialSystemAttributeModel, "_system_attrs", super().set_trial_system_attr, trial_id, key, value)

    def _set_attr(self, model: Any, field_name: str, fallback: Callable[..., None], trial_id: int, key: str,
                  value: Any) -> None:
        def change(t: FrozenTrial) -> None:
            setattr(t, field_name, {**getattr(t, field_name), key: value})

        row = {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
        self._write(trial_id, change, self._insert_or_fallback, model, row, ("trial_id", "key"),
                    fallback, trial_id, key, value)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        try:
            now = self._set_state_fast(trial_id, state, values) if self._fast else None
            if now is None:  # not a running/waiting trial (or another database): Optuna answers
                changed = super().set_trial_state_values(trial_id, state, values)
                self._install_from_database(trial_id)
                return changed
        except BaseException:
            self._forget_reads_of(trial_id)  # e.g. another process finished it: read the database next time
            raise

        def change(t: FrozenTrial) -> None:
            t.state = state
            if state == TrialState.RUNNING:
                t.datetime_start = now
            if state.is_finished():
                t.datetime_complete = now
            if values is not None:
                t.values = list(values)

        self._patch(trial_id, change)
        return True

    def delete_study(self, study_id: int) -> None:
        super().delete_study(study_id)
        self._ids_by_name = {name: i for name, i in self._ids_by_name.items() if i != study_id}
        self._read_at.pop(study_id, None)
        self._refresh_locks.pop(study_id, None)

    # ---- the copy in memory --------------------------------------------------------------------------

    def _write(self, trial_id: int, change: Callable[[FrozenTrial], None], write: Callable[..., None],
               *args: Any) -> None:
        """Run a database write, then apply `change` to the copy in memory. If the write fails, it may still
        have committed: the study's next read goes to the database."""
        try:
            write(*args)
        except BaseException:
            self._forget_reads_of(trial_id)
            raise
        self._patch(trial_id, change)

    # ---- writes in one statement ---------------------------------------------------------------------
    # Optuna's RDBStorage spends an ORM session and three to four statements on each write. These do the
    # same in one statement and one commit, on PostgreSQL and SQLite (elsewhere Optuna's own code runs). A
    # row is only written while its trial is RUNNING or WAITING; when nothing was written (a finished or
    # unknown trial), Optuna's code runs instead and raises its usual error.

    def _insert_or_fallback(self, model: Any, row: dict[str, Any], conflict: tuple[str, ...] | None,
                            fallback: Callable[..., None], *args: Any) -> None:
        if not self._fast:
            fallback(*args)
            return
        batch = getattr(self._local, "batch", None)
        if batch is not None and row["trial_id"] in batch.trials:
            batch.rows.append((model.__table__, row, conflict))  # written when the ask ends
            return
        insert = self._upsert_statement(model.__table__, tuple(row), conflict)
        with self._backend.engine.begin() as conn:
            written = conn.execute(insert, row).rowcount
        if not written:
            fallback(*args)

    @functools.cache  # noqa: B019 - one small statement per table, for the life of the process
    def _upsert_statement(self, table: sa.Table, columns: tuple[str, ...], conflict: tuple[str, ...] | None) -> Any:
        values = sa.select(*(sa.bindparam(k, type_=table.c[k].type) for k in columns)).where(
            sa.exists().where(_TRIALS.c.trial_id == sa.bindparam("trial_id"), _TRIALS.c.state.in_(_UPDATABLE)))
        insert = self._insert(table).from_select(list(columns), values)
        if conflict:
            insert = insert.on_conflict_do_update(
                index_elements=list(conflict), set_={k: insert.excluded[k] for k in columns if k not in conflict})
        return insert

    def _set_state_fast(self, trial_id: int, state: TrialState, values: Sequence[float] | None) -> datetime | None:
        """Optuna's `set_trial_state_values` in one transaction; None when the trial was not in a state this
        change applies to."""
        now = optuna_now()
        update = sa.update(_TRIALS).where(_TRIALS.c.trial_id == trial_id)
        if state == TrialState.RUNNING:
            update = update.where(_TRIALS.c.state == TrialState.WAITING).values(state=state, datetime_start=now)
        else:
            update = update.where(_TRIALS.c.state.in_(_UPDATABLE)).values(state=state)
            if state.is_finished():
                update = update.values(datetime_complete=now)
        table = TrialValueModel.__table__
        with self._backend.engine.begin() as conn:
            if not conn.execute(update).rowcount:
                conn.rollback()
                return None
            for objective, value in enumerate(values or ()):
                stored, kind = TrialValueModel.value_to_stored_repr(value)
                insert = self._insert(table).values(trial_id=trial_id, objective=objective, value=stored,
                                                    value_type=kind)
                conn.execute(insert.on_conflict_do_update(
                    index_elements=["trial_id", "objective"],
                    set_={"value": insert.excluded.value, "value_type": insert.excluded.value_type}))
        return now

    def _create_running_trial(self, study_id: int) -> FrozenTrial:
        """Optuna's `_create_new_trial` without a template (every `ask` that takes no queued trial), in one
        transaction: lock the study row, insert, number the trial by counting the study's earlier trials
        (as Optuna does: the insert comes first, so on SQLite the write lock is held while counting)."""
        now = optuna_now()
        with self._backend.engine.begin() as conn:
            locked = conn.execute(sa.select(_STUDIES.c.study_id).where(_STUDIES.c.study_id == study_id)
                                  .with_for_update()).first()
            if locked is None:
                raise KeyError(f"No study with study_id {study_id} exists.")
            trial_id = conn.execute(sa.insert(_TRIALS).values(
                number=None, study_id=study_id, state=TrialState.RUNNING, datetime_start=now
            ).returning(_TRIALS.c.trial_id)).scalar_one()
            number = conn.execute(sa.select(sa.func.count()).select_from(_TRIALS).where(
                _TRIALS.c.study_id == study_id, _TRIALS.c.trial_id < trial_id)).scalar_one()
            conn.execute(sa.update(_TRIALS).where(_TRIALS.c.trial_id == trial_id).values(number=number))
        return FrozenTrial(number=number, state=TrialState.RUNNING, value=None, values=None, datetime_start=now,
                           datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
                           intermediate_values={}, trial_id=trial_id)

    def _install_from_database(self, trial_id: int) -> None:
        try:
            self._read_trial(trial_id)
        except Exception:
            self._forget_reads_of(trial_id)

    def _forget_reads_of(self, trial_id: int) -> None:
        located = self._trial_id_to_study_id_and_number.get(trial_id)
        if located is not None:
            self._read_at.pop(located[0], None)

    def _patch(self, trial_id: int, change: Callable[[FrozenTrial], None]) -> None:
        """Replace the cached copy of an unfinished trial by a changed one; an unknown trial is left to the
        next read."""
        with self._lock:
            located = self._trial_id_to_study_id_and_number.get(trial_id)
            if located is None:
                return
            study_id, number = located
            trials = self._studies[study_id].trials
            if trials[number].state.is_finished():
                return
            updated = copy.copy(trials[number])
            change(updated)
            trials[number] = updated
            if updated.state.is_finished():
                self._studies[study_id].unfinished_trial_ids.discard(trial_id)

    def _read_trial(self, trial_id: int) -> FrozenTrial:
        """Read a trial from the database and put it in memory. Both happen under the lock, as in Optuna's
        own refresh: a write that committed after the read cannot then be overwritten by the older copy."""
        with self._lock:
            if trial_id in self._pending:  # memory is ahead of the database until its batch is written
                study_id, number = self._trial_id_to_study_id_and_number[trial_id]
                return self._studies[study_id].trials[number]
            trial = self._backend.get_trial(trial_id)
            self._install_locked(trial)
        return trial

    def _add_trials_to_cache(self, study_id: int, trials: list[FrozenTrial]) -> None:
        # Optuna's refresh installs what it read through here: never over a trial of an open batch, whose
        # parameters are in memory and not yet in the database (another thread's read would drop them).
        if self._pending:
            study = self._studies[study_id]
            trials = [t for t in trials if t._trial_id not in self._pending or t.number not in study.trials]
        super()._add_trials_to_cache(study_id, trials)

    def _install_locked(self, trial: FrozenTrial) -> None:
        if trial._trial_id in self._pending:
            return  # memory is ahead of the database (see `_add_trials_to_cache`)
        located = self._trial_id_to_study_id_and_number.get(trial._trial_id)
        if located is None:
            return  # its study is not loaded yet: the study's first read brings it
        study = self._studies[located[0]]
        study.trials[trial.number] = trial
        if trial.state.is_finished():
            study.unfinished_trial_ids.discard(trial._trial_id)
        else:
            study.unfinished_trial_ids.add(trial._trial_id)

# ---- warm starts that reach the sampler ---------------------------------------------------------------------
#
# Warm starts that reach the sampler: an earlier study's completed trials, shown to this study's sampler as if
# they were its own.
#
# A spec's `warm_start: {study, top_k}` enqueues the earlier study's `top_k` best configurations (see
# `studies._warm_start_configurations`). That alone tells a model-based sampler (TPE, GP) nothing about the
# rest of the earlier study: it starts from random search again. `PriorTrialsSampler` wraps the sampler so that,
# while it proposes, the study it reads lists the earlier study's completed (feasible) trials before its own.
# Only the sampler sees them: they are not trials of this study, so the budget, the views, the best trial, the
# pruner and optuna-dashboard never count them.
#
# The study the wrapped sampler gets is a shallow copy whose `_get_trials`/`get_trials` add the priors; the
# runtime's own `Study` object is never patched, so other threads reading it (views, the reaper) see only the
# study's trials. Each prior keeps the parameters the new search space accepts (a value outside a new range
# or a dropped choice is left out, as TPE does for a parameter a trial never suggested).

def prior_trials(trials: Sequence[FrozenTrial], space: Mapping[str, distributions.BaseDistribution]
                 ) -> list[FrozenTrial]:
    """The completed trials of an earlier study as trials of a study searching `space`: parameters outside it
    dropped, trials left with none or without a finite value skipped. Numbered -1, -2, ... (they are no
    trial of this study; a sampler reads their parameters and values)."""
    out: list[FrozenTrial] = []
    for t in trials:
        if t.state != TrialState.COMPLETE or t.value is None or not math.isfinite(t.value):
            continue
        params, dists = {}, {}
        for name, value in t.params.items():
            dist = space.get(name)
            if dist is None or not _contains(dist, value):
                continue
            params[name], dists[name] = value, dist
        if not params:
            continue
        prior = optuna.trial.create_trial(params=params, distributions=dists, value=t.value,
                                          user_attrs={"warm_start_trial": t.number})
        prior.number = prior._trial_id = -(len(out) + 1)
        out.append(prior)
    return out


def _contains(dist: distributions.BaseDistribution, value: Any) -> bool:
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


class PriorTrialsSampler(BaseSampler):
    """A sampler that also reads an earlier study's trials (`load_priors()`, called once, at the first
    proposal); every other call goes to the wrapped sampler unchanged."""

    def __init__(self, sampler: BaseSampler, load_priors: Callable[[], list[FrozenTrial]]):
        self.sampler = sampler
        self._load_priors = load_priors
        self._priors: list[FrozenTrial] | None = None

    def __str__(self) -> str:
        return f"PriorTrialsSampler({self.sampler})"

    @property
    def priors(self) -> list[FrozenTrial]:
        if self._priors is None:
            self._priors = self._load_priors()
        return self._priors

    def view(self, study: Study) -> Study:
        """`study` as the wrapped sampler sees it: the priors listed before the study's own completed trials."""
        priors, own = self.priors, study._get_trials
        if not priors:
            return study

        def get_trials(deepcopy: bool = True, states: Container[TrialState] | None = None,
                       use_cache: bool = False) -> list[FrozenTrial]:
            trials = own(deepcopy=deepcopy, states=states, use_cache=use_cache)
            if states is not None and TrialState.COMPLETE not in states:
                return trials
            return [*(copy.deepcopy(priors) if deepcopy else priors), *trials]

        seen = copy.copy(study)
        seen._get_trials = get_trials  # type: ignore[method-assign]
        seen.get_trials = lambda deepcopy=True, states=None: get_trials(deepcopy, states)  # type: ignore[method-assign]
        return seen

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        return self.sampler.infer_relative_search_space(self.view(study), trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self.sampler.sample_relative(self.view(study), trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: distributions.BaseDistribution) -> Any:
        return self.sampler.sample_independent(self.view(study), trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(self.view(study), trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()

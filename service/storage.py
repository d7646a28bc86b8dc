"""The server's Optuna storage: Optuna's own `_CachedStorage`, extended to serve running trials from memory.

Optuna's cache keeps finished trials (they never change) and re-reads every unfinished trial from the
database on each `get_all_trials`, and every unfinished trial on each `get_trial`. In a server, every
report (Hyperband reads the study) and every ask (TPE with constant_liar reads running trials) would then
reload all running trials: with 100 workers, 100 trials per call, for each of the ~7 calls of a trial.

Here the server keeps its own copy of running trials as well:

- Writes go to the database first, through Optuna's RDBStorage, exactly as before. Only after a write
  succeeds is the in-memory copy updated (a new `FrozenTrial` object, so a sampler iterating an earlier
  list never sees it change). Nothing is durable only in memory.
- A state change (ask, tell, claiming a queued trial) re-reads that one trial, so timestamps and values in
  memory are the database's.
- Reads come from memory. The running trials are re-read from the database when the copy is older than
  `refresh_seconds`, which only matters for writes made by someone else: another server replica, or a
  script using Optuna on the same database. With one server, memory and database never differ. Before
  each ask, `sync` compares the number of trials per state with the database (one cheap query), so the
  queue and the budget are exact across replicas; only other replicas' intermediate values may lag.

`optuna==5.0.0` is pinned because this builds on Optuna's private `_CachedStorage`.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter
from collections.abc import Callable, Container, Sequence
from typing import Any

import sqlalchemy as sa
from optuna import distributions
from optuna._typing import JSONSerializable
from optuna.storages import RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._rdb.models import TrialModel
from optuna.trial import FrozenTrial, TrialState

__all__ = ["ServerStorage"]


def _detached(trial: FrozenTrial) -> FrozenTrial:
    """A copy whose dicts the caller may change (Optuna's `Trial` updates its snapshot in place)."""
    clone = copy.copy(trial)
    clone._params = dict(trial._params)
    clone._distributions = dict(trial._distributions)
    clone._user_attrs = dict(trial._user_attrs)
    clone._system_attrs = dict(trial._system_attrs)
    clone.intermediate_values = dict(trial.intermediate_values)
    return clone


class ServerStorage(_CachedStorage):
    """`_CachedStorage` that also keeps unfinished trials in memory, written through to the database."""

    def __init__(self, backend: RDBStorage, refresh_seconds: float = 1.0):
        super().__init__(backend)
        self.refresh_seconds = refresh_seconds
        self._read_at: dict[int, float] = {}  # study id -> time.monotonic() of its last database read
        self._refresh_locks: dict[int, threading.Lock] = {}

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._refresh_locks = {}

    # ---- reads ---------------------------------------------------------------------------------------

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

    def sync(self, study_id: int) -> bool:
        """Make sure memory holds every trial of the study in its current state, with one cheap query: the
        number of trials per state. States only move forward (WAITING -> RUNNING -> finished), so any trial
        created or moved by someone else changes those counts. Called under the ask lock, so budgets and
        the queue are exact across server replicas. Returns whether the study had to be re-read."""
        if study_id not in self._read_at:
            self.refresh(study_id)
            return True
        model = TrialModel.__table__
        query = sa.select(model.c.state, sa.func.count()).where(model.c.study_id == study_id).group_by(model.c.state)
        with self._backend.engine.connect() as conn:
            in_database = {TrialState[str(getattr(state, "name", state))]: n for state, n in conn.execute(query)}
        with self._lock:
            in_memory = Counter(t.state for t in self._studies[study_id].trials.values())
        if in_database == dict(in_memory):
            return False
        self.refresh(study_id)
        return True

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if not self._fresh(study_id):
            self.refresh(study_id)
        with self._lock:
            trials = self._studies[study_id].trials
            selected = [t for t in trials.values() if states is None or t.state in states]
            selected.sort(key=lambda t: t.number)  # some samplers rely on this order
            return copy.deepcopy(selected) if deepcopy else selected

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
        trial = self._backend.get_trial(trial_id)
        self._install(trial)
        return _detached(trial) if not trial.state.is_finished() else trial

    # ---- writes: the database first, then the copy in memory -------------------------------------------

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)
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

        self._write(trial_id, change, super().set_trial_param, trial_id, param_name, param_value_internal,
                    distribution)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        def change(t: FrozenTrial) -> None:
            t.intermediate_values = {**t.intermediate_values, step: intermediate_value}

        self._write(trial_id, change, super().set_trial_intermediate_value, trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        def change(t: FrozenTrial) -> None:
            t._user_attrs = {**t._user_attrs, key: value}

        self._write(trial_id, change, super().set_trial_user_attr, trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: JSONSerializable) -> None:
        def change(t: FrozenTrial) -> None:
            t._system_attrs = {**t._system_attrs, key: value}

        self._write(trial_id, change, super().set_trial_system_attr, trial_id, key, value)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        try:
            changed = super().set_trial_state_values(trial_id, state, values)
        except BaseException:
            self._forget_reads_of(trial_id)  # e.g. another process finished it: read the database next time
            raise
        try:
            # Timestamps and values as the database holds them; also when another process won the change.
            self._install(self._backend.get_trial(trial_id))
        except Exception:
            self._forget_reads_of(trial_id)
        return changed

    def delete_study(self, study_id: int) -> None:
        super().delete_study(study_id)
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

    def _install(self, trial: FrozenTrial) -> None:
        """Put a trial read from the database into memory (its study must be known to the cache)."""
        with self._lock:
            located = self._trial_id_to_study_id_and_number.get(trial._trial_id)
            if located is None:
                return  # not loaded yet: the study's next read brings it
            study = self._studies[located[0]]
            study.trials[trial.number] = trial
            if trial.state.is_finished():
                study.unfinished_trial_ids.discard(trial._trial_id)
            else:
                study.unfinished_trial_ids.add(trial._trial_id)

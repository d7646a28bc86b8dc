"""ServerStorage: what it keeps in memory must be what Optuna's own RDBStorage reads from the database,
after our writes, after someone else's writes, and when a write is refused."""

from __future__ import annotations

import math
import time

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from tunefleet.service.storage import ServerStorage

SPACE = {
    "lr": FloatDistribution(1e-5, 1e-2, log=True),
    "rank": CategoricalDistribution([4, 8, 16]),
    "epochs": IntDistribution(1, 5),
}


def _rdb(url: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(url, skip_compatibility_check=True)


def _key(t: FrozenTrial) -> tuple:
    return (t._trial_id, t.number, t.state, t.values, t.datetime_start, t.datetime_complete, t.params,
            t.distributions, t.user_attrs, t.system_attrs, t.intermediate_values)


def _same_as_database(storage: ServerStorage, url: str, study_id: int) -> None:
    fresh = _rdb(url)
    try:
        in_database = [_key(t) for t in fresh.get_all_trials(study_id)]
    finally:
        fresh.engine.dispose()
    storage.refresh_seconds = math.inf  # read memory only
    assert [_key(t) for t in storage.get_all_trials(study_id)] == in_database
    assert [_key(storage.get_trial(t[0])) for t in in_database] == in_database


@pytest.fixture
def storage(db_url: str):  # type: ignore[no-untyped-def]
    s = ServerStorage(_rdb(db_url), refresh_seconds=60.0)
    yield s
    s._backend.engine.dispose()


def test_memory_matches_the_database_after_a_study(storage: ServerStorage, db_url: str) -> None:
    study = optuna.create_study(storage=storage, study_name="mem", direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=1, n_startup_trials=3),
                                pruner=optuna.pruners.HyperbandPruner(min_resource=20, max_resource=100))
    study.enqueue_trial({"lr": 1e-3, "rank": 8, "epochs": 2}, user_attrs={"is_baseline": True})
    for i in range(12):
        trial = study.ask(SPACE)
        trial.set_user_attr("seen", i)
        for step in (20, 40, 60):
            trial.report(trial.params["lr"] * 100 + step / 100, step)
            if trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            if i % 5 == 4:
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, trial.params["lr"] * 100)
    running = study.ask(SPACE)  # a trial left running, with a report and attributes
    running.report(0.5, 20)
    storage.set_trial_system_attr(running._trial_id, "note", {"a": [1, 2]})
    _same_as_database(storage, db_url, study._study_id)


def test_writes_to_a_finished_trial_raise_optunas_error_and_change_nothing(storage: ServerStorage,
                                                                         db_url: str) -> None:
    study = optuna.create_study(storage=storage, study_name="done")
    trial = study.ask(SPACE)
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_intermediate_value(trial._trial_id, 5, 0.3)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_user_attr(trial._trial_id, "late", True)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [2.0])
    _same_as_database(storage, db_url, study._study_id)
    assert storage.get_trial(trial._trial_id).values == [1.0]


def test_an_incompatible_distribution_is_refused_as_optuna_does(storage: ServerStorage) -> None:
    study = optuna.create_study(storage=storage, study_name="dist")
    study.ask(SPACE)
    with pytest.raises(ValueError, match="Cannot set different distribution kind"):
        study.ask({**SPACE, "rank": FloatDistribution(0, 1)})


def test_sync_and_refresh_pick_up_another_processs_writes(storage: ServerStorage, db_url: str) -> None:
    study = optuna.create_study(storage=storage, study_name="shared", direction="maximize")
    mine = study.ask(SPACE)
    study.get_trials()  # loaded into memory
    other = _rdb(db_url)  # another server process, or a script
    try:
        theirs = optuna.load_study(study_name="shared", storage=other)
        new = theirs.ask(SPACE)
        theirs.tell(mine.number, 0.7)  # finishes *our* running trial
        theirs.enqueue_trial({"lr": 1e-4, "rank": 4, "epochs": 1})
        other.set_trial_intermediate_value(new._trial_id, 20, 0.25)
        # Trials created or moved to another state: one light query before each ask finds them.
        assert storage.sync(study._study_id) == 3
        states = {t.number: t.state for t in storage.get_all_trials(study._study_id)}
        assert states == {0: TrialState.COMPLETE, 1: TrialState.RUNNING, 2: TrialState.WAITING}
        assert storage.sync(study._study_id) == 0
        # Reports on trials whose state did not change: seen once the copy is older than refresh_seconds.
        storage.refresh_seconds = 0.05
        time.sleep(0.1)
        assert storage.get_trial(new._trial_id).intermediate_values == {20: 0.25}
        _same_as_database(storage, db_url, study._study_id)
    finally:
        other.engine.dispose()


def test_a_trial_written_elsewhere_can_be_reloaded(storage: ServerStorage, db_url: str) -> None:
    study = optuna.create_study(storage=storage, study_name="reload")
    trial = study.ask(SPACE)
    other = _rdb(db_url)
    try:
        other.set_trial_intermediate_value(trial._trial_id, 40, 0.9)
    finally:
        other.engine.dispose()
    assert storage.get_trial(trial._trial_id).intermediate_values == {}  # memory, until told
    assert storage.reload_trial(trial._trial_id).intermediate_values == {40: 0.9}
    assert storage.get_trial(trial._trial_id).intermediate_values == {40: 0.9}


def test_trial_numbers_stay_unique_when_asks_and_enqueues_race(storage: ServerStorage, db_url: str) -> None:
    # The server asks under a per-study lock but enqueues retries outside it (a failed trial's parameters).
    import threading

    study = optuna.create_study(storage=storage, study_name="race")

    def ask() -> None:
        for _ in range(10):
            study.ask(SPACE)

    def enqueue() -> None:
        for _ in range(10):
            study.enqueue_trial({"lr": 1e-3, "rank": 8, "epochs": 2})

    threads = [threading.Thread(target=f) for f in (ask, enqueue, ask, enqueue)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    numbers = [t.number for t in storage.get_all_trials(study._study_id)]
    assert 20 <= len(numbers) <= 40  # an ask takes a queued trial when there is one
    assert sorted(numbers) == list(range(len(numbers)))
    _same_as_database(storage, db_url, study._study_id)


def test_a_batched_ask_writes_its_values_in_one_transaction(storage: ServerStorage, db_url: str) -> None:
    study = optuna.create_study(storage=storage, study_name="batched",
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2))
    for _ in range(4):  # the first values of each parameter take Optuna's own checks; later ones are batched
        with storage.batched_ask():
            trial = study.ask(SPACE)
        study.tell(trial, trial.params["lr"])
    with storage.batched_ask():
        running = study.ask(SPACE)
        assert len(storage._local.batch.rows) >= 3  # held back until the block ends
    assert running.params.keys() == SPACE.keys()
    _same_as_database(storage, db_url, study._study_id)


def test_a_failed_batched_ask_leaves_memory_as_the_database_has_it(storage: ServerStorage, db_url: str) -> None:
    study = optuna.create_study(storage=storage, study_name="batch-fail")
    study.tell(study.ask(SPACE), 1.0)  # parameters known: later asks are batched
    with pytest.raises(RuntimeError), storage.batched_ask():
        trial = study.ask(SPACE)
        raise RuntimeError("the server stopped mid-ask")
    # The trial row was committed on its own, its values were not: no half-truths in memory.
    assert storage.get_trial(trial._trial_id).params == {}
    _same_as_database(storage, db_url, study._study_id)


def test_a_read_during_a_batched_ask_keeps_its_parameters(storage: ServerStorage, db_url: str) -> None:
    """Another request of the same process may re-read the study from the database while an ask's values
    are still held back; that read must not drop them (it once leased a trial without parameters)."""
    study = optuna.create_study(storage=storage, study_name="batch-read")
    study.tell(study.ask(SPACE), 1.0)  # parameters known: later asks are batched
    with storage.batched_ask():
        trial = study.ask(SPACE)
        assert storage._local.batch.rows, "the values are held back"
        storage.refresh(study._study_id)  # what a concurrent report's read does, from the database
        assert storage.get_trial(trial._trial_id).params == trial.params
    assert storage.get_trial(trial._trial_id).params == trial.params
    assert storage.get_all_trials(study._study_id)[-1].params == trial.params
    _same_as_database(storage, db_url, study._study_id)

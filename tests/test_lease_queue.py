"""Leases from a queue of pre-asked trials (service/queue.py) and the bounded history TPE and GP read
(service/storage.py, `BoundedHistorySampler`), on PostgreSQL over real HTTP: leases claim queued trials,
two servers on one database never hand out a trial twice and keep the budget exact, a dead server's queue
is served by another, a stopped study fails its queue, and a queue never keeps a study from completing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from tests.conftest import LiveServer, free_port, make_settings, study_spec, wait_until
from tests.test_resilience import ServerProcess
from tunefleet.service.client import Client
from tunefleet.service.storage import BoundedHistorySampler, ServerStorage


def _queued(url: str, study_id: int) -> list[int]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(sa.text("SELECT trial_id FROM tf_leases WHERE study_id = :s AND state = 'queued' "
                                             "ORDER BY trial_id"), {"s": study_id}))
    finally:
        engine.dispose()


def test_a_lease_claims_the_oldest_queued_trial_and_the_queue_refills(server: LiveServer) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("queue", baseline=None, budget={"max_trials": 20}))
        first = client.lease("w1", {}, "h")  # the queue is empty: asked on the request
        queued = wait_until("a full queue", lambda: len(_queued(server.settings.database_url, study["id"])) == 4
                       and _queued(server.settings.database_url, study["id"]))
        shown = client.get_study(study["id"])
        assert shown["counts"]["queued"] == 4 and shown["counts"]["running"] == 1
        assert shown["trials_used"] == 1  # queued trials hold budget (see the replicas test), unused yet
        listed = client.list_trials(study["id"], state="queued")["items"]
        assert [t["id"] for t in listed] == queued and {t["state"] for t in listed} == {"QUEUED"}
        assert all(t["params"] and t["worker_id"] is None for t in listed)
        second = client.lease("w2", {}, "h")
        assert first is not None and second is not None and second["trial_id"] == queued[0]
        assert second["params"] == listed[0]["params"]
        assert client.get_trial(second["trial_id"])["worker_id"] == "w2"
        client.complete(second["trial_id"], value=0.5)
        client.complete(first["trial_id"], value=0.4)
        shown = client.get_study(study["id"])
    assert shown["counts"]["complete"] == 2 and shown["counts"]["queued"] + shown["counts"]["running"] >= 3


def test_two_servers_on_one_database_never_hand_out_a_trial_twice(pg_url: str, tmp_path: Path) -> None:
    budget = 40
    with LiveServer(make_settings(pg_url, tmp_path / "a")) as a, LiveServer(make_settings(pg_url, tmp_path / "b")) as b:
        with Client(a.url) as client:
            study = client.create_study(study_spec("replicas", budget={"max_trials": budget}))
        got: list[int] = []
        lock = threading.Lock()

        def work(url: str, name: str) -> None:
            with Client(url) as client:
                while (lease := client.lease(name, {}, "h")) is not None:
                    with lock:
                        got.append(lease["trial_id"])
                    if lease["trial_id"] % 5 == 0 and lease["attempt"] == 0:  # preempted: its retry completes
                        client.fail(lease["trial_id"], "preempted", retryable=True)
                    else:
                        client.complete(lease["trial_id"], value=0.5)

        threads = [threading.Thread(target=work, args=(server.url, f"{server.port}-{i}"))
                   for server in (a, b) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        with Client(b.url) as client:
            shown = client.get_study(study["id"])
            trials = client.list_trials(study["id"], limit=1000)["items"]
    failed = shown["counts"]["fail"]
    assert failed > 0 and len(got) == budget + failed and len(set(got)) == len(got), sorted(got)
    assert shown["state"] == "completed" and shown["trials_used"] == budget
    assert shown["counts"]["complete"] == budget and len(trials) == budget + failed  # nothing queued or running


def test_a_killed_servers_queue_is_served_by_another_and_never_reaped(pg_url: str, tmp_path: Path) -> None:
    # Short leases: the orphan reaper of the second server looks at trials older than 1 s.
    env = {"TUNEFLEET_LEASE_SECONDS": "1", "TUNEFLEET_REAPER_INTERVAL_SECONDS": "0.2"}
    first = ServerProcess(pg_url, tmp_path / "first", free_port(), **env).start()
    try:
        with Client(first.url) as client:
            study = client.create_study(study_spec("dead-queue", baseline=None, budget={"max_trials": 10}))
            leased = client.lease("w", {}, "h")
            assert leased is not None
            client.complete(leased["trial_id"], value=0.5)
            queued = wait_until("a full queue", lambda: len(q := _queued(pg_url, study["id"])) == 4 and q)
    finally:
        first.kill()  # SIGKILL: its queue stays in the database
    second = ServerProcess(pg_url, tmp_path / "second", free_port(), **env).start()
    try:
        with Client(second.url) as client:
            time.sleep(2.0)  # several reaper passes, with the queued trials older than a lease
            assert _queued(pg_url, study["id"]) == queued, "the reaper must leave queued trials alone"
            got = []
            while (lease := client.lease("w", {}, "h")) is not None:
                got.append(lease["trial_id"])
                client.complete(lease["trial_id"], value=0.5)
            shown = client.get_study(study["id"])
    finally:
        second.stop()
    assert got[:4] == queued  # the dead server's queue first, in order
    assert shown["state"] == "completed" and shown["trials_used"] == 10 and shown["counts"]["fail"] == 0


def test_a_stopped_study_fails_its_queued_trials(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path, reaper_interval_seconds=0.2)
    with LiveServer(settings) as live, Client(live.url) as client:
        study = client.create_study(study_spec("stopped", baseline=None, budget={"max_trials": 20}))
        held = client.lease("w", {}, "h")
        queued = wait_until("a full queue", lambda: len(q := _queued(pg_url, study["id"])) == 4 and q)
        client.stop_study(study["id"])
        wait_until("the queue drained", lambda: not _queued(pg_url, study["id"]))
        trials = {t["id"]: t for t in client.list_trials(study["id"])["items"]}
        assert client.lease("w2", {}, "h") is None
    assert held is not None and trials[held["trial_id"]]["state"] == "RUNNING"  # its worker hears "stop"
    for trial_id in queued:
        assert trials[trial_id]["state"] == "FAIL" and "stopped" in trials[trial_id]["fail_reason"]
    assert not any(t["retry_of"] for t in trials.values()), "never re-queued"


def test_a_queue_never_keeps_a_small_study_from_completing(server: LiveServer) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("small", budget={"max_trials": 3}))
        got = []
        while (lease := client.lease("w", {}, "h")) is not None:
            got.append(lease)
            client.complete(lease["trial_id"], value=0.5)
        shown = client.get_study(study["id"])
    assert len(got) == 3 and got[0]["is_baseline"]
    assert shown["state"] == "completed" and shown["trials_used"] == 3 and shown["counts"]["complete"] == 3


def test_a_device_hour_budget_has_no_queue(server: LiveServer) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("hours", baseline=None,
                                               budget={"max_trials": 20, "max_gpu_hours": 1.0}))
        lease = client.lease("w", {}, "h")
        client.complete(lease["trial_id"], value=0.5)
        time.sleep(0.5)  # what a filler would have queued by now
        shown = client.get_study(study["id"])
    assert shown["counts"]["queued"] == 0 and shown["counts"]["running"] == 0 and 0 < shown["gpu_hours"] < 1


def test_without_a_queue_leases_ask_on_the_request(pg_url: str, tmp_path: Path) -> None:
    with LiveServer(make_settings(pg_url, tmp_path, lease_queue_size=0)) as live, Client(live.url) as client:
        study = client.create_study(study_spec("no-queue", baseline=None))
        lease = client.lease("w", {}, "h")
        time.sleep(0.5)
        shown = client.get_study(study["id"])
    assert lease is not None and shown["counts"]["queued"] == 0 and shown["counts"]["running"] == 1


def test_trial_pages_read_only_the_page(pg_url: str, tmp_path: Path) -> None:
    # No queue: its filler would add trials between the two reads.
    with LiveServer(make_settings(pg_url, tmp_path, lease_queue_size=0)) as live, Client(live.url) as client:
        study = client.create_study(study_spec("pages", baseline=None, budget={"max_trials": 50}))
        for _ in range(7):
            lease = client.lease("w", {}, "h")
            client.complete(lease["trial_id"], value=0.5)
        everything = client.list_trials(study["id"], limit=1000)
        page = client.list_trials(study["id"], limit=3, offset=2)
    assert page["total"] == everything["total"] >= 7
    assert [t["number"] for t in page["items"]] == [2, 3, 4]
    assert page["items"] == everything["items"][2:5]


# ---- the bounded history --------------------------------------------------------------------------------

class _Recording(optuna.samplers.RandomSampler):
    """A real sampler that notes which trials each ask showed it."""

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.seen: list[list[int]] = []

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
        self.seen.append([t.number for t in study.get_trials(deepcopy=False)])
        return {}


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_the_bounded_history_is_the_best_the_most_recent_and_every_running_trial(pg_url: str,
                                                                                 direction: str) -> None:
    rdb = optuna.storages.RDBStorage(pg_url, skip_compatibility_check=True)
    storage = ServerStorage(rdb)
    try:
        recording = _Recording()
        study = optuna.create_study(study_name="bounded", storage=storage, direction=direction,
                                    sampler=BoundedHistorySampler(recording, best=3, recent=4))
        x = optuna.distributions.FloatDistribution(0, 100)
        # Values 0..39 in a shuffled order; every fifth trial pruned.
        values = [(7 * i) % 40 for i in range(40)]
        study.add_trials([optuna.trial.create_trial(params={"x": v}, distributions={"x": x}, value=v)
                          if i % 5 else optuna.trial.create_trial(params={"x": v}, distributions={"x": x},
                                                                   state=TrialState.PRUNED)
                          for i, v in enumerate(values)])
        running = study.ask({"x": x})
        asking = study.ask({"x": x})  # the trial being asked is running too, as in Optuna
        complete = [i for i in range(40) if i % 5]
        best = sorted(complete, key=lambda i: values[i], reverse=direction == "maximize")[:3]
        expected = sorted({*best, 36, 37, 38, 39, running.number, asking.number})
        assert recording.seen[-1] == expected
        assert len(study.get_trials()) == 42  # everything else still reads the whole study
        study.tell(running, 1000 if direction == "maximize" else -1000)
        study.ask({"x": x})
        assert running.number in recording.seen[-1] and 36 not in recording.seen[-1]
    finally:
        rdb.engine.dispose()

"""The worker protocol over real HTTP against a live server on PostgreSQL: leases, pruning, budgets,
expiry and re-queue, idempotent retries, many concurrent workers."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import optuna
import pytest
import sqlalchemy as sa

from tests.conftest import LiveServer, free_port, make_settings, study_spec, wait_until
from tunefleet.service.client import Client
from tunefleet.workers.loop import WorkerLoop
from tunefleet.workers.simulated import SimulatedTrainer, run_simulated_workers


def _run_loop(url: str, tmp_path: Path, name: str = "w0", **trainer_options: object) -> int:
    with Client(url) as client:
        loop = WorkerLoop(client, SimulatedTrainer(**trainer_options), worker_id=name, device="cpu",
                          once=True, idle_sleep=0.1, workdir=tmp_path / name)
        return loop.run()


def _trials(client: Client, study_id: int) -> list[dict]:
    return client.list_trials(study_id, limit=1000)["items"]


def test_tpe_hyperband_prunes_at_first_rung_and_runs_baseline_first(server: LiveServer, tmp_path: Path) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("tpe-hb", budget={"max_trials": 24}))
        assert study["rungs"] == [20, 60, 100]
        assert _run_loop(server.url, tmp_path) == 24
        trials = _trials(client, study["id"])
        shown = client.get_study(study["id"])

    assert len(trials) == 24 and shown["state"] == "completed" and shown["trials_used"] == 24
    first = min(trials, key=lambda t: t["number"])
    assert first["is_baseline"] and first["params"] == {"learning_rate": 5e-5, "lora_r": 8, "method": "lora"}
    assert first["id"] == shown["baseline_trial_id"]
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    assert pruned, "Hyperband should prune some trials"
    assert any(max(map(int, t["intermediate_values"])) == 20 for t in pruned), "someone pruned at the 20% rung"
    for t in trials:
        assert set(map(int, t["intermediate_values"])) <= {20, 60, 100}
        if t["state"] == "COMPLETE":
            assert t["validation_metrics"]["accuracy"] == pytest.approx(t["value"])
            assert "accuracy" in t["test_metrics"] and t["intermediate_values"]["100"] == pytest.approx(t["value"])
    assert shown["best_trial"]["value"] == max(t["value"] for t in trials if t["state"] == "COMPLETE")


def test_budget_and_concurrency_limits(server: LiveServer) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("limits", budget={"max_trials": 3, "max_concurrent_trials": 2},
                                               baseline=None))
        a = client.lease("w1", {}, "h")
        b = client.lease("w2", {}, "h")
        assert a and b and a["trial_id"] != b["trial_id"]
        assert client.lease("w3", {}, "h") is None, "max_concurrent_trials=2 is reached"
        client.complete(a["trial_id"], value=0.5)
        c = client.lease("w3", {}, "h")
        assert c is not None
        client.complete(b["trial_id"], value=0.6)
        assert client.lease("w4", {}, "h") is None, "max_trials=3 is spent"
        client.complete(c["trial_id"], value=0.7)
        assert client.get_study(study["id"])["state"] == "completed"


def test_work_is_shared_fairly_between_studies(server: LiveServer) -> None:
    with Client(server.url) as client:
        ids = [client.create_study(study_spec(f"fair{i}", baseline=None))["id"] for i in range(3)]
        leased = [client.lease(f"w{i}", {}, "h")["study_id"] for i in range(6)]
    assert Counter(leased) == {i: 2 for i in ids}


def test_expired_lease_fails_trial_and_requeues_same_params(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path, lease_seconds=1.0, reaper_interval_seconds=0.2)
    with LiveServer(settings) as live, Client(live.url) as client:
        study = client.create_study(study_spec("expiry", baseline=None, search={"max_retries": 1}))
        first = client.lease("dead-worker", {}, "h")
        assert first is not None
        # no heartbeat: the reaper fails it (after the 1 s lease) and re-queues its parameters
        failed = wait_until("the reaper", lambda: (t := client.get_trial(first["trial_id"]))["state"] == "FAIL" and t)
        assert failed["state"] == "FAIL" and "lease expired" in failed["fail_reason"]
        retry = client.lease("live-worker", {}, "h")
        assert retry["params"] == first["params"] and retry["attempt"] == 1
        assert client.get_trial(retry["trial_id"])["retry_of"] == first["trial_id"]
        assert client.heartbeat(first["trial_id"], "dead-worker")["stop"] is True
        # expires again: max_retries=1 is used up, nothing more is queued
        wait_until("the reaper", lambda: client.get_trial(retry["trial_id"])["state"] == "FAIL")
        third = client.lease("w", {}, "h")
        assert third is None or third["params"] != first["params"] or third["attempt"] == 0
        assert client.get_study(study["id"])["counts"]["fail"] == 2


def test_heartbeats_keep_a_lease_alive(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path, lease_seconds=1.0, reaper_interval_seconds=0.2)
    with LiveServer(settings) as live, Client(live.url) as client:
        client.create_study(study_spec("alive", baseline=None))
        lease = client.lease("w", {}, "h")
        for _ in range(6):
            time.sleep(0.4)
            assert client.heartbeat(lease["trial_id"], "w")["stop"] is False
        assert client.complete(lease["trial_id"], value=0.8)["state"] == "COMPLETE"


def test_every_worker_write_is_idempotent(server: LiveServer) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("idem", baseline=None, search={"pruner": "none"}))
        http = httpx.Client(base_url=server.url)
        body = {"worker_id": "w", "request_id": "req-1"}
        lease1 = http.post("/api/v1/leases", json=body).json()
        lease2 = http.post("/api/v1/leases", json=body).json()
        assert lease1["trial_id"] == lease2["trial_id"], "a retried lease returns the same trial"
        tid, token = lease1["trial_id"], lease2["lease_token"]  # a retry answers with a fresh token
        holder = {"X-Lease-Token": token}
        first = http.post(f"/api/v1/trials/{tid}/reports", json={"step": 20, "value": 0.4}, headers=holder).json()
        again = http.post(f"/api/v1/trials/{tid}/reports", json={"step": 20, "value": 0.9}, headers=holder).json()
        assert first == again
        done = client.complete(tid, value=0.7, validation_metrics={"accuracy": 0.7}, test_metrics={"accuracy": 0.69},
                               lease_token=token)
        repeat = client.complete(tid, value=0.1, lease_token=token)
        assert repeat["value"] == done["value"] == 0.7 and repeat["test_metrics"] == {"accuracy": 0.69}
        assert client.fail(tid, "late failure", retryable=True, lease_token=token)["state"] == "COMPLETE"
        trial = client.get_trial(tid)
        assert trial["intermediate_values"] == {"20": 0.4}
        shown = client.get_study(study["id"])
        assert shown["counts"]["complete"] == 1 and shown["counts"]["waiting"] == 0


def test_pruned_answer_is_stable_and_closes_the_trial(server: LiveServer) -> None:
    with Client(server.url) as client:
        client.create_study(study_spec("prune-stable", baseline=None,
                                       search={"pruner": "median", "n_startup_trials": 1, "sampler": "random"}))
        good = client.lease("w", {}, "h")
        client.report(good["trial_id"], 20, 0.9)
        client.complete(good["trial_id"], value=0.95)
        bad = client.lease("w", {}, "h")
        assert client.report(bad["trial_id"], 20, 0.1) == "prune"
        assert client.report(bad["trial_id"], 20, 0.1) == "prune"
        assert client.report(bad["trial_id"], 60, 0.99) == "prune", "a pruned trial stays pruned"
        assert client.get_trial(bad["trial_id"])["state"] == "PRUNED"
        assert client.heartbeat(bad["trial_id"], "w")["stop"] is True


def test_retryable_failure_is_requeued_and_fatal_one_is_not(server: LiveServer) -> None:
    with Client(server.url) as client:
        client.create_study(study_spec("fail-paths", baseline=None, budget={"max_trials": 2}))
        oom = client.lease("w", {}, "h")
        client.fail(oom["trial_id"], "CUDA out of memory", retryable=False)
        gone = client.lease("w", {}, "h")
        assert gone["params"] != oom["params"]
        client.fail(gone["trial_id"], "worker shutting down", retryable=True)
        again = client.lease("w", {}, "h")
        assert again["params"] == gone["params"] and again["attempt"] == 1
        assert client.lease("w", {}, "h") is None, "budget: 1 fatal failure + 1 retried trial"


def test_sixteen_concurrent_workers_never_share_a_trial(server: LiveServer, tmp_path: Path) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("crowd", budget={"max_trials": 48}))
        codes = run_simulated_workers(server.url, None, 16, timeout=240, workdir=tmp_path)
        trials = _trials(client, study["id"])
    assert codes == [0] * 16
    assert len(trials) == 48
    with server.backend.session() as session:
        from sqlalchemy import func, select

        from tunefleet.service.tables import Lease

        per_trial = session.execute(select(Lease.trial_id, func.count()).group_by(Lease.trial_id)).all()
        workers = {w for (w,) in session.execute(select(Lease.worker_id))}
    assert all(n == 1 for _, n in per_trial) and len(per_trial) == 48
    assert len(workers) > 1, "the work was spread over the workers"
    assert Counter(t["state"] for t in trials).keys() <= {"COMPLETE", "PRUNED"}


def test_parallel_lease_requests_get_distinct_trials(server: LiveServer) -> None:
    with Client(server.url) as client:
        client.create_study(study_spec("race", budget={"max_trials": 20}, baseline=None))
    got: list[int] = []
    lock = threading.Lock()

    def grab(i: int) -> None:
        with Client(server.url) as c:
            while (lease := c.lease(f"t{i}", {}, "h")) is not None:
                with lock:
                    got.append(lease["trial_id"])
                c.complete(lease["trial_id"], value=0.5)

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) == 20 and len(set(got)) == 20


def test_artifacts_upload_list_download(server: LiveServer, tmp_path: Path) -> None:
    with Client(server.url) as client:
        client.create_study(study_spec("art", baseline=None))
        lease = client.lease("w", {}, "h")
        blob = bytes(range(256)) * 1000
        meta = client.upload_artifact(lease["trial_id"], "adapter/adapter_model.safetensors", blob)
        assert meta["size"] == len(blob)
        again = client.upload_artifact(lease["trial_id"], "adapter/adapter_model.safetensors", blob)
        assert again["sha256"] == meta["sha256"]
        assert [a["name"] for a in client.list_artifacts(lease["trial_id"])] == ["adapter/adapter_model.safetensors"]
        assert client.download_artifact(lease["trial_id"], "adapter/adapter_model.safetensors") == blob
        bad = httpx.put(f"{server.url}/api/v1/trials/{lease['trial_id']}/artifacts/..%2Fescape", content=b"x",
                        headers={"X-Lease-Token": lease["lease_token"]})
        assert bad.status_code in (404, 422)


def test_two_server_replicas_on_one_database_never_hand_out_a_trial_twice(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path)
    with LiveServer(settings) as a, LiveServer(settings) as b:
        with Client(a.url) as client:
            study = client.create_study(study_spec("replicas", budget={"max_trials": 24}, baseline=None))
        got: list[int] = []
        lock = threading.Lock()

        def grab(url: str, i: int) -> None:
            with Client(url) as c:
                while (lease := c.lease(f"r{i}", {}, "h")) is not None:
                    with lock:
                        got.append(lease["trial_id"])
                    c.report(lease["trial_id"], 20, 0.5)
                    c.complete(lease["trial_id"], value=0.5)

        threads = [threading.Thread(target=grab, args=(url, i)) for i, url in enumerate([a.url, b.url] * 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        with Client(b.url) as client:
            shown = client.get_study(study["id"])
    assert len(got) == 24 and len(set(got)) == 24
    assert shown["trials_used"] == 24 and shown["counts"]["complete"] == 24


def _rank_four(params: dict) -> bool:  # module level: worker processes are spawned and unpickle it
    return params.get("lora_r") == 4


def test_concurrent_workers_on_the_embedded_sqlite_default(sqlite_url: str, tmp_path: Path) -> None:
    with LiveServer(make_settings(sqlite_url, tmp_path)) as live, Client(live.url) as client:
        study = client.create_study(study_spec("sqlite-crowd", budget={"max_trials": 24}))
        codes = run_simulated_workers(live.url, None, 6, timeout=240, workdir=tmp_path,
                                      fail_with="preempted", fail_retryable=True, fail_at_rung=1,
                                      fail_if=_rank_four)
        shown = client.get_study(study["id"])
        trials = _trials(client, study["id"])
    assert codes == [0] * 6
    assert shown["state"] == "completed" and shown["trials_used"] == 24
    assert "RUNNING" not in {t["state"] for t in trials}


def test_gpu_hour_budget_stops_new_trials(server: LiveServer) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("gpu-budget", baseline=None,
                                               budget={"max_trials": 50, "max_gpu_hours": 0.5 / 3600}))
        first = client.lease("w", {}, "h")
        time.sleep(0.7)  # the lease's wall time passes the half-second budget
        client.complete(first["trial_id"], value=0.5)
        assert client.lease("w", {}, "h") is None
        shown = client.get_study(study["id"])
    assert shown["state"] == "completed" and shown["gpu_hours"] >= 0.5 / 3600


def test_a_trial_reported_to_two_replicas_is_judged_on_all_its_reports(pg_url: str, tmp_path: Path) -> None:
    # A worker's reports may reach different server processes (a load balancer, a reconnect). The one that
    # gets a report must see the reports the other took, or Hyperband would judge the wrong rung.
    # trial_cache_seconds is long, so only the check in `leases.report` can bring them in.
    settings = make_settings(pg_url, tmp_path, trial_cache_seconds=600.0)
    with LiveServer(settings) as a, LiveServer(settings) as b, Client(a.url) as ca, Client(b.url) as cb:
        ca.create_study(study_spec("split", baseline=None))
        lease = ca.lease("w", {}, "h")
        trial_id = lease["trial_id"]
        assert ca.report(trial_id, 20, 0.50) == "continue"
        token = lease["lease_token"]
        assert cb.report(trial_id, 40, 0.60, lease_token=token) == "continue"
        assert ca.report(trial_id, 60, 0.70) == "continue"
        assert cb.report(trial_id, 60, 0.70, lease_token=token) == "continue"  # a retry of the same step: stored answer
        expected = {20: 0.50, 40: 0.60, 60: 0.70}
        assert a.backend.storage.get_trial(trial_id).intermediate_values == expected
        ca.complete(trial_id, value=0.8)
        shown = cb.get_trial(trial_id)["intermediate_values"]
        assert {int(step): value for step, value in shown.items()} == expected


def test_several_server_processes_share_one_study(pg_url: str, tmp_path: Path) -> None:
    from tests.test_resilience import ServerProcess

    server = ServerProcess(pg_url, tmp_path, free_port(), TUNEFLEET_SERVER_PROCESSES="2").start()
    try:
        with Client(server.url) as client:
            study = client.create_study(study_spec("processes", budget={"max_trials": 30}, baseline=None))
        got: list[int] = []
        lock = threading.Lock()

        def grab(i: int) -> None:
            with Client(server.url) as c:  # one connection per thread: the processes share them out
                while (lease := c.lease(f"p{i}", {}, "h")) is not None:
                    with lock:
                        got.append(lease["trial_id"])
                    for step in lease["rungs"]:
                        if c.report(lease["trial_id"], step,
                                    0.1 + 0.5 * lease["params"]["learning_rate"] * 100) == "prune":
                            break
                    else:
                        c.complete(lease["trial_id"], value=0.2)

        threads = [threading.Thread(target=grab, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        with Client(server.url) as client:
            shown = client.get_study(study["id"])
    finally:
        server.stop()
    assert len(got) == 30 and len(set(got)) == 30
    assert shown["state"] == "completed" and shown["trials_used"] == 30, shown["counts"]
    assert sum(shown["counts"].get(s, 0) for s in ("complete", "pruned")) == 30
    # Optuna's rows and ours agree on every trial, whichever process took each call.
    engine = sa.create_engine(pg_url)
    storage = optuna.storages.RDBStorage(pg_url, skip_compatibility_check=True)
    try:
        with engine.connect() as conn:
            reports = dict(conn.execute(sa.text("SELECT trial_id, count(*) FROM tf_reports GROUP BY trial_id")).all())
        for trial_id in got:
            frozen = storage.get_trial(trial_id)
            assert frozen.state.is_finished()
            assert len(frozen.intermediate_values) == reports[trial_id]
    finally:
        storage.engine.dispose()
        engine.dispose()


def test_a_trial_asked_but_never_leased_is_failed_and_requeued(pg_url: str, tmp_path: Path) -> None:
    # A server process that stops between `ask` and writing the lease row leaves a RUNNING trial no lease
    # points at. The reaper fails it once it is older than a lease, and re-queues its parameters.
    settings = make_settings(pg_url, tmp_path, lease_seconds=1.0, reaper_interval_seconds=0.2)
    with LiveServer(settings) as live, Client(live.url) as client:
        study = client.create_study(study_spec("orphan", baseline=None, search={"max_retries": 1}))
        rdb = optuna.storages.RDBStorage(pg_url, skip_compatibility_check=True)
        direct = optuna.load_study(study_name="orphan", storage=rdb)
        orphan = direct.ask()  # as the server's ask would, with no lease row after it
        params = {"learning_rate": orphan.suggest_float("learning_rate", 1e-5, 1e-2, log=True),
                  "lora_r": orphan.suggest_categorical("lora_r", [4, 8, 16, 32]),
                  "method": orphan.suggest_categorical("method", ["lora", "full"])}
        rdb.engine.dispose()
        failed = wait_until("the orphan reaper",
                            lambda: (t := client.get_trial(orphan._trial_id))["state"] == "FAIL" and t)
        assert failed["state"] == "FAIL" and "never leased" in failed["fail_reason"]
        retry = client.lease("w", {}, "h")
        assert retry["params"] == params and retry["attempt"] == 1
        shown = client.get_study(study["id"])
        assert shown["counts"]["fail"] == 1 and shown["trials_used"] == 1  # the retry takes the orphan's place

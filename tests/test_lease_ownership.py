"""Only the holder of a lease may change its trial; lease request ids are scoped to the worker.

Each test names the defect it guards against: before lease tokens, any worker token could heartbeat,
report, complete, fail or upload on a trial leased to another worker, and its value silently replaced the
holder's; a `request_id` was global, so another worker sending the same id got the first worker's lease,
and an empty one answered 500 from the second call on, burning one trial of the budget each time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, make_settings, study_spec
from tunefleet.service.auth import create_token
from tunefleet.service.client import Client, ConflictError, ForbiddenError

HOLDER = "X-Lease-Token"


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as client:
        yield client


def _study(http: httpx.Client, name: str, **overrides: object) -> int:
    spec = study_spec(name, baseline=None, search={"pruner": "none"}, **overrides)
    response = http.post("/studies", json=spec)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_calls_without_the_lease_token_are_refused_and_change_nothing(http: httpx.Client) -> None:
    study_id = _study(http, "holder")
    lease = http.post("/leases", json={"worker_id": "holder"}).json()
    tid, token = lease["trial_id"], lease["lease_token"]
    for headers in ({}, {HOLDER: "not-the-token"}):
        for path, body in (("heartbeat", {"worker_id": "thief"}), ("reports", {"step": 20, "value": 0.99}),
                           ("pause", {"step": 20}), ("complete", {"value": 0.99}),
                           ("fail", {"reason": "stolen", "retryable": False})):
            refused = http.post(f"/trials/{tid}/{path}", json=body, headers=headers)
            assert refused.status_code == 403, (path, refused.text)
            assert "X-Lease-Token" in refused.json()["detail"]
        upload = http.put(f"/trials/{tid}/artifacts/adapter.bin", content=b"forged", headers=headers)
        assert upload.status_code == 403, upload.text
    trial = http.get(f"/trials/{tid}").json()
    assert trial["state"] == "RUNNING" and trial["intermediate_values"] == {} and trial["value"] is None
    assert http.get(f"/trials/{tid}/artifacts").json() == []
    # The holder's own calls still work, and its result is the one stored.
    assert http.post(f"/trials/{tid}/reports", json={"step": 20, "value": 0.4}, headers={HOLDER: token}).json() == {
        "action": "continue", "prune": False}
    done = http.post(f"/trials/{tid}/complete", json={"value": 0.7}, headers={HOLDER: token})
    assert done.status_code == 200 and done.json()["value"] == 0.7
    assert http.post(f"/trials/{tid}/complete", json={"value": 0.1}).status_code == 403, "nor after it finished"
    assert http.get(f"/studies/{study_id}").json()["best_trial"]["value"] == 0.7


def test_the_python_client_sends_the_token_of_the_lease_it_holds(server: LiveServer) -> None:
    with Client(server.url) as holder, Client(server.url) as other:
        holder.create_study(study_spec("client-holder", baseline=None, search={"pruner": "none"}))
        lease = holder.lease("w1", {}, "h")
        tid = lease["trial_id"]
        assert holder.heartbeat(tid, "w1")["stop"] is False
        with pytest.raises(ForbiddenError, match="leased to worker 'w1'"):
            other.complete(tid, value=0.9)
        assert other.report(tid, 20, 0.3, lease_token=lease["lease_token"]) == "continue"  # a token handed over
        assert holder.complete(tid, value=0.5)["value"] == 0.5


def test_a_request_id_belongs_to_its_worker(http: httpx.Client) -> None:
    _study(http, "scoped")
    first = http.post("/leases", json={"worker_id": "w1", "request_id": "shared-id"}).json()
    other = http.post("/leases", json={"worker_id": "w2", "request_id": "shared-id"}).json()
    assert other["trial_id"] != first["trial_id"], "another worker's request is a new request"
    retry = http.post("/leases", json={"worker_id": "w1", "request_id": "shared-id"}).json()
    assert retry["trial_id"] == first["trial_id"], "the same worker's retry gets its lease back"
    assert retry["lease_token"] != first["lease_token"], "with a fresh token: the first answer never arrived"
    assert http.post(f"/trials/{first['trial_id']}/heartbeat", headers={HOLDER: first["lease_token"]}
                     ).status_code == 403, "the token of the lost answer is void"
    assert http.post(f"/trials/{first['trial_id']}/heartbeat", headers={HOLDER: retry["lease_token"]}
                     ).status_code == 200


@pytest.mark.parametrize("request_id", ["", " ", "a\u0000b", "x" * 65, "é"])
def test_a_malformed_request_id_is_422_and_burns_no_trial(http: httpx.Client, request_id: str) -> None:
    study_id = _study(http, "empty-key")
    for _ in range(3):
        refused = http.post("/leases", json={"worker_id": "w", "request_id": request_id})
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"][0]["loc"][-1] == "request_id"
    study = http.get(f"/studies/{study_id}").json()
    assert study["trials_used"] == 0 and study["counts"].get("fail", 0) == 0


def test_a_stale_holder_gets_409_and_cannot_overwrite(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path, lease_seconds=1.0)
    with LiveServer(settings) as live, Client(live.url) as client:
        client.create_study(study_spec("stale", baseline=None, search={"pruner": "none", "max_retries": 1}))
        lease = client.lease("slow", {}, "h")
        deadline = time.monotonic() + 30
        while client.get_trial(lease["trial_id"])["state"] == "RUNNING":  # the reaper takes the lease away
            assert time.monotonic() < deadline, "the reaper never expired the lease"
            time.sleep(0.2)
        with pytest.raises(ConflictError, match="expired"):
            client.complete(lease["trial_id"], value=0.9)
        assert client.get_trial(lease["trial_id"])["state"] == "FAIL"


def test_a_request_id_replayed_with_another_api_token_is_a_conflict(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path, auth=True)
    tokens = {name: create_token(settings, name, role) for name, role in
              (("admin", "admin"), ("node1", "worker"), ("node2", "worker"))}
    with LiveServer(settings) as live:
        def client(name: str) -> httpx.Client:
            return httpx.Client(base_url=live.url + "/api/v1", timeout=30,
                                headers={"Authorization": f"Bearer {tokens[name]}"})

        with client("admin") as admin, client("node1") as node1, client("node2") as node2:
            assert admin.post("/studies", json=study_spec("tokens", baseline=None)).status_code == 201
            body = {"worker_id": "gpu0", "request_id": "r-1"}
            leased = node1.post("/leases", json=body)
            assert leased.status_code == 200
            hijack = node2.post("/leases", json=body)
            assert hijack.status_code == 409 and "another API token" in hijack.json()["detail"]
            assert node2.post(f"/trials/{leased.json()['trial_id']}/heartbeat").status_code == 403
            assert node1.post("/leases", json=body).json()["trial_id"] == leased.json()["trial_id"]

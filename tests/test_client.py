"""The client's retry, backoff and error mapping, against httpx.MockTransport (no server)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tunefleet.service.client import (
    ApiError,
    AuthError,
    Client,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ServerUnavailable,
)

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that answers from a script and records every request."""

    def __init__(self, *answers: httpx.Response | Exception):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def make_client(handler: Handler, *, retries: int = 3, token: str | None = "tf_secret",
                sleeps: list[float] | None = None) -> Client:
    record = sleeps if sleeps is not None else []
    return Client("http://tunefleet.test", token, transport=httpx.MockTransport(handler), retries=retries,
                  backoff=0.5, max_backoff=4.0, sleep=record.append, rng=random.Random(0))


def ok(body: object, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def test_sends_bearer_token_and_api_prefix() -> None:
    handler = Recorder(ok({"id": 3, "name": "s"}))
    study = make_client(handler).get_study(3)
    assert study["id"] == 3
    (request,) = handler.requests
    assert request.url.path == "/api/v1/studies/3"
    assert request.headers["Authorization"] == "Bearer tf_secret"


def test_no_token_sends_no_authorization_header() -> None:
    handler = Recorder(ok({"status": "ok"}))
    make_client(handler, token=None).healthz()
    assert "Authorization" not in handler.requests[0].headers
    assert handler.requests[0].url.path == "/healthz"


def test_base_url_with_api_prefix_is_not_doubled() -> None:
    handler = Recorder(ok({"items": [], "total": 0, "limit": 50, "offset": 0}))
    client = Client("http://tunefleet.test/api/v1/", transport=httpx.MockTransport(handler))
    client.list_studies(state="running")
    assert handler.requests[0].url.path == "/api/v1/studies"
    assert handler.requests[0].url.params["state"] == "running"
    assert "name" not in handler.requests[0].url.params  # None filters are left out


@pytest.mark.parametrize("status", [502, 503, 504])
def test_retries_transient_statuses_then_succeeds(status: int) -> None:
    sleeps: list[float] = []
    handler = Recorder(ok({"detail": "busy"}, status), ok({"detail": "busy"}, status), ok({"id": 1}))
    assert make_client(handler, sleeps=sleeps).get_trial(1) == {"id": 1}
    assert len(handler.requests) == 3
    assert len(sleeps) == 2


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    sleeps: list[float] = []
    handler = Recorder(httpx.ConnectError("refused"))
    with pytest.raises(ServerUnavailable):
        make_client(handler, retries=6, sleeps=sleeps).get_trial(1)
    assert len(handler.requests) == 7  # the first try and 6 retries
    assert len(sleeps) == 6  # no sleep after the last try
    for attempt, slept in enumerate(sleeps):
        nominal = min(4.0, 0.5 * 2**attempt)
        assert nominal / 2 <= slept <= nominal  # jitter scales into [0.5, 1] of the nominal delay
    assert max(sleeps) <= 4.0


def test_retries_timeouts_and_connection_errors() -> None:
    handler = Recorder(httpx.ReadTimeout("slow"), httpx.ConnectError("refused"), ok({"prune": False}))
    assert make_client(handler).report(5, 20, 0.5, {"accuracy": 0.5}) == "continue"
    assert len(handler.requests) == 3


def test_gives_up_with_server_unavailable_naming_the_cause() -> None:
    handler = Recorder(httpx.ConnectError("connection refused"))
    with pytest.raises(ServerUnavailable) as info:
        make_client(handler, retries=2).get_study(1)
    assert info.value.status_code is None
    assert "cannot reach http://tunefleet.test" in str(info.value)
    assert "gave up after 3 tries" in str(info.value)


def test_exhausted_503_keeps_status_and_detail() -> None:
    handler = Recorder(ok({"detail": "database not ready: run `tunefleet db upgrade`"}, 503))
    with pytest.raises(ServerUnavailable) as info:
        make_client(handler, retries=1).get_study(1)
    assert info.value.status_code == 503
    assert "tunefleet db upgrade" in str(info.value)


def test_retry_after_header_is_honoured_up_to_max_backoff() -> None:
    sleeps: list[float] = []
    busy = httpx.Response(503, headers={"Retry-After": "3"}, json={"detail": "busy"})
    very_busy = httpx.Response(503, headers={"Retry-After": "600"}, json={"detail": "busy"})
    handler = Recorder(busy, very_busy, ok({"id": 1}))
    make_client(handler, sleeps=sleeps).get_trial(1)
    assert sleeps[0] == pytest.approx(3.0)
    assert sleeps[1] == pytest.approx(4.0)  # capped by max_backoff


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, ApiError), (401, AuthError), (403, ForbiddenError), (404, NotFoundError), (409, ConflictError),
     (500, ApiError)],
)
def test_client_errors_map_to_exceptions_without_retry(status: int, error: type[ApiError]) -> None:
    handler = Recorder(ok({"detail": "nope: do this instead"}, status))
    with pytest.raises(error) as info:
        make_client(handler).get_study(1)
    assert type(info.value) is error
    assert info.value.status_code == status
    assert str(info.value) == f"{status}: nope: do this instead"
    assert len(handler.requests) == 1


def test_422_lists_every_field_and_message() -> None:
    detail = [
        {"loc": ["body", "search_space", "lr"], "msg": "unknown training parameter 'lr'", "type": "value_error"},
        {"loc": ["body", "budget", "max_trials"], "msg": "must be >= 1", "type": "value_error"},
    ]
    handler = Recorder(ok({"detail": detail}, 422))
    with pytest.raises(ApiError) as info:
        make_client(handler).create_study({"name": "x"})
    message = str(info.value)
    assert "search_space.lr: unknown training parameter 'lr'" in message
    assert "budget.max_trials: must be >= 1" in message
    assert info.value.detail == detail


def test_non_json_error_body_is_still_readable() -> None:
    handler = Recorder(httpx.Response(500, text="Internal Server Error"))
    with pytest.raises(ApiError, match="500: Internal Server Error"):
        make_client(handler).get_study(1)


def test_lease_204_means_no_work() -> None:
    handler = Recorder(httpx.Response(204))
    assert make_client(handler).lease("node1-gpu0", {"type": "cpu"}, "node1") is None


def test_lease_reuses_its_request_id_across_retries_only() -> None:
    lease = {"trial_id": 17, "lease_token": "secret-17", "params": {}, "rungs": [20, 100]}
    handler = Recorder(httpx.ConnectError("reset"), ok({"detail": "busy"}, 502), ok(lease))
    client = make_client(handler)
    assert client.lease("node1-gpu0", {"type": "cuda", "name": "H100"}, "node1") == lease
    bodies = [json.loads(r.content) for r in handler.requests]
    assert len({b["request_id"] for b in bodies}) == 1
    assert bodies[0]["worker_id"] == "node1-gpu0" and bodies[0]["device"]["name"] == "H100"

    handler.answers = [ok(lease)]
    client.lease("node1-gpu0", {"type": "cpu"}, "node1")
    assert json.loads(handler.requests[-1].content)["request_id"] != bodies[0]["request_id"]


def test_calls_on_a_leased_trial_send_its_lease_token() -> None:
    handler = Recorder(ok({"trial_id": 17, "lease_token": "secret-17"}), ok({"prune": False}),
                       ok({"stop": False}), ok({"prune": False}), ok({"id": 9}))
    client = make_client(handler)
    client.lease("w", {}, "h")
    client.report(17, 20, 0.5)
    client.heartbeat(17, "w")
    client.report(17, 40, 0.6, lease_token="handed-over")
    client.complete(9, value=0.1)  # a trial this client never leased: no header, the server answers 403
    tokens = [r.headers.get("X-Lease-Token") for r in handler.requests]
    assert tokens == [None, "secret-17", "secret-17", "handed-over", None]


def test_report_returns_the_servers_action() -> None:
    handler = Recorder(ok({"action": "pause", "prune": False}), ok({"prune": True}))
    assert make_client(handler).report(9, 60, 0.4) == "pause"
    assert json.loads(handler.requests[0].content) == {"step": 60, "value": 0.4, "metrics": {}}
    assert make_client(handler).report(9, 60, 0.4) == "prune", "a server from before pause sends only prune"


def test_complete_needs_exactly_one_of_value_and_values() -> None:
    client = make_client(Recorder(ok({})))
    with pytest.raises(ValueError):
        client.complete(1)
    with pytest.raises(ValueError):
        client.complete(1, value=0.5, values=[0.5])


def test_complete_sends_metrics_and_extra() -> None:
    handler = Recorder(ok({"id": 4, "state": "COMPLETE"}))
    make_client(handler).complete(4, values=[0.9, 12.0], validation_metrics={"accuracy": 0.9},
                                  extra={"gpu_hours": 0.1})
    body = json.loads(handler.requests[0].content)
    assert body == {"values": [0.9, 12.0], "validation_metrics": {"accuracy": 0.9}, "test_metrics": {},
                    "extra": {"gpu_hours": 0.1}}


def test_upload_artifact_keeps_slashes_and_sends_raw_bytes(tmp_path: Path) -> None:
    handler = Recorder(ok({"name": "adapter/adapter model.safetensors", "size": 3}))
    file = tmp_path / "weights"
    file.write_bytes(b"\x00\x01\x02")
    make_client(handler).upload_artifact(8, "adapter/adapter model.safetensors", file)
    request = handler.requests[0]
    assert request.method == "PUT"
    assert request.url.raw_path == b"/api/v1/trials/8/artifacts/adapter/adapter%20model.safetensors"
    assert request.content == b"\x00\x01\x02"


def test_download_artifact_returns_bytes() -> None:
    handler = Recorder(httpx.Response(200, content=b"weights"))
    assert make_client(handler).download_artifact(8, "trainer_log.json") == b"weights"


def test_delete_answers_none_on_204() -> None:
    handler = Recorder(httpx.Response(204))
    assert make_client(handler).delete_study(2) is None
    assert handler.requests[0].method == "DELETE"


def test_readyz_does_not_retry() -> None:
    sleeps: list[float] = []
    handler = Recorder(ok({"detail": "schema at revision 1, need 2"}, 503))
    with pytest.raises(ServerUnavailable, match="need 2"):
        make_client(handler, sleeps=sleeps).readyz()
    assert len(handler.requests) == 1 and sleeps == []

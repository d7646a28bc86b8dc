"""The demo's progress moves while a trial runs: rungs and elapsed time of running trials, from a live server."""

from __future__ import annotations

from datetime import datetime, timedelta

from tests.conftest import LiveServer, study_spec
from tunefleet.progress import elapsed as _elapsed
from tunefleet.progress import study_progress as _progress
from tunefleet.service.client import Client


def _snapshot(client: Client, study_id: int, now: datetime | None = None) -> tuple[float, str]:
    study = client.get_study(study_id)
    return _progress(study, client.list_trials(study_id, limit=1000)["items"], 4, now)


def test_progress_changes_while_a_trial_runs(server: LiveServer) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("demo-progress", budget={"max_trials": 4}))
        assert _snapshot(client, study["id"]) == (0, "0 running, 0 pruned, 0 complete")
        lease = client.lease("w", {"type": "cpu"}, "host")
        assert lease is not None
        started = datetime.fromisoformat(client.get_trial(lease["trial_id"])["datetime_start"])

        completed, text = _snapshot(client, study["id"], started + timedelta(seconds=5))
        assert completed == 0 and text == "1 running, 0 pruned, 0 complete | #0 before its first rung, 5s"
        # Minutes later, with nothing reported yet, the line still moves: the elapsed time.
        later = _snapshot(client, study["id"], started + timedelta(minutes=16, seconds=3))[1]
        assert later.endswith("#0 before its first rung, 16m03s")

        assert client.report(lease["trial_id"], 20, 0.4123) == "continue"
        completed, text = _snapshot(client, study["id"], started + timedelta(hours=1, minutes=2))
        assert completed == 0.2  # a fifth of a trial's budget is done
        assert text.endswith("#0 at 20%: 0.41, 1h02m")

        client.complete(lease["trial_id"], value=0.8)
        completed, text = _snapshot(client, study["id"])
        assert completed == 1 and text == "0 running, 0 pruned, 1 complete"


def test_elapsed_of_an_unknown_start() -> None:
    assert _elapsed(None) == "?"
    assert _elapsed("2026-01-01T10:00:00+00:00", datetime.fromisoformat("2026-01-01T10:00:59+00:00")) == "59s"

"""optuna-dashboard pointed at the server's database shows tunefleet's studies, trials and metrics."""

from __future__ import annotations

import threading
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import httpx
from optuna_dashboard import wsgi

from tests.conftest import LiveServer, free_port, study_spec
from tunefleet.service.client import Client
from tunefleet.workers.loop import WorkerLoop
from tunefleet.workers.simulated import SimulatedTrainer


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_dashboard_reads_studies_written_through_the_api(server: LiveServer, tmp_path: Path) -> None:
    with Client(server.url) as client:
        study = client.create_study(study_spec("dash", budget={"max_trials": 6}))
        WorkerLoop(client, SimulatedTrainer(), worker_id="w", device="cpu", once=True, idle_sleep=0.1,
                   workdir=tmp_path).run()
    httpd = make_server("127.0.0.1", free_port(), wsgi(server.settings.resolved_database_url), handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_port}"
        studies = httpx.get(f"{base}/api/studies", timeout=30).json()["study_summaries"]
        [summary] = [s for s in studies if s["study_name"] == "dash"]
        assert summary["study_id"] == study["id"]
        detail = httpx.get(f"{base}/api/studies/{study['id']}", timeout=30).json()
    finally:
        httpd.shutdown()
    assert len(detail["trials"]) == 6
    assert detail["objective_names"] == ["accuracy"]
    complete = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert complete and all(any(a["key"] == "test_metrics" for a in t["user_attrs"]) for t in complete)
    assert any(t["intermediate_values"] for t in detail["trials"])

"""Operating a server: /metrics behind auth, exact gauges and counters, worker tokens kept out of `ps`, and
the server's own log lines (text or JSON, with request ids) on stderr. Real servers, HTTP and PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from tests.conftest import LiveServer, free_port, make_settings, study_spec
from tunefleet.cli import app
from tunefleet.service.auth import create_token
from tunefleet.service.client import Client


def _scrape(url: str, token: str | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, by (name, labels)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def _finished(url: str, state: str) -> float:
    return _scrape(url).get(("tunefleet_trials_finished_total", frozenset({("state", state)})), 0.0)


# -- 1. /metrics needs a token when auth is on ------------------------------------------------------------


def test_metrics_need_a_token_of_any_role_when_auth_is_on(secured: tuple[LiveServer, dict[str, str]]) -> None:
    live, tokens = secured
    for header in ({}, {"Authorization": "Bearer tf_not-a-real-token"}, {"Authorization": "Basic eDp5"}):
        refused = httpx.get(live.url + "/metrics", headers=header, timeout=30)
        assert refused.status_code == 401, header
        assert refused.headers["www-authenticate"] == "Bearer" and "token" in refused.json()["detail"]
    for role, token in tokens.items():
        assert ("tunefleet_active_leases", frozenset()) in _scrape(live.url, token), role
    assert httpx.get(live.url + "/healthz").status_code == 200, "health still needs no token"


def test_metrics_auth_false_keeps_metrics_open_and_true_closes_them_without_auth(pg_url: str,
                                                                                 tmp_path: Path) -> None:
    with LiveServer(make_settings(pg_url, tmp_path, auth=True, metrics_auth=False)) as live:
        assert ("tunefleet_active_leases", frozenset()) in _scrape(live.url)
        assert httpx.get(live.url + "/api/v1/studies").status_code == 401, "the API stays closed"
    settings = make_settings(pg_url, tmp_path, auth=False, metrics_auth=True)
    token = create_token(settings, "prometheus", "worker")
    with LiveServer(settings) as live:
        assert httpx.get(live.url + "/metrics").status_code == 401
        assert ("tunefleet_active_leases", frozenset()) in _scrape(live.url, token)


# -- 2. the active-leases gauge ----------------------------------------------------------------------------


def test_active_leases_gauge_counts_the_leases_in_the_database(server: LiveServer) -> None:
    with Client(server.url) as client:
        client.create_study(study_spec("gauge", baseline=None, search={"pruner": "none"}))
        assert _scrape(server.url)[("tunefleet_active_leases", frozenset())] == 0
        first = client.lease("w1", {}, "h")
        second = client.lease("w2", {}, "h")
        assert first is not None and second is not None
        assert _scrape(server.url)[("tunefleet_active_leases", frozenset())] == 2
        client.complete(first["trial_id"], value=0.5)
        assert _scrape(server.url)[("tunefleet_active_leases", frozenset())] == 1
        client.fail(second["trial_id"], "CUDA out of memory", retryable=False)
        assert _scrape(server.url)[("tunefleet_active_leases", frozenset())] == 0


# -- 3. pruned and expired trials are finished trials ----------------------------------------------------


def test_a_pruned_trial_is_counted_once(server: LiveServer) -> None:
    before = _finished(server.url, "pruned")
    with Client(server.url) as client:
        client.create_study(study_spec("count-pruned", baseline=None,
                                       search={"pruner": "median", "n_startup_trials": 1, "sampler": "random"}))
        good = client.lease("w", {}, "h")
        assert good is not None
        assert client.report(good["trial_id"], 20, 0.9) == "continue"
        client.complete(good["trial_id"], value=0.95)
        bad = client.lease("w", {}, "h")
        assert bad is not None
        assert client.report(bad["trial_id"], 20, 0.1) == "prune"
        assert client.report(bad["trial_id"], 20, 0.1) == "prune", "a retried report: the stored answer"
        assert client.report(bad["trial_id"], 60, 0.99) == "prune", "a report after the prune"
    assert _finished(server.url, "pruned") - before == 1


def test_an_expired_lease_is_a_finished_trial(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path, lease_seconds=1.0, heartbeat_grace_seconds=0.0,
                             reaper_interval_seconds=0.2)
    with LiveServer(settings) as live, Client(live.url) as client:
        before = _finished(live.url, "expired")
        client.create_study(study_spec("count-expired", baseline=None, search={"pruner": "none"}))
        leased = client.lease("w", {}, "h")  # and never heard from again
        assert leased is not None
        deadline = time.monotonic() + 30
        while _finished(live.url, "expired") == before and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # a few more reaper passes: still counted once
        assert _finished(live.url, "expired") - before == 1
        assert client.get_trial(leased["trial_id"])["state"] == "FAIL"
        assert _scrape(live.url)[("tunefleet_active_leases", frozenset())] == 0


# -- 4. worker tokens stay out of the process list ---------------------------------------------------------


def _worker(url: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFLEET_")}
    return subprocess.Popen([sys.executable, "-m", "tunefleet", "worker", "--once", "--simulated", "--server", url,
                             "--workdir", str(tmp_path / "work"), *args],
                            env={**clean, "TUNEFLEET_HOME": str(tmp_path), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_worker_reads_its_token_from_a_file_and_ps_never_shows_it(secured: tuple[LiveServer, dict[str, str]],
                                                                    tmp_path: Path) -> None:
    live, tokens = secured
    token = tokens["worker"]
    with Client(live.url, tokens["user"]) as client:
        study = client.create_study(study_spec("token-file", baseline=None, budget={"max_trials": 2},
                                               search={"pruner": "none"}))
        token_file = tmp_path / "worker.token"
        token_file.write_text(f"\n  {token}  \n")
        token_file.chmod(0o600)
        proc = _worker(live.url, tmp_path, "--token-file", str(token_file))
        cmdline, deadline = b"", time.monotonic() + 10
        while not cmdline and time.monotonic() < deadline:  # empty for an instant while exec sets it up
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(proc.pid)], capture_output=True, text=True)
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
        assert b"--token-file" in cmdline and token.encode() not in cmdline and token.encode() not in environ
        assert token not in ps.stdout
        assert "warning" not in stderr
        assert client.get_study(study["id"])["counts"]["complete"] == 2, "the worker leased and ran both trials"

    # --token on the command line still works, with a warning; TUNEFLEET_TOKEN gives none.
    typed = _worker(live.url, tmp_path, "--token", token)
    _, stderr = typed.communicate(timeout=180)
    assert typed.returncode == 0, stderr
    flat = " ".join(stderr.split())
    assert "warning:" in flat and "process list" in flat and "TUNEFLEET_TOKEN" in flat and "--token-file" in flat
    from_env = _worker(live.url, tmp_path, env={"TUNEFLEET_TOKEN": token})
    _, stderr = from_env.communicate(timeout=180)
    assert from_env.returncode == 0 and "warning" not in stderr, stderr


def test_a_missing_empty_or_unreadable_token_file_is_one_clear_error(tmp_path: Path) -> None:
    runner = CliRunner()
    empty = tmp_path / "empty.token"
    empty.write_text(" \n")
    cases = {tmp_path / "missing.token": "no such file", empty: "is empty", tmp_path: "is a folder"}
    for path, message in cases.items():
        result = runner.invoke(app, ["worker", "--once", "--simulated", "--server", "http://127.0.0.1:9",
                                     "--token-file", str(path)], env={"COLUMNS": "200"})
        assert result.exit_code == 1, result.output
        assert f"--token-file {path}" in result.output and message in result.output
        assert "Traceback" not in result.output
    if os.geteuid() != 0:  # root reads any file
        unreadable = tmp_path / "unreadable.token"
        unreadable.write_text("tf_x")
        unreadable.chmod(0)
        result = runner.invoke(app, ["worker", "--once", "--token-file", str(unreadable)])
        assert result.exit_code == 1 and "permission denied" in result.output


def test_worker_help_says_what_docs_cli_md_says() -> None:
    result = CliRunner().invoke(app, ["worker", "--help"], env={"COLUMNS": "250"})
    text = " ".join(result.output.replace("│", " ").split())
    docs = " ".join((Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text().split())
    assert "--token-file" in text and "TUNEFLEET_TOKEN_FILE" in text
    for phrase in ("surrounding whitespace stripped", "Wins over TUNEFLEET_TOKEN", "with --token too it is an error",
                   "process list"):
        assert phrase in text and phrase in docs, phrase


# -- 5. the server's own log lines -------------------------------------------------------------------------


class _ServerCommand:
    """`tunefleet server` as a subprocess, its stderr in a file."""

    def __init__(self, db_url: str, home: Path, *args: str, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = home / f"server-{self.port}.stderr"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFLEET_")}
        with self.stderr_path.open("w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tunefleet", "server", "--port", str(self.port), *args],
                env={**clean, "TUNEFLEET_DATABASE_URL": db_url, "TUNEFLEET_HOME": str(home), **env},
                stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{self.stderr_path.read_text()}")
            time.sleep(0.2)

    def stop(self) -> str:
        """Stop the server; its stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.stderr_path.read_text()


def test_server_writes_tunefleet_log_lines_with_time_level_and_logger(pg_url: str, tmp_path: Path) -> None:
    server = _ServerCommand(pg_url, tmp_path)
    try:
        created = httpx.post(server.url + "/api/v1/studies", json=study_spec("log-text"), timeout=60)
        echoed = httpx.get(server.url + "/healthz", headers={"X-Request-ID": "mine-42"})
    finally:
        stderr = server.stop()
    assert created.status_code == 201, created.text
    study_id = created.json()["id"]
    line = re.compile(rf"^\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z INFO tunefleet\.service\.studies: "
                      rf"study {study_id} \(log-text\) created: .* \[request_id=(\w+)\]$", re.M)
    found = line.search(stderr)
    assert found, stderr
    assert re.search(r"^\S+ INFO tunefleet\.server: tunefleet \S+ on http://127\.0\.0\.1", stderr, re.M), stderr
    assert created.headers["x-request-id"] == found.group(1), "the response names the request id of its log lines"
    assert re.fullmatch(r"[0-9a-f]{32}", found.group(1)), "a new request id when the caller sent none"
    assert echoed.headers["x-request-id"] == "mine-42", "the caller's request id is kept"


def test_json_logs_of_every_server_process_carry_the_request_and_study(pg_url: str, tmp_path: Path) -> None:
    server = _ServerCommand(pg_url, tmp_path, "--processes", "2", TUNEFLEET_LOG_FORMAT="json",
                            TUNEFLEET_LOG_LEVEL="INFO")
    try:
        created = httpx.post(server.url + "/api/v1/studies", json=study_spec("log-json"),
                             headers={"X-Request-ID": "ops-create-1"}, timeout=60)
        assert created.status_code == 201 and created.headers["x-request-id"] == "ops-create-1"
        study_id = created.json()["id"]
        # Several calls, so both processes (one socket) most likely serve some.
        for i in range(6):
            action = "pause" if i % 2 == 0 else "resume"
            answer = httpx.post(f"{server.url}/api/v1/studies/{study_id}/{action}",
                                headers={"X-Request-ID": f"ops-{action}-{i}"}, timeout=60)
            assert answer.status_code == 200, answer.text
        leased = httpx.post(server.url + "/api/v1/leases", json={"worker_id": "gpu-7"}, timeout=60)
        assert leased.status_code == 200, leased.text
        bad = httpx.get(server.url + "/healthz", headers={"X-Request-ID": "bad id; with spaces and a quote \""})
        assert re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"]), "an unsafe id is replaced"
    finally:
        stderr = server.stop()
    entries = []
    for raw in stderr.splitlines():
        if raw.strip():
            entry = json.loads(raw)  # every line is one JSON object
            assert {"time", "level", "logger", "message"} <= entry.keys(), entry
            entries.append(entry)
    made = [e for e in entries if e.get("request_id") == "ops-create-1" and e["logger"].startswith("tunefleet.")]
    assert any(f"study {study_id} (log-json) created" in e["message"] for e in made), made
    assert all(e["level"] == "INFO" for e in made)
    paused = [e for e in entries if e.get("request_id") == "ops-pause-0" and e["logger"].startswith("tunefleet.")]
    assert paused and paused[0]["study_id"] == study_id, paused
    lease_lines = [e for e in entries if "leased to gpu-7" in e["message"]]
    assert lease_lines and lease_lines[0]["worker_id"] == "gpu-7", lease_lines
    assert lease_lines[0]["trial_id"] == leased.json()["trial_id"] and lease_lines[0]["study_id"] == study_id
    assert len({e["message"] for e in entries if e["message"].startswith("Started server process")}) == 2, \
        "both processes log through tunefleet's handler"

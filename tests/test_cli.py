"""The `tunefleet` command line against a live server and real databases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import LiveServer, study_spec
from tunefleet.cli import app
from tunefleet.service.db import head_revision

runner = CliRunner()


def _run(live: LiveServer, *args: str) -> str:
    result = runner.invoke(app, ["--server", live.url, *args], catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_study_lifecycle_through_the_cli(server: LiveServer, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(study_spec("cli-study", budget={"max_trials": 4})))
    study_id = int(_run(server, "study", "create", str(spec_file), "-q").strip())
    assert "cli-study" in _run(server, "study", "ls")
    from tunefleet.service.client import Client
    from tunefleet.workers.loop import WorkerLoop
    from tunefleet.workers.simulated import SimulatedTrainer

    with Client(server.url) as client:
        WorkerLoop(client, SimulatedTrainer(), worker_id="w", device="cpu", once=True, idle_sleep=0.1,
                   workdir=tmp_path / "w").run()
    shown = json.loads(_run(server, "study", "show", str(study_id), "--json"))
    assert shown["state"] == "completed" and shown["trials_used"] == 4
    assert "COMPLETE" in _run(server, "trial", "ls", str(study_id))
    report = json.loads(_run(server, "study", "report", str(study_id), "--json"))
    assert report["rungs"][0]["step"] == 20
    assert "Spearman" in _run(server, "study", "report", str(study_id)) or "spearman" in \
        _run(server, "study", "report", str(study_id))
    out = tmp_path / "best"
    _run(server, "study", "export", str(study_id), "--best", str(out))
    card = (out / "README.md").read_text()
    assert str(shown["best_trial"]["value"])[:4] in card and (out / "trainer_log.json").exists()


def test_bad_spec_and_unknown_study_print_one_line_and_exit_1(server: LiveServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(study_spec("bad", search={"sampler": "bayes"})))
    result = runner.invoke(app, ["--server", server.url, "study", "create", str(bad)])
    assert result.exit_code == 1 and "search.sampler" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["--server", server.url, "study", "show", "999"])
    assert result.exit_code == 1 and "999" in result.output


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunefleet", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_server_on_unmigrated_database_says_what_to_run(pg_template: str, tmp_path: Path) -> None:
    from tests.conftest import _db_url, _drop, _pg_connect

    name = f"tf_cli_{os.getpid()}"
    conn = _pg_connect()
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    env = {"TUNEFLEET_DATABASE_URL": _db_url(name), "TUNEFLEET_HOME": str(tmp_path)}
    try:
        refused = _cli(env, "server", "--port", "1")
        assert refused.returncode == 1, refused.stderr
        assert "tunefleet db upgrade" in refused.stderr + refused.stdout and "Traceback" not in refused.stderr
        upgraded = _cli(env, "db", "upgrade")
        assert upgraded.returncode == 0 and head_revision(_db_url(name)) in upgraded.stdout
        token = _cli(env, "token", "create", "--name", "ops", "--role", "admin")
        assert token.returncode == 0 and token.stdout.strip().startswith("tf_")
    finally:
        _drop(name)


@pytest.mark.parametrize("role", ["root"])
def test_token_create_rejects_unknown_role(role: str, sqlite_url: str, tmp_path: Path) -> None:
    result = _cli({"TUNEFLEET_DATABASE_URL": sqlite_url, "TUNEFLEET_HOME": str(tmp_path)},
                  "token", "create", "--name", "x", "--role", role)
    assert result.returncode != 0 and "Traceback" not in result.stderr


def test_several_server_processes_need_postgresql(sqlite_url: str, tmp_path: Path) -> None:
    refused = _cli({"TUNEFLEET_DATABASE_URL": sqlite_url, "TUNEFLEET_HOME": str(tmp_path)},
                   "server", "--port", "1", "--processes", "2")
    assert refused.returncode == 2, refused.stderr
    assert "need PostgreSQL" in refused.stderr + refused.stdout and "Traceback" not in refused.stderr


def _help(*command: str) -> str:
    """A command's --help text with the box drawing and line wrapping flattened to single spaces."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_pause_lets_running_trials_finish_as_its_help_says(server: LiveServer) -> None:
    assert "no new trials are leased; running trials go on and finish" in _help("study", "pause")
    assert "re-queued" not in _help("study", "pause")
    from tunefleet.service.client import Client

    with Client(server.url) as client:
        study = client.create_study(study_spec("pause-finishes", budget={"max_trials": 4}))
        lease = client.lease("w", {"type": "cpu"}, "host")
        assert lease is not None
        assert "is now paused" in _run(server, "study", "pause", str(study["id"]))
        assert client.heartbeat(lease["trial_id"], "w")["stop"] is False  # not told to stop
        assert client.lease("w2", {"type": "cpu"}, "host") is None  # no new leases
        client.report(lease["trial_id"], 20, 0.5)
        client.complete(lease["trial_id"], value=0.7)
        assert client.get_trial(lease["trial_id"])["state"] == "COMPLETE"
        assert client.get_study(study["id"])["state"] == "paused"


def test_stop_help_matches_what_stop_does(server: LiveServer) -> None:
    assert "told to stop at their next heartbeat and are not re-queued" in _help("study", "stop")
    from tunefleet.service.client import Client

    with Client(server.url) as client:
        study = client.create_study(study_spec("stop-tells", budget={"max_trials": 4}))
        lease = client.lease("w", {"type": "cpu"}, "host")
        assert lease is not None
        _run(server, "study", "stop", str(study["id"]))
        assert client.heartbeat(lease["trial_id"], "w")["stop"] is True
        client.fail(lease["trial_id"], "stopped by the server", retryable=True)  # what a worker then does
        assert client.list_trials(study["id"], state="WAITING")["total"] == 0  # not re-queued


def test_piped_study_ls_keeps_full_names_and_states(server: LiveServer) -> None:
    name = "product-attributes-generative-lora-sweep-on-the-shared-cluster-2026-11-28"
    from tunefleet.service.client import Client

    with Client(server.url) as client:
        client.create_study(study_spec(name))
        paused = client.create_study(study_spec(name + "-paused"))
        client.pause_study(paused["id"])
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # as in a cron job or `| grep`
    result = subprocess.run([sys.executable, "-m", "tunefleet", "--server", server.url, "study", "ls"],
                            env=env, capture_output=True, stdin=subprocess.DEVNULL,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[2].strip(): line.split("│")[3].strip()
            for line in result.stdout.splitlines() if line.startswith("│")}
    assert rows == {name: "running", name + "-paused": "paused"}, result.stdout


def _new_database(prefix: str) -> str:
    from tests.conftest import _pg_connect

    name = f"{prefix}_{os.getpid()}_{time.monotonic_ns() % 10**6}"
    conn = _pg_connect()
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return name


def _bare_url(name: str, scheme: str) -> str:
    """`<scheme>://user@host:port/name` for the test server: no driver named, as users write it."""
    from sqlalchemy.engine import make_url

    from tests.conftest import PG_ADMIN_URL

    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    return scheme + "://" + url.split("://", 1)[1]


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_db_upgrade_accepts_a_bare_postgresql_url(scheme: str, pg_template: str, tmp_path: Path) -> None:
    from tests.conftest import _drop

    name = _new_database("tf_bare")
    env = {"TUNEFLEET_DATABASE_URL": _bare_url(name, scheme), "TUNEFLEET_HOME": str(tmp_path)}
    try:
        upgraded = _cli(env, "db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        assert f"revision {head_revision(_bare_url(name, scheme))}" in upgraded.stdout
        assert "psycopg'" not in upgraded.stderr
        token = _cli(env, "token", "create", "--name", "ops", "--role", "admin")
        assert token.returncode == 0 and token.stdout.strip().startswith("tf_"), token.stderr
    finally:
        _drop(name)


def test_database_urls_are_normalised_in_one_place(tmp_path: Path) -> None:
    from tunefleet.service.config import Settings, normalise_database_url

    assert Settings(database_url="postgresql://u:p@h:5432/d").resolved_database_url == \
        "postgresql+psycopg2://u:p@h:5432/d"
    assert normalise_database_url("postgres://h/d") == "postgresql+psycopg2://h/d"
    for unchanged in ("postgresql+psycopg2://h/d", "postgresql+asyncpg://h/d", "sqlite:///x.db"):
        assert normalise_database_url(unchanged) == unchanged
    assert Settings(home=tmp_path).resolved_database_url.startswith("sqlite:///")


def test_dashboard_opens_a_bare_postgresql_url(pg_url: str, tmp_path: Path) -> None:
    import httpx

    from tests.conftest import free_port

    bare = _bare_url(pg_url.rsplit("/", 1)[1], "postgresql")
    port = free_port()
    env = {**os.environ, "TUNEFLEET_DATABASE_URL": bare, "TUNEFLEET_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "tunefleet", "dashboard", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/studies", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            proc.kill()
            raise AssertionError(f"dashboard did not answer: {proc.communicate(timeout=10)}")
        assert answer.status_code == 200 and "study_summaries" in answer.json()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(20)


def test_study_create_wait_follows_the_study_to_its_end(server: LiveServer, tmp_path: Path) -> None:
    import threading

    from tunefleet.service.client import Client
    from tunefleet.workers.loop import WorkerLoop
    from tunefleet.workers.simulated import SimulatedTrainer

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(study_spec("cli-wait", budget={"max_trials": 3}, baseline=None)))
    with Client(server.url) as client:
        loop = WorkerLoop(client, SimulatedTrainer(seconds_per_rung=0.2), worker_id="w", device="cpu", once=False,
                          idle_sleep=0.1, workdir=tmp_path / "w")
        worker = threading.Thread(target=loop.run, daemon=True)
        worker.start()
        try:
            output = _run(server, "study", "create", str(spec_file), "--wait", "--interval", "0.2")
        finally:
            loop.request_shutdown()
            worker.join(30)
    assert "cli-wait" in output and "completed" in output

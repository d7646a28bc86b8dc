"""The `tunefleet` command line against a live server and real databases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import LiveServer, study_spec
from tunefleet.cli import app

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
        assert upgraded.returncode == 0 and "0001" in upgraded.stdout
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

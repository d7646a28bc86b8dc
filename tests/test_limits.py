"""Limits, configurable and refused with the setting to change: spec size, search-space size, artifact bytes
per trial, and database connections per server process against PostgreSQL's max_connections."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, make_settings, study_spec
from tunefleet.service.client import Client
from tunefleet.service.config import Settings
from tunefleet.service.db import check_connection_budget, make_engine
from tunefleet.service.errors import DatabaseNotReady


@pytest.fixture
def limited(pg_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    settings = make_settings(pg_url, tmp_path, max_spec_kb=4, max_search_params=3, max_search_choices=50,
                             max_trial_artifact_mb=1)
    with LiveServer(settings) as live:
        yield live


def _post(live: LiveServer, spec: dict) -> httpx.Response:
    return httpx.post(f"{live.url}/api/v1/studies", json=spec, timeout=30)


def _count(live: LiveServer) -> int:
    return httpx.get(f"{live.url}/api/v1/studies", timeout=30).json()["total"]


def test_a_spec_over_the_size_limit_is_422_naming_the_setting(limited: LiveServer) -> None:
    refused = _post(limited, study_spec("big", description="x" * 5000))
    assert refused.status_code == 422
    assert "TUNEFLEET_MAX_SPEC_KB" in refused.json()["detail"][0]["msg"]
    assert _count(limited) == 0
    assert _post(limited, study_spec("small", description="x" * 100)).status_code == 201


def test_a_search_space_over_its_limits_is_422(limited: LiveServer) -> None:
    many_choices = study_spec("choices", baseline=None, search_space={
        "lora_r": {"type": "categorical", "choices": list(range(51))}})
    refused = _post(limited, many_choices)
    assert refused.status_code == 422
    [error] = refused.json()["detail"]
    assert error["loc"] == ["search_space"] and "TUNEFLEET_MAX_SEARCH_CHOICES" in error["msg"]
    too_many = study_spec("params", baseline=None, search_space={
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "lora_r": {"type": "categorical", "choices": [4, 8]},
        "lora_alpha": {"type": "int", "low": 4, "high": 32},
        "weight_decay": {"type": "float", "low": 0.0, "high": 0.1}})
    refused = _post(limited, too_many)
    assert refused.status_code == 422 and "TUNEFLEET_MAX_SEARCH_PARAMS" in refused.json()["detail"][0]["msg"]
    assert _count(limited) == 0


def test_a_trials_artifacts_together_stay_under_their_limit(limited: LiveServer) -> None:
    with Client(limited.url) as client:
        client.create_study(study_spec("artifacts", baseline=None))
        trial_id = client.lease("w", {}, "h")["trial_id"]
        client.upload_artifact(trial_id, "a.bin", b"a" * 600_000)
        with pytest.raises(Exception, match="TUNEFLEET_MAX_TRIAL_ARTIFACT_MB"):
            client.upload_artifact(trial_id, "b.bin", b"b" * 600_000)
        assert [a["name"] for a in client.list_artifacts(trial_id)] == ["a.bin"], "nothing written"
        client.upload_artifact(trial_id, "a.bin", b"A" * 900_000)  # replacing a file counts it once
        assert client.download_artifact(trial_id, "a.bin") == b"A" * 900_000


def test_pool_sizes_come_from_the_settings(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path, db_pool_size=3, db_max_overflow=1)
    engine = make_engine(settings.resolved_database_url, settings)
    try:
        assert engine.pool.size() == 3 and engine.pool._max_overflow == 1  # type: ignore[attr-defined]
    finally:
        engine.dispose()
    assert settings.connections_per_process == 2 * (3 + 1)


def test_more_connections_than_postgresql_allows_are_refused_at_start(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path)
    engine = make_engine(settings.resolved_database_url, settings)
    try:
        check_connection_budget(engine, settings, processes=1)  # the defaults fit a stock PostgreSQL
        greedy = Settings(database_url=pg_url, home=tmp_path, db_pool_size=50, db_max_overflow=50)
        with pytest.raises(DatabaseNotReady, match=r"2 server process\(es\) × 200 connections .* max_connections"):
            check_connection_budget(engine, greedy, processes=2)
    finally:
        engine.dispose()
    sqlite = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        check_connection_budget(sqlite, greedy, processes=8)  # SQLite has no connection limit to check
    finally:
        sqlite.dispose()


def test_the_server_refuses_to_start_with_more_connections_than_postgresql_allows(pg_url: str,
                                                                                 tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tunefleet.service.config import Settings as _Settings
    from tunefleet.service.db import upgrade_database

    upgrade_database(_Settings(database_url=pg_url, home=tmp_path))
    env = {**os.environ, "TUNEFLEET_DATABASE_URL": pg_url, "TUNEFLEET_HOME": str(tmp_path),
           "TUNEFLEET_DB_POOL_SIZE": "40", "TUNEFLEET_DB_MAX_OVERFLOW": "40"}
    result = subprocess.run([sys.executable, "-m", "tunefleet", "server", "--port", "1", "--processes", "2"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "exceeds PostgreSQL's max_connections" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr

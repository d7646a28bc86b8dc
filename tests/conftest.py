"""Shared fixtures: a fresh real PostgreSQL database per test (or SQLite), settings, and a live uvicorn server.

PostgreSQL is the one at TUNEFLEET_TEST_PG (default postgresql+psycopg2://postgres@127.0.0.1:5432/test);
each test gets its own database, copied from a migrated template made once per run and dropped after.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg2
import pytest
from sqlalchemy.engine import make_url

from tunefleet.service.api.app import BackgroundServer
from tunefleet.service.config import Settings
from tunefleet.service.db import upgrade_database

# One CPU thread for torch in this process and in every process the tests start (servers, workers, ranks):
# the suite runs them beside PostgreSQL on 2 cores, where torch's default of a thread per core makes them fight
# for the cores. Read by torch when it is first imported, which is after this file.
os.environ.setdefault("OMP_NUM_THREADS", "1")

PG_ADMIN_URL = os.environ.get("TUNEFLEET_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
RUN_ID = uuid.uuid4().hex[:8]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A test that runs a server entry point in this process (`run_server`) configures logging for the whole
    process; put it back, so later tests' captured output holds no server log lines."""
    root, ours = logging.getLogger(), logging.getLogger("tunefleet")
    handlers, levels = list(root.handlers), (root.level, ours.level)
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(levels[0])
    ours.setLevel(levels[1])


def _pg_connect():  # type: ignore[no-untyped-def]
    url = make_url(PG_ADMIN_URL)
    conn = psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username, password=url.password,
                            dbname=url.database)
    conn.autocommit = True
    return conn


def _db_url(name: str) -> str:
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop(name: str) -> None:
    with contextlib.closing(_pg_connect()) as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database that each test's database is copied from (CREATE DATABASE ... TEMPLATE)."""
    name = f"tf_template_{RUN_ID}"
    try:
        conn = _pg_connect()
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({exc}); start it with "
                    "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`")
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    upgrade_database(Settings(database_url=_db_url(name), home=tmp_path_factory.mktemp("template")))
    yield name
    _drop(name)


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    name = f"tf_test_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    with contextlib.closing(_pg_connect()) as conn, conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield _db_url(name)
    _drop(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'tunefleet.db'}"
    upgrade_database(Settings(database_url=url, home=tmp_path))
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs a test against both storage back ends."""
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


def make_settings(db_url: str, home: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"database_url": db_url, "home": home, "lease_seconds": 30.0,
                                 "heartbeat_grace_seconds": 0.0, "reaper_interval_seconds": 0.5, "auth": False}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def wait_until(what: str, condition: Callable[[], object], timeout: float = 60.0) -> object:
    """Poll `condition` until it returns something truthy (returned); fail naming `what` after `timeout` s.
    For background work (the reaper, queue filler) whose timing a loaded machine stretches."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer(BackgroundServer):
    """A real uvicorn server on a loopback port, in a thread of the test process."""

    def __init__(self, settings: Settings):
        from tunefleet.service.api.app import create_app

        self.settings = settings
        self.app = create_app(settings)
        super().__init__(self.app)

    @property
    def backend(self):  # type: ignore[no-untyped-def]
        return self.app.state.backend


@pytest.fixture
def server(pg_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    """A live server on a fresh PostgreSQL database, auth off."""
    with LiveServer(make_settings(pg_url, tmp_path)) as live:
        yield live


@pytest.fixture
def secured(pg_url: str, tmp_path: Path) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    """A live server with auth on, on a fresh PostgreSQL database, and one token of each role."""
    from tunefleet.service.auth import create_token

    settings = make_settings(pg_url, tmp_path, auth=True)
    tokens = {role: create_token(settings, f"{role}-token", role) for role in ("admin", "user", "worker")}
    with LiveServer(settings) as live:
        yield live, tokens


S3_BUCKET = "tunefleet-test"


@pytest.fixture(scope="session")
def _moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        moto.stop()


@pytest.fixture
def s3_endpoint(_moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real S3 API server (moto in server mode) on a loopback port, emptied, with the bucket S3_BUCKET; its
    URL. The test process gets dummy AWS credentials (the server's store uses them); nothing else does."""
    import boto3

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    httpx.post(f"{_moto_server}/moto-api/reset").raise_for_status()  # every test starts from an empty server
    boto3.client("s3", endpoint_url=_moto_server).create_bucket(Bucket=S3_BUCKET)
    return _moto_server


def s3_keys(endpoint: str, prefix: str = "") -> list[str]:
    """Every key in S3_BUCKET under `prefix`, asked of the S3 server itself."""
    import boto3

    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(
        Bucket=S3_BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def study_spec(name: str = "study", **overrides: object) -> dict:
    """A valid spec for the simulated worker (no model is loaded; the names only need to validate)."""
    spec: dict = {
        "name": name,
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "task": "sequence-classification",
        "data": {"train": "data/train.jsonl", "text": "text", "label": "label"},
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "search_space": {
            "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
            "lora_r": {"type": "categorical", "choices": [4, 8, 16, 32]},
            "method": {"type": "categorical", "choices": ["lora", "full"]},
        },
        "fixed": {"max_steps": 100},
        "baseline": {"learning_rate": 5e-5, "lora_r": 8, "method": "lora"},
        "search": {"sampler": "tpe", "pruner": "hyperband", "min_resource": 0.2, "seed": 0, "n_startup_trials": 4},
        "budget": {"max_trials": 12},
    }
    spec.update(overrides)
    return spec

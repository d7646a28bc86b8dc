"""Schema checks: a server on an un-migrated or older database says what to run, never a traceback."""

from __future__ import annotations

import contextlib
import logging
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import _db_url, _drop, _pg_connect
from tunefleet.service.api.app import run_server
from tunefleet.service.config import Settings, get_settings
from tunefleet.service.db import check_database, head_revision, make_engine, upgrade_database
from tunefleet.service.errors import DatabaseNotReady


@pytest.fixture
def empty_pg() -> str:
    name = f"tf_empty_{uuid.uuid4().hex[:8]}"
    with contextlib.closing(_pg_connect()) as conn, conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield _db_url(name)
    _drop(name)


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return request.getfixturevalue("empty_pg")


def test_unmigrated_database_is_reported_with_the_fix(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        with pytest.raises(DatabaseNotReady, match="run `tunefleet db upgrade`"):
            check_database(engine)
    finally:
        engine.dispose()


def test_upgrade_then_ready_and_upgrade_is_idempotent(empty_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=empty_url, home=tmp_path)
    assert upgrade_database(settings) == head_revision(empty_url)
    assert upgrade_database(settings) == head_revision(empty_url)
    engine = make_engine(empty_url)
    try:
        check_database(engine)
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"tf_studies", "tf_leases", "tf_reports", "tf_tokens", "tf_artifacts", "tf_alembic_version"} <= tables
    assert {"studies", "trials", "version_info", "alembic_version"} <= tables, "Optuna's own tables"


def test_older_schema_is_reported(empty_url: str, tmp_path: Path) -> None:
    upgrade_database(Settings(database_url=empty_url, home=tmp_path))
    engine = make_engine(empty_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE tf_alembic_version SET version_num = '0000'"))
        with pytest.raises(DatabaseNotReady, match="revision 0000, this tunefleet needs"):
            check_database(engine)
    finally:
        engine.dispose()


def test_server_start_on_unmigrated_database_exits_with_message(empty_url: str, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TUNEFLEET_DATABASE_URL", empty_url)
    get_settings.cache_clear()
    try:
        with caplog.at_level(logging.ERROR):
            assert run_server(host="127.0.0.1", port=1) == 1
        assert "tunefleet db upgrade" in caplog.text
    finally:
        get_settings.cache_clear()


def test_unreachable_database_is_reported() -> None:
    engine = make_engine("postgresql+psycopg2://postgres@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(DatabaseNotReady, match="cannot reach the database"):
            check_database(engine)
    finally:
        engine.dispose()


def _insert_study(conn: sa.Connection) -> None:
    """Study 1, as raw SQL: the tests below write rows at an older schema than the models describe."""
    conn.execute(sa.text("INSERT INTO tf_studies (id, name, spec, state, created_at, updated_at) VALUES "
                         "(1, 's', '{}', 'running', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))


def _insert_lease(conn: sa.Connection, trial_id: int, worker: str, request_id: str) -> None:
    """An active lease of study 1, in the columns every schema since 0001 has."""
    conn.execute(sa.text("INSERT INTO tf_leases (trial_id, study_id, worker_id, request_id, attempt, state, "
                         "requeued, started_at, deadline) VALUES (:t, 1, :w, :r, 0, 'active', false, "
                         "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"), {"t": trial_id, "w": worker, "r": request_id})


def test_lease_tokens_migrate_an_existing_database_up_and_down(empty_url: str) -> None:
    """0002 keeps the leases (and their reports) of a database made by 0001, scopes request ids per worker,
    and reverts. On SQLite a table change copies the table: no row may be lost to ON DELETE CASCADE."""
    from tunefleet.service.db import migrate

    def columns() -> set[str]:
        return {c["name"] for c in sa.inspect(engine).get_columns("tf_leases")}

    engine = make_engine(empty_url)
    try:
        migrate(engine, "0001")
        with engine.begin() as conn:
            _insert_study(conn)
            _insert_lease(conn, 1, "w1", "r1")
            conn.execute(sa.text("INSERT INTO tf_reports (trial_id, step, value, metrics, prune, created_at) "
                                 "VALUES (1, 20, 0.5, '{}', false, CURRENT_TIMESTAMP)"))
        migrate(engine, "head")
        assert {"token_hash", "owner_token_id"} <= columns()
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT worker_id, request_id FROM tf_leases")).all() == [("w1", "r1")]
            assert conn.execute(sa.text("SELECT trial_id, step FROM tf_reports")).all() == [(1, 20)]
            _insert_lease(conn, 2, "w2", "r1")  # another worker may use the same key
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            _insert_lease(conn, 3, "w1", "r1")  # the same worker may not
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM tf_leases WHERE trial_id = 2"))
        migrate(engine, "0001", down=True)
        assert "token_hash" not in columns()
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT trial_id, step FROM tf_reports")).all() == [(1, 20)]
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            _insert_lease(conn, 4, "w2", "r1")  # 0001's global uniqueness is back
    finally:
        engine.dispose()


def test_artifact_sizes_over_2_gib_are_kept_after_0006_and_the_migration_reverts(empty_url: str) -> None:
    """A full fine-tuning's weights pass 2 GiB; before 0006 PostgreSQL refused such a size (32-bit column)."""
    from tunefleet.service.db import migrate

    big = 3 * 2**30

    def add_artifact(conn: sa.Connection, trial_id: int, size: int) -> None:
        _insert_lease(conn, trial_id, "w", f"r{trial_id}")
        conn.execute(sa.text("INSERT INTO tf_artifacts (trial_id, study_id, name, path, size, sha256, created_at) "
                             "VALUES (:t, 1, 'model.safetensors', 'p', :s, :h, CURRENT_TIMESTAMP)"),
                     {"t": trial_id, "s": size, "h": "0" * 64})

    engine = make_engine(empty_url)
    try:
        migrate(engine, "0005")
        with engine.begin() as conn:
            _insert_study(conn)
            add_artifact(conn, 1, 1234)
        if engine.dialect.name == "postgresql":
            with pytest.raises(sa.exc.DataError), engine.begin() as conn:
                add_artifact(conn, 2, big)  # what a 3 GiB checkpoint met before 0006
        migrate(engine, "head")
        with engine.begin() as conn:
            add_artifact(conn, 2, big)
            rows = conn.execute(sa.text("SELECT trial_id, size FROM tf_artifacts ORDER BY trial_id")).all()
        assert [tuple(r) for r in rows] == [(1, 1234), (2, big)], "the old row kept, the large one stored exactly"
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM tf_leases WHERE trial_id = 2"))  # down needs sizes that fit
        migrate(engine, "0005", down=True)
        with engine.begin() as conn:
            assert [tuple(r) for r in conn.execute(sa.text("SELECT trial_id, size FROM tf_artifacts"))] == [(1, 1234)]
    finally:
        engine.dispose()

"""Engine, sessions, the one transaction helper, and the schema check / upgrade.

Our tables are migrated by alembic from ``migrations/`` (version table ``tf_alembic_version``);
Optuna's tables are created and upgraded by Optuna itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tunefleet.service.config import Settings
from tunefleet.service.errors import DatabaseNotReady
from tunefleet.service.storage import OPTUNA_VERSION_TABLE

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "VERSION_TABLE",
    "check_connection_budget",
    "check_database",
    "engine_kwargs",
    "make_engine",
    "migrate",
    "transaction",
    "upgrade_database",
]

log = logging.getLogger(__name__)
VERSION_TABLE = "tf_alembic_version"
# alembic's script location: the `tunefleet.migrations` folder beside this package (not imported: it
# imports the server's models itself).
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def engine_kwargs(url: str, settings: Settings | None = None) -> dict:
    """Pool settings shared by our engine and Optuna's RDBStorage (`settings`' pool sizes, or the defaults)."""
    if url.startswith("sqlite"):
        return {"connect_args": {"check_same_thread": False, "timeout": 60}}
    settings = settings or Settings()
    # pool_timeout: a request waiting for a connection gives up within seconds, answered 503 (retried).
    return {"pool_pre_ping": True, "pool_size": settings.db_pool_size, "max_overflow": settings.db_max_overflow,
            "pool_recycle": 1800, "pool_timeout": 10}


def make_engine(url: str, settings: Settings | None = None) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, **engine_kwargs(url, settings))
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets optuna-dashboard and the CLI read while the server writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


@contextlib.contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Commit on success, roll back on any error; a lost database becomes DatabaseNotReady (503)."""
    session = factory()
    try:
        yield session
        session.commit()
    except OperationalError as exc:
        session.rollback()
        raise DatabaseNotReady(f"the database did not answer: {exc.orig}") from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision(url: str) -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(url)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def check_database(engine: Engine) -> None:
    """Raise DatabaseNotReady with the fix when the database is unreachable or not at the latest schema."""
    url = engine.url.render_as_string(hide_password=True)
    try:
        current = current_revision(engine)
        has_optuna = sa.inspect(engine).has_table(OPTUNA_VERSION_TABLE)
    except OperationalError as exc:
        raise DatabaseNotReady(f"cannot reach the database {url}: {exc.orig}".strip()) from exc
    head = head_revision(str(engine.url))
    if current is None or not has_optuna:
        raise DatabaseNotReady(f"the database {url} has no tunefleet schema yet: run `tunefleet db upgrade`")
    if current != head:
        raise DatabaseNotReady(
            f"the database {url} is at schema revision {current}, this tunefleet needs {head}: "
            "run `tunefleet db upgrade`"
        )


def check_connection_budget(engine: Engine, settings: Settings, processes: int) -> None:
    """Raise DatabaseNotReady, with the arithmetic and the fix, when `processes` server processes could open
    more connections than PostgreSQL allows less the reserves; other databases pass."""
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:
        allowed = int(conn.execute(sa.text("SHOW max_connections")).scalar_one())
        superuser = int(conn.execute(sa.text("SHOW superuser_reserved_connections")).scalar_one())
    per_process = settings.connections_per_process
    room = allowed - superuser - settings.db_reserved_connections
    if processes * per_process > room:
        raise DatabaseNotReady(
            f"{processes} server process(es) × {per_process} connections (2 engines × (TUNEFLEET_DB_POOL_SIZE "
            f"{settings.db_pool_size} + TUNEFLEET_DB_MAX_OVERFLOW {settings.db_max_overflow})) = "
            f"{processes * per_process} exceeds PostgreSQL's max_connections {allowed} less {superuser} reserved "
            f"for superusers and TUNEFLEET_DB_RESERVED_CONNECTIONS {settings.db_reserved_connections} = {room}: "
            "lower the pool sizes or the processes, or raise max_connections")


def migrate(engine: Engine, revision: str = "head", *, down: bool = False) -> None:
    """Upgrade (or with `down`, downgrade) our tables to `revision`, in one transaction.

    On SQLite, foreign keys are off while it runs: alembic changes a table there by copying it into a new
    one and dropping the old, and with foreign keys on, the drop would delete every row that refers to the
    old table through ON DELETE CASCADE (a lease's reports and artifacts, a study's leases). They are
    checked once the migration is done."""
    from alembic import command

    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:  # a no-op inside a transaction: set it before one begins
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        with conn.begin():
            cfg = _alembic_config(engine.url.render_as_string(hide_password=False))
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, revision)
        if sqlite:
            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()
            if broken:
                raise DatabaseNotReady(f"the migration left rows without their parents: {broken[:5]}")


def upgrade_database(settings: Settings) -> str:
    """Create or upgrade our tables and Optuna's; returns the schema revision now in place."""
    import optuna

    url = settings.resolved_database_url
    engine = make_engine(url, settings)
    try:
        migrate(engine)
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url, settings),
                                             skip_compatibility_check=True)
        if storage.get_current_version() != storage.get_head_version():
            storage.upgrade()
        storage.remove_session()
        storage.engine.dispose()
        return current_revision(engine) or ""
    except OperationalError as exc:
        raise DatabaseNotReady(f"cannot reach the database: {exc.orig}".strip()) from exc
    finally:
        engine.dispose()

"""Every setting of the server, CLI and workers, in one pydantic-settings class.

Each field can be set from the environment with the ``TUNEFLEET_`` prefix (``TUNEFLEET_DATABASE_URL``)
or from a ``.env`` file. Nothing else in tunefleet reads ``os.environ``.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings", "is_loopback", "normalise_database_url"]

DEFAULT_HOME = Path(".tunefleet")
# Engines of one server process: tunefleet's own (sessions) and Optuna's RDBStorage.
ENGINES_PER_PROCESS = 2


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFLEET_", env_file=".env", extra="ignore")

    home: Path = Field(DEFAULT_HOME, description="folder for the embedded database and artifacts")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; unset means the embedded SQLite file <home>/tunefleet.db. "
        "Production: postgresql+psycopg2://user:password@host:5432/tunefleet",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    auth: bool | None = Field(
        None, description="require bearer tokens; unset means on unless the server binds a loopback address"
    )
    server_processes: int = Field(
        1, ge=1, description="uvicorn processes serving the API (PostgreSQL only); they coordinate like "
        "replicas on several hosts. About one per CPU core for many workers"
    )
    lease_seconds: float = Field(120.0, gt=0, description="a lease's length; each heartbeat extends it")
    heartbeat_grace_seconds: float = Field(30.0, ge=0, description="slack after a deadline before the reaper acts")
    reaper_interval_seconds: float = Field(5.0, gt=0)
    trial_cache_seconds: float = Field(
        1.0, ge=0, description="how stale the server's in-memory view of running trials may be when another "
        "server replica (or a script) writes to the same studies; 0 re-reads them on every call"
    )
    lease_queue_size: int = Field(
        4, ge=0, description="trials asked ahead for each running study, so a lease claims one instead of "
        "waiting for a sampler; refilled in the background once fewer than half are left. 0 asks on the "
        "lease request itself"
    )
    sampler_best_trials: int = Field(
        100, ge=0, description="TPE and GP (single objective) model the best this many complete trials, plus "
        "the most recent ones, plus every running one; both 0 reads the whole study on each ask"
    )
    sampler_recent_trials: int = Field(200, ge=0, description="the most recently finished trials TPE and GP model")
    artifact_dir: Path | None = Field(None, description="artifact store folder; unset means <home>/artifacts")
    store_url: str | None = Field(
        None, description="object storage for artifacts, checkpoints, data sets and models: s3://bucket/prefix "
        "(S3 or any S3-compatible service; credentials from the standard AWS_* variables). Unset means the "
        "local folder artifact_dir"
    )
    store_endpoint_url: str | None = Field(
        None, description="the S3 API endpoint of a store that is not AWS (MinIO, Ceph, R2): http://host:9000"
    )
    store_region: str | None = Field(None, description="the S3 region; unset means boto3's default (AWS_REGION)")
    max_upload_mb: int = Field(20480, gt=0, description="largest data set or base model upload accepted")
    max_artifact_mb: int = Field(2048, gt=0, description="largest artifact file accepted")
    max_trial_artifact_mb: int = Field(20480, gt=0, description="all artifacts of one trial together")
    max_spec_kb: int = Field(256, gt=0, description="largest study spec accepted (its JSON); each lease carries it")
    max_search_params: int = Field(100, gt=0, description="most parameters in a search space")
    max_search_choices: int = Field(
        10_000, gt=0, description="most categorical choices in a search space, summed over its parameters "
        "(every ask reads them all)"
    )
    db_pool_size: int = Field(
        5, ge=1, description="database connections each server process keeps open per engine; a process has "
        "two engines (tunefleet's tables and Optuna's)"
    )
    db_max_overflow: int = Field(5, ge=0, description="extra connections per engine under load, closed after use")
    db_reserved_connections: int = Field(
        10, ge=0, description="PostgreSQL connections left for everything but the server processes (dashboard, "
        "migrations, psql), besides PostgreSQL's own superuser reserve; checked at start-up"
    )
    server_url: str = Field("http://127.0.0.1:8000", description="where the CLI and workers find the server")
    token: str | None = Field(None, description="bearer token the CLI and workers send")
    metrics_auth: bool | None = Field(
        None, description="require a bearer token (of any role) for /metrics; unset means the same as auth, "
        "false keeps /metrics open even with auth on"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="level of the server's own log lines (loggers tunefleet.*) and of uvicorn's; "
        "any case"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="server log lines on stderr: text (time, level, logger, message) or json (one "
        "object per line)"
    )

    @field_validator("store_url")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value and (not value.startswith("s3://") or not value.removeprefix("s3://").split("/")[0]):
            raise ValueError("TUNEFLEET_STORE_URL must be s3://bucket or s3://bucket/prefix; unset it for the "
                             "local folder TUNEFLEET_ARTIFACT_DIR")
        return value or None

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL every part of tunefleet opens: the configured one (a bare `postgresql://`
        or `postgres://` naming psycopg2, see `normalise_database_url`), else the embedded SQLite file."""
        if self.database_url:
            return normalise_database_url(self.database_url)
        return f"sqlite:///{(self.home / 'tunefleet.db').resolve()}"

    @property
    def connections_per_process(self) -> int:
        """The most database connections one server process opens: two engines, each pool plus overflow."""
        return ENGINES_PER_PROCESS * (self.db_pool_size + self.db_max_overflow)

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.home / "artifacts").resolve()

    def auth_enabled(self, host: str | None = None) -> bool:
        if self.auth is not None:
            return self.auth
        return not is_loopback(host or self.host)


def normalise_database_url(url: str) -> str:
    """`url` with a bare `postgresql://` or `postgres://` scheme rewritten to `postgresql+psycopg2://`;
    any other URL unchanged.

    SQLAlchemy 2.1 reads a bare `postgresql://` as psycopg 3, which tunefleet does not install (it uses
    psycopg2), and rejects `postgres://` (the spelling Heroku-style hosts hand out) altogether.
    """
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg2://" + url.removeprefix(bare)
    return url


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""`tunefleet token bootstrap DIR` on PostgreSQL: the first admin token and the workers' token from nothing,
a no-op on every later run, secrets generated elsewhere (a Kubernetes Secret) registered, and a revoked token
never brought back."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import LiveServer, make_settings
from tunefleet.cli import app
from tunefleet.service.client import ApiError, Client

runner = CliRunner()


def _bootstrap(pg_url: str, home: Path, folder: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["token", "bootstrap", str(folder)],
                           env={"TUNEFLEET_DATABASE_URL": pg_url, "TUNEFLEET_HOME": str(home)})
    return result.exit_code, result.output


def _names(live: LiveServer, admin: str) -> list[str]:
    with Client(live.url, admin) as client:
        return sorted(row["name"] for row in client.list_tokens())


def test_bootstrap_creates_both_tokens_once(pg_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "tokens"
    code, out = _bootstrap(pg_url, tmp_path, folder)
    assert code == 0, out
    assert "admin token" in out and "worker token" in out and out.count(": created") == 2
    secrets = {role: (folder / f"{role}.token").read_text().strip() for role in ("admin", "worker")}
    assert all(secret not in out for secret in secrets.values())  # never printed
    assert all(stat.S_IMODE((folder / f"{role}.token").stat().st_mode) == 0o600 for role in secrets)
    assert sorted(p.name for p in folder.iterdir()) == ["admin.token", "worker.token"]  # no drafts left

    code, out = _bootstrap(pg_url, tmp_path, folder)
    assert code == 0 and out.count(": already registered") == 2, out
    assert {role: (folder / f"{role}.token").read_text().strip() for role in secrets} == secrets

    with LiveServer(make_settings(pg_url, tmp_path, auth=True)) as live:
        assert _names(live, secrets["admin"]) == ["bootstrap-admin", "bootstrap-worker"]  # one row each
        with Client(live.url, secrets["worker"]) as worker, pytest.raises(ApiError) as refused:
            worker.list_tokens()
        assert refused.value.status_code == 403  # the worker token is a worker's, not an admin's


def test_bootstrap_registers_secrets_made_elsewhere(pg_url: str, tmp_path: Path) -> None:
    """As the Kubernetes bootstrap Job does with the mounted Secret: the files exist, the database learns them."""
    folder = tmp_path / "secret"
    folder.mkdir()
    (folder / "admin.token").write_text("a" * 16 + "0123456789abcdef0123456789abcdef\n")
    (folder / "worker.token").write_text("w" * 16 + "0123456789abcdef0123456789abcdef")
    code, out = _bootstrap(pg_url, tmp_path, folder)
    assert code == 0 and out.count(": registered") == 2, out
    with LiveServer(make_settings(pg_url, tmp_path, auth=True)) as live:
        assert _names(live, "a" * 16 + "0123456789abcdef0123456789abcdef") == ["bootstrap-admin", "bootstrap-worker"]


def test_a_revoked_token_is_not_brought_back(pg_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "tokens"
    assert _bootstrap(pg_url, tmp_path, folder)[0] == 0
    admin = (folder / "admin.token").read_text().strip()
    with LiveServer(make_settings(pg_url, tmp_path, auth=True)) as live, Client(live.url, admin) as client:
        worker_id = next(row["id"] for row in client.list_tokens() if row["name"] == "bootstrap-worker")
        client.revoke_token(worker_id)
    code, out = _bootstrap(pg_url, tmp_path, folder)
    assert code == 1 and "was revoked" in out and "Traceback" not in out, out
    (folder / "worker.token").unlink()  # the documented way to a new one
    code, out = _bootstrap(pg_url, tmp_path, folder)
    assert code == 0 and "worker token" in out and ": created" in out, out


@pytest.mark.parametrize(("content", "problem"), [
    ("short", "at least 32 characters"),
    ("", "is empty"),
])
def test_a_weak_or_empty_secret_is_refused(content: str, problem: str, pg_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "tokens"
    folder.mkdir()
    (folder / "admin.token").write_text(content)
    code, out = _bootstrap(pg_url, tmp_path, folder)
    assert code == 1 and problem in out and "Traceback" not in out, out

"""Bearer tokens and roles: 401 without a valid token, 403 for the wrong role; hashed at rest."""

from __future__ import annotations

import logging

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import LiveServer, study_spec
from tunefleet.service.api.app import run_server
from tunefleet.service.config import get_settings


def _client(live: LiveServer, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=live.url + "/api/v1", headers=headers, timeout=30)


def test_missing_or_bad_token_is_401(secured: tuple[LiveServer, dict[str, str]]) -> None:
    live, _ = secured
    for token in (None, "tf_not-a-real-token"):
        with _client(live, token) as http:
            for method, path in (("GET", "/studies"), ("POST", "/leases"), ("GET", "/tokens")):
                response = http.request(method, path, json={"worker_id": "w"})
                assert response.status_code == 401, (token, path)
                assert "token" in response.json()["detail"]
    assert httpx.get(live.url + "/healthz").status_code == 200, "health needs no token"


def test_roles(secured: tuple[LiveServer, dict[str, str]]) -> None:
    live, tokens = secured
    with _client(live, tokens["user"]) as user, _client(live, tokens["worker"]) as worker, \
            _client(live, tokens["admin"]) as admin:
        assert worker.post("/studies", json=study_spec("w-study")).status_code == 403
        created = user.post("/studies", json=study_spec("u-study"))
        assert created.status_code == 201
        sid = created.json()["id"]
        assert user.post("/leases", json={"worker_id": "u"}).status_code == 403
        assert user.post("/tokens", json={"name": "x", "role": "admin"}).status_code == 403
        assert user.delete("/datasets/news/abcdef").status_code == 403, "uploads are shared: only an admin deletes"
        assert worker.delete(f"/studies/{sid}").status_code == 403
        assert worker.post(f"/studies/{sid}/stop").status_code == 403
        lease = worker.post("/leases", json={"worker_id": "w"})
        assert lease.status_code == 200
        assert worker.get(f"/studies/{sid}").status_code == 200, "workers may read"
        assert user.post(f"/trials/{lease.json()['trial_id']}/complete", json={"value": 1.0}).status_code == 403
        new = admin.post("/tokens", json={"name": "ci", "role": "worker"})
        assert new.status_code == 201 and new.json()["token"].startswith("tf_")
        with _client(live, new.json()["token"]) as ci:
            assert ci.get("/studies").status_code == 200
            assert admin.delete(f"/tokens/{new.json()['id']}").status_code == 204
            assert ci.get("/studies").status_code == 401, "a revoked token is refused"
        assert admin.post("/tokens", json={"name": "x", "role": "root"}).status_code == 422
        assert admin.delete(f"/studies/{sid}").status_code == 204


def test_tokens_are_stored_hashed(secured: tuple[LiveServer, dict[str, str]]) -> None:
    live, tokens = secured
    with live.backend.engine.connect() as conn:
        stored = [row[0] for row in conn.execute(sa.text("SELECT token_hash FROM tf_tokens"))]
    assert len(stored) == 3 and not set(tokens.values()) & set(stored)


def test_server_refuses_a_public_address_without_auth(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                      sqlite_url: str) -> None:
    monkeypatch.setenv("TUNEFLEET_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("TUNEFLEET_AUTH", "false")
    get_settings.cache_clear()
    try:
        with caplog.at_level(logging.ERROR):
            assert run_server(host="0.0.0.0", port=1) == 2
        assert "without auth" in caplog.text and "TUNEFLEET_AUTH=true" in caplog.text
    finally:
        get_settings.cache_clear()


def test_auth_defaults_on_for_public_addresses_and_off_on_loopback() -> None:
    from tunefleet.service.config import Settings

    assert Settings(auth=None).auth_enabled("0.0.0.0") is True
    assert Settings(auth=None).auth_enabled("127.0.0.1") is False
    assert Settings(auth=True).auth_enabled("127.0.0.1") is True

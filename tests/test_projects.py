"""Projects: a user token sees and changes only the studies of the projects it was granted; a worker token
limited to projects leases only from them; admins see everything.

The defect this guards against: any user token could list, read, pause, stop and delete every other user's
study and read its artifacts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import LiveServer, make_settings, study_spec
from tunefleet.service.auth import add_project, create_token
from tunefleet.service.config import Settings
from tunefleet.service.db import make_engine


class Team:
    def __init__(self, live: LiveServer, tokens: dict[str, str]):
        self.live, self.tokens = live, tokens

    def client(self, who: str) -> httpx.Client:
        return httpx.Client(base_url=self.live.url + "/api/v1", timeout=30,
                            headers={"Authorization": f"Bearer {self.tokens[who]}"})


@pytest.fixture
def team(pg_url: str, tmp_path: Path) -> Iterator[Team]:
    settings = make_settings(pg_url, tmp_path, auth=True)
    for name in ("alpha", "beta"):
        add_project(settings, name)
    tokens = {
        "admin": create_token(settings, "admin", "admin"),
        "ana": create_token(settings, "ana", "user", {"alpha": "write"}),
        "bo": create_token(settings, "bo", "user", {"beta": "write"}),
        "reader": create_token(settings, "reader", "user", {"alpha": "read"}),
        "nobody": create_token(settings, "nobody", "user"),
        "beta-gpu": create_token(settings, "beta-gpu", "worker", {"beta": "read"}),
        "any-gpu": create_token(settings, "any-gpu", "worker"),
    }
    with LiveServer(settings) as live:
        yield Team(live, tokens)


def _create(client: httpx.Client, name: str, project: str) -> httpx.Response:
    return client.post("/studies", json=study_spec(name, project=project, baseline=None,
                                                   search={"pruner": "none"}))


def test_users_see_and_change_only_their_projects_studies(team: Team) -> None:
    with team.client("ana") as ana, team.client("bo") as bo, team.client("reader") as reader, \
            team.client("admin") as admin, team.client("nobody") as nobody, team.client("any-gpu") as gpu:
        alpha = _create(ana, "alpha-study", "alpha")
        assert alpha.status_code == 201 and alpha.json()["project"] == "alpha"
        sid = alpha.json()["id"]
        lease = gpu.post("/leases", json={"worker_id": "g"}).json()  # a worker without grants serves any project
        assert lease["study_id"] == sid
        holder = {"X-Lease-Token": lease["lease_token"]}
        uploaded = gpu.put(f"/trials/{lease['trial_id']}/artifacts/log.txt", content=b"x", headers=holder)
        assert uploaded.status_code == 200
        assert _create(bo, "beta-study", "beta").status_code == 201

        assert [s["name"] for s in ana.get("/studies").json()["items"]] == ["alpha-study"]
        assert [s["name"] for s in bo.get("/studies").json()["items"]] == ["beta-study"]
        assert nobody.get("/studies").json()["total"] == 0
        assert {s["name"] for s in admin.get("/studies").json()["items"]} == {"alpha-study", "beta-study"}

        # Another project's study is answered exactly as an unknown id: its existence does not leak.
        for method, path in (("GET", f"/studies/{sid}"), ("GET", f"/studies/{sid}/trials"),
                             ("GET", f"/studies/{sid}/report"), ("POST", f"/studies/{sid}/pause"),
                             ("POST", f"/studies/{sid}/stop"), ("DELETE", f"/studies/{sid}")):
            assert bo.request(method, path).status_code == 404, (method, path)
        trial = lease["trial_id"]
        for path in (f"/trials/{trial}", f"/trials/{trial}/artifacts", f"/trials/{trial}/artifacts/log.txt"):
            assert bo.get(path).status_code == 404, path
            assert ana.get(path).status_code == 200, path

        assert reader.get(f"/studies/{sid}").status_code == 200
        assert reader.post(f"/studies/{sid}/pause").status_code == 403
        assert reader.delete(f"/studies/{sid}").status_code == 403
        assert _create(reader, "by-reader", "alpha").status_code == 403
        assert _create(ana, "in-beta", "beta").status_code == 404, "a project that is not yours"
        assert _create(ana, "nowhere", "no-such-project").status_code == 404
        assert ana.post(f"/studies/{sid}/pause").json()["state"] == "paused"
        assert admin.get(f"/studies/{sid}").json()["state"] == "paused"


def test_a_worker_token_limited_to_a_project_leases_only_from_it(team: Team) -> None:
    with team.client("ana") as ana, team.client("bo") as bo, team.client("beta-gpu") as worker:
        _create(ana, "alpha-only", "alpha")
        beta = _create(bo, "beta-only", "beta").json()["id"]
        leased = [worker.post("/leases", json={"worker_id": f"w{i}"}) for i in range(3)]
        assert all(r.status_code == 200 and r.json()["study_id"] == beta for r in leased)
        assert [p["name"] for p in worker.get("/projects").json()] == ["beta"]


def test_projects_and_grants_are_managed_by_admins(team: Team) -> None:
    with team.client("admin") as admin, team.client("ana") as ana:
        assert admin.post("/projects", json={"name": "gamma"}).status_code == 201
        assert admin.post("/projects", json={"name": "gamma"}).status_code == 409
        assert ana.post("/projects", json={"name": "mine"}).status_code == 403
        assert {p["name"]: p["access"] for p in ana.get("/projects").json()} == {"alpha": "write"}
        made = admin.post("/tokens", json={"name": "g", "role": "user", "projects": {"gamma": "read"}})
        assert made.status_code == 201 and made.json()["projects"] == {"gamma": "read"}
        assert admin.post("/tokens", json={"name": "x", "role": "user", "projects": {"nope": "read"}}
                          ).status_code == 404
        assert admin.post("/tokens", json={"name": "x", "role": "user", "projects": {"gamma": "own"}}
                          ).status_code == 422
        assert admin.post("/tokens", json={"name": "x", "role": "admin", "projects": {"gamma": "read"}}
                          ).status_code == 422


def test_the_migration_puts_existing_studies_and_users_in_the_default_project(pg_url: str, tmp_path: Path) -> None:
    from tunefleet.service.db import migrate, upgrade_database

    upgrade_database(Settings(database_url=pg_url, home=tmp_path))
    engine = make_engine(pg_url)
    try:
        migrate(engine, "0002", down=True)
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO tf_studies (id, name, spec, state, created_at, updated_at) VALUES "
                                 "(7, 'old', '{}', 'completed', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            conn.execute(sa.text("INSERT INTO tf_tokens (name, role, token_hash, created_at) VALUES "
                                 "('old-user', 'user', 'h1', CURRENT_TIMESTAMP), "
                                 "('old-worker', 'worker', 'h2', CURRENT_TIMESTAMP)"))
        migrate(engine)
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT name FROM tf_projects")).scalars().all() == ["default"]
            assert conn.execute(sa.text("SELECT project_id FROM tf_studies WHERE id = 7")).scalar_one() == 1
            grants = conn.execute(sa.text("SELECT t.name, g.access FROM tf_grants g JOIN tf_tokens t "
                                          "ON t.id = g.token_id")).all()
            assert grants == [("old-user", "write")], "users keep their studies; workers stay unlimited"
            conn.execute(sa.text("INSERT INTO tf_projects (name, created_at) VALUES ('next', CURRENT_TIMESTAMP)"))
    finally:
        engine.dispose()


def test_the_cli_creates_projects_and_grants_them(pg_url: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    settings = make_settings(pg_url, tmp_path, auth=True)
    env = {**os.environ, "TUNEFLEET_DATABASE_URL": pg_url, "TUNEFLEET_HOME": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tunefleet", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    assert "created project research" in cli("project", "create", "research").stdout
    assert cli("project", "create", "research").returncode == 1, "a taken name is one red line"
    made = cli("token", "create", "--name", "ana", "--role", "user", "--project", "research",
               "--project", "default:read")
    assert made.returncode == 0, made.stderr
    bad = cli("token", "create", "--name", "x", "--role", "user", "--project", "research:own")
    assert bad.returncode == 1 and "NAME:read or NAME:write" in bad.stderr
    with LiveServer(settings) as live:
        shown = cli("--server", live.url, "--token", made.stdout.strip(), "project", "ls")
    assert shown.returncode == 0, shown.stderr
    assert "research" in shown.stdout and "write" in shown.stdout and "read" in shown.stdout

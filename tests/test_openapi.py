"""OpenAPI is the truth: `/openapi.json` documents every status each route answers, with one error schema
(`{"detail": "message"}`, and for a 422 `{"detail": [{"loc", "msg", "type"}]}`), the study spec's schema
as the body of POST /studies, and the server keeps to it; a database that goes away answers 503 with
Retry-After, never 500.

Defects guarded against (what the server did before): a 422 whose `detail` was a message (an unknown `state`
filter, an oversized artifact) or pydantic's entries with `input` and `ctx`; a body that was not UTF-8
answered 400 with FastAPI's "There was an error parsing the body"; no route documented 401, 403, 404, 409 or
503, and 422 pointed at FastAPI's own `HTTPValidationError`; POST /studies documented an untyped object;
`GET /trials/{unknown}/artifacts` answered 200 `[]`; an artifact over the limit was a 422; a trial's
datetimes had no offset (Optuna's naive local time), not the `date-time` the document promised; with the
database gone, a study's trials answered 500 and its report dropped the connection, and no 503 said when to
retry (no Retry-After).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg2
import pytest
from fastapi.testclient import TestClient
from optuna.exceptions import StorageInternalError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from tests.conftest import PG_ADMIN_URL, LiveServer, make_settings, study_spec
from tunefleet.service.api.app import create_app
from tunefleet.service.auth import create_token
from tunefleet.service.errors import DatabaseNotReady
from tunefleet.service.spec import StudySpec

HOLDER = "X-Lease-Token"
ERROR = "#/components/schemas/ErrorOut"
VALIDATION_ERROR = "#/components/schemas/ValidationErrorOut"
JSON = {"Content-Type": "application/json"}


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _schema_of(answer: dict[str, Any]) -> Any:
    return answer["content"]["application/json"]["schema"]


def _offline_app() -> Any:
    return create_app(make_settings("sqlite:////nonexistent/tunefleet.db", Path("/nonexistent")))


# ---- the document ---------------------------------------------------------------------------------------------

SUCCESS = {
    ("POST", "/api/v1/studies"): {"201"},
    ("POST", "/api/v1/studies/{study_id}/trials"): {"201"},
    ("DELETE", "/api/v1/studies/{study_id}"): {"204"},
    ("POST", "/api/v1/leases"): {"200", "204"},
    ("POST", "/api/v1/tokens"): {"201"},
    ("POST", "/api/v1/projects"): {"201"},
    ("DELETE", "/api/v1/tokens/{token_id}"): {"204"},
    ("POST", "/api/v1/datasets/{name}"): {"201"},
    ("POST", "/api/v1/models/{name}"): {"201"},
}
# Routes without an id in the path that can answer 404: an unknown project named in the body.
NOT_FOUND_WITHOUT_ID = {("POST", "/api/v1/studies"), ("POST", "/api/v1/tokens")}
# Uploads of data sets and models: their {name} is new (no 404), and their body has a size limit (413).
UPLOADS = {("POST", "/api/v1/datasets/{name}"), ("POST", "/api/v1/models/{name}")}
CONFLICTS = {  # the routes that can answer 409
    ("POST", "/api/v1/studies"), ("POST", "/api/v1/studies/{study_id}/{action}"), ("POST", "/api/v1/leases"),
    ("POST", "/api/v1/trials/{trial_id}/reports"), ("POST", "/api/v1/trials/{trial_id}/complete"),
    ("POST", "/api/v1/trials/{trial_id}/fail"), ("POST", "/api/v1/trials/{trial_id}/pause"),
    ("PUT", "/api/v1/trials/{trial_id}/artifacts/{name}"),
    ("POST", "/api/v1/projects"), ("POST", "/api/v1/studies/{study_id}/trials"),
    ("DELETE", "/api/v1/datasets/{name}/{version}"), ("DELETE", "/api/v1/models/{name}/{version}"),  # in use
}


def test_openapi_documents_every_answer_of_every_route_with_one_error_schema(server: LiveServer) -> None:
    doc = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    api = [(m, p, op) for m, p, op in _operations(doc) if p.startswith("/api/v1/")]
    assert len(api) >= 19
    for method, path, operation in api:
        where = f"{method} {path}"
        answers = operation["responses"]
        has_input = bool(operation.get("parameters") or operation.get("requestBody"))
        expected = {*SUCCESS.get((method, path), {"200"}), "401", "403", "503"}
        expected |= {"422"} if has_input else set()
        new_name = (method, path) in UPLOADS
        expected |= {"404"} if ("{" in path and not new_name) or (method, path) in NOT_FOUND_WITHOUT_ID else set()
        expected |= {"409"} if (method, path) in CONFLICTS else set()
        expected |= {"413"} if method == "PUT" or new_name else set()
        assert set(answers) == expected, where
        for status, answer in answers.items():
            if status.startswith("2"):
                continue
            assert _schema_of(answer) == {"$ref": VALIDATION_ERROR if status == "422" else ERROR}, (where, status)
        assert answers["503"]["headers"]["Retry-After"]["required"] is True, where
        assert "WWW-Authenticate" in answers["401"]["headers"], where
        assert operation["security"] == [{"HTTPBearer": []}], where
    schemas = doc["components"]["schemas"]
    assert schemas["ErrorOut"]["properties"]["detail"] == {"type": "string", "title": "Detail"}
    assert schemas["ValidationErrorOut"]["properties"]["detail"]["items"] == {"$ref": "#/components/schemas/ErrorItem"}
    assert set(schemas["ErrorItem"]["required"]) == {"loc", "msg", "type"}
    assert "HTTPValidationError" not in schemas, "FastAPI's own 422 schema is not what the server answers"
    health = {(m, p): set(op["responses"]) for m, p, op in _operations(doc) if not p.startswith("/api/")}
    assert health == {("GET", "/healthz"): {"200"}, ("GET", "/readyz"): {"200", "503"},
                      ("GET", "/metrics"): {"200", "401", "503"}}
    missing = {ref for ref in _refs(doc) if ref.removeprefix("#/components/schemas/") not in schemas}
    assert not missing, f"references to nothing: {missing}"


def test_the_body_of_post_studies_is_the_study_spec_schema() -> None:
    doc = _offline_app().openapi()
    body = doc["paths"]["/api/v1/studies"]["post"]["requestBody"]
    assert body["required"] is True
    assert _schema_of(body)["$ref"] == "#/components/schemas/StudySpec"
    expected = StudySpec.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in [*expected.pop("$defs").items(), ("StudySpec", expected)]:
        documented = doc["components"]["schemas"][name]
        for key in ("properties", "required", "additionalProperties"):  # FastAPI drops `default: null`
            assert set(documented.get(key) or ()) == set(definition.get(key) or ()), (name, key)
    assert doc["components"]["schemas"]["StudySpec"]["additionalProperties"] is False
    upload = doc["paths"]["/api/v1/trials/{trial_id}/artifacts/{name}"]["put"]["requestBody"]
    assert upload["content"] == {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    action = doc["paths"]["/api/v1/studies/{study_id}/{action}"]["post"]["parameters"][1]
    assert action["schema"]["enum"] == ["pause", "resume", "stop"]


def test_the_study_answer_documents_the_pareto_front_and_feasibility() -> None:
    schemas = _offline_app().openapi()["components"]["schemas"]
    assert schemas["StudyOut"]["properties"]["best_trials"]["items"] == {"$ref": "#/components/schemas/TrialOut"}
    trial = schemas["TrialOut"]["properties"]
    assert trial["constraints"]["additionalProperties"] == {"type": "number"}
    assert {"type": "boolean"} in trial["feasible"]["anyOf"]
    constraint = schemas["ConstraintSpec"]["properties"]
    assert set(constraint) == {"metric", "min", "max"}


# ---- the answers ----------------------------------------------------------------------------------------------

def _message(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"], body
    return body["detail"]


def _fields(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], list) and body["detail"], body
    for entry in body["detail"]:
        assert set(entry) == {"loc", "msg", "type"}, entry
        assert isinstance(entry["loc"], list) and isinstance(entry["msg"], str) and isinstance(entry["type"], str)
    return body["detail"]


@pytest.fixture
def small_limit(pg_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    """A live server (auth off) whose artifacts may be 1 MB at most."""
    with LiveServer(make_settings(pg_url, tmp_path, max_artifact_mb=1)) as live:
        yield live


def test_every_error_answer_has_one_shape(small_limit: LiveServer) -> None:
    with httpx.Client(base_url=small_limit.url + "/api/v1", timeout=60) as http:
        created = http.post("/studies", json=study_spec("shape"))
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        assert "does not exist" in _message(http.get("/studies/999999"), 404)
        assert "stop" in _message(http.post(f"/studies/{sid}/explode"), 404)
        _message(http.get("/no/such/route"), 404)
        refused = http.delete("/leases")
        assert "POST" in refused.headers["allow"] and _message(refused, 405)
        assert "exists" in _message(http.post("/studies", json=study_spec("shape")), 409)
        # 422s: from FastAPI's validation, from the domain (with and without the field), from unreadable JSON
        assert _fields(http.get("/studies", params={"limit": 0}))[0]["loc"] == ["query", "limit"]
        state = _fields(http.get("/studies", params={"state": "bogus"}))
        assert state[0]["loc"] == ["query", "state"] and "running" in state[0]["msg"]
        trial_state = _fields(http.get(f"/studies/{sid}/trials", params={"state": "bogus"}))
        assert trial_state[0]["loc"] == ["query", "state"]
        spec = _fields(http.post("/studies", json=study_spec("bad", search_space={}, fixed={"lora_rr": 1})))
        assert {tuple(e["loc"]) for e in spec} >= {("search_space",)}
        assert _fields(http.post("/leases", content=b'{"worker_id": ', headers=JSON))[0]["type"] == "json_invalid"
        not_utf8 = _fields(http.post("/leases", content=b'{"worker_id": "\xff"}', headers=JSON))
        assert not_utf8 == [{"loc": ["body"], "msg": "the body is not readable JSON: send UTF-8 encoded JSON",
                             "type": "json_invalid"}]
        assert _fields(http.post("/tokens", json={"name": "x", "role": "root"}))[0]["loc"] == ["body", "role"]
        # unknown trials: 404 for their artifacts too; a known one without artifacts: an empty list
        assert "does not exist" in _message(http.get("/trials/999999/artifacts"), 404)
        lease = http.post("/leases", json={"worker_id": "w1"}).json()
        tid, token = lease["trial_id"], lease["lease_token"]
        listed = http.get(f"/trials/{tid}/artifacts")
        assert listed.status_code == 200 and listed.json() == []
        # 413: over TUNEFLEET_MAX_ARTIFACT_MB, whether the size is declared or only streamed
        big = b"x" * (2**20 + 1)
        assert "TUNEFLEET_MAX_ARTIFACT_MB" in _message(
            http.put(f"/trials/{tid}/artifacts/big.bin", content=big, headers={HOLDER: token}), 413)
        streamed = http.put(f"/trials/{tid}/artifacts/big.bin", content=iter([big[:2**19], big[2**19:]]),
                            headers={HOLDER: token})
        _message(streamed, 413)
        assert http.get(f"/trials/{tid}/artifacts").json() == [], "nothing was stored"
        assert "lease token" in _message(http.post(f"/trials/{tid}/heartbeat", json={}), 403)
        # datetimes carry their offset (Optuna stores naive local times)
        trial = http.get(f"/trials/{tid}").json()
        assert trial["datetime_start"].endswith(("Z", "+00:00")) or trial["datetime_start"][-6] in "+-"


def test_auth_errors_have_the_shape(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path, auth=True)
    worker = create_token(settings, "w", "worker")
    with LiveServer(settings) as live, httpx.Client(base_url=live.url + "/api/v1", timeout=60) as http:
        refused = http.get("/studies")
        assert "token" in _message(refused, 401) and refused.headers["www-authenticate"] == "Bearer"
        assert "role" in _message(http.get("/tokens", headers={"Authorization": f"Bearer {worker}"}), 403)


# ---- a database that goes away --------------------------------------------------------------------------------

@contextlib.contextmanager
def _admin() -> Iterator[Any]:
    url = make_url(PG_ADMIN_URL)
    conn = psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username, password=url.password,
                            dbname=url.database)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def _cut_off(database: str, how: str) -> None:
    """No new connection to `database`, and every open one ended (the server's pools too)."""
    with _admin() as cur:
        if how == "dropped":
            cur.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
            return
        cur.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))


def _reconnect(database: str) -> None:
    with _admin() as cur:
        cur.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')


@pytest.mark.parametrize("how", ["refused", "dropped"])
def test_a_database_that_goes_away_answers_503_with_retry_after(pg_url: str, tmp_path: Path, how: str) -> None:
    database = make_url(pg_url).database
    assert database
    with LiveServer(make_settings(pg_url, tmp_path)) as live, \
            httpx.Client(base_url=live.url + "/api/v1", timeout=60) as http:
        created = http.post("/studies", json=study_spec("outage"))
        assert created.status_code == 201, created.text
        sid, waiting = created.json()["id"], created.json()["baseline_trial_id"]
        assert http.get(f"/trials/{waiting}").status_code == 200
        _cut_off(database, how)
        try:
            calls = [("GET", "/studies", None), ("GET", f"/studies/{sid}", None), ("GET", f"/trials/{waiting}", None),
                     ("GET", f"/trials/{waiting}/artifacts", None), ("GET", "/trials/424242/artifacts", None),
                     ("GET", f"/studies/{sid}/trials", None), ("GET", f"/studies/{sid}/report", None),
                     ("POST", "/leases", {"worker_id": "w1"}), ("POST", "/studies", study_spec("later")),
                     ("POST", f"/studies/{sid}/pause", None), ("DELETE", f"/studies/{sid}", None),
                     ("GET", "/tokens", None)]
            for method, path, body in calls:
                answer = http.request(method, path, json=body)
                assert answer.status_code == 503, (method, path, answer.text)
                assert 1 <= int(answer.headers["Retry-After"]) <= 5, (method, path)
                assert "retry" in _message(answer, 503).lower()
            ready = httpx.get(f"{live.url}/readyz", timeout=60)
            assert ready.status_code == 503 and ready.headers["Retry-After"], ready.text
        finally:
            if how == "refused":
                _reconnect(database)
        if how == "refused":  # back once the database is
            assert http.get(f"/studies/{sid}").status_code == 200
            assert http.get(f"/trials/{waiting}").status_code == 200


def test_database_errors_answer_503_when_the_database_is_away_and_500_otherwise() -> None:
    app = _offline_app()
    orig = Exception("FATAL:  sorry, too many clients already")
    faults: dict[str, BaseException] = {
        "too-many-clients": OperationalError("SELECT 1", {}, orig),
        "pool-timeout": PoolTimeout("QueuePool limit of size 5 overflow 10 reached"),
        "invalidated": DBAPIError("SELECT 1", {}, Exception("server closed the connection"),
                                  connection_invalidated=True),
        "not-ready": DatabaseNotReady("the database is at schema revision 1, this tunefleet needs 2"),
        "bug": ProgrammingError("SELEC 1", {}, Exception("syntax error")),
        "plain-bug": RuntimeError("a bug"),
    }
    storage = StorageInternalError("An exception is raised during the commit.")
    storage.__cause__ = faults["too-many-clients"]
    faults["optuna-commit"] = storage
    faults["optuna-bare"] = StorageInternalError("An exception is raised during the commit.")

    def boom(name: str) -> None:
        raise faults[name]

    app.get("/boom/{name}")(boom)
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: these routes need no backend
    for name in ("too-many-clients", "pool-timeout", "invalidated", "not-ready", "optuna-commit", "optuna-bare"):
        answer = client.get(f"/boom/{name}")
        assert answer.status_code == 503, (name, answer.text)
        assert answer.headers["retry-after"] == "2" and isinstance(answer.json()["detail"], str), name
    assert "no free connection" in client.get("/boom/too-many-clients").json()["detail"]
    assert "no free connection" in client.get("/boom/pool-timeout").json()["detail"]
    for name in ("bug", "plain-bug"):
        answer = client.get(f"/boom/{name}")
        assert answer.status_code == 500 and "retry-after" not in answer.headers, name
        assert set(answer.json()) == {"detail"} and "request id" in answer.json()["detail"], name


def test_api_pages_load_their_scripts_from_the_server_not_a_cdn(server: LiveServer) -> None:
    import re

    import httpx

    with httpx.Client(base_url=server.url) as http:
        for page in ("/docs", "/redoc"):
            html = http.get(page)
            assert html.status_code == 200 and "cdn" not in html.text.lower(), page
            assets = re.findall(r'(?:src|href)="(/[^"]+\.(?:js|css))"', html.text)
            assert assets, f"{page} names no script of its own"
            for asset in assets:
                served = http.get(asset)
                assert served.status_code == 200 and len(served.content) > 10_000, asset

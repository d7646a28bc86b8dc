"""Malformed inputs get a clear 4xx naming the field and the fix, and change nothing.

Each case names the defect it guards against (live server on PostgreSQL; what it did before the fix):
an offset past 2**63 answered 500 (PostgreSQL's bigint overflowed), or a page of nothing; a NUL character
answered 500 in a study's name filter, a fail reason, a worker's id or hostname, a heartbeat's worker id and
an artifact name, and was stored as sent in a spec's strings, a worker's device, report and complete
metrics; a NUL fail reason marked the trial FAIL in Optuna but left its lease active, so the reaper re-queued
a failure the worker said was not retryable; a lone surrogate (JSON "\\ud800") answered 500 almost anywhere,
even where the field was refused anyway (the 422 quoted the string, which cannot be encoded), and was
stored as a report's metric name or a device key; NaN, Infinity or 1e309 in report metrics wrote the
intermediate value to Optuna and then answered 500, in complete's metrics they were stored (as null), in a
worker's device or a spec they answered 500; artifact names with a part over 255 bytes, over 500 bytes in
all, NUL, a file where a folder is (or the reverse) answered 500, control characters were stored, and
`a/./b` or `a//b` silently replaced `a/b`; a hostname over 200 characters answered 500.

Bodies are sent as raw text (httpx's json= refuses NaN and lone surrogates): `_raw` writes NaN, Infinity,
-Infinity as Python's json does, lone surrogates as escapes, and the placeholder `BIG` as the token 1e309.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import LiveServer, make_settings, study_spec

HOLDER = "X-Lease-Token"
NAN, INF = float("nan"), float("inf")
BIG = "__1e309__"  # written as the bare token 1e309, which Python's json reads as inf
SURROGATE = "\ud800"
NUL = "\x00"
JSON_HEADERS = {"Content-Type": "application/json"}


def _raw(body: Any) -> bytes:
    """JSON text as a careless client writes it: NaN/Infinity tokens, lone surrogates as escapes."""
    return json.dumps(body).replace(f'"{BIG}"', "1e309").encode("ascii")


@dataclass
class World:
    server: LiveServer
    http: httpx.Client
    study_id: int
    trial_id: int
    token: str

    def snapshot(self) -> dict[str, Any]:
        """Every row of every table (ours and Optuna's), and every file of the artifact store."""
        engine = self.server.backend.engine
        tables: dict[str, Any] = {}
        with engine.connect() as conn:
            for table in sa.inspect(engine).get_table_names():
                rows = conn.execute(sa.text(f'SELECT * FROM "{table}"')).all()
                tables[table] = sorted(repr(tuple(row)) for row in rows)
        root: Path = self.server.backend.store.root
        files = sorted((str(p.relative_to(root)), p.read_bytes()) for p in root.rglob("*")
                       if p.is_file() and ".incoming" not in p.parts)
        return {"tables": tables, "files": files}

    def lease_is_usable(self) -> None:
        beat = self.http.post(f"/trials/{self.trial_id}/heartbeat", json={"worker_id": "w1"},
                              headers={HOLDER: self.token})
        assert beat.status_code == 200 and beat.json()["stop"] is False, beat.text
        trial = self.http.get(f"/trials/{self.trial_id}").json()
        assert trial["state"] == "RUNNING", trial


@pytest.fixture
def world(pg_url: str, tmp_path: Path) -> Iterator[World]:
    """A study with one trial leased to w1: one report at 20 %, two artifacts (adapter/model.bin, log.txt).
    No lease queue: its filler would add trials between two snapshots."""
    with LiveServer(make_settings(pg_url, tmp_path, lease_queue_size=0)) as server, \
            httpx.Client(base_url=server.url + "/api/v1", timeout=30) as http:
        spec = study_spec("inputs", baseline=None, search={"pruner": "none"})
        created = http.post("/studies", json=spec)
        assert created.status_code == 201, created.text
        lease = http.post("/leases", json={"worker_id": "w1", "hostname": "h1", "device": {"gpu": "H200"}}).json()
        tid, token = lease["trial_id"], lease["lease_token"]
        headers = {HOLDER: token}
        assert http.post(f"/trials/{tid}/reports", json={"step": 20, "value": 0.4, "metrics": {"loss": 1.5}},
                         headers=headers).json() == {"action": "continue", "prune": False}
        for name in ("adapter/model.bin", "log.txt"):
            uploaded = http.put(f"/trials/{tid}/artifacts/{name}", content=name.encode(), headers=headers)
            assert uploaded.status_code == 200, uploaded.text
        yield World(server, http, created.json()["id"], tid, token)


@dataclass
class Case:
    id: str
    method: str
    path: str  # {tid} and {sid} are filled in
    status: int
    loc: list[Any] | None  # the error entry to find; None: `detail` is a message
    hint: str  # lower-case text the message must contain
    body: Any = None  # sent through _raw
    params: dict[str, Any] = field(default_factory=dict)
    holder: bool = True  # send the lease token


def _spec(**changes: Any) -> dict[str, Any]:
    spec = study_spec("bad", baseline=None, search={"pruner": "none"})
    for path, value in changes.items():
        node = spec
        keys = path.split("__")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return spec


def _art(name: str) -> str:
    return "/trials/{tid}/artifacts/" + quote(name, safe="")


FAIL_INSTEAD = "fail the trial instead"
MAX = "less than or equal"

CASES = [
    # 1. paging bounds
    Case("studies-offset-past-bigint", "GET", "/studies", 422, ["query", "offset"], MAX,
         params={"offset": 2**63}),
    Case("studies-offset-negative", "GET", "/studies", 422, ["query", "offset"], "greater than or equal",
         params={"offset": -1}),
    Case("studies-limit-huge", "GET", "/studies", 422, ["query", "limit"], MAX, params={"limit": 10**30}),
    Case("studies-limit-zero", "GET", "/studies", 422, ["query", "limit"], "greater than or equal",
         params={"limit": 0}),
    Case("trials-offset-past-bigint", "GET", "/studies/{sid}/trials", 422, ["query", "offset"], MAX,
         params={"offset": 2**63}),
    Case("trials-offset-negative", "GET", "/studies/{sid}/trials", 422, ["query", "offset"], "greater than",
         params={"offset": -5}),
    Case("trials-limit-huge", "GET", "/studies/{sid}/trials", 422, ["query", "limit"], MAX,
         params={"limit": 2**64}),
    # ids past the columns' integers are unknown ids, not a 500
    Case("study-id-past-bigint", "GET", "/studies/9223372036854775808", 404, None, "does not exist"),
    Case("study-trials-id-past-int", "GET", "/studies/2147483648/trials", 404, None, "does not exist"),
    Case("trial-id-past-bigint", "GET", "/trials/9223372036854775808", 404, None, "does not exist"),
    Case("heartbeat-trial-id-past-bigint", "POST", "/trials/9223372036854775808/heartbeat", 404, None, "no lease",
         {"worker_id": "w1"}),
    Case("artifact-trial-id-past-bigint", "PUT", "/trials/9223372036854775808/artifacts/x.bin", 404, None,
         "no lease"),
    # 2. NUL characters
    Case("studies-name-filter-too-long", "GET", "/studies", 422, ["query", "name"], "at most 200 characters",
         params={"name": "n" * 201}),
    Case("studies-name-filter-nul", "GET", "/studies", 422, ["query", "name"], "nul", params={"name": f"in{NUL}"}),
    Case("spec-name-nul", "POST", "/studies", 422, ["name"], "nul", _spec(name=f"bad{NUL}")),
    Case("spec-description-nul", "POST", "/studies", 422, ["description"], "nul", _spec(description=f"a{NUL}b")),
    Case("spec-model-nul", "POST", "/studies", 422, ["model"], "nul", _spec(model=f"org/m{NUL}")),
    Case("spec-nested-string-nul", "POST", "/studies", 422, ["data", "train"], "nul", _spec(data__train=f"t{NUL}")),
    Case("spec-option-nul", "POST", "/studies", 422, ["search", "sampler_options", "note", 0], "nul",
         _spec(search__sampler_options={"note": [f"x{NUL}"]})),
    Case("spec-param-name-nul", "POST", "/studies", 422, ["search_space", f"lora_r{NUL}"], "nul",
         _spec(search_space={f"lora_r{NUL}": {"type": "int", "low": 4, "high": 32}})),
    Case("spec-choice-nul", "POST", "/studies", 422, ["search_space", "method", "choices", 1], "nul",
         _spec(search_space__method={"type": "categorical", "choices": ["lora", f"full{NUL}"]})),
    Case("fail-reason-nul", "POST", "/trials/{tid}/fail", 422, ["body", "reason"], "nul",
         {"reason": f"oom{NUL}", "retryable": False}),
    Case("lease-worker-id-nul", "POST", "/leases", 422, ["body", "worker_id"], "nul", {"worker_id": f"w{NUL}"}),
    Case("lease-hostname-nul", "POST", "/leases", 422, ["body", "hostname"], "nul",
         {"worker_id": "w2", "hostname": f"h{NUL}"}),
    Case("lease-hostname-too-long", "POST", "/leases", 422, ["body", "hostname"], "at most 200",
         {"worker_id": "w2", "hostname": "h" * 201}),
    Case("lease-device-nul", "POST", "/leases", 422, ["body", "device", "gpu"], "nul",
         {"worker_id": "w2", "device": {"gpu": f"H{NUL}"}}),
    Case("heartbeat-worker-id-nul", "POST", "/trials/{tid}/heartbeat", 422, ["body", "worker_id"], "nul",
         {"worker_id": f"w1{NUL}"}),
    Case("report-metric-name-nul", "POST", "/trials/{tid}/reports", 422, ["body", "metrics", f"f1{NUL}"], "nul",
         {"step": 60, "value": 0.5, "metrics": {f"f1{NUL}": 0.5}}),
    Case("complete-metric-string-nul", "POST", "/trials/{tid}/complete", 422,
         ["body", "validation_metrics", "note"], "nul", {"value": 0.5, "validation_metrics": {"note": f"x{NUL}"}}),
    Case("complete-extra-key-nul", "POST", "/trials/{tid}/complete", 422, ["body", "extra", "run", f"k{NUL}"], "nul",
         {"value": 0.5, "extra": {"run": {f"k{NUL}": 1}}}),
    Case("artifact-name-nul", "PUT", _art(f"bad{NUL}name"), 422, ["path", "name"], "control character"),
    # 3. lone surrogates (the loc shows the key escaped)
    Case("spec-description-surrogate", "POST", "/studies", 422, ["description"], "surrogate",
         _spec(description=f"a{SURROGATE}")),
    Case("spec-name-surrogate", "POST", "/studies", 422, ["name"], "surrogate", _spec(name=f"b{SURROGATE}")),
    Case("spec-param-name-surrogate", "POST", "/studies", 422, ["search_space", "lr\\ud800"], "surrogate",
         _spec(search_space={f"lr{SURROGATE}": {"type": "float", "low": 0.1, "high": 1.0}})),
    Case("spec-choice-surrogate", "POST", "/studies", 422, ["search_space", "method", "choices", 0], "surrogate",
         _spec(search_space__method={"type": "categorical", "choices": [SURROGATE, "full"]})),
    Case("fail-reason-surrogate", "POST", "/trials/{tid}/fail", 422, ["body", "reason"], "surrogate",
         {"reason": f"oom{SURROGATE}"}),
    Case("lease-worker-id-surrogate", "POST", "/leases", 422, ["body", "worker_id"], "surrogate",
         {"worker_id": SURROGATE}),
    Case("lease-hostname-surrogate", "POST", "/leases", 422, ["body", "hostname"], "surrogate",
         {"worker_id": "w2", "hostname": SURROGATE}),
    Case("lease-device-key-surrogate", "POST", "/leases", 422, ["body", "device", "\\ud800"], "surrogate",
         {"worker_id": "w2", "device": {SURROGATE: "x"}}),
    Case("heartbeat-worker-id-surrogate", "POST", "/trials/{tid}/heartbeat", 422, ["body", "worker_id"],
         "surrogate", {"worker_id": SURROGATE}),
    Case("report-metric-name-surrogate", "POST", "/trials/{tid}/reports", 422, ["body", "metrics", "\\ud800"],
         "surrogate", {"step": 60, "value": 0.5, "metrics": {SURROGATE: 0.5}}),
    Case("report-metric-value-surrogate", "POST", "/trials/{tid}/reports", 422, ["body", "metrics", "f1"],
         "surrogate", {"step": 60, "value": 0.5, "metrics": {"f1": SURROGATE}}),
    Case("complete-extra-surrogate", "POST", "/trials/{tid}/complete", 422, ["body", "extra", "log", 1],
         "surrogate", {"value": 0.5, "extra": {"log": ["ok", SURROGATE]}}),
    Case("token-name-surrogate", "POST", "/tokens", 422, ["body", "name"], "surrogate",
         {"name": SURROGATE, "role": "worker"}),
    # 4. NaN, Infinity, -Infinity, 1e309
    Case("report-metric-nan", "POST", "/trials/{tid}/reports", 422, ["body", "metrics", "loss"], "nan",
         {"step": 60, "value": 0.5, "metrics": {"loss": NAN}}),
    Case("report-metric-infinity", "POST", "/trials/{tid}/reports", 422, ["body", "metrics", "loss"], "infinity",
         {"step": 60, "value": 0.5, "metrics": {"loss": INF}}),
    Case("report-metric-minus-infinity", "POST", "/trials/{tid}/reports", 422, ["body", "metrics", "loss"],
         "-infinity", {"step": 60, "value": 0.5, "metrics": {"loss": -INF}}),
    Case("report-metric-1e309", "POST", "/trials/{tid}/reports", 422, ["body", "metrics", "loss"], "finite",
         {"step": 60, "value": 0.5, "metrics": {"loss": BIG}}),
    Case("report-value-nan", "POST", "/trials/{tid}/reports", 422, ["body", "value"], FAIL_INSTEAD,
         {"step": 60, "value": NAN}),
    Case("report-value-1e309", "POST", "/trials/{tid}/reports", 422, ["body", "value"], FAIL_INSTEAD,
         {"step": 60, "value": BIG}),
    Case("complete-value-nan", "POST", "/trials/{tid}/complete", 422, ["body", "value"], FAIL_INSTEAD,
         {"value": NAN}),
    Case("complete-validation-nan", "POST", "/trials/{tid}/complete", 422, ["body", "validation_metrics", "f1"],
         "nan", {"value": 0.5, "validation_metrics": {"f1": NAN}}),
    Case("complete-test-infinity", "POST", "/trials/{tid}/complete", 422, ["body", "test_metrics", "f1"],
         "infinity", {"value": 0.5, "test_metrics": {"f1": INF}}),
    Case("complete-extra-nested-1e309", "POST", "/trials/{tid}/complete", 422, ["body", "extra", "curve", 1],
         "finite", {"value": 0.5, "extra": {"curve": [0.1, BIG]}}),
    Case("lease-device-nan", "POST", "/leases", 422, ["body", "device", "memory_gb"], "nan",
         {"worker_id": "w2", "device": {"memory_gb": NAN}}),
    Case("spec-fixed-nan", "POST", "/studies", 422, ["fixed", "warmup_ratio"], "nan",
         _spec(fixed={"warmup_ratio": NAN})),
    Case("spec-option-infinity", "POST", "/studies", 422, ["search", "sampler_options", "gamma"], "infinity",
         _spec(search__sampler_options={"gamma": INF})),
    Case("spec-high-1e309", "POST", "/studies", 422, ["search_space", "learning_rate", "high"], "finite",
         _spec(search_space__learning_rate__high=BIG)),
    Case("spec-choice-minus-infinity", "POST", "/studies", 422, ["search_space", "lora_r", "choices", 2],
         "-infinity", _spec(search_space__lora_r__choices=[4, 8, -INF])),
    # 5. artifact names
    Case("artifact-part-over-255-bytes", "PUT", _art("d/" + "é" * 128), 422, ["path", "name"], "255 bytes"),
    Case("artifact-name-too-long", "PUT", _art("/".join(["p" * 200] * 3)), 422, ["path", "name"], "500 bytes"),
    Case("artifact-name-control-character", "PUT", _art("log\x01.txt"), 422, ["path", "name"], "control character"),
    Case("artifact-name-backslash", "PUT", _art("adapter\\model.bin"), 422, ["path", "name"], "backslash"),
    Case("artifact-name-dot-part", "PUT", _art("adapter/./model.bin"), 422, ["path", "name"], "'.'"),
    Case("artifact-name-dotdot-part", "PUT", _art("../escape"), 422, ["path", "name"], "'..'"),
    Case("artifact-name-empty-part", "PUT", _art("adapter//model.bin"), 422, ["path", "name"], "empty"),
    Case("artifact-name-absolute", "PUT", _art("/etc/passwd"), 422, ["path", "name"], "relative"),
    Case("artifact-file-over-folder", "PUT", _art("adapter"), 409, None, "adapter/model.bin"),
    Case("artifact-folder-over-file", "PUT", _art("log.txt/inner.bin"), 409, None, "log.txt"),
    Case("artifact-download-nul", "GET", _art(f"log{NUL}.txt"), 422, ["path", "name"], "control character"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_malformed_input_is_refused_and_changes_nothing(world: World, case: Case) -> None:
    before = world.snapshot()
    path = case.path.format(tid=world.trial_id, sid=world.study_id)
    content = b"payload" if case.method == "PUT" else (None if case.body is None else _raw(case.body))
    headers = {**JSON_HEADERS, **({HOLDER: world.token} if case.holder else {})}
    response = world.http.request(case.method, path, params=case.params, content=content, headers=headers)
    assert response.status_code == case.status, response.text
    detail = response.json()["detail"]
    if case.loc is None:
        assert isinstance(detail, str) and case.hint in detail.lower(), detail
    else:
        match = [e for e in detail if e["loc"] == case.loc] if isinstance(detail, list) else []
        assert match, f"no error at {case.loc}: {detail}"
        assert case.hint in match[0]["msg"].lower(), match[0]
    assert world.snapshot() == before, "the refused call changed something"
    world.lease_is_usable()


def test_a_fail_with_a_nul_reason_changes_nothing_and_a_proper_fail_then_works(world: World) -> None:
    headers = {**JSON_HEADERS, HOLDER: world.token}
    refused = world.http.post(f"/trials/{world.trial_id}/fail", headers=headers,
                              content=_raw({"reason": f"CUDA{NUL} out of memory", "retryable": False}))
    assert refused.status_code == 422, refused.text
    world.lease_is_usable()
    with world.server.backend.engine.connect() as conn:
        state = conn.scalar(sa.text("SELECT state FROM tf_leases WHERE trial_id = :t"), {"t": world.trial_id})
    assert state == "active"
    failed = world.http.post(f"/trials/{world.trial_id}/fail", json={"reason": "CUDA out of memory"},
                             headers={HOLDER: world.token})
    assert failed.status_code == 200, failed.text
    assert failed.json()["state"] == "FAIL" and failed.json()["fail_reason"] == "CUDA out of memory"
    study = world.http.get(f"/studies/{world.study_id}").json()
    assert study["counts"]["waiting"] == 0 and study["counts"]["running"] == 0, "not retryable: not re-queued"


def test_a_nan_metric_report_writes_nothing_and_the_next_report_counts(world: World) -> None:
    headers = {**JSON_HEADERS, HOLDER: world.token}
    body = {"step": 60, "value": 0.55, "metrics": {"loss": NAN}}
    refused = world.http.post(f"/trials/{world.trial_id}/reports", headers=headers, content=_raw(body))
    assert refused.status_code == 422, refused.text
    trial = world.http.get(f"/trials/{world.trial_id}").json()
    assert trial["intermediate_values"] == {"20": 0.4} and list(trial["rung_metrics"]) == ["20"]
    accepted = world.http.post(f"/trials/{world.trial_id}/reports", headers=headers,
                               content=_raw({**body, "metrics": {"loss": 1.2}}))
    assert accepted.status_code == 200, accepted.text
    trial = world.http.get(f"/trials/{world.trial_id}").json()
    assert trial["intermediate_values"] == {"20": 0.4, "60": 0.55}
    assert trial["rung_metrics"]["60"] == {"loss": 1.2}


def test_artifact_names_at_the_limits_are_accepted(world: World) -> None:
    headers = {HOLDER: world.token}
    names = ["d/" + "é" * 127 + "x", "/".join(["q" * 166] * 3), "adapter/nested/deeper/model.bin", "name with space"]
    for name in names:
        response = world.http.put(f"/trials/{world.trial_id}/artifacts/{quote(name, safe='/')}",
                                  content=name.encode(), headers=headers)
        assert response.status_code == 200, (name, response.text)
    listed = {a["name"] for a in world.http.get(f"/trials/{world.trial_id}/artifacts").json()}
    assert set(names) <= listed
    # Replacing a file by the same name is not a clash.
    again = world.http.put(f"/trials/{world.trial_id}/artifacts/adapter/model.bin", content=b"v2", headers=headers)
    assert again.status_code == 200, again.text
    download = world.http.get(f"/trials/{world.trial_id}/artifacts/adapter/model.bin")
    assert download.content == b"v2"


def test_artifact_folder_checks_are_exact_on_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    """SQLite's LIKE ignores case: `Adapter` is no folder of `adapter/model.bin` there either."""
    with LiveServer(make_settings(sqlite_url, tmp_path)) as live, \
            httpx.Client(base_url=live.url + "/api/v1", timeout=30) as http:
        assert http.post("/studies", json=study_spec("lite", baseline=None)).status_code == 201
        lease = http.post("/leases", json={"worker_id": "w1"}).json()
        url, headers = f"/trials/{lease['trial_id']}/artifacts", {HOLDER: lease["lease_token"]}
        assert http.put(f"{url}/adapter/model.bin", content=b"1", headers=headers).status_code == 200
        assert http.put(f"{url}/Adapter", content=b"2", headers=headers).status_code == 200
        assert http.put(f"{url}/adapter_x", content=b"3", headers=headers).status_code == 200
        clash = http.put(f"{url}/adapter", content=b"4", headers=headers)
        assert clash.status_code == 409 and "adapter/model.bin" in clash.json()["detail"], clash.text
        assert [a["name"] for a in http.get(url).json()] == ["Adapter", "adapter/model.bin", "adapter_x"]

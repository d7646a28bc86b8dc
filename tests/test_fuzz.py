"""Property-based fuzzing of the whole REST API against its own OpenAPI document (schemathesis).

For every operation of `/openapi.json`, schemathesis makes requests from the documented parameters and bodies
(its coverage cases: boundary values, each part missing or of the wrong type; then generated valid ones and
invalid ones) and sends them to a live server on PostgreSQL, with auth off and with auth on (an admin
token); operations on a trial also run as the holder of a fresh lease (its id and its `X-Lease-Token`), so
reports, completes, fails and uploads get past the ownership check. A test fails on any 5xx, any answer
whose body, content type or headers do not match what the document says for its status, and any status the
operation does not document. The first failing case of each operation and mode is reported with a curl line
that reproduces it.

Bounded for a small machine: at most `TUNEFLEET_FUZZ_COVERAGE` coverage cases (default 500) and
`TUNEFLEET_FUZZ_EXAMPLES` generated examples (default 30) per operation and mode, seeded (the same cases
each run), without shrinking; `TUNEFLEET_FUZZ_SEED` picks other examples (e.g. a nightly run with
`TUNEFLEET_FUZZ_EXAMPLES=200 TUNEFLEET_FUZZ_SEED=$RANDOM`). The totals (cases, operations, seconds) are
printed in pytest's terminal summary.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, make_settings, study_spec

schemathesis = pytest.importorskip("schemathesis", reason="the API fuzzer needs schemathesis (pip install -e .[dev])")

from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402

EXAMPLES = int(os.environ.get("TUNEFLEET_FUZZ_EXAMPLES", "30"))
SEED = int(os.environ.get("TUNEFLEET_FUZZ_SEED", "0"))
COVERAGE = int(os.environ.get("TUNEFLEET_FUZZ_COVERAGE", "500"))  # coverage cases per operation, at most
HOLDER = "X-Lease-Token"
# What every answer must satisfy: no 5xx, a documented status, and the body, content type and headers the
# document gives for that status.
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
          st_checks.response_schema_conformance, st_checks.response_headers_conformance]
# Run last: revoking tokens (the fuzzer's own, with auth on) and deleting studies leave less to explore.
LAST = ("DELETE /api/v1/tokens/{token_id}", "DELETE /api/v1/studies/{study_id}")


# ---- the totals, in pytest's terminal summary ---------------------------------------------------------------

class _Summary:
    """A plugin registered at run time: pytest calls its `pytest_terminal_summary` at the end of the run."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.lines:
            terminalreporter.section("API fuzzing (schemathesis)")
            for line in self.lines:
                terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def fuzz_summary(request: pytest.FixtureRequest) -> _Summary:
    plugin = request.config.pluginmanager.get_plugin("tunefleet-fuzz-summary")
    if plugin is None:
        plugin = _Summary()
        request.config.pluginmanager.register(plugin, "tunefleet-fuzz-summary")
    return plugin


# ---- one fuzzing run ----------------------------------------------------------------------------------------

@dataclass
class Run:
    cases: int = 0
    operations: set[str] = field(default_factory=set)
    statuses: Counter[str] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)  # "operation [variant]" -> the report
    seconds: float = 0.0

    def line(self, label: str) -> str:
        spread = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return (f"fuzzed {self.cases} cases over {len(self.operations)} operations ({label}) in "
                f"{self.seconds:.0f} s, {EXAMPLES} examples per operation and mode, seed {SEED}; "
                f"statuses {spread}; {len(self.failures)} failing")


def _fuzz_operation(run: Run, operation: Any, variant: str, base_url: str, headers: dict[str, str],
                    path_parameters: dict[str, Any] | None = None) -> None:
    """Positive then negative examples of one operation; the first failing case of each mode is recorded."""
    holder = {k: v for k, v in headers.items() if k == HOLDER} or None  # pinned: the lease token parameter
    extra = {k: v for k, v in headers.items() if k != HOLDER}  # the bearer token, sent with every case
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters, headers=holder)

        @seed(SEED)
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                  verbosity=Verbosity.quiet, report_multiple_bugs=False)
        @given(case=strategy)
        def fuzz(case: Any) -> None:
            run.cases += 1
            response = case.call(base_url=base_url, headers=extra, timeout=60)
            run.statuses[f"{response.status_code // 100}xx"] += 1
            case.validate_response(response, checks=CHECKS, headers=extra)

        try:
            fuzz()
        except Unsatisfiable:  # nothing to make invalid: the operation has no parameters and no body
            assert mode == GenerationMode.NEGATIVE and not list(operation.iter_parameters()) and not operation.body
        except (KeyboardInterrupt, SystemExit, pytest.fail.Exception):  # interrupted, or timed out
            raise
        except BaseException as exc:  # a check failed (a FailureGroup, an exception group), or the call broke
            key = f"{operation.label} [{variant}, {mode.value}]"
            run.failures[key] = f"{type(exc).__name__}: {exc}"[:3000]


def _cover_operation(run: Run, operation: Any, variant: str, base_url: str, headers: dict[str, str]) -> None:
    """Schemathesis' coverage cases of one operation (boundary values, each required part missing or of
    the wrong type, unexpected methods), at most COVERAGE of them; the first failing one is recorded."""
    schema = operation.schema
    config = schema.config.generation_for(operation=operation, phase="coverage")
    cases = schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode), generation_config=config)
    for case in itertools.islice(cases, COVERAGE):
        run.cases += 1
        try:
            response = case.call(base_url=base_url, headers=headers, timeout=60)
            run.statuses[f"{response.status_code // 100}xx"] += 1
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (KeyboardInterrupt, SystemExit, pytest.fail.Exception):
            raise
        except BaseException as exc:  # as in _fuzz_operation
            run.failures[f"{operation.label} [{variant}, coverage]"] = f"{type(exc).__name__}: {exc}"[:3000]
            return


def _fuzz_api(live: LiveServer, headers: dict[str, str], holder: Callable[[], tuple[int, str]],
              study_id: int) -> Run:
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", headers=dict(headers), timeout=60)
    operations = [result.ok() for result in schema.get_all_operations()]
    operations.sort(key=lambda op: (op.label in LAST, LAST.index(op.label) if op.label in LAST else 0))
    run = Run()
    start = time.monotonic()
    for operation in operations:
        run.operations.add(operation.label)
        params = {p.name for p in operation.path_parameters}
        _cover_operation(run, operation, "any ids", live.url, headers)
        _fuzz_operation(run, operation, "any ids", live.url, headers)
        if "trial_id" in params and operation.method.upper() != "GET":
            trial_id, token = holder()  # a fresh lease: the calls come from its holder
            _fuzz_operation(run, operation, f"holder of trial {trial_id}", live.url, {**headers, HOLDER: token},
                            {"trial_id": trial_id})
        elif "trial_id" in params:
            trial_id, _ = holder()
            _fuzz_operation(run, operation, f"trial {trial_id}", live.url, headers, {"trial_id": trial_id})
        elif "study_id" in params and operation.method.upper() != "DELETE":
            _fuzz_operation(run, operation, f"study {study_id}", live.url, headers, {"study_id": study_id})
    run.seconds = time.monotonic() - start
    return run


# ---- the two servers ----------------------------------------------------------------------------------------

@dataclass
class World:
    live: LiveServer
    headers: dict[str, str]
    study_id: int

    studies: int = 0

    def new_study(self, http: httpx.Client) -> int:
        """A running study with room for many trials (the fuzzer may stop or delete the earlier ones)."""
        self.studies += 1
        created = http.post("/studies", json=study_spec(f"fuzz-{self.studies}", search={"pruner": "none", "seed": 0},
                                                        budget={"max_trials": 10_000}))
        assert created.status_code == 201, created.text
        return created.json()["id"]

    def holder(self) -> tuple[int, str]:
        """A newly leased trial: its id and its lease token."""
        with httpx.Client(base_url=self.live.url + "/api/v1", headers=self.headers, timeout=60) as http:
            leased = http.post("/leases", json={"worker_id": "fuzz-holder"})
            if leased.status_code == 204:  # no running study left
                self.new_study(http)
                leased = http.post("/leases", json={"worker_id": "fuzz-holder"})
            assert leased.status_code == 200, leased.text
            return leased.json()["trial_id"], leased.json()["lease_token"]


def _seed(live: LiveServer, headers: dict[str, str]) -> World:
    """A running study with room for many trials, one of them leased with an artifact uploaded."""
    world = World(live, headers, 0)
    with httpx.Client(base_url=live.url + "/api/v1", headers=headers, timeout=60) as http:
        world.study_id = world.new_study(http)
        trial_id, token = world.holder()
        uploaded = http.put(f"/trials/{trial_id}/artifacts/adapter/config.json", content=b"{}",
                            headers={HOLDER: token})
        assert uploaded.status_code == 200, uploaded.text
    return world


@pytest.fixture(params=["auth-off", "auth-on"])
def world(request: pytest.FixtureRequest, pg_url: str, tmp_path: Path) -> Iterator[World]:
    from tunefleet.service.auth import create_token

    auth = request.param == "auth-on"
    settings = make_settings(pg_url, tmp_path, auth=auth, max_artifact_mb=1)
    headers = {"Authorization": f"Bearer {create_token(settings, 'fuzz-admin', 'admin')}"} if auth else {}
    with LiveServer(settings) as live:
        yield _seed(live, headers)


@pytest.mark.timeout(900)
def test_the_api_answers_every_generated_request_as_its_openapi_says(world: World, fuzz_summary: _Summary,
                                                                     request: pytest.FixtureRequest) -> None:
    run = _fuzz_api(world.live, world.headers, world.holder, world.study_id)
    label = request.node.callspec.id
    line = run.line(label)
    fuzz_summary.lines.append(line)
    print(line, file=sys.stderr)
    assert len(run.operations) >= 20 and run.cases >= len(run.operations), line  # the whole API really ran
    assert not run.failures, line + "\n\n" + "\n\n".join(f"== {k}\n{v}" for k, v in run.failures.items())

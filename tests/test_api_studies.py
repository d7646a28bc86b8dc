"""Study routes on both storage back ends: create, list, show, state changes, delete; every bad spec is a 422."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, make_settings, study_spec


@pytest.fixture
def live(db_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    with LiveServer(make_settings(db_url, tmp_path)) as server:
        yield server


@pytest.fixture
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url + "/api/v1", timeout=30) as client:
        yield client


def test_spec_is_stored_and_returned_unchanged(http: httpx.Client) -> None:
    spec = study_spec("unchanged", description="kept as sent", search={"sampler": "tpe", "seed": 3})
    created = http.post("/studies", json=spec)
    assert created.status_code == 201, created.text
    shown = http.get(f"/studies/{created.json()['id']}").json()
    assert shown["spec"] == spec
    assert shown["state"] == "running" and shown["counts"]["waiting"] == 1  # the baseline, queued
    assert shown["max_trials"] == 12 and shown["progress"] == 0


def test_list_with_paging_and_filters(http: httpx.Client) -> None:
    ids = [http.post("/studies", json=study_spec(f"list-{i}")).json()["id"] for i in range(5)]
    http.post(f"/studies/{ids[0]}/pause")
    page = http.get("/studies", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 5 and len(page["items"]) == 2 and page["items"][0]["id"] == ids[3]
    paused = http.get("/studies", params={"state": "paused"}).json()
    assert [s["id"] for s in paused["items"]] == [ids[0]]
    named = http.get("/studies", params={"name": "list-4"}).json()
    assert [s["name"] for s in named["items"]] == ["list-4"]
    assert http.get("/studies", params={"state": "sleeping"}).status_code == 422


def test_pause_resume_stop_delete(http: httpx.Client) -> None:
    sid = http.post("/studies", json=study_spec("states")).json()["id"]
    assert http.post(f"/studies/{sid}/pause").json()["state"] == "paused"
    assert http.post("/leases", json={"worker_id": "w"}).status_code == 204, "a paused study hands out nothing"
    assert http.post(f"/studies/{sid}/resume").json()["state"] == "running"
    lease = http.post("/leases", json={"worker_id": "w"}).json()
    assert http.post(f"/studies/{sid}/stop").json()["state"] == "stopped"
    assert http.post(f"/trials/{lease['trial_id']}/heartbeat", json={"worker_id": "w"},
                     headers={"X-Lease-Token": lease["lease_token"]}).json()["stop"] is True
    conflict = http.post(f"/studies/{sid}/resume")
    assert conflict.status_code == 409 and "stopped" in conflict.json()["detail"]
    assert http.delete(f"/studies/{sid}").status_code == 204
    assert http.get(f"/studies/{sid}").status_code == 404
    assert http.post("/studies", json=study_spec("states")).status_code == 201, "the name is free again"


def test_duplicate_name_is_a_conflict_and_keeps_the_first(http: httpx.Client) -> None:
    first = http.post("/studies", json=study_spec("dup")).json()
    again = http.post("/studies", json=study_spec("dup", description="second"))
    assert again.status_code == 409 and "dup" in again.json()["detail"]
    assert http.get(f"/studies/{first['id']}").json()["spec"] == study_spec("dup")


def test_unknown_ids_are_404(http: httpx.Client) -> None:
    assert http.get("/studies/999").status_code == 404
    assert http.get("/trials/999").status_code == 404
    assert http.post("/trials/999/reports", json={"step": 20, "value": 0.1}).status_code == 404


def _bad(**changes: object) -> dict:
    spec = copy.deepcopy(study_spec("bad"))
    for path, value in changes.items():
        node = spec
        keys = path.split("__")
        for key in keys[:-1]:
            node = node[key]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return spec


DELETE = object()
LR = "search_space__learning_rate"

BAD_SPECS = [
    ("unknown top-level key", _bad(colour="blue"), ["colour"], "unknown key"),
    ("unknown key in search", _bad(search={"sampler": "tpe", "prunner": "hyperband"}), ["search", "prunner"],
     "unknown"),
    ("empty range", _bad(**{f"{LR}__high": 1e-5}), ["search_space", "learning_rate"], "low < high"),
    ("inverted int range", _bad(search_space={"lora_r": {"type": "int", "low": 32, "high": 4}},
                                baseline=None), ["search_space", "lora_r"], "low < high"),
    ("log range through zero", _bad(**{f"{LR}__low": 0.0}), ["search_space", "learning_rate"], "above zero"),
    ("negative log range", _bad(**{f"{LR}__low": -1.0}), ["search_space", "learning_rate"], "above zero"),
    ("unknown sampler", _bad(search={"sampler": "bayes"}), ["search", "sampler"], "tpe"),
    ("unknown pruner", _bad(search={"pruner": "bohb"}), ["search", "pruner"], "hyperband"),
    ("metric the task does not produce", _bad(objective={"metric": "bleu"}), ["objective", "metric"], "accuracy"),
    ("unknown task", _bad(task="translation"), ["task"], "sequence-classification"),
    ("missing model", _bad(model=DELETE), ["model"], "required"),
    ("misspelt parameter", _bad(search_space={"learning_rat": {"type": "float", "low": 0.1, "high": 1.0}},
                                baseline=None), ["search_space", "learning_rat"], "learning_rate"),
    ("empty choices", _bad(search_space={"lora_r": {"type": "categorical", "choices": []}}, baseline=None),
     ["search_space", "lora_r", "choices"], "at least 1"),
    ("baseline outside the range", _bad(baseline={"learning_rate": 1.0, "lora_r": 8, "method": "lora"}),
     ["baseline", "learning_rate"], "outside"),
    ("searched and fixed", _bad(fixed={"learning_rate": 1e-4}), ["fixed", "learning_rate"], "one place"),
    ("min_resource above 1", _bad(search={"min_resource": 1.5}), ["search", "min_resource"], "1"),
    ("no training data", _bad(data={"text": "t"}), ["data"], "data.train"),
    ("multi-objective with a pruner", _bad(objective=[{"metric": "accuracy"}, {"metric": "loss",
                                                                                 "direction": "minimize"}]),
     ["search", "pruner"], "none"),
    ("zero trials", _bad(budget={"max_trials": 0}), ["budget", "max_trials"], "greater than or equal to 1"),
    ("no objective in the list", _bad(objective=[]), ["objective", "list[ObjectiveSpec]"], "at least 1"),
]


@pytest.mark.parametrize("case, spec, loc, hint", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_is_422_naming_the_field_and_fix(http: httpx.Client, case: str, spec: dict, loc: list,
                                                  hint: str) -> None:
    response = http.post("/studies", json=spec)
    assert response.status_code == 422, f"{case}: {response.text}"
    errors = response.json()["detail"]
    match = [e for e in errors if e["loc"] == loc]
    assert match, f"{case}: no error at {loc}: {errors}"
    assert hint.lower() in match[0]["msg"].lower(), f"{case}: {match[0]['msg']}"
    assert http.get("/studies").json()["total"] == 0, "nothing is stored"


def test_several_problems_are_all_listed(http: httpx.Client) -> None:
    spec = _bad(colour="blue", search={"sampler": "bayes"}, budget={"max_trials": -1})
    locs = [e["loc"] for e in http.post("/studies", json=spec).json()["detail"]]
    assert ["colour"] in locs and ["search", "sampler"] in locs and ["budget", "max_trials"] in locs


def test_a_bad_spec_leaves_existing_studies_untouched(http: httpx.Client) -> None:
    good = http.post("/studies", json=study_spec("keep")).json()
    assert http.post("/studies", json=_bad(name="keep", colour="x")).status_code == 422
    assert http.get(f"/studies/{good['id']}").json()["spec"] == study_spec("keep")


@pytest.mark.parametrize("sampler", ["random", "grid", "cmaes", "nsga2", "tpe"])
def test_each_sampler_hands_out_trials(http: httpx.Client, sampler: str) -> None:
    space = {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3, "step": 1e-4 if sampler == "grid" else None},
             "lora_r": {"type": "int", "low": 4, "high": 8, "step": 4}}
    space["learning_rate"] = {k: v for k, v in space["learning_rate"].items() if v is not None}
    spec = study_spec(f"s-{sampler}", search_space=space, baseline=None, search={"sampler": sampler, "seed": 1})
    created = http.post("/studies", json=spec)
    assert created.status_code == 201, created.text
    for i in range(3):
        lease = http.post("/leases", json={"worker_id": "w"}).json()
        assert set(lease["params"]) == {"learning_rate", "lora_r"}
        http.post(f"/trials/{lease['trial_id']}/complete", json={"value": 0.1 * i},
                  headers={"X-Lease-Token": lease["lease_token"]})

"""Data, models and artifacts across nodes: a worker process started in another working directory, sharing no
path with the client and holding no S3 credentials, trains an uploaded tiny model on an uploaded data set;
its pause checkpoint and final adapter land in a real S3 API server (moto on loopback) behind the server on
PostgreSQL. Plus: HF_HUB_OFFLINE fails a missing hub id at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import S3_BUCKET, LiveServer, make_settings, s3_keys
from tests.workers.conftest import classification_rows, write_jsonl
from tunefleet.cli.export import model_card
from tunefleet.service.client import Client
from tunefleet.workers.errors import ModelLoadError
from tunefleet.workers.inputs import InputCache
from tunefleet.workers.model_cache import check_local_path


def test_a_worker_elsewhere_trains_uploads_and_its_checkpoints_and_adapter_land_in_s3(
        pg_url, tmp_path, tiny_bert, s3_endpoint) -> None:
    client_side, worker_side = tmp_path / "client", tmp_path / "worker-node"
    worker_side.mkdir()
    data = client_side / "data"
    data.mkdir(parents=True)
    for i, (split, n) in enumerate((("train", 128), ("validation", 32), ("test", 32))):
        write_jsonl(data / f"{split}.jsonl", classification_rows(n, seed=i))
    model = shutil.copytree(tiny_bert, client_side / "tiny-bert")
    settings = make_settings(pg_url, tmp_path / "server", store_url=f"s3://{S3_BUCKET}/tf",
                             store_endpoint_url=s3_endpoint)
    with LiveServer(settings) as live, Client(live.url) as client:
        dataset = client.upload_asset("datasets", "shop-reviews", data)
        uploaded = client.upload_asset("models", "tiny-bert", model)
        shutil.rmtree(client_side)  # nothing the worker could read on this side
        study = client.create_study({
            "name": "across-nodes", "model": "tunefleet://tiny-bert", "task": "sequence-classification",
            "data": {"train": "tunefleet://shop-reviews/train.jsonl",
                     "validation": "tunefleet://shop-reviews/validation.jsonl",
                     "test": "tunefleet://shop-reviews/test.jsonl"},
            "objective": {"metric": "loss", "direction": "minimize"},
            "search_space": {"learning_rate": {"type": "categorical", "choices": [3e-3]}},
            "fixed": {"per_device_batch_size": 16, "max_seq_length": 48, "eval_batch_size": 64, "method": "lora",
                      "max_steps": 20, "warmup_ratio": 0.1},
            # One rung before the end: the only trial pauses there (no peer yet), then resumes from S3.
            "search": {"sampler": "grid", "pruner": "asha", "rungs": [50, 100], "seed": 0},
            "budget": {"max_trials": 1}, "checkpoints": {"storage": "upload", "keep": "all"}, "seed": 0,
        })
        assert study["spec"]["model"] == f"tunefleet://tiny-bert@{uploaded['version']}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the worker has no S3 access
        worker = subprocess.run(
            [sys.executable, "-m", "tunefleet", "worker", "--server", live.url, "--once", "--device", "cpu",
             "--idle-sleep", "0.2"], cwd=worker_side, env=env, capture_output=True, text=True, timeout=300)
        assert worker.returncode == 0, worker.stderr[-3000:]
        (trial,) = client.list_trials(study["id"])["items"]
        artifacts = {a["name"] for a in client.list_artifacts(trial["id"])}
        splits = json.loads(client.download_artifact(trial["id"], "data_splits.json"))
        shown = client.get_study(study["id"])
    assert trial["state"] == "COMPLETE" and trial["resumes"] >= 1, trial
    assert "checkpoints/step-050.tar" in artifacts and "adapter_model.safetensors" in artifacts
    keys = s3_keys(s3_endpoint, f"tf/{study['id']}/{trial['id']}/")
    assert {k.removeprefix(f"tf/{study['id']}/{trial['id']}/") for k in keys} == artifacts, "every artifact is in S3"
    assert not (settings.home / "artifacts").exists(), "nothing on the server's disk"
    assert splits["inputs"]["data.train"] == {"uri": f"tunefleet://shop-reviews@{dataset['version']}/train.jsonl",
                                              "sha256": dataset["sha256"]}
    assert splits["inputs"]["model"]["sha256"] == uploaded["sha256"]
    cache = worker_side / ".tunefleet" / "cache"
    assert sorted(p.name for p in (cache / "datasets").iterdir()) == [dataset["sha256"]]
    assert sorted(p.name for p in (cache / "models").iterdir()) == [uploaded["sha256"]]
    card = model_card(shown, trial, None, sorted(artifacts))
    assert "base_model: tiny-bert\n" in card and str(tmp_path) not in card


def test_a_remote_file_is_downloaded_with_fsspec_and_kept_by_hash(tmp_path) -> None:
    import fsspec

    with fsspec.open("memory://bucket/train.jsonl", "wb") as fh:  # fsspec's in-memory file system, as s3fs is one
        fh.write(b'{"text": "a", "label": "b"}\n')
    cache = InputCache(tmp_path / "cache", client=None)  # type: ignore[arg-type]  # no upload is fetched
    first, digest = cache._remote("memory://bucket/train.jsonl")
    again, same = cache._remote("memory://bucket/train.jsonl")
    assert first == again == tmp_path / "cache" / "remote" / digest / "train.jsonl" and digest == same
    assert first.read_bytes() == b'{"text": "a", "label": "b"}\n'
    assert [p.name for p in (tmp_path / "cache" / "remote").iterdir()] == [digest], "no half-written copies"


def test_hf_hub_offline_fails_a_missing_hub_id_at_once(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set.*tunefleet model upload"):
        check_local_path("nobody/no-such-model-here", "model")
    assert time.monotonic() - started < 5

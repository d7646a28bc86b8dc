"""The store for bytes (service/stores.py): the same tests against the local folder and a real S3 API server
(moto in server mode on loopback); then data set and model uploads through the API on PostgreSQL, with the
S3 store: versions by content, pinning in a study's spec, and a clear 4xx for every bad upload or name."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import S3_BUCKET, LiveServer, free_port, make_settings, s3_keys, study_spec
from tunefleet.cli import app
from tunefleet.service.client import Client, pack_files
from tunefleet.service.errors import StoreUnavailable
from tunefleet.service.stores import CHUNK_BYTES, LocalStore, S3Store, Store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Store(f"s3://{S3_BUCKET}/prefix", endpoint_url=endpoint, region=None, spool=tmp_path / "spool")


def _put(store: Store, key: str, data: bytes) -> Path:
    fd, tmp = store.incoming()
    with open(fd, "wb") as fh:
        fh.write(data)
    store.put(key, tmp)
    return tmp


def test_an_object_goes_in_whole_and_comes_back_in_chunks(store: Store) -> None:
    data = bytes(range(256)) * (CHUNK_BYTES // 256 * 2 + 1000)  # two full chunks and a bit
    spooled = _put(store, "7/8/adapter/model.bin", data)
    assert not spooled.exists(), "the spool file is moved or deleted once stored"
    assert store.exists("7/8/adapter/model.bin")
    chunks = list(store.chunks("7/8/adapter/model.bin"))
    assert len(chunks) >= 3 and max(map(len, chunks)) <= CHUNK_BYTES
    assert b"".join(chunks) == data


def test_put_replaces_and_a_missing_key_is_not_an_error_except_to_read(store: Store) -> None:
    _put(store, "a/b.txt", b"first")
    _put(store, "a/b.txt", b"second")
    assert b"".join(store.chunks("a/b.txt")) == b"second"
    assert not store.exists("a/missing.txt")
    with pytest.raises(FileNotFoundError):
        store.chunks("a/missing.txt")
    store.delete("a/missing.txt")
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")


def test_delete_prefix_removes_one_folder_only(store: Store) -> None:
    for key in ("1/2/adapter.bin", "1/3/log.txt", "10/1/log.txt", "datasets/x.tar"):
        _put(store, key, key.encode())
    store.delete_prefix("1/")
    assert [k for k in ("1/2/adapter.bin", "1/3/log.txt", "10/1/log.txt", "datasets/x.tar") if store.exists(k)] == [
        "10/1/log.txt", "datasets/x.tar"]


def test_an_s3_store_that_does_not_answer_is_store_unavailable(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    store = S3Store(f"s3://{S3_BUCKET}", endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1",
                    spool=tmp_path / "spool")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="TUNEFLEET_STORE_URL, TUNEFLEET_STORE_ENDPOINT_URL"):
        store.exists("datasets/x.tar")
    assert time.monotonic() - started < 10


# ---- uploads through the API, S3 store, PostgreSQL -------------------------------------------------------

@pytest.fixture
def s3_server(pg_url: str, tmp_path: Path, s3_endpoint: str) -> Iterator[LiveServer]:
    settings = make_settings(pg_url, tmp_path / "server", store_url=f"s3://{S3_BUCKET}/tf",
                             store_endpoint_url=s3_endpoint, max_upload_mb=1)
    with LiveServer(settings) as live:
        yield live


def _data_folder(root: Path) -> Path:
    root.mkdir()
    (root / "train.jsonl").write_text('{"text": "good", "label": "a"}\n' * 20)
    (root / "test.jsonl").write_text('{"text": "bad", "label": "b"}\n' * 5)
    return root


def test_uploads_are_versioned_by_content_and_pinned_in_a_study(s3_server, s3_endpoint, tmp_path) -> None:
    folder = _data_folder(tmp_path / "news")
    with Client(s3_server.url) as client:
        first = client.upload_asset("datasets", "news", folder)
        again = client.upload_asset("datasets", "news", folder)
        assert again["version"] == first["version"] and len(first["version"]) == 12
        assert [f["name"] for f in first["files"]] == ["test.jsonl", "train.jsonl"]
        (folder / "train.jsonl").write_text('{"text": "good", "label": "a"}\n' * 21)
        second = client.upload_asset("datasets", "news", folder)
        assert second["version"] != first["version"]
        assert [v["version"] for v in client.list_assets("datasets", "news")] == [second["version"], first["version"]]
        assert s3_keys(s3_endpoint, "tf/datasets/") == sorted(
            f"tf/datasets/{v['sha256']}.tar" for v in (first, second))
        downloaded = tmp_path / "down.tar"
        assert client.download_asset_to("datasets", "news", first["version"], downloaded) == first["sha256"]
        with tarfile.open(downloaded) as tar:
            assert tar.getnames() == ["test.jsonl", "train.jsonl"]
        spec = study_spec("pinned", data={"train": "tunefleet://news/train.jsonl",
                                          "test": f"tunefleet://news@{first['version']}/test.jsonl"})
        study = client.create_study(spec)
    assert study["spec"]["data"]["train"] == f"tunefleet://news@{second['version']}/train.jsonl", "newest, pinned"
    assert study["spec"]["data"]["test"] == f"tunefleet://news@{first['version']}/test.jsonl"


def test_the_cli_uploads_lists_and_shows_and_a_bad_path_is_one_error_line(s3_server, tmp_path) -> None:
    folder = _data_folder(tmp_path / "news")
    runner = CliRunner()

    def tunefleet(*args: str) -> Any:
        return runner.invoke(app, ["--server", s3_server.url, *args], env={"COLUMNS": "200"})

    uploaded = tunefleet("data", "upload", str(folder), "--name", "news")
    assert uploaded.exit_code == 0, uploaded.output
    version = uploaded.stdout.strip().removeprefix("tunefleet://news@")
    assert len(version) == 12
    listed = tunefleet("data", "ls", "--json")
    assert [(a["name"], a["version"]) for a in json.loads(listed.stdout)] == [("news", version)]
    shown = tunefleet("data", "show", "news")
    assert shown.exit_code == 0 and "train.jsonl" in shown.stdout and version in shown.stdout
    missing = tunefleet("model", "upload", str(tmp_path / "nowhere"), "--name", "m")
    assert missing.exit_code == 1 and "no such file or folder" in missing.output
    unknown = tunefleet("model", "show", "m")
    assert unknown.exit_code == 1 and "no model named 'm'" in unknown.output


def test_a_version_is_deleted_unless_a_running_study_uses_it(s3_server, s3_endpoint, tmp_path) -> None:
    folder = _data_folder(tmp_path / "news")
    runner = CliRunner()
    with Client(s3_server.url) as client, httpx.Client(base_url=s3_server.url + "/api/v1") as http:
        first = client.upload_asset("datasets", "news", folder)
        copy = client.upload_asset("datasets", "copy", folder)  # the same bytes under another name: one tar
        (folder / "train.jsonl").write_text('{"text": "good", "label": "a"}\n' * 21)
        second = client.upload_asset("datasets", "news", folder)
        study = client.create_study(study_spec("uses-news", data={"train": "tunefleet://news/train.jsonl"}))

        latest = http.delete("/datasets/news/latest")
        assert latest.status_code == 422 and "name the version" in latest.json()["detail"][0]["msg"]
        assert http.delete("/datasets/news/abcdef").status_code == 404
        in_use = http.delete(f"/datasets/news/{second['version']}")
        assert in_use.status_code == 409 and "uses-news" in in_use.json()["detail"], in_use.text
        assert len(client.list_assets("datasets", "news")) == 2, "a refused deletion changes nothing"

        client.stop_study(study["id"])
        gone = client.delete_asset("datasets", "news", second["version"])
        assert gone["sha256"] == second["sha256"]
        assert f"tf/datasets/{second['sha256']}.tar" not in s3_keys(s3_endpoint, "tf/datasets/")
        client.delete_asset("datasets", "news", first["version"])
        assert http.get("/datasets/news").status_code == 404
        assert f"tf/datasets/{first['sha256']}.tar" in s3_keys(s3_endpoint, "tf/datasets/"), "'copy' still holds it"
        assert client.download_asset_to("datasets", "copy", copy["version"], tmp_path / "c.tar") == copy["sha256"]

    removed = runner.invoke(app, ["--server", s3_server.url, "data", "rm", "copy", copy["version"]])
    assert removed.exit_code == 0 and f"deleted copy version {copy['version']}" in removed.output
    assert s3_keys(s3_endpoint, "tf/datasets/") == [], "the last name of those bytes is gone: so is the tar"
    again = runner.invoke(app, ["--server", s3_server.url, "data", "rm", "copy", copy["version"]])
    assert again.exit_code == 1 and "no data set named 'copy'" in again.output


def _tar_bytes(*members: tarfile.TarInfo) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return buffer.getvalue()


def _link() -> tarfile.TarInfo:
    info = tarfile.TarInfo("passwd")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 3
    return info


@pytest.mark.parametrize(("path", "body", "status", "loc", "hint"), [
    ("/datasets/bad name!", b"", 422, ["path", "name"], "letters, digits"),
    ("/models/-leading", b"", 422, ["path", "name"], "starting with a letter"),
    ("/datasets/news", b"not a tar at all" * 100, 422, ["body"], "not a tar file"),
    ("/datasets/news", _tar_bytes(), 422, ["body"], "holds no file"),
    ("/models/m", _tar_bytes(_link()), 422, ["body"], "not a plain file"),
    ("/datasets/news", _tar_bytes(_file("../escape.jsonl")), 422, ["body"], "unsafe name"),
    ("/datasets/news", b"x" * (2 * 2**20), 413, None, "tunefleet_max_upload_mb"),
])
def test_bad_uploads_are_4xx_naming_the_fix(s3_server, s3_endpoint, path, body, status, loc, hint) -> None:
    with httpx.Client(base_url=s3_server.url + "/api/v1", timeout=30) as http:
        answer = http.post(path, content=body, headers={"Content-Type": "application/octet-stream"})
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    if loc is not None:
        assert [e for e in detail if e["loc"] == loc and hint in e["msg"].lower()], detail
    else:
        assert hint in str(detail).lower()
    assert s3_keys(s3_endpoint, "tf/") == [], "nothing is stored"


def test_bad_references_in_a_spec_are_422_naming_the_field(s3_server, tmp_path) -> None:
    folder = _data_folder(tmp_path / "news")
    with Client(s3_server.url) as client, httpx.Client(base_url=s3_server.url + "/api/v1", timeout=30) as http:
        version = client.upload_asset("datasets", "news", folder)["version"]
        cases = [
            ({"data": {"train": "tunefleet://nothing"}}, ["data", "train"], "no data set named 'nothing'"),
            ({"data": {"train": "tunefleet://news"}}, ["data", "train"], "holds 2 files: name one"),
            ({"data": {"train": "tunefleet://news/val.jsonl"}}, ["data", "train"], "holds no file 'val.jsonl'"),
            ({"data": {"train": "tunefleet://news@abcdef/train.jsonl"}}, ["data", "train"], "has no version"),
            ({"data": {"train": "tunefleet://news@zz/train.jsonl"}}, ["data", "train"], "bad version"),
            ({"model": "tunefleet://no-model"}, ["model"], "tunefleet model upload"),
        ]
        for change, loc, hint in cases:
            answer = http.post("/studies", json=study_spec("refs", **change))
            assert answer.status_code == 422, answer.text
            assert [e for e in answer.json()["detail"] if e["loc"] == loc and hint in e["msg"]], (change, answer.text)
        for path in (f"/datasets/news/{version[:6]}00/content", "/datasets/nothing", "/models/news/latest"):
            assert http.get(path).status_code == 404, path
        assert http.get("/studies", params={"name": "refs"}).json()["total"] == 0


def test_the_same_files_always_pack_to_the_same_bytes(tmp_path) -> None:
    folder = _data_folder(tmp_path / "news")
    pack_files(folder, tmp_path / "one.tar")
    (folder / "train.jsonl").touch()  # a new mtime
    pack_files(folder, tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    with pytest.raises(ValueError, match="no such file"):
        pack_files(tmp_path / "missing", tmp_path / "three.tar")

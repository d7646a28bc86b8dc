"""The curve recorder's second task and its shards: data from the vaderSentiment sdist layout, shards that
split one design, appends that never interleave, data files that are never seen half-written."""

from __future__ import annotations

import io
import json
import multiprocessing
import tarfile
from pathlib import Path

import pytest

from benchmarks.record_curves import (
    REVIEW_MEMBER,
    REVIEW_SIZES,
    append_record,
    main,
    read_records,
    review_sentences,
    reviews_spec,
    sample_configs,
    write_review_sentences,
)

LINES = ["1_1\t-0.9\tno picture at all.", "1_2\t0.1\tit came in a box.", "1_3\t0.75\tthe best  player\tI own",
         "bad line", "1_4\t-0.5\tworst buy."]


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_sdist(path: Path, lines: list[str]) -> Path:
    """An sdist laid out as vaderSentiment 3.3.2's: a tar.gz inside the tar.gz holds the rated sentences."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        _tar_add(tar, "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt", "\r\n".join(lines).encode())
        _tar_add(tar, "hutto_ICWSM_2014/tweets_GroundTruth.txt", b"1\t0.5\tnot this one")
    with tarfile.open(path, "w:gz") as tar:
        _tar_add(tar, "vaderSentiment-3.3.2/setup.py", b"")
        _tar_add(tar, f"vaderSentiment-3.3.2/{REVIEW_MEMBER}", inner.getvalue())
    return path


def test_review_sentences_are_cut_at_half_a_point_and_malformed_lines_skipped(tmp_path: Path) -> None:
    records = review_sentences(make_sdist(tmp_path / "v.tar.gz", LINES))
    assert records == [{"text": "no picture at all.", "label": "negative"},
                       {"text": "it came in a box.", "label": "neutral"},
                       {"text": "the best player", "label": "positive"},
                       {"text": "worst buy.", "label": "negative"}]


def test_missing_sdist_or_member_names_the_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pip download --no-deps --no-binary :all: vaderSentiment"):
        review_sentences(tmp_path / "absent.tar.gz")
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        _tar_add(tar, "pkg/README", b"")
    with pytest.raises(FileNotFoundError, match=REVIEW_MEMBER):
        review_sentences(other)


def test_review_split_is_seeded_disjoint_and_sized(tmp_path: Path) -> None:
    lines = [f"{i}\t{(i % 5 - 2) / 2}\tsentence number {i}" for i in range(1500)]
    sdist = make_sdist(tmp_path / "v.tar.gz", lines)
    paths = write_review_sentences(tmp_path / "a", sdist)
    again = write_review_sentences(tmp_path / "b", sdist)
    texts = {split: [json.loads(line)["text"] for line in p.read_text().splitlines()] for split, p in paths.items()}
    assert {split: len(t) for split, t in texts.items()} == {**REVIEW_SIZES, "train": 1500 - 400 - 800}
    assert len(set().union(*texts.values())) == 1500  # no sentence in two splits
    assert all(paths[s].read_bytes() == again[s].read_bytes() for s in paths)
    assert not list((tmp_path / "a").glob(".*tmp"))  # written aside, renamed over


def test_shards_partition_the_design_and_the_reviews_space_matches_the_demos_names() -> None:
    spec = reviews_spec(Path("/data"), Path("/model"))
    assert set(spec["search_space"]) == {"method", "learning_rate", "lora_r", "weight_decay", "warmup_ratio",
                                         "train_size"}
    configs = sample_configs(spec["search_space"], 40, 0)
    assert configs[:10] == sample_configs(spec["search_space"], 10, 0)
    shards = [[i for i in range(40) if i % 3 == k] for k in range(3)]
    assert sorted(sum(shards, [])) == list(range(40))


def _append_many(path: str, worker: int) -> None:
    for i in range(50):
        append_record(Path(path), {"index": worker * 1000 + i, "pad": "x" * 20_000})


def test_appends_from_several_processes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "curves.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    records = read_records(path)
    assert sorted(r["index"] for r in records) == sorted(w * 1000 + i for w in range(4) for i in range(50))


def test_bad_shard_and_incomplete_reviews_arguments_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--shard", "3/3", "--out", str(tmp_path / "x")])
    assert "--shard '3/3'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs --gguf"):
        main(["--task", "reviews-smollm2", "--out", str(tmp_path / "x"), "--data-dir", str(tmp_path / "d"),
              "--prepare-only"])

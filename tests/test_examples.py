"""Every example spec in examples/ is valid, so the README's commands work as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunefleet.service.spec import parse_spec_text, validate_spec

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_spec_is_valid(path: Path) -> None:
    spec = validate_spec(parse_spec_text(path.read_text()))
    assert spec.rungs()[0] == 20 and spec.baseline is not None


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 3


def test_spec_text_json_is_json_and_yaml_numbers_follow_yaml_1_2() -> None:
    """A spec the REST API accepts as JSON is read the same from a file; `5e-5` in YAML is a float."""
    from tunefleet.service.spec import parse_spec_text

    assert parse_spec_text('{"lr": 5e-5, "n": 3}') == {"lr": 5e-5, "n": 3}
    assert parse_spec_text("lr: 5e-5\nwd: 1E+2\nq: '5e-5'\nn: 3\nx: 1.5") == {
        "lr": 5e-5, "wd": 100.0, "q": "5e-5", "n": 3, "x": 1.5}
    assert parse_spec_text("{lr: 1e-3}") == {"lr": 1e-3}  # YAML's flow style still works
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_spec_text('{"lr": 1,, "n": 2}')
    with pytest.raises(ValueError, match="must be a mapping"):
        parse_spec_text("- 1")

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

"""Layout rules a reader relies on: one module owns Optuna's private internals, and the import contracts hold."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPTUNA_INTERNALS_MODULE = ROOT / "service" / "storage.py"
# An import of a private Optuna module, a private attribute of an Optuna object, or Optuna's table names.
PRIVATE_USE = re.compile(r"optuna(\.\w+)*\._\w+|\._(trial_id|study_id|storage|backend)\b|_get_trials|_CachedStorage"
                         r"|_rdb\b|version_info|\b(FROM|JOIN|INTO|UPDATE)\s+(trials|studies|trial_\w+|study_\w+)\b",
                         re.IGNORECASE)


def _package_sources() -> list[Path]:
    """Every module of the installed package, each once (tunefleet/service etc. are links to the folders)."""
    linked = {"service", "workers", "migrations"}
    own = [p for p in (ROOT / "tunefleet").rglob("*.py") if p.relative_to(ROOT / "tunefleet").parts[0] not in linked]
    return sorted(own + [p for name in sorted(linked) for p in (ROOT / name).rglob("*.py")])


def test_only_one_module_uses_optunas_private_internals() -> None:
    sources = _package_sources()
    assert OPTUNA_INTERNALS_MODULE in sources and len(sources) > 40
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for path in sources if path != OPTUNA_INTERNALS_MODULE
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if PRIVATE_USE.search(line.split("#")[0])]
    assert not offenders, "use the helpers of service/storage.py instead:\n" + "\n".join(offenders)


def test_the_import_contracts_hold() -> None:
    """The same check `make test` runs (`lint-imports`): arrows between layers go one way."""
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

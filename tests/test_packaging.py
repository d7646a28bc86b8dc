"""The wheel installs one top-level package, `tunefleet`, and works beside other distributions' generic names.

The wheel is built from a copy of the tracked files (as a clean clone has them, links included). The fresh
virtual environment gets tunefleet and a distribution that ships its own top-level `service` package
installed by pip; tunefleet's dependencies come from this test's environment through a path entry, so the
test needs no download.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def _tracked_copy(dest: Path) -> Path:
    """The tracked files (and new files not ignored) of this checkout, links kept as links."""
    files = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout
    for name in filter(None, files.split("\0")):
        source, target = ROOT / name, dest / name
        if not source.is_symlink() and not source.exists():
            continue  # deleted in the work tree, not yet in the index
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            target.write_bytes(source.read_bytes())
    return dest


def _build_wheel(project: Path, out: Path) -> Path:
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", out,
         project)
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = _tracked_copy(tmp_path_factory.mktemp("src"))
    return _build_wheel(source, tmp_path_factory.mktemp("dist"))


def test_the_wheel_holds_only_the_tunefleet_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"tunefleet", "tunefleet-0.1.0.dist-info"}
    for needed in ("tunefleet/__init__.py", "tunefleet/py.typed", "tunefleet/cli/__init__.py",
                   "tunefleet/service/api/app.py", "tunefleet/service/client.py", "tunefleet/workers/loop.py",
                   "tunefleet/migrations/env.py", "tunefleet/migrations/script.py.mako",
                   "tunefleet/migrations/versions/0001_initial_tables.py"):
        assert needed in names, f"{needed} is missing from the wheel"
    entry_points = zipfile.ZipFile(wheel).read("tunefleet-0.1.0.dist-info/entry_points.txt").decode()
    assert "tunefleet = tunefleet.cli:app" in entry_points


def test_the_sdist_holds_real_files_not_links(tmp_path: Path) -> None:
    source = _tracked_copy(tmp_path / "src")
    code = f"from setuptools import build_meta as b; print(b.build_sdist({str(tmp_path / 'sdist')!r}))"
    _run(sys.executable, "-c", code, cwd=source)
    (sdist,) = (tmp_path / "sdist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
    assert not [name for name, m in members.items() if m.issym()], "an sdist must not depend on links"
    assert members["tunefleet/service/api/app.py"].isfile()
    assert members["tunefleet/migrations/script.py.mako"].isfile()


def _other_distribution(tmp_path: Path) -> Path:
    """A distribution that ships a top-level `service` package, as many do."""
    project = tmp_path / "other"
    (project / "service").mkdir(parents=True)
    (project / "service" / "__init__.py").write_text('OWNER = "other-service"\n')
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "other-service"\nversion = "1.0"\n'
        '[tool.setuptools]\npackages = ["service"]\n')
    return _build_wheel(project, tmp_path / "other-dist")


def test_installs_and_runs_beside_a_distribution_with_a_top_level_service_package(wheel: Path,
                                                                                    tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after the venv's own
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index"]
    _run(*pip, wheel)
    _run(*pip, _other_distribution(tmp_path))  # installed second: it would overwrite a top-level `service`

    user_dir = tmp_path / "project"  # a user's folder with its own service.py and workers/ beside the script
    (user_dir / "workers").mkdir(parents=True)
    (user_dir / "service.py").write_text("raise SystemExit('the user\\'s own service.py was imported')\n")
    (user_dir / "workers" / "__init__.py").write_text("raise SystemExit('the user\\'s own workers/')\n")
    env = {"PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "TUNEFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'tunefleet.db'}", "TUNEFLEET_HOME": str(tmp_path)}

    where = _run(python, "-c", "import tunefleet, service; print(tunefleet.__file__); print(service.OWNER)",
                 cwd=tmp_path, env=env).stdout.split()
    assert where == [str(site / "tunefleet" / "__init__.py"), "other-service"]
    assert "Create, watch and manage studies" in _run(env_dir / "bin" / "tunefleet", "--help", env=env).stdout
    upgraded = _run(python, "-m", "tunefleet", "db", "upgrade", cwd=user_dir, env=env)  # cwd first on sys.path
    assert "database ready" in upgraded.stdout
    workers = _run(python, "-m", "tunefleet", "worker", "--help", cwd=user_dir, env=env)
    assert "--gpus" in workers.stdout

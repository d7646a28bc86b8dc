"""Trial throughput of the tunefleet service against Optuna's RDBStorage used directly, and the
server's memory once it holds many finished trials.

    .venv/bin/python benchmarks/service_throughput.py --workers 1,10,100 --duration 20 \
        --out docs/benchmarks/service_throughput.md

For each N in --workers, on a fresh PostgreSQL database each time (created and dropped here):
- service: a `tunefleet server` subprocess on a loopback port; N worker processes, each doing cycles
  of lease + 5 reports (rungs 20..100 %) + complete over HTTP with zero training time;
- direct: N processes on Optuna's RDBStorage, each doing ask (TPE) + 5 × (report + should_prune) + tell.
Both sides use TPE and Hyperband (min 20 %, factor 3), and the values of `tunefleet.workers.simulated`, so
pruning ends some cycles early on both sides alike. A pruned cycle counts as a trial cycle.

Memory: a fresh database and server; 20 studies created through the API, each filled with 1,000
finished trials written by Optuna directly (fast), then every study read through the API and one
trial leased from each (so the server loads its trials and sampler); the server's RSS before/after.

Needs PostgreSQL with trust auth for user postgres on 127.0.0.1:5432 (change with --pg). PostgreSQL's
default max_connections (100) bounds the direct runs: 100 processes hold 100 connections.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

# Run as a script from anywhere: the repository root holds the `service` and `workers` packages.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tunefleet.service.client import Client  # noqa: E402
from tunefleet.workers.simulated import simulated_quality  # noqa: E402

console = Console()
RUNGS = [20, 40, 60, 80, 100]
SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    "lora_r": {"type": "categorical", "choices": [4, 8, 16, 32]},
    "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
    "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
}
SERVICE_CALLS = ("lease", "report", "complete")
DIRECT_CALLS = ("ask", "report", "tell")


def study_spec(name: str, max_trials: int) -> dict[str, Any]:
    """The benchmark's study: TPE + Hyperband over four parameters, reports at RUNGS."""
    return {
        "name": name,
        "model": "simulated",
        "task": "sequence-classification",
        "data": {"train": "simulated.jsonl"},
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "search_space": SEARCH_SPACE,
        "search": {"sampler": "tpe", "pruner": "hyperband", "min_resource": 0.2, "reduction_factor": 3,
                   "rungs": RUNGS, "seed": 0},
        "budget": {"max_trials": max_trials},
    }


def optuna_distributions() -> dict[str, Any]:
    import optuna.distributions as d

    return {
        "learning_rate": d.FloatDistribution(1e-5, 1e-3, log=True),
        "lora_r": d.CategoricalDistribution([4, 8, 16, 32]),
        "weight_decay": d.FloatDistribution(0.0, 0.1),
        "warmup_ratio": d.FloatDistribution(0.0, 0.2),
    }


def optuna_pruner() -> Any:
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=20, max_resource=100, reduction_factor=3)


# -- infrastructure: a fresh database, a server subprocess --------------------------------------


@contextlib.contextmanager
def fresh_database(pg: str) -> Iterator[str]:
    """Create a uniquely named database under the PostgreSQL server `pg`; yield its URL; drop it."""
    import psycopg2
    from sqlalchemy.engine import make_url

    admin = make_url(pg)
    name = f"tf_bench_{uuid.uuid4().hex[:10]}"

    def execute(sql: str) -> None:
        conn = psycopg2.connect(host=admin.host, port=admin.port or 5432, user=admin.username,
                                password=admin.password, dbname="postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
        finally:
            conn.close()

    execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    pid: int
    token: str | None


@contextlib.contextmanager
def running_server(database_url: str, auth: bool, log: Path, processes: int = 1) -> Iterator[Server]:
    """`tunefleet server` on a free loopback port over `database_url`, until the block ends."""
    port = free_port()
    env = {**os.environ, "TUNEFLEET_DATABASE_URL": database_url, "TUNEFLEET_AUTH": str(auth).lower(),
           "TUNEFLEET_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT)}
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "tunefleet", "server", "--migrate", "--port", str(port),
                                    "--processes", str(processes)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        with Client(url) as client:
            client.wait_ready(timeout=120)
        token = None
        if auth:
            from tunefleet.service.auth import create_token
            from tunefleet.service.config import Settings

            token = create_token(Settings(database_url=database_url), "benchmark", "admin")
        yield Server(url, process.pid, token)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc; psutil elsewhere)."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


# -- the two kinds of worker process ------------------------------------------------------------


def _timed(samples: list[float], call: Any, *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    result = call(*args, **kwargs)
    samples.append(time.perf_counter() - start)
    return result


def service_worker(url: str, token: str | None, index: int, duration: float, ready: Any, start: Event,
                   results: Any) -> None:
    """Lease + reports + complete over HTTP for `duration` seconds after `start`; puts its samples."""
    samples: dict[str, list[float]] = {c: [] for c in SERVICE_CALLS}
    cycles = 0
    try:
        with Client(url, token, retries=3) as client:
            ready.put(index)
            start.wait()
            deadline = time.monotonic() + duration
            while time.monotonic() < deadline:
                lease = _timed(samples["lease"], client.lease, f"bench-{index}", {"type": "cpu"}, "bench")
                if lease is None:  # budget exhausted or sampler busy: should not happen, but count it
                    time.sleep(0.01)
                    continue
                params, trial_id = lease["params"], lease["trial_id"]
                for step in lease["rungs"]:
                    value = simulated_quality(params, step)
                    if _timed(samples["report"], client.report, trial_id, step, value, {"accuracy": value}):
                        break
                else:
                    _timed(samples["complete"], client.complete, trial_id, value=simulated_quality(params, 100))
                cycles += 1
        results.put({"cycles": cycles, "samples": samples})
    except Exception as exc:  # reported in the table, not lost in a child's stderr
        results.put({"cycles": cycles, "samples": samples, "error": f"{type(exc).__name__}: {exc}"})


def direct_worker(database_url: str, study_name: str, setup_lock: Any, index: int, duration: float, ready: Any,
                  start: Event, results: Any) -> None:
    """ask + report/should_prune + tell on RDBStorage for `duration` seconds after `start`."""
    samples: dict[str, list[float]] = {c: [] for c in DIRECT_CALLS}
    cycles = 0
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        # RDBStorage's schema check holds two connections at once; afterwards one is enough. So one
        # pooled connection per process plus one overflow, and setups one at a time: 100 processes
        # then fit PostgreSQL's default max_connections of 100.
        with setup_lock:
            storage = optuna.storages.RDBStorage(
                database_url, engine_kwargs={"pool_size": 1, "max_overflow": 1, "pool_pre_ping": True})
            study = optuna.load_study(study_name=study_name, storage=storage,
                                      sampler=optuna.samplers.TPESampler(seed=index), pruner=optuna_pruner())
        distributions = optuna_distributions()
        ready.put(index)
        start.wait()
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            trial = _timed(samples["ask"], study.ask, distributions)
            for step in RUNGS:
                value = simulated_quality(trial.params, step)
                start_report = time.perf_counter()
                trial.report(value, step)
                prune = trial.should_prune()
                samples["report"].append(time.perf_counter() - start_report)
                if prune:
                    _timed(samples["tell"], study.tell, trial, state=optuna.trial.TrialState.PRUNED)
                    break
            else:
                _timed(samples["tell"], study.tell, trial, simulated_quality(trial.params, 100))
            cycles += 1
        results.put({"cycles": cycles, "samples": samples})
    except Exception as exc:
        results.put({"cycles": cycles, "samples": samples, "error": f"{type(exc).__name__}: {exc}"})


# -- running one configuration ------------------------------------------------------------------


@dataclass
class Result:
    mode: str  # service | direct
    workers: int
    duration: float
    cycles: int = 0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.cycles / self.duration

    def percentile_ms(self, call: str, q: float) -> float | None:
        data = sorted(self.latencies.get(call) or [])
        if not data:
            return None
        if len(data) == 1:
            return data[0] * 1000
        return statistics.quantiles(data, n=100, method="inclusive")[round(q * 100) - 1] * 1000


def _context() -> Any:
    # fork: 100 interpreters that share the parent's imports start in a second, not a minute.
    # The parent holds no threads here (the server is a subprocess), so forking is safe.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def run_processes(mode: str, n: int, duration: float, target: Any, args: tuple[Any, ...]) -> Result:
    """Start `n` processes of `target(*args, index, duration, ready, start, results)`, release them
    together once all are ready, and gather their cycles and latencies."""
    ctx = _context()
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    processes = [ctx.Process(target=target, args=(*args, i, duration, ready, start, results), daemon=True)
                 for i in range(n)]
    for process in processes:
        process.start()
    result = Result(mode, n, duration)
    started = 0
    with contextlib.suppress(Exception):
        for _ in range(n):
            ready.get(timeout=180)
            started += 1
    start.set()
    for _ in range(n):
        try:
            item = results.get(timeout=duration + 120)
        except Exception:
            result.errors.append("a worker sent no result")
            continue
        result.cycles += item["cycles"]
        for call, samples in item["samples"].items():
            result.latencies.setdefault(call, []).extend(samples)
        if "error" in item:
            result.errors.append(item["error"])
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.kill()
    if started < n:
        result.errors.append(f"only {started} of {n} workers got ready")
    return result


def bench_service(pg: str, n: int, duration: float, auth: bool, log: Path, processes: int) -> Result:
    with fresh_database(pg) as database_url, running_server(database_url, auth, log, processes) as server:
        with Client(server.url, server.token) as client:
            client.create_study(study_spec(f"bench-service-{n}", max_trials=1_000_000))
        mode = "service" if processes == 1 else f"service ×{processes}"
        return run_processes(mode, n, duration, service_worker, (server.url, server.token))


def bench_direct(pg: str, n: int, duration: float) -> Result:
    import optuna

    with fresh_database(pg) as database_url:
        storage = optuna.storages.RDBStorage(database_url)
        optuna.create_study(study_name="bench-direct", storage=storage, direction="maximize",
                            sampler=optuna.samplers.TPESampler(seed=0), pruner=optuna_pruner())
        storage.engine.dispose()  # release its connections: 100 workers need all of PostgreSQL's
        lock = _context().Lock()
        return run_processes("direct", n, duration, direct_worker, (database_url, "bench-direct", lock))


# -- memory -------------------------------------------------------------------------------------


def _fill_study(database_url: str, study_name: str, trials: int, seed: int) -> None:
    """Add `trials` finished trials (complete and pruned, with intermediate values) to a study."""
    import random

    import optuna

    rng = random.Random(seed)
    study = optuna.load_study(study_name=study_name, storage=database_url)
    distributions = optuna_distributions()
    batch = []
    for _ in range(trials):
        params = {"learning_rate": 10 ** rng.uniform(-5, -3), "lora_r": rng.choice([4, 8, 16, 32]),
                  "weight_decay": rng.uniform(0, 0.1), "warmup_ratio": rng.uniform(0, 0.2)}
        steps = RUNGS if rng.random() < 0.4 else RUNGS[: rng.randint(1, 4)]
        intermediate = {s: simulated_quality(params, s) for s in steps}
        complete = steps[-1] == 100
        batch.append(optuna.trial.create_trial(
            params=params, distributions=distributions, intermediate_values=intermediate,
            value=intermediate[100] if complete else None,
            state=optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.PRUNED))
    study.add_trials(batch)


def bench_memory(pg: str, studies: int, trials: int, auth: bool, log: Path) -> dict[str, Any]:
    """Server RSS empty, then after it has read and leased from `studies` × `trials` finished trials."""
    with fresh_database(pg) as database_url, running_server(database_url, auth, log) as server, \
            Client(server.url, server.token, timeout=300) as client:
        rss_empty = rss_mb(server.pid)
        names = []
        for i in range(studies):
            # One trial of budget left, so a lease makes the server ask() on each study.
            names.append(client.create_study(study_spec(f"bench-memory-{i}", max_trials=trials + 1))["name"])
        started = time.monotonic()
        with _context().Pool(min(4, studies)) as pool:
            pool.starmap(_fill_study, [(database_url, name, trials, i) for i, name in enumerate(names)])
        fill_seconds = time.monotonic() - started
        started = time.monotonic()
        for study in client.list_studies(limit=500)["items"]:
            client.get_study(study["id"])
            for offset in range(0, trials, 1000):
                client.list_trials(study["id"], limit=1000, offset=offset)
            client.study_report(study["id"])
        leased = sum(client.lease("bench-memory", {"type": "cpu"}, "bench") is not None for _ in range(studies))
        load_seconds = time.monotonic() - started
        return {"studies": studies, "trials per study": trials, "RSS empty (MiB)": rss_empty,
                "RSS loaded (MiB)": rss_mb(server.pid), "fill (s, Optuna direct)": fill_seconds,
                "read + lease all (s)": load_seconds, "leases": leased}


# -- output -------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def throughput_rows(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    header = ["workers", "mode", "trial cycles/s", "lease (ask) p50/p95 ms", "report p50/p95 ms",
              "complete (tell) p50/p95 ms", "service/direct", "errors"]
    rows = []
    by_key = {(r.mode, r.workers): r for r in results}
    for r in results:
        calls = SERVICE_CALLS if r.mode.startswith("service") else DIRECT_CALLS
        direct = by_key.get(("direct", r.workers))
        ratio = f"{r.rate / direct.rate:.2f}" if r.mode.startswith("service") and direct and direct.rate else ""
        rows.append([str(r.workers), r.mode, f"{r.rate:.1f}",
                     *(f"{_ms(r.percentile_ms(c, 0.5))} / {_ms(r.percentile_ms(c, 0.95))}" for c in calls),
                     ratio, "; ".join(sorted(set(r.errors)))[:200] or "0"])
    return header, rows


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in lines)


def write_report(path: Path, command: str, throughput: tuple[list[str], list[list[str]]] | None,
                 memory: dict[str, Any] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = ["# Service throughput vs Optuna RDBStorage direct", "",
             f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} "
             f"({os.cpu_count()} CPUs, Python {platform.python_version()}), PostgreSQL on loopback.", "",
             "```", command, "```", ""]
    if throughput:
        parts += ["A cycle is lease + 5 reports + complete over HTTP (service) or ask + 5 × (report + "
                  "should_prune) + tell on RDBStorage (direct); a pruned trial ends its cycle early on both "
                  "sides. TPE + Hyperband, zero training time.", "", markdown_table(*throughput), ""]
    if memory:
        parts += ["## Server memory", "", markdown_table(list(memory), [[_fmt(v) for v in memory.values()]]), ""]
    path.write_text("\n".join(parts))


def _fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def main(
    workers: Annotated[str, typer.Option(help="Comma-separated numbers of worker processes.")] = "1,10,100",
    duration: Annotated[float, typer.Option(help="Seconds of measurement per run.")] = 20.0,
    out: Annotated[Path, typer.Option(help="Markdown report.")] = Path("docs/benchmarks/service_throughput.md"),
    pg: Annotated[str, typer.Option(help="PostgreSQL server (databases are created and dropped there).")]
    = "postgresql+psycopg2://postgres@127.0.0.1:5432",
    direct: Annotated[bool, typer.Option(help="Also measure Optuna's RDBStorage directly.")] = True,
    memory: Annotated[bool, typer.Option(help="Also measure server memory with many finished trials.")] = True,
    memory_studies: Annotated[int, typer.Option(help="Studies loaded for the memory measurement.")] = 20,
    memory_trials: Annotated[int, typer.Option(help="Finished trials per study.")] = 1000,
    auth: Annotated[bool, typer.Option(help="Run the server with bearer tokens, as in production.")] = True,
    server_processes: Annotated[str, typer.Option(
        help="Comma-separated server process counts to measure (`tunefleet server --processes`).")] = "1",
    server_log: Annotated[Path, typer.Option(help="Where the servers' output goes.")]
    = Path("/tmp/tunefleet-benchmark-server.log"),
) -> None:
    """Service vs direct Optuna trial throughput and latency, and server memory; prints tables."""
    counts = [int(n) for n in workers.split(",") if n.strip()]
    results: list[Result] = []
    for n in counts:
        for processes in [int(p) for p in server_processes.split(",") if p.strip()]:
            console.print(f"[bold]{n} worker(s)[/]: service, {processes} server process(es) ...")
            results.append(bench_service(pg, n, duration, auth, server_log, processes))
        if direct:
            console.print(f"[bold]{n} worker(s)[/]: direct ...")
            results.append(bench_direct(pg, n, duration))
    throughput = throughput_rows(results) if results else None
    if throughput:
        print_table("trial cycles", *throughput)
    memory_result = None
    if memory:
        console.print(f"memory: {memory_studies} studies × {memory_trials} finished trials ...")
        memory_result = bench_memory(pg, memory_studies, memory_trials, auth, server_log)
        print_table("server memory", list(memory_result), [[_fmt(v) for v in memory_result.values()]])
    command = " ".join(["python", "benchmarks/service_throughput.py", *sys.argv[1:]])
    write_report(out, command, throughput, memory_result)
    console.print(f"report written to {out}")


if __name__ == "__main__":
    typer.run(main)

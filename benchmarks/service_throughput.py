"""Trial throughput and lease latency of the tunefleet service against two peers an Optuna user would run
instead, at several study sizes, and the server's memory per finished trial.

    .venv/bin/python benchmarks/service_throughput.py --workers 1,10,100 --finished 0,5000,20000 \
        --server-processes 1,2 --duration 15 --out docs/benchmarks/service_throughput.md

For each study size (finished trials written straight into Optuna's tables before the run) and each N in
--workers, on a fresh PostgreSQL database each time (created and dropped here):
- service: a `tunefleet server` subprocess (`--processes 1` and `2`); N worker processes, each doing
  cycles of lease + 5 reports (rungs 20..100 %) + complete over HTTP with zero training time;
- direct: Optuna's RDBStorage (through Optuna's own cache, as `load_study(storage=url)` does), each worker
  doing ask + 5 × (report + should_prune) + tell. At most --direct-processes processes hold a PostgreSQL
  connection each; more workers run as threads of those processes (the table says how many);
- grpc: Optuna's gRPC storage proxy (`run_grpc_proxy_server` over the same RDBStorage, one process) and N
  worker processes with `GrpcStorageProxy` clients doing the same cycle as direct: what an Optuna user runs
  to serve many workers without database credentials.
Every side uses the same sampler configuration (TPE, multivariate, constant liar, 5 startup trials) and
Hyperband (min 20 %, factor 3), and the values of `tunefleet.workers.simulated`, so pruning ends some
cycles early on all sides alike. A pruned cycle counts as a trial cycle. Only cycles that finish inside the
measurement window count, and only calls that return inside it give latencies. Each side is warmed up
(its processes load the study) before the window opens.

Memory: the RSS of the server process (and of the gRPC proxy) after each one-process run; the growth from
the empty study to the largest, divided by its finished trials, is the memory per finished trial.

Needs PostgreSQL with trust auth for user postgres on 127.0.0.1:5432 (change with --pg). Connections: a
server process opens at most 20, the proxy 10, direct runs --direct-processes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import multiprocessing
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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
N_STARTUP_TRIALS = 5  # the spec's default; the peers get the same
SERVICE_CALLS = ("lease", "report", "complete")
PEER_CALLS = ("ask", "report", "tell")
STUDY = "bench"


def study_spec(name: str, max_trials: int) -> dict[str, Any]:
    """The benchmark's study: TPE (multivariate, constant liar: the spec's defaults) + Hyperband over four
    parameters, reports at RUNGS."""
    return {
        "name": name,
        "model": "simulated",
        "task": "sequence-classification",
        "data": {"train": "simulated.jsonl"},
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "search_space": SEARCH_SPACE,
        "search": {"sampler": "tpe", "pruner": "hyperband", "min_resource": 0.2, "reduction_factor": 3,
                   "rungs": RUNGS, "seed": 0, "multivariate": True, "constant_liar": True,
                   "n_startup_trials": N_STARTUP_TRIALS},
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


def optuna_sampler(seed: int) -> Any:
    """The service's sampler configuration, for the peers."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                      n_startup_trials=N_STARTUP_TRIALS)


def optuna_pruner() -> Any:
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=20, max_resource=100, reduction_factor=3)


# -- infrastructure: a fresh database, a server subprocess, a pre-filled study --------------------


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
    """Resident memory of a process and its children in MiB (Linux /proc; psutil elsewhere)."""
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def prefill(database_url: str, study_name: str, trials: int, seed: int = 0) -> None:
    """Write `trials` finished trials (40 % complete, the rest pruned at a random rung, with intermediate
    values) straight into Optuna's tables, in a few statements: adding them through Optuna takes about a
    minute per thousand."""
    import sqlalchemy as sa
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models

    if not trials:
        return
    rng = random.Random(seed)
    dists = optuna_distributions()
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            study_id = conn.scalar(sa.select(models.StudyModel.study_id)
                                   .where(models.StudyModel.study_name == study_name))
            first = conn.scalar(sa.select(sa.func.count()).select_from(models.TrialModel)
                                .where(models.TrialModel.study_id == study_id)) or 0
            now = dt.datetime.now()
            plans = []
            for _ in range(trials):
                params = {"learning_rate": 10 ** rng.uniform(-5, -3), "lora_r": rng.choice([4, 8, 16, 32]),
                          "weight_decay": rng.uniform(0, 0.1), "warmup_ratio": rng.uniform(0, 0.2)}
                steps = RUNGS if rng.random() < 0.4 else RUNGS[: rng.randint(1, 4)]
                plans.append((params, {s: simulated_quality(params, s) for s in steps}))
            ids = conn.execute(sa.insert(models.TrialModel).returning(models.TrialModel.trial_id,
                                                                      sort_by_parameter_order=True),
                               [{"number": first + i, "study_id": study_id,
                                 "state": "COMPLETE" if 100 in values else "PRUNED",
                                 "datetime_start": now, "datetime_complete": now}
                                for i, (_, values) in enumerate(plans)]).scalars().all()
            conn.execute(sa.insert(models.TrialParamModel), [
                {"trial_id": tid, "param_name": name, "param_value": dists[name].to_internal_repr(value),
                 "distribution_json": distribution_to_json(dists[name])}
                for tid, (params, _) in zip(ids, plans, strict=True) for name, value in params.items()])
            conn.execute(sa.insert(models.TrialIntermediateValueModel), [
                {"trial_id": tid, "step": step, "intermediate_value": value, "intermediate_value_type": "FINITE"}
                for tid, (_, values) in zip(ids, plans, strict=True) for step, value in values.items()])
            conn.execute(sa.insert(models.TrialValueModel), [
                {"trial_id": tid, "objective": 0, "value": values[100], "value_type": "FINITE"}
                for tid, (_, values) in zip(ids, plans, strict=True) if 100 in values])
    finally:
        engine.dispose()


# -- the worker processes -----------------------------------------------------------------------


class Window:
    """The measurement window: what finishes inside it counts."""

    def __init__(self, duration: float):
        self.end = time.monotonic() + duration

    def open(self) -> bool:
        return time.monotonic() < self.end

    def timed(self, samples: list[float], call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = call(*args, **kwargs)
        if self.open():
            samples.append(time.perf_counter() - start)
        return result


def service_worker(url: str, token: str | None, rung_seconds: float, index: int, threads: int, duration: float,
                   ready: Any, start: Event, results: Any) -> None:
    """Lease + reports + complete over HTTP for `duration` seconds after `start`; puts its samples."""
    samples: dict[str, list[float]] = {c: [] for c in SERVICE_CALLS}
    cycles = 0
    try:
        with Client(url, token, retries=3) as client:
            ready.put(index)
            start.wait()
            window = Window(duration)
            while window.open():
                # The fleet's first leases come all at once (a burst no queue absorbs): with training time,
                # only later leases, from workers that drifted apart, give latencies.
                first = rung_seconds > 0 and not cycles and not samples["report"]
                lease = window.timed([] if first else samples["lease"], client.lease, f"bench-{index}",
                                     {"type": "cpu"}, "bench")
                if lease is None:  # budget exhausted: should not happen
                    time.sleep(0.01)
                    continue
                params, trial_id = lease["params"], lease["trial_id"]
                pace = rung_seconds * random.uniform(0.5, 1.5)  # trials differ in speed
                for step in lease["rungs"]:
                    time.sleep(pace)  # training up to this rung
                    value = simulated_quality(params, step)
                    if window.timed(samples["report"], client.report, trial_id, step, value, {"accuracy": value}):
                        break
                else:
                    window.timed(samples["complete"], client.complete, trial_id, value=simulated_quality(params, 100))
                cycles += window.open()
        results.put({"cycles": cycles, "samples": samples})
    except Exception as exc:  # reported in the table, not lost in a child's stderr
        results.put({"cycles": cycles, "samples": samples, "error": f"{type(exc).__name__}: {exc}"})


def _optuna_cycles(study: Any, rung_seconds: float, window_box: list[Window], start: Event,
                   samples: dict[str, list[float]], counts: list[int]) -> None:
    """ask + 5 × (report + should_prune) + tell until the window closes."""
    import optuna

    distributions = optuna_distributions()
    start.wait()
    window = window_box[0]
    first = rung_seconds > 0  # as in service_worker: the fleet's first asks are a burst
    while window.open():
        trial = window.timed([] if first else samples["ask"], study.ask, distributions)
        first = False
        pace = rung_seconds * random.uniform(0.5, 1.5)
        for step in RUNGS:
            time.sleep(pace)
            value = simulated_quality(trial.params, step)
            started = time.perf_counter()
            trial.report(value, step)
            prune = trial.should_prune()
            if window.open():
                samples["report"].append(time.perf_counter() - started)
            if prune:
                window.timed(samples["tell"], study.tell, trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            window.timed(samples["tell"], study.tell, trial, simulated_quality(trial.params, 100))
        counts[0] += window.open()


def peer_worker(storage_spec: tuple[str, Any], setup_lock: Any, rung_seconds: float, index: int, threads: int,
                duration: float, ready: Any, start: Event, results: Any) -> None:
    """Optuna ask/report/tell cycles on `storage_spec` (("rdb", url) or ("grpc", port)) in `threads` threads
    of this process (one storage and its cache shared, as in one Optuna process), after `start`."""
    samples: dict[str, list[float]] = {c: [] for c in PEER_CALLS}
    counts = [0]
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        kind, where = storage_spec
        with setup_lock:  # RDBStorage's schema check holds two connections at once: one process at a time
            if kind == "rdb":
                rdb = optuna.storages.RDBStorage(where, engine_kwargs={"pool_size": 1, "max_overflow": 1,
                                                                       "pool_pre_ping": True})
                storage = optuna.storages.get_storage(rdb)  # Optuna's cache, as load_study(storage=url) has
            else:
                storage = optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=where)
            studies = [optuna.load_study(study_name=STUDY, storage=storage, sampler=optuna_sampler(index * 100 + t),
                                         pruner=optuna_pruner()) for t in range(threads)]
        studies[0].get_trials(deepcopy=False)  # warm the cache before the window opens
        ready.put(index)
        thread_start = threading.Event()
        window_box: list[Window] = []
        workers = [threading.Thread(target=_optuna_cycles,
                                    args=(s, rung_seconds, window_box, thread_start, samples, counts))
                   for s in studies]
        for worker in workers:
            worker.start()
        start.wait()
        window_box.append(Window(duration))
        thread_start.set()
        for worker in workers:
            worker.join()
        results.put({"cycles": counts[0], "samples": samples})
    except Exception as exc:
        results.put({"cycles": counts[0], "samples": samples, "error": f"{type(exc).__name__}: {exc}"})


def grpc_proxy(database_url: str, port: int) -> None:
    """Optuna's gRPC proxy over RDBStorage (with Optuna's cache) on `port`, until killed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rdb = optuna.storages.RDBStorage(database_url, engine_kwargs={"pool_size": 5, "max_overflow": 5,
                                                                  "pool_pre_ping": True})
    optuna.storages.run_grpc_proxy_server(optuna.storages.get_storage(rdb), host="127.0.0.1", port=port)


# -- running one configuration ------------------------------------------------------------------


@dataclass
class Result:
    mode: str  # service | service ×2 | direct | grpc
    finished: int
    workers: int
    duration: float
    layout: str = ""  # processes × threads, when not one process per worker
    cycles: int = 0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    rss_mb: float | None = None

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
    # The parent holds no threads here (servers are subprocesses), so forking is safe.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def run_processes(result: Result, processes: int, threads: int, target: Any, args: tuple[Any, ...]) -> Result:
    """Start `processes` processes of `target(*args, index, threads, duration, ready, start, results)`,
    release them together once all are ready, and gather their cycles and latencies into `result`."""
    ctx = _context()
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    children = [ctx.Process(target=target, args=(*args, i, threads, result.duration, ready, start, results),
                            daemon=True) for i in range(processes)]
    for child in children:
        child.start()
    started = 0
    with contextlib.suppress(Exception):
        for _ in range(processes):
            ready.get(timeout=600)
            started += 1
    start.set()
    for _ in range(processes):
        try:
            item = results.get(timeout=result.duration + 300)
        except Exception:
            result.errors.append("a worker sent no result")
            continue
        result.cycles += item["cycles"]
        for call, samples in item["samples"].items():
            result.latencies.setdefault(call, []).extend(samples)
        if "error" in item:
            result.errors.append(item["error"])
    for child in children:
        child.join(10)
        if child.is_alive():
            child.kill()
    if started < processes:
        result.errors.append(f"only {started} of {processes} worker processes got ready")
    return result


def _warm_service(server: Server, processes: int) -> None:
    """Each server process loads the study and its sampler before the window: a few leases and completes,
    each on a new connection (the kernel spreads new connections over the processes)."""
    for i in range(4 * processes):
        with Client(server.url, server.token) as client:
            lease = client.lease(f"warm-{i}", {"type": "cpu"}, "bench")
            if lease is not None:
                client.complete(lease["trial_id"], value=0.5)


def bench_service(pg: str, finished: int, n: int, duration: float, rung_seconds: float, auth: bool, log: Path,
                  processes: int) -> Result:
    with fresh_database(pg) as database_url, running_server(database_url, auth, log, processes) as server:
        with Client(server.url, server.token) as client:
            client.create_study(study_spec(STUDY, max_trials=1_000_000))
        prefill(database_url, STUDY, finished)
        _warm_service(server, processes)
        mode = "service" if processes == 1 else f"service ×{processes}"
        result = run_processes(Result(mode, finished, n, duration), n, 1, service_worker,
                               (server.url, server.token, rung_seconds))
        result.rss_mb = rss_mb(server.pid)
        return result


def _create_optuna_study(database_url: str, finished: int) -> None:
    import optuna

    rdb = optuna.storages.RDBStorage(database_url)
    optuna.create_study(study_name=STUDY, storage=rdb, direction="maximize")
    rdb.engine.dispose()  # release its connections before the workers open theirs
    prefill(database_url, STUDY, finished)


def _layout(n: int, most_processes: int) -> tuple[int, int]:
    processes = min(n, most_processes)
    return processes, math.ceil(n / processes)


def bench_direct(pg: str, finished: int, n: int, duration: float, rung_seconds: float, most_processes: int) -> Result:
    with fresh_database(pg) as database_url:
        _create_optuna_study(database_url, finished)
        processes, threads = _layout(n, most_processes)
        result = Result("direct", finished, n, duration,
                        layout=f"{processes} processes × {threads} threads" if threads > 1 else "")
        return run_processes(result, processes, threads, peer_worker,
                             (("rdb", database_url), _context().Lock(), rung_seconds))


def bench_grpc(pg: str, finished: int, n: int, duration: float, rung_seconds: float) -> Result:
    with fresh_database(pg) as database_url:
        _create_optuna_study(database_url, finished)
        port = free_port()
        proxy = _context().Process(target=grpc_proxy, args=(database_url, port), daemon=True)
        proxy.start()
        try:
            import optuna

            optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=port).wait_server_ready(timeout=60)
            result = run_processes(Result("grpc", finished, n, duration), n, 1, peer_worker,
                                   (("grpc", port), _context().Lock(), rung_seconds))
            assert proxy.pid is not None
            result.rss_mb = rss_mb(proxy.pid)
            return result
        finally:
            proxy.kill()
            proxy.join(10)


# -- the cost of one ask ------------------------------------------------------------------------


def ask_cost(pg: str, sizes: list[int], asks: int = 30) -> tuple[list[str], list[list[str]]]:
    """Median and p95 ms of one TPE ask (+ its tell) in this process through the server's storage, with the
    server's bounded history (best 100 + recent 200) and over the whole study, at each study size."""
    import optuna

    from tunefleet.service.storage import BoundedHistorySampler, ServerStorage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rows = []
    for size in sizes:
        cells = [f"{size:,}"]
        for bounded in (True, False):
            with fresh_database(pg) as database_url:
                _create_optuna_study(database_url, size)
                rdb = optuna.storages.RDBStorage(database_url)
                sampler = optuna_sampler(0)
                study = optuna.load_study(study_name=STUDY, storage=ServerStorage(rdb), pruner=optuna_pruner(),
                                          sampler=BoundedHistorySampler(sampler, 100, 200) if bounded else sampler)
                study.get_trials(deepcopy=False)  # load the study first, as the server does once
                samples = []
                for _ in range(asks):
                    started = time.perf_counter()
                    trial = study.ask(optuna_distributions())
                    samples.append(time.perf_counter() - started)
                    study.tell(trial, simulated_quality(trial.params, 100))
                rdb.engine.dispose()
            quantiles = statistics.quantiles(samples, n=20, method="inclusive")
            cells.append(f"{statistics.median(samples) * 1000:.0f} / {quantiles[18] * 1000:.0f}")
        rows.append(cells)
    return ["finished trials", "bounded history: ask p50 / p95 ms", "whole study: ask p50 / p95 ms"], rows


# -- output -------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _ratio(r: Result, peer: Result | None) -> str:
    if peer is None or not r.mode.startswith("service"):
        return ""
    if not peer.rate:
        return "∞ (peer: no cycle)" if r.rate else ""
    return f"{r.rate / peer.rate:.2f}"


def throughput_rows(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    header = ["finished trials", "workers", "mode", "cycles/s", "lease (ask) p50 / p95 / p99 ms",
              "report p50 / p95 ms", "complete (tell) p50 / p95 ms", "× direct", "× grpc", "server RSS MiB",
              "errors"]
    peers = {(r.mode, r.finished, r.workers): r for r in results}
    rows = []
    for r in results:
        calls = SERVICE_CALLS if r.mode.startswith("service") else PEER_CALLS
        direct, grpc = (peers.get((peer, r.finished, r.workers)) for peer in ("direct", "grpc"))
        lease = " / ".join(_ms(r.percentile_ms(calls[0], q)) for q in (0.5, 0.95, 0.99))
        rows.append([f"{r.finished:,}", str(r.workers) + (f" ({r.layout})" if r.layout else ""), r.mode,
                     f"{r.rate:.1f}", lease,
                     *(f"{_ms(r.percentile_ms(c, 0.5))} / {_ms(r.percentile_ms(c, 0.95))}" for c in calls[1:]),
                     _ratio(r, direct), _ratio(r, grpc), "" if r.rss_mb is None else f"{r.rss_mb:.0f}",
                     "; ".join(sorted(set(r.errors)))[:200] or "0"])
    return header, rows


def memory_rows(results: list[Result]) -> tuple[list[str], list[list[str]]] | None:
    """Memory per finished trial: RSS growth from the smallest to the largest study, per finished trial,
    for the one-process server and the gRPC proxy (each at its largest worker count)."""
    rows = []
    for mode in ("service", "grpc"):
        runs = [r for r in results if r.mode == mode and r.rss_mb is not None]
        if len({r.finished for r in runs}) < 2:
            continue
        workers = max(r.workers for r in runs)
        by_size = sorted((r for r in runs if r.workers == workers), key=lambda r: r.finished)
        small, large = by_size[0], by_size[-1]
        assert small.rss_mb is not None and large.rss_mb is not None
        per_trial = (large.rss_mb - small.rss_mb) * 1024 / (large.finished - small.finished)
        rows.append([mode, str(workers), f"{small.rss_mb:.0f} at {small.finished:,}",
                     f"{large.rss_mb:.0f} at {large.finished:,}", f"{per_trial:.1f}"])
    header = ["server", "workers", "RSS MiB (smallest study)", "RSS MiB (largest study)", "KiB per finished trial"]
    return (header, rows) if rows else None


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


def write_report(path: Path, command: str, rung_seconds: float, throughput: tuple[list[str], list[list[str]]],
                 memory: tuple[list[str], list[list[str]]] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = ["# Service throughput vs Optuna direct and Optuna's gRPC proxy", "",
             f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} "
             f"({os.cpu_count()} CPUs, Python {platform.python_version()}), PostgreSQL on loopback.", "",
             "```", command, "```", "",
             "A cycle is lease + 5 reports + complete over HTTP (service) or ask + 5 × (report + should_prune) + "
             "tell through RDBStorage (direct) or the gRPC proxy (grpc); a pruned trial ends its cycle early. "
             f"TPE (multivariate, constant liar) + Hyperband on every side, {rung_seconds} s of training per rung; "
             "only cycles "
             "finished inside the window count. `× direct` and `× grpc`: the service's cycles/s over the "
             "peer's at the same size and workers, in this run.", "", markdown_table(*throughput), ""]
    if memory:
        parts += ["## Server memory per finished trial", "", markdown_table(*memory), ""]
    path.write_text("\n".join(parts))


def main(
    workers: Annotated[str, typer.Option(help="Comma-separated numbers of workers.")] = "1,10,100",
    finished: Annotated[str, typer.Option(help="Comma-separated numbers of finished trials in the study.")]
    = "0,5000,20000",
    duration: Annotated[float, typer.Option(help="Seconds of measurement per run.")] = 15.0,
    rung_seconds: Annotated[float, typer.Option(
        help="Mean simulated training time before each rung's report, ±50 % per trial (0: the server is the "
        "only cost). With training time, each worker's first lease (the fleet's start burst) gives no latency."
    )] = 0.0,
    out: Annotated[Path, typer.Option(help="Markdown report.")] = Path("docs/benchmarks/service_throughput.md"),
    pg: Annotated[str, typer.Option(help="PostgreSQL server (databases are created and dropped there).")]
    = "postgresql+psycopg2://postgres@127.0.0.1:5432",
    modes: Annotated[str, typer.Option(help="Comma-separated sides to measure: service, direct, grpc.")]
    = "service,direct,grpc",
    direct_processes: Annotated[int, typer.Option(
        help="Most direct processes (each holds one PostgreSQL connection); more workers run as threads.")] = 25,
    auth: Annotated[bool, typer.Option(help="Run the server with bearer tokens, as in production.")] = True,
    server_processes: Annotated[str, typer.Option(
        help="Comma-separated server process counts to measure (`tunefleet server --processes`).")] = "1",
    server_log: Annotated[Path, typer.Option(help="Where the servers' output goes.")]
    = Path("/tmp/tunefleet-benchmark-server.log"),
    asks: Annotated[bool, typer.Option(
        help="Only measure one ask's cost at each --finished size, bounded history vs whole study.")] = False,
) -> None:
    """Service vs Optuna direct vs Optuna's gRPC proxy: trial throughput, lease latency, server memory."""
    sizes = [int(f) for f in finished.split(",") if f.strip()]
    if asks:
        print_table("one TPE ask", *ask_cost(pg, sizes))
        return
    sides = {m.strip() for m in modes.split(",") if m.strip()}
    results: list[Result] = []
    for size in sizes:
        for n in [int(w) for w in workers.split(",") if w.strip()]:
            if "service" in sides:
                for processes in [int(p) for p in server_processes.split(",") if p.strip()]:
                    console.print(f"[bold]{size:,} finished, {n} worker(s)[/]: service, {processes} process(es) ...")
                    results.append(bench_service(pg, size, n, duration, rung_seconds, auth, server_log, processes))
            if "direct" in sides:
                console.print(f"[bold]{size:,} finished, {n} worker(s)[/]: direct ...")
                results.append(bench_direct(pg, size, n, duration, rung_seconds, direct_processes))
            if "grpc" in sides:
                console.print(f"[bold]{size:,} finished, {n} worker(s)[/]: grpc ...")
                results.append(bench_grpc(pg, size, n, duration, rung_seconds))
            print_table("trial cycles", *throughput_rows([r for r in results if (r.finished, r.workers) == (size, n)]))
    throughput = throughput_rows(results)
    print_table("trial cycles", *throughput)
    memory = memory_rows(results)
    if memory:
        print_table("server memory", *memory)
    command = " ".join(["python", "benchmarks/service_throughput.py", *sys.argv[1:]])
    write_report(out, command, rung_seconds, throughput, memory)
    console.print(f"report written to {out}")


if __name__ == "__main__":
    typer.run(main)

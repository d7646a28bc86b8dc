"""Search strategies compared on recorded learning curves, at equal total training steps.

Every strategy searches the recording's space; each configuration it proposes is answered by the
nearest recorded configuration (`tunefleet.workers.replay`), so all strategies see the same real curves and
no model is trained. Our strategies run through the real server and protocol: one study per
(strategy, seed) on a uvicorn server in this process, one `WorkerLoop` with a `ReplayTrainer`, the
trials read back through the client. Peers from PyPI (SMAC3's multi-fidelity facade, DEHB) run
through a small ask/tell adapter on the same table with the same step accounting, and so does Egele et al.'s
baseline (random configurations screened at the lowest fidelity, the top 3 trained to 100%: `_screen_run`).
`spend_rows` says where each strategy's compute went.

Compute is optimizer steps: a budget of B full-trial equivalents is B × the mean steps of a recorded
configuration. A trial stopped at p% of its budget costs ceil(p% × its steps). A resumed trial is charged
only its extra steps, for every strategy alike: our pausing strategies (ASHA) resume from the checkpoint
through the server; peers re-evaluating a configuration at a higher fidelity are charged as if they had
(neither SMAC nor DEHB does so by itself, so this favours them). The timeline of a server run is the
replay trainer's own ledger, one entry per stretch of training in the order it ran, so a trial paused at
20% and finished later counts when it really ended. Only full-budget results count as "found": a
strategy's incumbent is its best final validation score so far, and we report that incumbent's test score
too (test never drives the search), and how many of the recording's top-5 configurations it trained to
100% (a late bloomer pruned early is lost).

    .venv/bin/python benchmarks/strategies.py --table benchmarks/data/curves-bbc-minilm-v1.jsonl \
        --seeds 20 --budget-trials 20 --out docs/search_quality_results.md --plot docs/img/anytime_regret.png

`--quick` runs 2 seeds of 3 strategies on a small budget (the tests use it on the synthetic table).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from tunefleet.workers.replay import ReplayTable, ReplayTrainer  # noqa: E402

__all__ = [
    "FRACTIONS",
    "STRATEGIES",
    "Evaluation",
    "Run",
    "Strategy",
    "anytime",
    "load_runs",
    "run_benchmark",
    "save_runs",
    "summarise",
]

log = logging.getLogger("tunefleet.bench")

DEFAULT_TABLE = ROOT / "benchmarks" / "data" / "curves-bbc-minilm-v1.jsonl"
FRACTIONS = (0.25, 0.5, 1.0)  # of the compute budget, for the table
REFERENCE = "tpe-full"  # the ratio column: compute to reach this strategy's final best
REGRET_FLOOR = 1e-3  # a 300-example validation set cannot resolve less than 1/300 anyway


# -- what a run produces ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """One stretch of training in the order it ran: a trial up to where it stopped or paused, a resumed
    trial's extra rungs, a peer's evaluation at one fidelity.

    `steps_end` is the cumulative compute when it ended; `final` and `test` are set only for a
    configuration trained to the full budget (the only results that count as found).
    """

    steps_end: float
    final: float | None = None
    test: float | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    strategy: str
    seed: int
    budget_steps: float
    evaluations: list[Evaluation]
    seconds: float = 0.0


@dataclass(frozen=True)
class Strategy:
    """A named way to search: `run(table, seed, budget_steps, context)` returns its evaluations."""

    name: str
    label: str
    run: Callable[[ReplayTable, int, float, BenchContext], list[Evaluation]]
    peer: bool = False
    available: Callable[[], str | None] = lambda: None  # why it cannot run here, or None


@dataclass
class BenchContext:
    """What every run shares: a client of the server (None for peer-only runs), a scratch folder, and the
    recording of another task that warm-started strategies learn from first (``--warm-from``)."""

    client: Any
    workdir: Path
    warm_from: ReplayTable | None = None


# -- the server side -------------------------------------------------------------------------------


@contextlib.contextmanager
def local_server(database_url: str | None = None) -> Iterator[str]:
    """A real uvicorn server on a loopback port in a thread of this process; yields its URL.

    `database_url` None means a fresh SQLite file in a temporary folder. Raises RuntimeError when
    the server does not start within 30 s.
    """
    import socket

    import uvicorn

    from tunefleet.service.api.app import create_app
    from tunefleet.service.config import Settings
    from tunefleet.service.db import upgrade_database

    with tempfile.TemporaryDirectory(prefix="tunefleet-bench-") as home:
        url = database_url or f"sqlite:///{Path(home) / 'bench.db'}"
        # Long leases: a replayed trial takes milliseconds, the reaper must never fire.
        settings = Settings(database_url=url, home=Path(home), auth=False, lease_seconds=600.0,
                            reaper_interval_seconds=60.0, log_level="warning")
        upgrade_database(settings)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                               log_level="warning", timeout_graceful_shutdown=5))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the benchmark's server did not start")
            time.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=15)


def study_spec_for(table: ReplayTable, name: str, sampler: str, pruner: str, seed: int,
                   **search_options: Any) -> dict[str, Any]:
    """The recording's spec as a study: `sampler` × `pruner`, seeded, no baseline, no trial limit.

    Rungs and the first rung follow the spec's own search section (our default: 20%, factor 3) unless
    `search_options` (more keys of the spec's search section, e.g. ``rungs``) say otherwise.
    """
    spec = copy.deepcopy(table.spec)
    spec["name"] = name
    spec.pop("baseline", None)  # every strategy starts from nothing: no free known-good trial
    search = dict(spec.get("search") or {})
    search.update(sampler=sampler, pruner=pruner, seed=seed, **search_options)
    spec["search"] = search
    spec["budget"] = {"max_trials": 100_000}  # the step budget, not a trial count, ends a run
    return spec


def _server_run(sampler: str, pruner: str, *, warm_start: bool = False,
                **search_options: Any) -> Callable[[ReplayTable, int, float, BenchContext], list[Evaluation]]:
    """A strategy of our own server: `sampler` × `pruner` (more `search_options` of the spec's search section).

    With `warm_start`, the same strategy first runs a study of the same seed on `ctx.warm_from` (another task's
    recording, its own budget of the same size in full trials), and the study on `table` names it in
    ``warm_start: {study, top_k: 3}``: its best 3 configurations run first, and TPE reads its finals from the
    first proposal. Only the second study's steps are charged: the first stands for an earlier study the user
    already ran.
    """
    def run(table: ReplayTable, seed: int, budget_steps: float, ctx: BenchContext) -> list[Evaluation]:
        warm: dict[str, Any] | None = None
        if warm_start:
            if ctx.warm_from is None:
                raise ValueError("a warm-started strategy needs --warm-from TABLE (another task's recording)")
            other = ctx.warm_from
            source = _replay_study(other, study_spec_for(other, f"warm-source-s{seed}-{uuid.uuid4().hex[:6]}",
                                                         sampler, pruner, seed, **search_options),
                                   budget_steps / table.mean_total_steps() * other.mean_total_steps(), ctx)[1]
            warm = {"study": source["name"], "top_k": WARM_START_TOP_K}
        spec = study_spec_for(table, f"bench-{sampler}-{pruner}-s{seed}-{uuid.uuid4().hex[:6]}", sampler, pruner,
                              seed, **search_options)
        if warm:
            spec["warm_start"] = warm
        return _replay_study(table, spec, budget_steps, ctx)[0]

    return run


WARM_START_TOP_K = 3  # as many as the screening baseline keeps: a handful of known-good starting points


def _replay_study(table: ReplayTable, spec: dict[str, Any], budget_steps: float,
                  ctx: BenchContext) -> tuple[list[Evaluation], dict[str, Any]]:
    """Create `spec` on the server, serve it with one replay worker until `budget_steps` are spent, stop it;
    returns its evaluations and the study as created."""
    from tunefleet.workers.loop import WorkerLoop

    client = ctx.client
    study = client.create_study(spec)
    loop: WorkerLoop | None = None

    def stop() -> None:
        assert loop is not None
        loop.request_shutdown()

    trainer = ReplayTrainer(table, budget_steps=budget_steps, on_budget_spent=stop)
    loop = WorkerLoop(client, trainer, worker_id=f"replay-{spec['name']}", device="cpu", once=True, idle_sleep=0.05,
                      workdir=ctx.workdir / spec["name"])
    loop.run()
    with contextlib.suppress(Exception):  # already completed is fine: nothing must lease from it
        client.stop_study(study["id"])
    return evaluations_from_ledger(trainer.trials, _all_trials(client, study["id"]), table), study


def _all_trials(client: Any, study_id: int) -> list[dict[str, Any]]:
    trials: list[dict[str, Any]] = []
    while True:
        page = client.list_trials(study_id, limit=1000, offset=len(trials))
        trials.extend(page["items"])
        if len(trials) >= page["total"] or not page["items"]:
            return trials


def evaluations_from_ledger(ledger: Sequence[Mapping[str, Any]], trials: Sequence[Mapping[str, Any]],
                            table: ReplayTable) -> list[Evaluation]:
    """The replay trainer's ledger as evaluations: one per stretch of training, in the order they ran.

    With pausing, a trial's steps are spread over time (paused at 20%, resumed later), so its result counts
    only where its last stretch ended, never at its trial number's place. Each stretch is charged the steps
    it ran (a resumed trial only its extra steps). Final and test scores come from the trial as the server
    holds it; raises RuntimeError when the server does not hold a completion the ledger ran.
    """
    by_id = {t["id"]: t for t in trials}
    out, total = [], 0.0
    for entry in ledger:
        done = entry["state"] == "COMPLETE"
        if entry["steps"] == 0 and not done:
            continue
        trial = by_id.get(entry["trial_id"])
        if trial is None or (done and trial["state"] != "COMPLETE"):
            raise RuntimeError(f"trial {entry['trial_id']} ran to the end in replay but the server holds "
                               f"{trial['state'] if trial else 'nothing'}")
        total += entry["steps"]
        out.append(Evaluation(total, float(trial["value"]) if done else None,
                              _test_value(table, trial["test_metrics"]) if done else None, trial["params"]))
    return out


def _test_value(table: ReplayTable, test_metrics: Mapping[str, Any]) -> float | None:
    value = test_metrics.get(table.metric)
    return None if value is None else float(value)


# -- peers from PyPI ---------------------------------------------------------------------------------


class _PeerLedger:
    """Step accounting for ask/tell peers: charges each evaluation the steps beyond what the same
    proposed configuration already had (resume from a checkpoint), and records full-budget results.

    The credit is keyed by the configuration the peer proposed, not by its recorded neighbour: a new
    configuration that happens to map to an already-trained recording would be trained from scratch.

    A proposal that trains nothing new (a configuration already trained that far) costs nothing and adds
    no evaluation. A peer that makes `MAX_FREE_PROPOSALS` of them in a row has nothing new to try (DEHB
    on a small space re-proposes forever): its run ends there, and its incumbent stands.
    """

    MAX_FREE_PROPOSALS = 200

    def __init__(self, table: ReplayTable, budget_steps: float):
        self.table, self.budget_steps = table, budget_steps
        self.used = 0.0
        self.evaluations: list[Evaluation] = []
        self._reached: dict[str, int] = {}  # proposed configuration -> steps already trained
        self._free_in_a_row = 0

    @property
    def done(self) -> bool:
        """The budget is spent, or the peer keeps proposing what it already trained."""
        return self.used >= self.budget_steps or self._free_in_a_row >= self.MAX_FREE_PROPOSALS

    def evaluate(self, params: Mapping[str, Any], pct: float) -> float:
        """The objective at `pct` percent for `params`' nearest recording, charged; returns a cost to minimise."""
        record, _ = self.table.nearest(params)
        key = json.dumps(dict(params), sort_keys=True, default=str)
        steps = record.steps_at(pct)
        extra = max(0, steps - self._reached.get(key, 0))
        self._reached[key] = max(steps, self._reached.get(key, 0))
        self._free_in_a_row = 0 if extra else self._free_in_a_row + 1
        if extra:
            self.used += extra
            full = pct >= 100
            self.evaluations.append(Evaluation(self.used, self.table.final(record) if full else None,
                                               _test_value(self.table, record.test_metrics) if full else None,
                                               dict(params)))
        value = record.value_at(pct)
        return -value if self.table.direction == "maximize" else value


def _configspace(table: ReplayTable, seed: int) -> Any:
    from ConfigSpace import Categorical, ConfigurationSpace, Float, Integer

    cs = ConfigurationSpace(seed=seed)
    for name, p in table.space.items():
        if p["type"] == "categorical":
            cs.add(Categorical(name, list(p["choices"])))
        elif p["type"] == "int":
            cs.add(Integer(name, (int(p["low"]), int(p["high"])), log=bool(p.get("log"))))
        else:
            cs.add(Float(name, (float(p["low"]), float(p["high"])), log=bool(p.get("log"))))
    return cs


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    # ConfigSpace hands back numpy scalars; the table compares plain Python values.
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in dict(config).items()}


def _min_resource_pct(table: ReplayTable) -> float:
    return 100.0 * float((table.spec.get("search") or {}).get("min_resource", 0.2))


def _missing(module: str, install: str) -> Callable[[], str | None]:
    def check() -> str | None:
        import importlib.util

        return None if importlib.util.find_spec(module) else f"{module} is not installed ({install})"

    return check


def _smac_run(table: ReplayTable, seed: int, budget_steps: float, ctx: BenchContext) -> list[Evaluation]:
    from smac import MultiFidelityFacade, Scenario
    from smac.main.exceptions import ConfigurationSpaceExhaustedException
    from smac.runhistory.dataclasses import TrialValue

    ledger = _PeerLedger(table, budget_steps)
    scenario = Scenario(_configspace(table, seed), deterministic=True, n_trials=100_000,
                        min_budget=_min_resource_pct(table), max_budget=100.0, seed=seed,
                        output_directory=ctx.workdir / f"smac-{seed}-{uuid.uuid4().hex[:6]}")
    intensifier = MultiFidelityFacade.get_intensifier(scenario, eta=3)
    smac = MultiFidelityFacade(scenario, lambda config, seed=0, budget=100.0: 0.0, intensifier=intensifier,
                               overwrite=True, logging_level=40)
    while not ledger.done:
        try:
            info = smac.ask()
        except (ConfigurationSpaceExhaustedException, StopIteration):
            break  # SMAC has no new configuration to try (a small space): its incumbent stands
        assert info.budget is not None  # the multi-fidelity facade always gives one
        cost = ledger.evaluate(_plain(info.config), float(info.budget))
        smac.tell(info, TrialValue(cost=cost), save=False)
    return ledger.evaluations


def _dehb_run(table: ReplayTable, seed: int, budget_steps: float, ctx: BenchContext) -> list[Evaluation]:
    from dehb import DEHB

    ledger = _PeerLedger(table, budget_steps)
    cs = _configspace(table, seed)
    dehb = DEHB(cs=cs, f=None, dimensions=len(list(cs.values())), min_fidelity=_min_resource_pct(table),
                max_fidelity=100.0, eta=3, n_workers=1, seed=seed, save_freq="end",
                output_path=ctx.workdir / f"dehb-{seed}-{uuid.uuid4().hex[:6]}", log_level="WARNING")
    while not ledger.done:
        job = dehb.ask()  # with a ConfigSpace, job["config"] is already a Configuration
        cost = ledger.evaluate(_plain(job["config"]), float(job["fidelity"]))
        dehb.tell(job, {"fitness": cost, "cost": 0.0})
    return ledger.evaluations


SCREEN_TOP_K = 3  # Egele et al. (arXiv 2307.15422) keep the top 3 of the lowest-fidelity screening


def _screen_run(fidelity: Callable[[ReplayTable], float]) -> Callable[[ReplayTable, int, float, BenchContext],
                                                                       list[Evaluation]]:
    """Egele et al.'s baseline (arXiv 2307.15422): random configurations trained to the lowest fidelity, then
    the top `SCREEN_TOP_K` of them trained on to 100%.

    The paper screens a fixed N = 200 configurations at 1 epoch of 100 and finishes the top 3 (500 epochs in
    all); here the budget is fixed instead, so N is as many configurations as it allows once the full
    training of the top K is set aside: a configuration is screened only while the worst case (it enters the
    top K, or it does not) still leaves the steps to finish the top K. The finishing stretches are charged only
    their extra steps (resumed from the screening's checkpoint), like every other strategy's.
    """
    def run(table: ReplayTable, seed: int, budget_steps: float, ctx: BenchContext) -> list[Evaluation]:
        pct = fidelity(table)
        ledger = _PeerLedger(table, budget_steps)
        cs = _configspace(table, seed)
        screened: list[tuple[float, dict[str, Any], int]] = []  # (cost at pct, params, steps left to 100%)
        while True:
            params = _plain(cs.sample_configuration())
            record, _ = table.nearest(params)
            left = record.total_steps - record.steps_at(pct)
            top = [s[2] for s in screened[:SCREEN_TOP_K]]  # it displaces the K-th if it enters the top K
            reserve = max(sum(top), sum(top[: SCREEN_TOP_K - 1]) + left)
            if ledger.used + record.steps_at(pct) + reserve > budget_steps:
                break
            screened.append((ledger.evaluate(params, pct), params, left))
            screened.sort(key=lambda s: s[0])  # best (lowest cost) first; stable: earliest of equals
        for _, params, _ in screened[:SCREEN_TOP_K]:
            ledger.evaluate(params, 100.0)
        return ledger.evaluations

    return run


def _clairvoyant_run(table: ReplayTable, seed: int, budget_steps: float, ctx: BenchContext) -> list[Evaluation]:
    """A bound, not a strategy: random proposals under a scheduler that knows every configuration's final.

    Each random configuration is screened at the first rung (its cost is paid: the screen is what shows it),
    and trained on to 100% exactly when its recorded final beats the best final trained so far; nothing else
    is ever trained past the screen. No real scheduler can do better with random proposals, since it must
    pay a screen to see a configuration and the full budget to use it: what is left between this row and
    a strategy is the scheduler's share, what is left between this row and a target is the proposals' share.
    """
    pct = _min_resource_pct(table)
    ledger = _PeerLedger(table, budget_steps)
    cs = _configspace(table, seed)
    sign = 1.0 if table.direction == "maximize" else -1.0
    best = -math.inf
    while not ledger.done:
        params = _plain(cs.sample_configuration())
        ledger.evaluate(params, pct)
        final = sign * table.final(table.nearest(params)[0])
        if final > best and not ledger.done:
            ledger.evaluate(params, 100.0)
            best = final
    return ledger.evaluations


def _lowest_recorded_pct(table: ReplayTable) -> float:
    """The lowest fidelity the recording holds (10% for the demo task's): the paper's "one epoch"."""
    return float(min(min(r.curve) for r in table.complete))


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("random-full", "Random, full budget", _server_run("random", "none")),
        Strategy("tpe-full", "TPE, full budget", _server_run("tpe", "none")),
        Strategy("tpe-hyperband", "TPE + Hyperband (the old default)", _server_run("tpe", "hyperband")),
        Strategy("random-hyperband", "Random + Hyperband", _server_run("random", "hyperband")),
        Strategy("gp-hyperband", "GP + Hyperband", _server_run("gp", "hyperband")),
        Strategy("tpe-asha", "TPE + ASHA (pause/resume)", _server_run("tpe", "asha")),
        Strategy("random-asha", "Random + ASHA (pause/resume)", _server_run("random", "asha")),
        Strategy("mf-tpe-asha", "MF-TPE (BOHB-style) + ASHA", _server_run("mf-tpe", "asha")),
        Strategy("mf-tpe-hyperband", "MF-TPE (BOHB-style) + Hyperband", _server_run("mf-tpe", "hyperband")),
        Strategy("tpe-freeze-thaw", "TPE + freeze-thaw (the default)", _server_run("tpe", "freeze-thaw")),
        Strategy("random-freeze-thaw", "Random + freeze-thaw (cost-aware)", _server_run("random", "freeze-thaw")),
        Strategy("qmc-freeze-thaw", "Sobol (QMC) + freeze-thaw", _server_run("qmc", "freeze-thaw")),
        Strategy("mf-tpe-freeze-thaw", "MF-TPE + freeze-thaw (cost-aware)", _server_run("mf-tpe", "freeze-thaw")),
        Strategy("mf-gp-freeze-thaw", "MF-GP + freeze-thaw (cost-aware)", _server_run("mf-gp", "freeze-thaw")),
        Strategy("mf-gp-asha", "MF-GP + ASHA", _server_run("mf-gp", "asha")),
        Strategy("tpe-freeze-thaw-warm", "TPE + freeze-thaw, warm-started from the other task's study",
                 _server_run("tpe", "freeze-thaw", warm_start=True)),
        Strategy("mf-tpe-p-freeze-thaw", "MF-TPE on predicted finals + freeze-thaw",
                 _server_run("mf-tpe", "freeze-thaw", sampler_options={"view": "predicted"})),
        Strategy("mf-gp-p-freeze-thaw", "MF-GP on predicted finals + freeze-thaw",
                 _server_run("mf-gp", "freeze-thaw", sampler_options={"view": "predicted"})),
        # A smaller first rung (10%, the recording's lowest): tried, not kept (docs/search_quality.md).
        Strategy("tpe-freeze-thaw-r10", "TPE + freeze-thaw, rungs 10/20/60/100",
                 _server_run("tpe", "freeze-thaw", rungs=[10, 20, 60, 100])),
        Strategy("random-asha-r10", "Random + ASHA, rungs 10/30/90/100",
                 _server_run("random", "asha", min_resource=0.1)),
        Strategy("smac-mf", "SMAC3 MultiFidelityFacade (peer)", _smac_run, peer=True,
                 available=_missing("smac", "pip install smac")),
        Strategy("screen-top3", "Lowest rung (20%) for all, top 3 to 100% (Egele et al.)",
                 _screen_run(_min_resource_pct), peer=True),
        Strategy("screen10-top3", "Lowest recorded (10%) for all, top 3 to 100% (Egele et al.)",
                 _screen_run(_lowest_recorded_pct), peer=True),
        Strategy("clairvoyant-random", "Bound: random proposals, clairvoyant scheduler", _clairvoyant_run, peer=True),
        Strategy("dehb", "DEHB (peer)", _dehb_run, peer=True,
                 available=_missing("dehb", "DEHB 0.1.2 pins numpy<2: pip install --no-deps --target DIR "
                                    "dehb loguru, then --peer-path DIR")),
    )
}
QUICK = ("random-full", "tpe-full", "tpe-hyperband")


def run_benchmark(table: ReplayTable, strategies: Sequence[str], seeds: Sequence[int], budget_trials: float,
                  *, database_url: str | None = None, progress: Callable[[str], None] = print,
                  warm_from: ReplayTable | None = None) -> list[Run]:
    """Run every strategy for every seed on `table`; returns the runs (skipped strategies are absent).

    Raises KeyError for an unknown strategy name. A strategy whose package is missing is skipped
    with a message through `progress`.
    """
    budget_steps = budget_trials * table.mean_total_steps()
    chosen = [STRATEGIES[name] for name in strategies]
    runs: list[Run] = []
    needs_server = any(not s.peer for s in chosen if s.available() is None)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tunefleet-bench-")))
        client = None
        if needs_server:
            from tunefleet.service.client import Client

            url = stack.enter_context(local_server(database_url))
            client = stack.enter_context(Client(url))
        ctx = BenchContext(client, workdir, warm_from)
        for strategy in chosen:
            why = strategy.available()
            if why:
                progress(f"{strategy.name}: skipped: {why}")
                continue
            started = time.perf_counter()
            for seed in seeds:
                t0 = time.perf_counter()
                evaluations = strategy.run(table, seed, budget_steps, ctx)
                runs.append(Run(strategy.name, seed, budget_steps, evaluations, time.perf_counter() - t0))
            progress(f"{strategy.name}: {len(seeds)} seed(s) in {time.perf_counter() - started:.1f} s")
    return runs


def save_runs(runs: Sequence[Run], path: Path) -> None:
    """Write runs as JSON (strategy, seed, budget, evaluations), for `load_runs` and `--load`."""
    data = [{"strategy": r.strategy, "seed": r.seed, "budget_steps": r.budget_steps, "seconds": r.seconds,
             "evaluations": [[e.steps_end, e.final, e.test, dict(e.params)] for e in r.evaluations]} for r in runs]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def load_runs(path: Path) -> list[Run]:
    """Runs written by `save_runs`; raises FileNotFoundError, json.JSONDecodeError, KeyError."""
    return [Run(d["strategy"], d["seed"], d["budget_steps"],
                [Evaluation(e[0], e[1], e[2], e[3]) for e in d["evaluations"]], d.get("seconds", 0.0))
            for d in json.loads(path.read_text(encoding="utf-8"))]


# -- analysis --------------------------------------------------------------------------------------------


def anytime(run: Run, fractions: Sequence[float], direction: str = "maximize") -> tuple[np.ndarray, np.ndarray]:
    """The incumbent's final validation and test score at each fraction of the budget (NaN before any).

    An evaluation counts at fraction f when it ended within f × budget: the one that crosses the
    budget is not counted, so no strategy gets more than its share.
    """
    sign = 1.0 if direction == "maximize" else -1.0
    best_val = np.full(len(fractions), np.nan)
    best_test = np.full(len(fractions), np.nan)
    for i, fraction in enumerate(fractions):
        limit = fraction * run.budget_steps + 1e-9
        done = [(e.final, e) for e in run.evaluations if e.final is not None and e.steps_end <= limit]
        if done:
            final, best = max(done, key=lambda pair: sign * pair[0])  # first of equals: the earliest found
            best_val[i], best_test[i] = final, np.nan if best.test is None else best.test
    return best_val, best_test


def steps_to_reach(run: Run, target: float, direction: str = "maximize") -> float:
    """Compute (steps) until a full-budget result at least as good as `target`; inf if never."""
    for e in run.evaluations:
        if e.final is not None and (e.final >= target if direction == "maximize" else e.final <= target):
            return e.steps_end
    return math.inf


def _mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over seeds (NaN-aware; 0 width for one value)."""
    from scipy import stats

    v = values[np.isfinite(values)]
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def summarise(runs: Sequence[Run], table: ReplayTable, fractions: Sequence[float] = FRACTIONS) -> list[dict[str, Any]]:
    """One row per strategy: incumbent validation/test and regret (mean, CI) at each fraction, the compute
    ratio, and how many of the table's top configurations (`top_configurations`) it trained to the end.

    The ratio is the median compute a strategy needed to match the reference strategy's (tpe-full)
    mean final best, divided by the reference's own median; `reached` is the share of seeds that
    matched it within the budget. Without the reference in `runs` these columns are NaN.
    """
    by_strategy: dict[str, list[Run]] = {}
    for run in runs:
        by_strategy.setdefault(run.strategy, []).append(run)
    target = math.nan
    if REFERENCE in by_strategy:
        finals = np.array([anytime(r, [1.0], table.direction)[0][0] for r in by_strategy[REFERENCE]])
        target = float(np.nanmean(finals))
    reference_median = math.nan
    top = top_configurations(table)
    nearest = _NearestCache(table)
    sign = 1.0 if table.direction == "maximize" else -1.0
    rows = []
    for name, group in by_strategy.items():
        vals = np.array([anytime(r, fractions, table.direction)[0] for r in group])
        tests = np.array([anytime(r, fractions, table.direction)[1] for r in group])
        row: dict[str, Any] = {"strategy": name, "label": STRATEGIES[name].label if name in STRATEGIES else name,
                               "peer": STRATEGIES[name].peer if name in STRATEGIES else False, "seeds": len(group),
                               "trials": float(np.mean([_configurations(r, full=False) for r in group])),
                               "full_trials": float(np.mean([_configurations(r, full=True) for r in group])),
                               "top": _mean_ci(np.array([len(_top_trained(r, nearest) & top) for r in group],
                                                        dtype=float)),
                               "top_size": len(top)}
        for j, fraction in enumerate(fractions):
            row[f"val@{fraction:g}"] = _mean_ci(vals[:, j])
            row[f"regret@{fraction:g}"] = _mean_ci(sign * (table.best_final() - vals[:, j]))
            row[f"test@{fraction:g}"] = _mean_ci(tests[:, j])
        if math.isfinite(target):
            steps = np.array([steps_to_reach(r, target, table.direction) / r.budget_steps for r in group])
            reached = np.isfinite(steps)
            row["reached"] = float(reached.mean())
            # Seeds that never matched it count as beyond the budget: the median stays honest.
            row["median_fraction"] = float(np.median(np.where(reached, steps, np.inf)))
            if name == REFERENCE:
                reference_median = row["median_fraction"]
        rows.append(row)
    for row in rows:
        frac = row.get("median_fraction", math.nan)
        row["ratio"] = frac / reference_median if math.isfinite(reference_median) and reference_median > 0 else math.nan
    row_target = {"target": target, "oracle": table.best_final()}
    for row in rows:
        row.update(row_target)
    return rows


def top_configurations(table: ReplayTable, k: int = 5) -> set[int]:
    """The recorded indices of the `k` best final validation scores, with every configuration tied with the
    k-th (so the set may hold more than `k`)."""
    sign = 1.0 if table.direction == "maximize" else -1.0
    finals = sorted((sign * table.final(r) for r in table.complete), reverse=True)
    cut = finals[min(k, len(finals)) - 1]
    return {r.index for r in table.complete if sign * table.final(r) >= cut}


class _NearestCache:
    """The recorded configuration that answered a proposal (`ReplayTable.nearest`), remembered per proposal."""

    def __init__(self, table: ReplayTable):
        self.table = table
        self._index: dict[str, int] = {}

    def __call__(self, params: Mapping[str, Any]) -> int:
        key = json.dumps(dict(params), sort_keys=True, default=str)
        if key not in self._index:
            self._index[key] = self.table.nearest(params)[0].index
        return self._index[key]


def _top_trained(run: Run, nearest: _NearestCache) -> set[int]:
    """The recorded configurations the run trained to 100% within its budget ("no lost late bloomers")."""
    limit = run.budget_steps + 1e-9
    return {nearest(e.params) for e in run.evaluations if e.final is not None and e.steps_end <= limit}


def _configurations(run: Run, full: bool) -> int:
    """Distinct configurations a run trained (to the end when `full`): a paused and resumed trial is one."""
    return len({json.dumps(dict(e.params), sort_keys=True, default=str) for e in run.evaluations
                if not full or e.final is not None})


# -- where the compute went ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stretch:
    """One evaluation seen as training: its recorded configuration, the steps it ran and where it started."""

    record: int
    start: int  # steps the same proposed configuration had already trained
    steps: float
    steps_end: float  # cumulative compute when it ended


def _stretches(run: Run, nearest: _NearestCache) -> list[_Stretch]:
    """The run's evaluations within its budget as stretches of training, in the order they ran."""
    reached: dict[str, int] = {}
    out, before = [], 0.0
    for e in run.evaluations:
        if e.steps_end > run.budget_steps + 1e-9:
            break
        key = json.dumps(dict(e.params), sort_keys=True, default=str)
        start = reached.get(key, 0)
        reached[key] = start + round(e.steps_end - before)
        out.append(_Stretch(nearest(e.params), start, e.steps_end - before, e.steps_end))
        before = e.steps_end
    return out


EARLY_PROPOSALS, LATER_PROPOSALS = 10, 20  # proposal quality: the first 10 new configurations, the next 20


def spend_rows(runs: Sequence[Run], table: ReplayTable, target: float) -> list[dict[str, Any]]:
    """Per strategy, where its compute went (shares of the budget, mean over seeds) and how soon it first
    started and finished a configuration that reaches `target` (median over seeds; inf when it never did).

    A stretch is a configuration's first stretch (a new configuration, up to where it first stopped, or to
    100% without stopping: `from scratch to 100%`), a stretch resumed to an intermediate rung, or one resumed
    to 100%. `below median` is the share spent on configurations whose recorded final is below the table's
    median final: compute that could not have paid off. `hits_early` and `hits_later` are the shares of the
    new configurations, the first `EARLY_PROPOSALS` and the `LATER_PROPOSALS` after them (pooled over seeds),
    that reach `target`: how good the proposals are, apart from how they are scheduled (NaN when none).
    """
    nearest = _NearestCache(table)
    records = {r.index: r for r in table.records}
    finals = {r.index: table.final(r) for r in table.complete}
    sign = 1.0 if table.direction == "maximize" else -1.0
    median = float(np.median(list(finals.values())))
    winners = {i for i, f in finals.items() if sign * f >= sign * target}
    by_strategy: dict[str, list[Run]] = {}
    for run in runs:
        by_strategy.setdefault(run.strategy, []).append(run)
    rows = []
    for name, group in by_strategy.items():
        shares: dict[str, list[float]] = {k: [] for k in ("first", "scratch", "middle", "resumed", "below")}
        started, finished, before = [], [], []
        early: list[bool] = []
        later: list[bool] = []
        for run in group:
            stretches = _stretches(run, nearest)
            new = [st.record in winners for st in stretches if st.start == 0]
            early += new[:EARLY_PROPOSALS]
            later += new[EARLY_PROPOSALS:EARLY_PROPOSALS + LATER_PROPOSALS]
            parts = dict.fromkeys(shares, 0.0)
            first_start = first_end = math.inf
            n_before = None
            for i, st in enumerate(stretches):
                full = st.start + st.steps >= records[st.record].total_steps
                kind = ("scratch" if full else "first") if st.start == 0 else ("resumed" if full else "middle")
                parts[kind] += st.steps
                parts["below"] += st.steps if sign * finals.get(st.record, -math.inf) < sign * median else 0.0
                if st.record in winners:
                    if st.start == 0 and not math.isfinite(first_start):
                        first_start = st.steps_end - st.steps
                        n_before = sum(1 for s in stretches[:i] if s.start == 0)
                    if full:
                        first_end = min(first_end, st.steps_end)
            for kind in shares:
                shares[kind].append(parts[kind] / run.budget_steps)
            started.append(first_start / run.budget_steps)
            finished.append(first_end / run.budget_steps)
            before.append(math.inf if n_before is None else n_before)
        rows.append({"strategy": name, "label": STRATEGIES[name].label if name in STRATEGIES else name,
                     **{k: float(np.mean(v)) for k, v in shares.items()},
                     "winner_started": float(np.median(started)), "winner_finished": float(np.median(finished)),
                     "configs_before": float(np.median(before)), "winners": len(winners),
                     "hits_early": float(np.mean(early)) if early else math.nan,
                     "hits_later": float(np.mean(later)) if later else math.nan})
    return rows


def spend_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """`spend_rows` as a markdown table."""
    def pct(x: float) -> str:
        return f"{x:.0%}" if math.isfinite(x) else "never"

    head = ["strategy", "new: first stretch", "new: from scratch to 100%", "resumed to a middle rung",
            "resumed to 100%", "on configurations below the median final",
            "a target-reaching configuration first started (median)", "… first trained to 100% (median)",
            "configurations started before it (median)",
            f"new configurations reaching it: first {EARLY_PROPOSALS}",
            f"… next {LATER_PROPOSALS}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        before = f"{r['configs_before']:.0f}" if math.isfinite(r["configs_before"]) else "–"
        cells = [r["label"], *(pct(r[k]) for k in ("first", "scratch", "middle", "resumed", "below")),
                 pct(r["winner_started"]), pct(r["winner_finished"]), before,
                 *(f"{r[k]:.2f}" if math.isfinite(r[k]) else "–" for k in ("hits_early", "hits_later"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def regret_curves(runs: Sequence[Run], table: ReplayTable, points: int = 101) -> dict[str, np.ndarray]:
    """Per strategy, an array (seeds × points) of simple regret (oracle final − incumbent final) over
    fractions of the budget 0..1; NaN before a strategy's first full-budget result."""
    grid = np.linspace(0, 1, points)
    oracle = table.best_final()
    sign = 1.0 if table.direction == "maximize" else -1.0
    out: dict[str, list[np.ndarray]] = {}
    for run in runs:
        val, _ = anytime(run, grid.tolist(), table.direction)
        out.setdefault(run.strategy, []).append(sign * (oracle - val))
    return {name: np.array(rows) for name, rows in out.items()}


def plot_regret(runs: Sequence[Run], table: ReplayTable, path: Path, title: str = "") -> Path:
    """Mean simple regret with a 95% band over seeds against the fraction of compute, one line per strategy.

    A strategy's line starts once every seed has a full-budget result (before that regret is undefined).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    curves = regret_curves(runs, table)
    grid = np.linspace(0, 1, next(iter(curves.values())).shape[1])
    fig, ax = plt.subplots(figsize=(9, 6))
    tab20 = plt.get_cmap("tab20")
    ax.set_prop_cycle(color=[tab20(i) for i in range(20)])  # up to 20 distinguishable strategies
    for name, rows in curves.items():
        defined = np.isfinite(rows).all(axis=0)
        mean = rows.mean(axis=0)
        n = rows.shape[0]
        half = stats.t.ppf(0.975, max(n - 1, 1)) * rows.std(axis=0, ddof=1 if n > 1 else 0) / math.sqrt(n)
        style = "--" if STRATEGIES.get(name) and STRATEGIES[name].peer else "-"
        label = STRATEGIES[name].label if name in STRATEGIES else name
        ax.plot(grid[defined] * 100, np.maximum(mean, REGRET_FLOOR)[defined], style, label=label)
        # Regret is never negative: the t-band is clipped at the plot's floor (log scale).
        low = np.maximum(mean - half, REGRET_FLOOR)
        ax.fill_between(grid[defined] * 100, low[defined], (mean + half)[defined], alpha=0.15)
    ax.set_xlabel("compute used (% of the budget, in optimizer steps)")
    ax.set_ylabel(f"regret: best recorded − incumbent final validation {table.metric}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=REGRET_FLOOR)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Anytime regret (mean and 95% CI over seeds)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cell(pair: tuple[float, float], digits: int = 3) -> str:
    mean, half = pair
    return "–" if not math.isfinite(mean) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def _columns(rows: Sequence[Mapping[str, Any]], fractions: Sequence[float]) -> tuple[list[str], list[list[str]]]:
    """The summary's header and cells, for the markdown table and the terminal alike."""
    head = ["strategy", "configs (full)"]
    head += [f"regret @{f:.0%}" for f in fractions] + [f"test @{f:.0%}" for f in fractions]
    head += ["compute to reach TPE-full's final (median, reached)", "ratio"]
    top_sizes = {row["top_size"] for row in rows}
    head.append(f"top-{'/'.join(map(str, sorted(top_sizes)))} trained to 100%")
    body = []
    for row in rows:
        cells = [row["label"], f"{row['trials']:.0f} ({row['full_trials']:.0f})"]
        cells += [_cell(row[f"regret@{f:g}"]) for f in fractions] + [_cell(row[f"test@{f:g}"]) for f in fractions]
        frac = row.get("median_fraction", math.nan)
        reach = f"{frac:.0%}" if math.isfinite(frac) else "> 100%"
        cells += [f"{reach} ({row.get('reached', math.nan):.0%})",
                  f"{row['ratio']:.2f}" if math.isfinite(row["ratio"]) else "–", _cell(row["top"], 1)]
        body.append(cells)
    return head, body


def markdown_table(rows: Sequence[Mapping[str, Any]], fractions: Sequence[float] = FRACTIONS) -> str:
    """The summary as a markdown table (regret and the incumbent's test score at each fraction, ratio, top)."""
    head, body = _columns(rows, fractions)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def print_rich(rows: Sequence[Mapping[str, Any]], fractions: Sequence[float] = FRACTIONS) -> None:
    """Print the summary with rich (the same columns as `markdown_table`)."""
    from rich.console import Console
    from rich.table import Table

    head, body = _columns(rows, fractions)
    table = Table(title="regret of the incumbent (best recorded − best final validation found) and its test "
                        "score at a share of the compute; mean ± 95% CI over seeds")
    for i, name in enumerate(head):
        table.add_column(name, justify="left" if i == 0 else "right")
    for cells in body:
        table.add_row(*cells)
    Console(width=240).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="a recording (.jsonl with its .meta.json)")
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budget-trials", type=float, default=20.0,
                        help="compute budget in full-trial equivalents (× the table's mean steps)")
    parser.add_argument("--database-url", default=None, help="server database (default: a temporary SQLite file)")
    parser.add_argument("--peer-path", type=Path, action="append", default=[],
                        help="extra import path for peers installed with --target (DEHB)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--plot", type=Path, help="write the anytime-regret plot here (PNG)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 3 strategies, 6 full trials of budget")
    parser.add_argument("--save", type=Path, help="write every run (JSON) here after each strategy")
    parser.add_argument("--warm-from", type=Path,
                        help="another task's recording, for the warm-started strategies (*-warm)")
    parser.add_argument("--load", type=Path, action="append", default=[],
                        help="summarise runs saved by --save instead of running (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for extra in args.peer_path:
        sys.path.append(str(extra))
    logging.getLogger("tunefleet.worker").setLevel(logging.ERROR)
    table = ReplayTable.load(args.table)
    strategies, seeds, budget = args.strategies, list(range(args.seeds)), args.budget_trials
    if args.quick:
        strategies, seeds, budget = list(QUICK), [0, 1], 6.0
    runs: list[Run] = []
    for saved in args.load:
        runs += load_runs(saved)
    if args.load:
        budget = runs[0].budget_steps / table.mean_total_steps()
        seeds = sorted({r.seed for r in runs})
    else:
        warm_from = ReplayTable.load(args.warm_from) if args.warm_from else None
        for name in strategies:  # one at a time, saved as they finish: a long run can be cut short
            runs += run_benchmark(table, [name], seeds, budget, database_url=args.database_url, warm_from=warm_from)
            if args.save:
                save_runs(runs, args.save)
    rows = summarise(runs, table)
    print_rich(rows)
    note = (f"table {args.table.name}: {len(table.records)} configurations ({len(table.complete)} complete), "
            f"budget {budget:g} full trials = {budget * table.mean_total_steps():.0f} steps, seeds {len(seeds)}; "
            f"target (TPE-full mean final) {rows[0]['target']:.4f}, oracle (best recorded) {table.best_final():.4f}")
    print(note)
    spend = ""
    if math.isfinite(rows[0]["target"]):
        spend = spend_table(spend_rows(runs, table, rows[0]["target"]))
        print(spend)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"{note}\n\n{markdown_table(rows)}\n\n{spend}\n", encoding="utf-8")
    if args.plot:
        plot_regret(runs, table, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How long a paused (or pruned) trial keeps a worker from its next one, with the real trainer.

    .venv/bin/python benchmarks/pause_handoff.py --trials 6 --out docs/benchmarks/pause_handoff.md

For each method (LoRA: checkpoints uploaded to the server; full fine-tuning: kept on the node's disk), one
ASHA study (`search.pruner: asha`, rungs 20/60/100) of the demo task (all-MiniLM-L6-v2 on BBC News, shipped
in a package) on a server in this process (SQLite in a temporary folder), served by one real worker
(`WorkerLoop` + `HFTrainer` on CPU). The worker measures, for every prune or pause answer, the seconds
until its next lease request (`WorkerLoop.handoff_seconds`): for a pause that includes saving the
checkpoint, packing and uploading it (or moving it into the node's folder) and the `pause` call. The goal
of issue 11 is under 2 s. Training sizes are small (the handoff does not depend on them; the checkpoint
size does, and that is the model's, printed too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.strategies import local_server  # noqa: E402
from tunefleet.demo.data import demo_spec, write_bbc_news  # noqa: E402
from tunefleet.service.client import Client  # noqa: E402
from tunefleet.workers.loop import HFTrainer, WorkerLoop  # noqa: E402


def study_spec(data_dir: Path, method: str, trials: int, seed: int) -> dict[str, Any]:
    spec = demo_spec(data_dir, name=f"handoff-{method}", max_trials=trials)
    spec.pop("baseline")
    spec["search_space"].pop("method")
    spec["fixed"].update(method=method, train_size=64, num_epochs=2)
    spec["data"]["max_eval_samples"] = 64
    spec["search"] = {"sampler": "random", "pruner": "asha", "min_resource": 0.2, "reduction_factor": 3,
                      "seed": seed}
    return spec


def run_method(method: str, trials: int, seed: int, data_dir: Path, workdir: Path) -> dict[str, Any]:
    with local_server() as url, Client(url) as client:
        study = client.create_study(study_spec(data_dir, method, trials, seed))
        loop = WorkerLoop(client, HFTrainer("cpu"), worker_id=f"handoff-{method}", device="cpu", once=True,
                          idle_sleep=0.2, workdir=workdir / method)
        started = time.monotonic()
        loop.run()
        seconds = time.monotonic() - started
        items = client.list_trials(study["id"], limit=1000)["items"]
    handoffs = sorted(loop.handoff_seconds)
    return {
        "method": method, "storage": "upload" if method != "full" else "node", "trials": len(items),
        "complete": sum(t["state"] == "COMPLETE" for t in items), "resumes": sum(t["resumes"] for t in items),
        "handoffs": len(handoffs), "p50": statistics.median(handoffs) if handoffs else float("nan"),
        "p95": handoffs[min(len(handoffs) - 1, round(0.95 * (len(handoffs) - 1)))] if handoffs else float("nan"),
        "max": handoffs[-1] if handoffs else float("nan"), "seconds": seconds,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | checkpoint | trials | complete | resumes | stops answered | handoff p50 s | p95 s | max s "
             "| study s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['storage']} | {r['trials']} | {r['complete']} | {r['resumes']} | "
                     f"{r['handoffs']} | {r['p50']:.2f} | {r['p95']:.2f} | {r['max']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6, help="trials per study (default 6)")
    parser.add_argument("--methods", default="lora,full", help="comma-separated methods (default lora,full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tunefleet-handoff-") as tmp:
        data_dir = Path(tmp) / "data"
        write_bbc_news(data_dir)
        rows = [run_method(m, args.trials, args.seed, data_dir, Path(tmp) / "work") for m in args.methods.split(",")]
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Pause handoff (`benchmarks/pause_handoff.py`)\n\n"
                            f"Command: `python benchmarks/pause_handoff.py --trials {args.trials} "
                            f"--methods {args.methods} --seed {args.seed}`\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

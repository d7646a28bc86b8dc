"""tunefleet: hyperparameter optimisation for fine-tuning language models, as a service.

Every installed module lives under this one package:

- `tunefleet.service`: the server (REST API, study specs, the Optuna-backed search, the worker
  protocol, the database) and the Python client, `tunefleet.service.client.Client`. No torch.
- `tunefleet.workers`: the fine-tuning workers (transformers + PEFT), which reach the server only
  through the client.
- `tunefleet.migrations`: alembic migrations of tunefleet's own tables.
- `tunefleet.sdk`: what a user's own training script imports under `tunefleet agent` (no torch).
- The composition floor above them: `tunefleet.cli` (the `tunefleet` command), `tunefleet.demo`,
  `tunefleet.fidelity_plots` (the fidelity report drawn on the client side) and `tunefleet.fleet`
  (one worker process per GPU).

In the repository `service/`, `workers/` and `migrations/` are top-level folders; `tunefleet/service`,
`tunefleet/workers` and `tunefleet/migrations` are relative links to them, so Python, the wheel build,
type checkers, import-linter and editors all see the one package without an import hook.
"""

__version__ = "0.1.0"

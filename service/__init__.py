"""tunefleet's server half: study specs, the Optuna-backed search, the worker protocol, CLI and client.

Nothing here imports torch; the fine-tuning code lives in the `workers` package.
"""

__version__ = "0.1.0"

"""Why a trial could not finish, as exceptions the pull loop maps to `POST /trials/{id}/fail`.

Every `TrialFailed` carries `reason` (a message that says what happened and what to change) and
`retryable` (whether running the same parameters again could succeed). Retrying a deterministic
failure — bad data, a model that cannot load, an out-of-memory configuration, a diverging learning
rate — only burns budget, so those are not retryable. `TrialInterrupted` is not a failure of the
parameters: the worker was told to stop (SIGTERM, study paused), and the loop decides what to report.
This module imports nothing heavy.
"""

from __future__ import annotations

import traceback

__all__ = [
    "DataError",
    "InvalidConfig",
    "ModelLoadError",
    "NonFiniteLoss",
    "OutOfMemory",
    "TrialFailed",
    "TrialInterrupted",
    "summarise",
]


class TrialFailed(Exception):
    """A trial that cannot complete; `reason` is shown to the user, `retryable` and `kind` go to the server.

    `kind` (a `tunefleet.service.spec.FailureKind`) lets the server tell a failure of the study (its model,
    data or configuration: every trial will fail alike) from one of the trial's parameters."""

    retryable_default = False
    kind = "trial"

    def __init__(self, reason: str, retryable: bool | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = self.retryable_default if retryable is None else retryable


class OutOfMemory(TrialFailed):
    """The device ran out of memory; the same parameters would run out again."""

    kind = "memory"


class NonFiniteLoss(TrialFailed):
    """The training loss became NaN or infinite (usually a learning rate far too high)."""

    kind = "diverged"


class DataError(TrialFailed):
    """The data cannot be read or does not have the fields the task needs."""

    kind = "data"


class ModelLoadError(TrialFailed):
    """The base model or its tokenizer cannot be loaded."""

    kind = "model"


class InvalidConfig(TrialFailed):
    """The training parameters name an unknown task, method or value the worker cannot run."""

    kind = "config"


class TrialInterrupted(Exception):
    """Training stopped because the worker was asked to stop (`should_stop()` returned True)."""


def summarise(exc: BaseException, limit: int = 2000) -> str:
    """`Type: message` first, then the innermost frames of the traceback, short enough for a fail reason."""
    frames = "".join(traceback.format_tb(exc.__traceback__, limit=-3))
    return f"{type(exc).__name__}: {exc}\n{frames}"[:limit]

"""What `tunefleet agent` and the SDK inside the script it runs agree on: environment variables and the local
channel. Spelled once here; both sides import these names (the agent from `tunefleet.workers.agent`).

The channel is HTTP on the loopback interface, served by the agent for one trial: JSON bodies, the trial's
secret in the `TOKEN_HEADER` header (another local process cannot report into the trial). The agent, not the
script, talks to the server: it holds the lease, relays reports to the server at the study's rungs, and stops
the process when the answer is prune or pause, so a script that ignores the answer is stopped all the same.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "COMPLETE_PATH",
    "ENV_AGENT_TOKEN",
    "ENV_AGENT_URL",
    "ENV_CHECKPOINT_DIR",
    "ENV_OBJECTIVE",
    "ENV_PARAMS_FILE",
    "ENV_PARAM_PREFIX",
    "ENV_RESUME_DIR",
    "ENV_TRIAL_ID",
    "REPORT_PATH",
    "SHOULD_STOP_PATH",
    "TOKEN_HEADER",
    "Action",
]

# The agent's answer to a report (the server's `tunefleet.service.spec.ReportAction`; a test pins the two).
Action = Literal["continue", "prune", "pause"]

ENV_TRIAL_ID = "TUNEFLEET_TRIAL_ID"  # the trial's id on the server
ENV_PARAMS_FILE = "TUNEFLEET_PARAMS_FILE"  # a JSON object: the trial's parameters (searched and fixed)
ENV_PARAM_PREFIX = "TUNEFLEET_PARAM_"  # + the parameter's name in upper case: its value (strings as they are)
ENV_OBJECTIVE = "TUNEFLEET_OBJECTIVE"  # the metric a report's value is (the study's first objective)
ENV_AGENT_URL = "TUNEFLEET_AGENT_URL"  # http://127.0.0.1:PORT, the agent's channel for this trial
ENV_AGENT_TOKEN = "TUNEFLEET_AGENT_TOKEN"  # the channel's secret for this trial
ENV_CHECKPOINT_DIR = "TUNEFLEET_CHECKPOINT_DIR"  # an empty folder: write a checkpoint here when told to pause
ENV_RESUME_DIR = "TUNEFLEET_RESUME_DIR"  # set when the trial resumes: the checkpoint written before its pause

TOKEN_HEADER = "X-Tunefleet-Agent-Token"
REPORT_PATH = "/report"  # POST {step, value, max_step, metrics} -> {action}
COMPLETE_PATH = "/complete"  # POST {value, metrics} -> {}
SHOULD_STOP_PATH = "/should-stop"  # GET -> {stop}

"""Prometheus metrics of the server, served at /metrics.

Counters count what this process did (each server process has its own registry); `tunefleet_active_leases`
is read from the database at scrape time, so every process reports the same, exact value.
"""

from prometheus_client import Counter, Gauge, Histogram

LEASES = Counter("tunefleet_leases_total", "Trials handed to workers")
REPORTS = Counter("tunefleet_reports_total", "Intermediate reports received, by the answer", ["action"])
FINISHED = Counter("tunefleet_trials_finished_total",
                   "Trials that reached a final state: complete, fail (by the worker), pruned, expired (by the "
                   "reaper)", ["state"])
FINISHED_STATES = ("complete", "fail", "pruned", "expired")
for _state in FINISHED_STATES:  # every series exists from the start, at 0
    FINISHED.labels(state=_state)
REAPED = Counter("tunefleet_leases_expired_total", "Leases that expired and were reaped")
ACTIVE_LEASES = Gauge("tunefleet_active_leases",
                      "Trials leased and not yet finished, in the database (all server processes)")
LATENCY = Histogram("tunefleet_request_seconds", "Request latency by route", ["method", "route"])


def trial_finished(state: str) -> None:
    """Count one trial that reached a final state (the backend's `on_trial_finished` hook)."""
    FINISHED.labels(state=state).inc()

"""Prometheus metrics of the server, served at /metrics."""

from prometheus_client import Counter, Gauge, Histogram

LEASES = Counter("tunefleet_leases_total", "Trials handed to workers")
REPORTS = Counter("tunefleet_reports_total", "Intermediate reports received", ["prune"])
FINISHED = Counter("tunefleet_trials_finished_total", "Trials completed or failed by workers", ["state"])
REAPED = Counter("tunefleet_leases_expired_total", "Leases that expired and were reaped")
ACTIVE_LEASES = Gauge("tunefleet_active_leases", "Trials leased and not yet finished")
LATENCY = Histogram("tunefleet_request_seconds", "Request latency by route", ["method", "route"])

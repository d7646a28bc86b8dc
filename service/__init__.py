"""`tunefleet.service`: the server half. Study specs, the Optuna-backed search, the worker protocol, the
REST API, the database, and the Python client (`tunefleet.service.client`).

Nothing here imports torch; the fine-tuning code lives in `tunefleet.workers`.
"""

# The README's two commands: `make demo` and `make test`. Both create .venv and install what they need.
VENV    ?= .venv
PY      := $(VENV)/bin/python
# torch 2.13.0 is pinned; where a wheel of it lies on local disk (/opt/wheels here), pip takes that one.
FIND    := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP   := $(VENV)/.installed

.PHONY: install demo test lint bench-service bench-worker bench-search bench-pause clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(FIND) "torch==2.13.0"
	$(PY) -m pip install -q $(FIND) -e ".[worker,demo,dev,bench,s3]"
	touch $(STAMP)

install: $(STAMP)

## A real tuning study on this machine: server on the embedded SQLite default, one worker, ~16 trials.
demo: $(STAMP)
	$(VENV)/bin/tunefleet demo

## The test suite against the real PostgreSQL at 127.0.0.1:5432 (started here if it is down).
test: $(STAMP)
	@pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest

## ruff, the import contracts between layers (import-linter) and the type checker (mypy).
lint: $(STAMP)
	$(VENV)/bin/ruff check service workers migrations tunefleet tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

bench-service: $(STAMP)
	$(PY) benchmarks/service_throughput.py

bench-pause: $(STAMP)
	$(PY) benchmarks/pause_handoff.py --out docs/benchmarks/pause_handoff.md

bench-worker: $(STAMP)
	$(PY) benchmarks/worker_throughput.py

bench-search: $(STAMP)
	$(PY) benchmarks/strategies.py

clean:
	rm -rf $(VENV) .tunefleet .pytest_cache

"""Chaos: a study survives its database restarting, its server being SIGKILLed and a worker frozen past its
lease, all in one run, and ends with the budget exact and nothing lost, stuck or duplicated.

The test starts a PostgreSQL cluster of its own (initdb in a temporary folder, its own port and socket), so
restarting it disturbs no other test and no other user of the machine's PostgreSQL.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import sqlalchemy as sa

from tests.conftest import free_port, study_spec
from tests.test_resilience import ServerProcess
from tunefleet.service.client import Client
from tunefleet.workers.simulated import start_simulated_workers

PG_CTL = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))


class OwnPostgres:
    """A throwaway PostgreSQL cluster: trust auth, loopback only, fsync off (nothing here must outlive it)."""

    def __init__(self) -> None:
        self.bin = Path(PG_CTL[-1]).parent
        self.port = free_port()
        self.data = Path(tempfile.mkdtemp(prefix="tunefleet-chaos-pg-"))
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/tunefleet"
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.data, user.pw_uid, user.pw_gid)

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def _options(self) -> str:
        return (f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c max_connections=80 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")

    def start(self) -> OwnPostgres:
        self._run("initdb", "-D", str(self.data / "db"), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data / "db"), "-o", self._options(), "-l", str(self.data / "log"), "-w",
                  "start")
        with contextlib.closing(psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                                 dbname="postgres")) as conn:
            conn.autocommit = True
            conn.cursor().execute("CREATE DATABASE tunefleet")
        return self

    def restart(self) -> None:
        self._run("pg_ctl", "-D", str(self.data / "db"), "-o", self._options(), "-l", str(self.data / "log"),
                  "-m", "fast", "-w", "restart")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.data / "db"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    if not PG_CTL:
        pytest.skip("PostgreSQL's server binaries (pg_ctl, initdb) are not installed")
    cluster = OwnPostgres().start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _wait(what: str, condition, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _freeze_holding_a_trial(client: Client, study_id: int, pid: int, worker_id: str) -> int:
    """SIGSTOP the worker while it holds a running trial; returns that trial's id."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGSTOP)
        running = [t["id"] for t in client.list_trials(study_id, state="RUNNING")["items"]
                   if t["worker_id"] == worker_id]
        if running:
            return running[0]
        os.kill(pid, signal.SIGCONT)  # between two trials: let it lease the next one
        time.sleep(0.3)
    raise AssertionError(f"worker {worker_id} never held a trial")


def _upgrade(url: str, home: Path) -> None:
    from tunefleet.service.config import Settings
    from tunefleet.service.db import upgrade_database

    upgrade_database(Settings(database_url=url, home=home))


def test_database_restart_server_kill_and_frozen_worker_lose_and_duplicate_nothing(own_postgres: OwnPostgres,
                                                                                    tmp_path: Path) -> None:
    budget = 24
    _upgrade(own_postgres.url, tmp_path)
    server = ServerProcess(own_postgres.url, tmp_path, free_port(), TUNEFLEET_LEASE_SECONDS="3").start()
    workers = []
    try:
        with Client(server.url, retries=40, backoff=0.2, max_backoff=1.0) as client:
            study = client.create_study(study_spec("chaos", budget={"max_trials": budget},
                                                   search={"pruner": "hyperband", "seed": 0, "max_retries": 3}))
            sid = study["id"]

            def finished() -> int:
                counts = client.get_study(sid)["counts"]
                return counts.get("complete", 0) + counts.get("pruned", 0)

            # Not `once`: a re-queued trial may appear after every worker found the queue empty.
            workers = start_simulated_workers(server.url, None, 3, seconds_per_rung=0.3, workdir=tmp_path,
                                              once=False, idle_sleep=0.2)
            _wait("the first finished trials", lambda: finished() >= 3)
            own_postgres.restart()  # every pooled connection of the server dies
            _wait("progress after the database restart", lambda: finished() >= 7)
            server.kill()  # SIGKILL, mid-trial for the workers
            time.sleep(0.5)
            server.start()
            _wait("progress after the server restart", lambda: finished() >= 11)
            frozen, frozen_id = workers[0], f"{socket.gethostname()}-sim0"
            assert frozen.pid is not None
            held = _freeze_holding_a_trial(client, sid, frozen.pid, frozen_id)
            _wait("the reaper to take the frozen worker's lease", lambda: client.get_trial(held)["state"] == "FAIL")
            os.kill(frozen.pid, signal.SIGCONT)  # it wakes up holding a lease that is no longer its
            _wait("the study to complete", lambda: client.get_study(sid)["state"] == "completed", timeout=240)
            shown = client.get_study(sid)
            trials = client.list_trials(sid, limit=1000)["items"]
    finally:
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGCONT)
                worker.terminate()
        for worker in workers:
            worker.join(30)
        server.stop()

    states = Counter(t["state"] for t in trials)
    stuck = [t for t in trials if t["state"] in ("RUNNING", "WAITING")]
    summary = [(t["id"], t["state"], t["retry_of"], t["worker_id"], bool(t["params"]), t["fail_reason"])
               for t in trials]
    assert not stuck, f"stuck trials ({states}): {stuck}\nall: {summary}\nfrozen: {held}"
    requeued = [t for t in trials if t["state"] == "FAIL" and any(r["retry_of"] == t["id"] for r in trials)]
    # The budget is exact: every trial counts once, except failures whose parameters ran again.
    assert shown["trials_used"] == budget == len(trials) - len(requeued), (shown, states, len(requeued))
    retries = Counter(t["retry_of"] for t in trials if t["retry_of"] is not None)
    assert all(n == 1 for n in retries.values()), f"a failure was re-queued twice: {retries}"
    frozen_trial = next(t for t in trials if t["id"] == held)
    assert frozen_trial["state"] == "FAIL" and "lease expired" in frozen_trial["fail_reason"]
    assert any(t["retry_of"] == held and t["state"] in ("COMPLETE", "PRUNED") for t in trials), "and ran again"
    for trial in trials:
        if trial["state"] == "COMPLETE":
            assert trial["value"] is not None and trial["test_metrics"], trial
    numbers = [t["number"] for t in trials]
    assert len(numbers) == len(set(numbers)), "a trial number was handed out twice"
    # Our lease rows agree with Optuna's trial states, whichever process or fault finished each trial.
    engine = sa.create_engine(own_postgres.url)
    try:
        with engine.connect() as conn:
            leases = dict(conn.execute(sa.text("SELECT trial_id, state FROM tf_leases")).all())
    finally:
        engine.dispose()
    expected = {"COMPLETE": {"complete"}, "PRUNED": {"pruned"}, "FAIL": {"failed", "expired"}}
    for trial in trials:
        assert leases.get(trial["id"]) in expected[trial["state"]], (trial, leases.get(trial["id"]))

"""`tunefleet worker --once` against a server that cannot be reached: it gives up with one error line and
status 1 once the client's retries are spent; a worker without --once keeps waiting for the server."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tunefleet.service.client import Client, ServerUnavailable
from tunefleet.workers.loop import WorkerLoop
from tunefleet.workers.simulated import SimulatedTrainer


def test_worker_once_exits_1_when_the_server_is_unreachable(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tunefleet", "worker", "--once", "--simulated", "--server", url,
                             "--workdir", str(tmp_path / "w")],
                            env={**os.environ, "TUNEFLEET_HOME": str(tmp_path)}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"error: cannot reach {url}" in result.stderr and "gave up after 6 tries" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60  # the client's backoff (about 15 s at most), not forever


def test_once_loop_raises_and_a_serving_loop_keeps_waiting(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retries=1, backoff=0.01) as client:
        once = WorkerLoop(client, SimulatedTrainer(), worker_id="w", device="cpu", once=True, idle_sleep=0.05,
                          workdir=tmp_path / "once")
        with pytest.raises(ServerUnavailable, match="cannot reach"):
            once.run()
        serving = WorkerLoop(client, SimulatedTrainer(), worker_id="w", device="cpu", idle_sleep=0.05,
                             workdir=tmp_path / "serving")
        thread = threading.Thread(target=serving.run, daemon=True)
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive()  # still retrying: a long-running worker outlives a server restart
        serving.request_shutdown()
        thread.join(10)
        assert not thread.is_alive() and serving.trials_run == 0

"""Graceful shutdown of the real `lorawarm run` with a load in flight (issue 5): SIGTERM abandons
the call within the daemon's deadline, closes the connection and exits 0."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from lorawarm.daemon import SHUTDOWN_DEADLINE
from tests.support.daemon_proc import LorawarmProcess, wait_for
from tests.support.fake_vllm_http import FakeVllmHttp
from tests.unit.adapters import write_adapter

MARGIN = 10.0
"""Seconds on top of the daemon's deadline for the interpreter to start its exit and the OS to
reap it on a busy 2-core machine."""


def test_sigterm_with_a_load_in_flight_exits_0_within_the_deadline(tmp_path: Path) -> None:
    """SIGTERM while vLLM sits on a load (it would answer after 60 s) makes lorawarm drop the
    call, close its connection and exit 0 within its shutdown deadline."""
    drop = tmp_path / "drop"
    drop.mkdir()
    with FakeVllmHttp() as fake:
        fake.delay("load", seconds=60)
        env = {"LORAWARM_REQUEST_TIMEOUT": "120"}  # the call is not abandoned by a timeout
        with LorawarmProcess(drop, tmp_path / "state", [fake.url], env=env) as d:
            write_adapter(drop / ".slow.tmp", seed=1)
            (drop / ".slow.tmp").rename(drop / "slow")
            load = wait_for(lambda: next(iter(fake.requests("load")), None), what="the load sent")
            assert d.process is not None
            assert d.process.poll() is None

            d.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            try:
                code = d.process.wait(timeout=SHUTDOWN_DEADLINE + MARGIN)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"lorawarm still running {SHUTDOWN_DEADLINE + MARGIN:.0f} s after SIGTERM:\n"
                    f"{d.log_text()[-3000:]}"
                ) from None
            print(f"exited {time.monotonic() - signalled:.2f} s after SIGTERM")
            assert code == 0, d.log_text()[-3000:]
            wait_for(lambda: load.client_gone is not None, timeout=10, what="the connection gone")
            assert load.client_gone is not None
            assert load.client_gone - signalled < SHUTDOWN_DEADLINE + MARGIN
            assert load.outcome == "pending"  # lorawarm did not wait for vLLM's answer
            assert '"event": "stopped"' in d.log_text()

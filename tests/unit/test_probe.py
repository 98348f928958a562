"""`python3 -m lorawarm.probe PATH`, the container probe for a loopback-only status API, run
as kubelet runs it against the real daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorawarm.probe import main
from tests.support.daemon_proc import LorawarmProcess, wait_for
from tests.support.vllm_server import free_port

UNREACHABLE = "http://127.0.0.1:9"
TOKEN = "probe-token-0123456789"


def probe(path: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LORAWARM_", "VLLM_"))}
    return subprocess.run(
        [sys.executable, "-m", "lorawarm.probe", path],
        capture_output=True,
        text=True,
        env={**base, **env},
        timeout=30,
        check=False,
    )


def test_probe_passes_on_a_ready_daemon_and_fails_on_none(tmp_path: Path) -> None:
    """/healthz and /readyz of a running daemon pass (exit 0); a port nobody listens on
    fails (exit 1) with the reason on stderr."""
    with LorawarmProcess(tmp_path / "drop", tmp_path / "state", [UNREACHABLE]) as proc:
        port = str(proc.port)
        for path in ("/healthz", "/readyz"):
            done = probe(path, LORAWARM_STATUS_PORT=port)
            assert done.returncode == 0, done.stderr
    nobody = probe("/healthz", LORAWARM_STATUS_PORT=str(free_port()))
    assert nobody.returncode == 1
    assert "lorawarm probe: 127.0.0.1:" in nobody.stderr


def test_probe_sends_the_status_token(tmp_path: Path) -> None:
    """With a status token, /readyz passes only when the probe has the token in its
    environment (as the sidecar container does), /healthz either way."""
    env = {"LORAWARM_STATUS_TOKEN": TOKEN}
    proc = LorawarmProcess(tmp_path / "drop", tmp_path / "state", [UNREACHABLE], env=env)
    proc.start()
    try:
        port = str(proc.port)
        wait_for(lambda: probe("/healthz", LORAWARM_STATUS_PORT=port).returncode == 0)
        with_token = wait_for(
            lambda: (r := probe("/readyz", LORAWARM_STATUS_PORT=port, **env)).returncode == 0 and r,
            what="ready with the token",
        )
        without = probe("/readyz", LORAWARM_STATUS_PORT=port)
    finally:
        proc.stop()
    assert with_token.returncode == 0
    assert without.returncode == 1
    assert "HTTP 401" in without.stderr
    assert TOKEN not in without.stderr


def test_probe_usage() -> None:
    """Anything but one absolute path is a usage error (exit 2)."""
    assert probe("healthz").returncode == 2


def test_probe_main_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe's entry point, called as `python3 -m` calls it: 0 for a route that answers
    200, 1 for one that does not (404 here), 2 for no path."""
    with LorawarmProcess(tmp_path / "drop", tmp_path / "state", [UNREACHABLE]) as proc:
        monkeypatch.setenv("LORAWARM_STATUS_PORT", str(proc.port))
        monkeypatch.delenv("LORAWARM_STATUS_TOKEN", raising=False)
        assert main(["/readyz"]) == 0
        assert main(["/no-such-route"]) == 1
    assert main([]) == 2

"""`make demo` in its --check form: the demo's steps cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_demo_check_passes(tmp_path: Path) -> None:
    """The demo starts vLLM with the plugin and lorawarm, warms the good adapter, reports the
    broken one as rank_too_large, shows the status table and a completion, and cleans up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAWARM_", "VLLM_"))}
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.demo", "--check", "--workdir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo check: ok" in result.stdout
    assert "demo-broken  incompatible  rank_too_large" in result.stdout
    assert "HTTP 200" in result.stdout

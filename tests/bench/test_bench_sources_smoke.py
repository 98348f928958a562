"""Smoke runs of the source benchmarks at tiny sizes, so that they cannot rot: each runs to the
end and prints its table (never a timed assertion). source_to_ready uses the suite's shared vLLM
server rather than starting one."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.common import BenchContext

from bench import source_listing, source_to_ready
from tests.support.vllm_server import VllmServer


def test_source_listing_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing and idle benchmark prints both of its tables."""
    monkeypatch.setenv("LORAWARM_BENCH_CACHE", str(tmp_path / "cache"))
    args = ["--sizes", "20", "--repeat", "1", "--idle-adapters", "3", "--window", "1"]
    assert source_listing.main([*args, "--polls", "1"]) == 0
    out = capsys.readouterr().out
    assert "## One listing" in out
    assert "| 20 | 40 | 1 |" in out
    assert "| poll 1 s | 3 |" in out
    assert "| no sources (same drop dir) | 3 |" in out


@pytest.mark.e2e
def test_source_to_ready_runs(
    tmp_path: Path,
    vllm: VllmServer,
    tiny_model: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The source-to-ready benchmark prints its lorawarm and floor rows."""
    monkeypatch.setenv("LORAWARM_BENCH_CACHE", str(tmp_path / "cache"))
    ctx = BenchContext(tmp_path, tiny_model, vllm, tmp_path, tmp_path, tmp_path, False, 16)
    argv = ["--count", "1", "--sizes", "small", "--polls", "1"]
    assert source_to_ready.main(argv, ctx=ctx) == 0
    out = capsys.readouterr().out
    assert "| small | lorawarm, poll 1 s | 1 |" in out
    assert "| small | boto3 download_file (transfer only) | 1 |" in out

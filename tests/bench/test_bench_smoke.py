"""Smoke runs of every benchmark in `bench/` at tiny sizes, so that they cannot rot.

These are not timed tests: they assert that each benchmark runs to the end and prints its
figures, never how fast anything was. The ones that need vLLM share ONE real vLLM CPU server
(tiny model, both resolver plugins) started for this module, as the benchmarks' `main(ctx=...)`
allows; each benchmark on its own starts the server it needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.common import BenchContext, summarize, vllm_context

from bench import cold_start, drop_to_ready, endpoint_cost, first_request, resolver_cost, scale

FIGURE = re.compile(r"\| [\d.]+ ms \|")


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Models and adapters the benchmarks generate go to a temporary cache, not /tmp's."""
    path = tmp_path_factory.mktemp("bench-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAWARM_BENCH_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def ctx(
    tiny_model: Path, bench_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BenchContext]:
    """One real vLLM server with the lorawarm plugin and vLLM's filesystem resolver."""
    work = tmp_path_factory.mktemp("bench-work")
    with vllm_context(tiny_model, work, plugins=True, max_lora_rank=64) as started:
        yield started


def test_summary_percentiles() -> None:
    """p50 is the median and p95 interpolates between the two largest of five samples."""
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.n, s.p50, s.min, s.max) == (5, 3.0, 1.0, 5.0)
    assert s.p95 == pytest.approx(4.8)


def test_resolver_cost_in_process_runs(
    bench_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """resolver_cost without a server calls both resolvers (vLLM's is imported from the
    installed vllm) and prints their p50s."""
    out = tmp_path / "figures.json"
    assert resolver_cost.main(["--tiny", "--no-e2e", "--repeats", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "built-in filesystem resolver" in text
    assert "lorawarm plugin, first resolve" in text
    assert FIGURE.search(text), text
    assert out.is_file()


@pytest.mark.e2e
def test_drop_to_ready_runs(ctx: BenchContext, capsys: pytest.CaptureFixture[str]) -> None:
    """drop_to_ready publishes by mv and cp -r into lorawarm (inotify, polling) and measures
    the floor, loading every adapter exactly once."""
    args = ["--count", "2", "--settle-seconds", "1", "--poll-seconds", "1"]
    assert drop_to_ready.main(args, ctx=ctx) == 0
    text = capsys.readouterr().out
    for row in ("lorawarm, inotify | mv", "lorawarm, polling 1 s | cp -r", "floor: POST"):
        assert row in text, text
    assert "(expected 10: each adapter loaded exactly once)" in text
    assert "lines: 10 " in text, text


@pytest.mark.e2e
def test_first_request_runs(ctx: BenchContext, capsys: pytest.CaptureFixture[str]) -> None:
    """first_request times the first token three ways and prints each ratio."""
    args = ["--trials", "1", "--warm-repeats", "1", "--pause", "0"]
    assert first_request.main(args, ctx=ctx) == 0
    text = capsys.readouterr().out
    for way in first_request.WAYS:
        assert f"| {way} | 1 |" in text, text
    assert "served from lorawarm snapshots: True" in text
    assert "resolver loads logged by vLLM: 4 " in text, text


@pytest.mark.e2e
def test_scale_runs(ctx: BenchContext, capsys: pytest.CaptureFixture[str]) -> None:
    """scale times ready, RSS and idle CPU, and a burst is inspected and loaded exactly once."""
    args = ["--sizes", "12", "--burst", "6", "--idle-seconds", "1", "--warm-limit", "2"]
    args += ["--restarts", "2", "--rescan-seconds", "1"]
    assert scale.main(args, ctx=ctx) == 0
    text = capsys.readouterr().out
    assert "| 12 |" in text, text
    assert "12 folders: CPU in the 1 s after a SIGHUP rescan" in text, text
    assert "each inspected and loaded exactly once: yes" in text, text


@pytest.mark.e2e
def test_resolver_cost_end_to_end_runs(
    ctx: BenchContext, capsys: pytest.CaptureFixture[str]
) -> None:
    """resolver_cost end to end compares a cold request through each resolver."""
    assert resolver_cost.main(["--repeats", "1", "--trials", "1"], ctx=ctx) == 0
    text = capsys.readouterr().out
    assert "Resolver cost end to end" in text
    assert "the lorawarm plugin adds" in text


@pytest.mark.e2e
def test_cold_start_runs(ctx: BenchContext, capsys: pytest.CaptureFixture[str]) -> None:
    """cold_start loads 20 adapters by bare POSTs and by a cold lorawarm, each exactly once."""
    assert cold_start.main(["--adapters", "20", "--models-samples", "1"], ctx=ctx) == 0
    text = capsys.readouterr().out
    assert "| floor: bare httpx POST /v1/load_lora_adapter | 20 |" in text, text
    assert "| lorawarm run, empty state dir | 20 |" in text, text
    assert "floor 20 (20), lorawarm 20 (20); lorawarm_loads_total 20;" in text, text
    assert "every adapter loaded exactly once in each phase: yes" in text, text


@pytest.mark.e2e
def test_endpoint_cost_runs(ctx: BenchContext, capsys: pytest.CaptureFixture[str]) -> None:
    """endpoint_cost times the lorawarm route next to vLLM's own, with the adapters it loaded
    reported resident by the endpoint."""
    assert endpoint_cost.main(["--rounds", "3", "--adapters", "2"], ctx=ctx) == 0
    text = capsys.readouterr().out
    for route in endpoint_cost.ROUTES:
        assert f"| {route} | 3 |" in text, text
    [line] = [row for row in text.splitlines() if row.startswith("adapters loaded: 2;")]
    assert "bench-endpoint-0" in line, line
    assert "bench-endpoint-1" in line, line
    assert "/v1/lorawarm/server p50 / /v1/models p50:" in text, text

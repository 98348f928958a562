"""Smoke run of `bench.inspect_cost` at tiny sizes, so that it cannot rot: it runs to the end
and prints a row per layout, side by side with a baseline tree (this one), never how fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import inspect_cost

DAEMON = Path(__file__).resolve().parents[2] / "daemon"


def test_inspect_cost_runs_against_a_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    """`--baseline` measures both trees in child processes and prints the ratio column."""
    assert inspect_cost.main(["--repeats", "3", "--rounds", "1", "--baseline", str(DAEMON)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["tiny", "7b", "70b"]
    assert all(row.rstrip(" |").endswith("x") for row in rows[1:])

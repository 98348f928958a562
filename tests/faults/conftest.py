"""Fixtures of the fault suites: a drop dir and a state dir, and the fake vLLM over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_vllm_http import FakeVllmHttp


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(drop dir, state dir) of one daemon; the drop dir exists, the state dir does not yet."""
    drop = tmp_path / "drop"
    drop.mkdir()
    return drop, tmp_path / "state"


@pytest.fixture
def vllm_http() -> Iterator[FakeVllmHttp]:
    """The recorded-faithful fake vLLM on a real loopback port: counts every request."""
    with FakeVllmHttp() as server:
        yield server

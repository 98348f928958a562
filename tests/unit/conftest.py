"""Fixtures every unit test shares."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lorawarm.daemon import Daemon
from lorawarm.settings import load

# Variables lorawarm reads besides its own LORAWARM_* ones.
FALLBACKS = ("STATE_DIRECTORY", "XDG_STATE_HOME")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No LORAWARM_*, VLLM_* or fallback variable from the machine changes a unit test."""
    for key in list(os.environ):
        if key.upper().startswith(("LORAWARM_", "VLLM_")) or key in FALLBACKS:
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """An empty drop directory."""
    path = tmp_path / "drop"
    path.mkdir()
    return path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state directory that does not exist yet."""
    return tmp_path / "state"


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running (an observer not stopped, a client not closed),
    as watchdog's own suite does: a leaked observer keeps feeding hints into later tests."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3.0
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


UNREACHABLE = "http://127.0.0.1:9"
"""A vLLM URL nothing answers on (the discard port)."""

MakeDaemon = Callable[..., Daemon]


@pytest.fixture
async def make_daemon(cache: Path, state: Path) -> AsyncIterator[MakeDaemon]:
    """Daemons on the test's drop and state dirs (an unreachable vLLM, a 0.3 s settle period,
    any setting overridable), closed after the test."""
    made: list[Daemon] = []

    def make(**overrides: Any) -> Daemon:
        settings = load(
            cache_dir=cache,
            state_dir=state,
            vllm_urls=overrides.pop("vllm_urls", [UNREACHABLE]),
            status_port=0,
            settle_seconds=overrides.pop("settle_seconds", 0.3),
            **overrides,
        )
        made.append(daemon := Daemon(settings))
        return daemon

    yield make
    for daemon in made:
        await daemon.aclose()  # rescan() starts the observer

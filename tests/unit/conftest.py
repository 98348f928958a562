"""Fixtures every unit test shares."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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

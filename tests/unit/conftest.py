"""Fixtures every unit test shares."""

from __future__ import annotations

import os
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

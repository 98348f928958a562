"""Session fixtures shared by the end-to-end suites: a tiny model, real PEFT adapters, and one
real vLLM CPU server that every test able to share it shares (a start costs ~40 s here)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.s3 import MotoS3
from tests.support.vllm_server import VllmServer


class AdapterFactory:
    """Real PEFT adapters for the tiny model, generated once per parameter set and copied out."""

    def __init__(self, model: Path, cache: Path) -> None:
        self.model = model
        self.cache = cache
        self._made: dict[str, Path] = {}

    def source(self, seed: int = 0, **options: Any) -> Path:
        key = f"seed{seed}-" + "-".join(f"{k}={options[k]}" for k in sorted(options))
        if key not in self._made:
            from tests.support.models import make_adapter

            self._made[key] = make_adapter(self.model, self.cache / key, seed=seed, **options)
        return self._made[key]

    def copy_to(self, dest: Path, seed: int = 0, **options: Any) -> Path:
        shutil.copytree(self.source(seed, **options), dest)
        return dest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterFactory:
    return AdapterFactory(tiny_model, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="session")
def vllm(tiny_model: Path) -> Iterator[VllmServer]:
    """The shared vLLM server: runtime LoRA updating on, no resolver plugin."""
    server = VllmServer(tiny_model, extra_args=["--max-loras", "2", "--max-cpu-loras", "4"])
    with server:
        yield server


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoS3]:
    """A real S3 protocol server on loopback (moto), shared by the source tests."""
    server = MotoS3().start()
    try:
        yield server
    finally:
        server.stop()

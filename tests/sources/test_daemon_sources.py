"""The real `lorawarm run` process with a source (no vLLM needed: its URL answers nothing):
SIGHUP lists at once, SIGTERM during a download exits promptly leaving nothing half-visible."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon_proc import LorawarmProcess, wait_for
from tests.support.s3 import Bucket, Fault, S3Proxy, credentials_env
from tests.unit.adapters import write_adapter


@pytest.fixture
def daemon(drop: Path, state: Path, bucket: Bucket, proxy: S3Proxy) -> Iterator[LorawarmProcess]:
    env = {
        "LORAWARM_SOURCES": f"s3://{bucket.name}/lora/",
        "LORAWARM_SOURCE_POLL_SECONDS": "3600",
        **credentials_env(proxy.endpoint),
    }
    with LorawarmProcess(drop, state, ["http://127.0.0.1:9"], env=env) as proc:
        yield proc


def sources(proc: LorawarmProcess) -> dict[str, object]:
    doc: dict[str, object] = proc.get("/v1/sources").json()["sources"][0]
    return doc


def test_sighup_lists_the_sources_at_once(
    daemon: LorawarmProcess, bucket: Bucket, tmp_path: Path
) -> None:
    """With an hour-long poll interval, SIGHUP (`systemctl reload`) syncs a new adapter now,
    and the intake takes it like any published folder."""
    wait_for(lambda: sources(daemon)["listings"] == 1, what="the first listing")
    bucket.put_adapter("lora/", "hup", write_adapter(tmp_path / "src", seed=1))
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: sources(daemon)["synced"] == 1, what="synced after SIGHUP")
    doc = wait_for(lambda: daemon.adapter("hup"), what="hup in the catalog")
    assert doc["source"] == f"s3://{bucket.name}/lora/"
    assert doc["state"] in ("pending", "failed")  # valid; the vLLM URL answers nothing


def test_sigterm_during_a_download_exits_promptly_and_leaves_nothing(
    daemon: LorawarmProcess, bucket: Bucket, drop: Path, tmp_path: Path, proxy: S3Proxy
) -> None:
    """A 32 MB weights object trickling in at 640 KiB/s is abandoned on SIGTERM: exit 0
    within a few seconds, no folder and no staging left visible in the drop directory."""
    wait_for(lambda: sources(daemon)["listings"] == 1, what="the first listing")
    proxy.faults.append(Fault("trickle", key="slowpoke/adapter_model", seconds=0.1))
    folder = write_adapter(tmp_path / "src", seed=2)
    bucket.put_adapter("lora/", "slowpoke", folder)
    bucket.put("lora/slowpoke/adapter_model.safetensors", os.urandom(1 << 20) * 32)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: proxy.count("GET", "slowpoke/adapter_model"), what="the download began")
    time.sleep(1)
    started = time.monotonic()
    assert daemon.stop(timeout=20) == 0
    assert time.monotonic() - started < 5
    assert not (drop / "slowpoke").exists()
    assert os.listdir(drop / ".lorawarm-sync") == []

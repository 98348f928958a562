"""The plugin's on-demand fetch (the resolver's "not found locally -> try the sources" hook)
against a real S3 protocol server: the same staging, inspection and snapshot store."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from lorawarm.inspection import Rules
from lorawarm.snapshot import SnapshotStore
from lorawarm.sources.fetch import Fetcher
from lorawarm.sources.location import parse_source
from lorawarm.sources.sync import SourceSync
from lorawarm_vllm.resolver import LorawarmResolver
from tests.support.s3 import Bucket, Fault, S3Proxy
from tests.unit.adapters import BASE_MODEL, write_adapter

pytestmark = pytest.mark.usefixtures("aws_env")


def resolver(bucket: Bucket, drop: Path, state: Path) -> tuple[LorawarmResolver, logging.Logger]:
    logger = logging.getLogger(f"test.on_demand.{bucket.name}")
    fetcher = Fetcher([parse_source(f"s3://{bucket.name}/lora/")], drop, state, max_bytes=10**7)
    rules = Rules(max_lora_rank=16, base_model=BASE_MODEL)
    return LorawarmResolver(
        drop, SnapshotStore(state), rules, logger=logger, fetcher=fetcher
    ), logger


def test_adapter_only_in_the_bucket_resolves_to_a_snapshot(
    bucket: Bucket, drop: Path, state: Path, tmp_path: Path
) -> None:
    """A name in no local folder but in the bucket is fetched, published into the drop
    directory, inspected and snapshotted; the daemon's sync later finds it its own."""
    bucket.put_adapter("lora/", "org/remote", write_adapter(tmp_path / "src", seed=3))
    res, _ = resolver(bucket, drop, state)
    snapshot = res.resolve_snapshot(BASE_MODEL, "org/remote")
    assert snapshot is not None
    assert (snapshot.path / "adapter_model.safetensors").is_file()
    assert (drop / "org" / "remote" / "adapter_config.json").is_file()
    sync = SourceSync(
        [f"s3://{bucket.name}/lora/"],
        drop,
        state,
        CollectorRegistry(),
        poll_seconds=30,
        concurrency=1,
        timeout=5,
        max_bytes=10**7,
        max_backoff=1,
    )
    asyncio.run(sync.sync_once())
    doc = sync.statuses()[0]
    assert (doc.synced, doc.downloads, doc.conflicts) == (1, 0, [])
    assert sync.source_of("org/remote") == f"s3://{bucket.name}/lora/"


def test_concurrent_requests_for_one_name_fetch_once(
    bucket: Bucket, drop: Path, state: Path, tmp_path: Path, proxy: S3Proxy
) -> None:
    """Eight requests at the same moment for one bucket-only name download its weights once
    and all get the same snapshot."""
    bucket.put_adapter("lora/", "burst", write_adapter(tmp_path / "src", seed=4))
    res, _ = resolver(bucket, drop, state)
    proxy.faults.append(Fault("slow", key="burst/adapter_model", seconds=0.5))
    got: list[object] = []
    threads = [
        threading.Thread(target=lambda: got.append(res.resolve_snapshot(BASE_MODEL, "burst")))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(got) == 8
    assert all(s is not None for s in got)
    assert len({str(s.path) for s in got if s is not None}) == 1
    assert proxy.count("GET", "/burst/adapter_model.safetensors") == 1


def test_a_failed_fetch_is_not_found_and_logged_once(
    bucket: Bucket,
    drop: Path,
    state: Path,
    tmp_path: Path,
    proxy: S3Proxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the store answers 503 the name resolves to nothing, the reason is logged once
    however often it is asked, nothing is left in the drop directory; afterwards it serves."""
    bucket.put_adapter("lora/", "flaky", write_adapter(tmp_path / "src", seed=5))
    res, logger = resolver(bucket, drop, state)
    proxy.faults.append(Fault("status", key="flaky/adapter_model", status=503, code="SlowDown"))
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert res.resolve_snapshot(BASE_MODEL, "flaky") is None
        assert res.resolve_snapshot(BASE_MODEL, "flaky") is None
    lines = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert len(lines) == 1
    assert "source_throttled" in lines[0]
    assert not (drop / "flaky").exists()
    assert os.listdir(drop / ".lorawarm-sync") == []
    proxy.clear()
    assert res.resolve_snapshot(BASE_MODEL, "flaky") is not None


def test_a_name_no_source_has_costs_one_listing_per_burst(
    bucket: Bucket, drop: Path, state: Path, proxy: S3Proxy
) -> None:
    """An unknown name answers not found; asked again at once it is not listed again."""
    res, _ = resolver(bucket, drop, state)
    assert res.resolve_snapshot(BASE_MODEL, "nowhere") is None
    listings = proxy.count("GET", "list-type=2")
    assert listings == 1
    assert res.resolve_snapshot(BASE_MODEL, "nowhere") is None
    assert proxy.count("GET", "list-type=2") == listings


def test_an_invalid_adapter_in_the_bucket_is_refused_with_inspections_reason(
    bucket: Bucket, drop: Path, state: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bucket adapter whose rank exceeds the limit is fetched, then refused by the same
    inspection as a local folder (rank_too_large), and never snapshotted."""
    bucket.put_adapter("lora/", "big-rank", write_adapter(tmp_path / "src", r=32))
    res, logger = resolver(bucket, drop, state)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert res.resolve_snapshot(BASE_MODEL, "big-rank") is None
    assert any("rank_too_large" in r.getMessage() for r in caplog.records)
    assert not (state / "snapshots" / "big-rank").exists()

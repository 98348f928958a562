"""The status API over a daemon with a source: `/v1/sources` and each adapter's `source`, from
the bucket through the sync, the drop directory and the intake (no vLLM needed)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from lorawarm.daemon import Daemon
from lorawarm.settings import load
from lorawarm.status import create_app
from tests.support.s3 import SECRET_KEY, Bucket
from tests.unit.adapters import write_adapter

pytestmark = pytest.mark.usefixtures("aws_env")


async def test_sources_route_and_adapter_source(
    bucket: Bucket, drop: Path, state: Path, tmp_path: Path
) -> None:
    """After one sync and one rescan, `/v1/sources` reports the source (no credentials) with
    its counts and `/metrics` its gauge and counters; the synced adapter's record names the
    source, a hand-dropped one says null."""
    bucket.put_adapter("lora/", "synced-one", write_adapter(tmp_path / "src", seed=1))
    write_adapter(drop / "by-hand", seed=2)
    url = f"s3://{bucket.name}/lora/"
    settings = load(
        cache_dir=drop, state_dir=state, sources=[url], vllm_urls=["http://127.0.0.1:9"]
    )
    daemon = Daemon(settings)
    try:
        assert daemon.sync is not None
        await daemon.sync.sync_once()
        await daemon.intake.rescan()
        app = create_app(daemon, sources=daemon.sync)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://status"
        ) as client:
            body = (await client.get("/v1/sources")).json()
            adapters = {a["name"]: a for a in (await client.get("/v1/adapters")).json()["adapters"]}
            metrics = (await client.get("/metrics")).text
    finally:
        await daemon.aclose()
    (source,) = body["sources"]
    assert source["url"] == url
    assert source["condition"] == "ok"
    assert (source["listed"], source["synced"], source["downloads"]) == (1, 1, 1)
    assert source["last_listing"] is not None
    assert SECRET_KEY not in str(body)
    assert adapters["synced-one"]["source"] == url
    assert adapters["by-hand"]["source"] is None
    assert f'lorawarm_source_up{{source="{url}"}} 1.0' in metrics
    assert f'lorawarm_source_listings_total{{source="{url}"}} 1.0' in metrics
    assert f'lorawarm_source_downloads_total{{source="{url}"}} 1.0' in metrics

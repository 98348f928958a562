"""Adapters from object storage end to end: a real S3 protocol server (moto) on loopback, the
real `lorawarm run` with LORAWARM_SOURCES, real vLLM CPU servers; a fleet of two replicas, each
with its own lorawarm, reading one bucket. One new vLLM start: the plugin replica (the other
replica is the suite's shared server)."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AdapterFactory
from tests.support.daemon_proc import LorawarmProcess, lora_models, wait_for
from tests.support.s3 import Bucket, MotoS3, credentials_env
from tests.support.vllm_server import VllmServer, completion, greedy_logprobs

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown"
_n = itertools.count()


@dataclass
class Replica:
    """One vLLM replica with its own drop and state directory (what a sidecar has)."""

    server: VllmServer
    drop: Path
    state: Path


@pytest.fixture(scope="module")
def fleet_bucket(moto: MotoS3) -> Bucket:
    return moto.bucket(f"fleet-{os.getpid()}")


@pytest.fixture(scope="module")
def plugin_replica(
    tiny_model: Path, moto: MotoS3, fleet_bucket: Bucket, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    """A vLLM with the lorawarm plugin reading the bucket on demand (no daemon yet)."""
    root = tmp_path_factory.mktemp("replica-b")
    drop, state = root / "drop", root / "state"
    drop.mkdir()
    server = VllmServer(
        tiny_model,
        plugins=["lorawarm"],
        extra_args=["--max-loras", "2", "--max-cpu-loras", "4"],
        env={
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
            "LORAWARM_CACHE_DIR": str(drop),
            "LORAWARM_STATE_DIR": str(state),
            "LORAWARM_SOURCES": f"s3://{fleet_bucket.name}/adapters/",
            "VLLM_LORA_RESOLVER_CACHE_DIR": None,
            **credentials_env(moto.endpoint),
        },
    )
    with server:
        yield Replica(server, drop, state)


def sidecar(
    replica_drop: Path, state: Path, url: str, moto: MotoS3, bucket: Bucket
) -> LorawarmProcess:
    return LorawarmProcess(
        replica_drop,
        state,
        [url],
        env={
            "LORAWARM_SOURCES": f"s3://{bucket.name}/adapters/",
            "LORAWARM_SOURCE_POLL_SECONDS": "1",
            **credentials_env(moto.endpoint),
        },
    )


def sources(proc: LorawarmProcess) -> dict[str, Any]:
    doc: dict[str, Any] = proc.get("/v1/sources").json()["sources"][0]
    return doc


def upload(bucket: Bucket, name: str, folder: Path) -> None:
    bucket.put_adapter("adapters/", name, folder)


def test_bucket_adapter_loads_changes_and_goes(
    tmp_path: Path, vllm: VllmServer, moto: MotoS3, adapters: AdapterFactory
) -> None:
    """Put -> loaded in vLLM (`source` says the bucket); overwrite the weights -> vLLM serves
    the new weights (the logprobs of the new weights under a fresh name); delete -> unloaded
    and the synced folder removed; a hand-dropped folder stays loaded throughout."""
    bucket = moto.bucket(f"single-{os.getpid()}-{next(_n)}")
    drop, state = tmp_path / "drop", tmp_path / "state"
    drop.mkdir()
    adapters.copy_to(drop / "s3-local", seed=2)
    with sidecar(drop, state, vllm.url, moto, bucket) as proc:
        upload(bucket, "s3-one", adapters.source(seed=1))
        doc = proc.wait_state("s3-one", "loaded")
        assert doc["source"] == f"s3://{bucket.name}/adapters/"
        assert proc.adapter("s3-local")["source"] is None
        old = greedy_logprobs(completion(vllm.url, "s3-one", PROMPT))

        bucket.put(
            "adapters/s3-one/adapter_model.safetensors",
            (adapters.source(seed=7) / "adapter_model.safetensors").read_bytes(),
        )
        wait_for(
            lambda: (
                (d := proc.adapter("s3-one"))
                and d["digest"] != doc["digest"]
                and d["state"] == "loaded"
            ),
            what="the new weights loaded",
        )
        new = greedy_logprobs(completion(vllm.url, "s3-one", PROMPT))
        upload(bucket, "s3-ref", adapters.source(seed=7))
        proc.wait_state("s3-ref", "loaded")
        reference = greedy_logprobs(completion(vllm.url, "s3-ref", PROMPT))
        assert new == pytest.approx(reference, abs=1e-3)
        assert new != pytest.approx(old, abs=1e-3)

        bucket.delete_adapter("adapters/", "s3-one")
        wait_for(
            lambda: proc.adapter("s3-one") is None and "s3-one" not in lora_models(vllm.url),
            what="s3-one unloaded",
        )
        assert not (drop / "s3-one").exists()
        assert proc.adapter("s3-local")["state"] == "loaded"
        assert (drop / "s3-local").is_dir()
        assert sources(proc)["condition"] == "ok"
        metrics = proc.get("/metrics").text
        assert f'lorawarm_source_up{{source="s3://{bucket.name}/adapters/"}} 1.0' in metrics
        assert "lorawarm_source_downloads_total" in metrics


def test_late_weights_and_truncated_objects_are_never_loaded_until_whole(
    tmp_path: Path, vllm: VllmServer, moto: MotoS3, adapters: AdapterFactory
) -> None:
    """A config uploaded before its weights is not published; a truncated weights object is
    refused by inspection (weights_truncated) and never reaches vLLM; both load once whole."""
    bucket = moto.bucket(f"partial-{os.getpid()}-{next(_n)}")
    drop, state = tmp_path / "drop", tmp_path / "state"
    drop.mkdir()
    src = adapters.source(seed=3)
    weights = (src / "adapter_model.safetensors").read_bytes()
    with sidecar(drop, state, vllm.url, moto, bucket) as proc:
        bucket.put(
            "adapters/s3-late/adapter_config.json", (src / "adapter_config.json").read_bytes()
        )
        upload(bucket, "s3-trunc", src)
        bucket.put("adapters/s3-trunc/adapter_model.safetensors", weights[: len(weights) // 2])
        wait_for(lambda: sources(proc)["waiting"] == 1, what="s3-late waiting")
        doc = proc.wait_state("s3-trunc", "invalid")
        assert doc["reason"] == "weights_truncated"
        assert proc.adapter("s3-late") is None
        assert "s3-trunc" not in lora_models(vllm.url)
        assert "s3-late" not in lora_models(vllm.url)
        bucket.put("adapters/s3-late/adapter_model.safetensors", weights)
        bucket.put("adapters/s3-trunc/adapter_model.safetensors", weights)
        proc.wait_state("s3-late", "loaded")
        proc.wait_state("s3-trunc", "loaded")


def test_plugin_serves_a_bucket_only_adapter_with_no_daemon(
    plugin_replica: Replica, fleet_bucket: Bucket, adapters: AdapterFactory
) -> None:
    """With no lorawarm running, a completion naming an adapter that exists only in the bucket
    returns 200: the plugin fetched it into the drop directory and vLLM loaded its snapshot."""
    upload(fleet_bucket, "s3-ondemand", adapters.source(seed=4))
    response = completion(plugin_replica.server.url, "s3-ondemand", PROMPT)
    assert response.status_code == 200, response.text
    root = lora_models(plugin_replica.server.url)["s3-ondemand"]
    assert root.startswith(str(plugin_replica.state))
    assert (plugin_replica.drop / "s3-ondemand" / "adapter_config.json").is_file()
    missing = completion(plugin_replica.server.url, "s3-nowhere", PROMPT)
    assert missing.status_code == 404


def test_fleet_of_two_replicas_converges_on_one_bucket(
    tmp_path: Path,
    vllm: VllmServer,
    plugin_replica: Replica,
    moto: MotoS3,
    fleet_bucket: Bucket,
    adapters: AdapterFactory,
) -> None:
    """Two vLLM replicas, each with its own lorawarm and directories, one bucket: publish,
    replace and delete converge on both; a lorawarm killed and restarted downloads nothing
    that did not change."""
    a_drop, a_state = tmp_path / "a-drop", tmp_path / "a-state"
    a_drop.mkdir()
    a = sidecar(a_drop, a_state, vllm.url, moto, fleet_bucket)
    b = sidecar(
        plugin_replica.drop, plugin_replica.state, plugin_replica.server.url, moto, fleet_bucket
    )
    replicas = [(a, vllm), (b, plugin_replica.server)]
    with a, b:
        upload(fleet_bucket, "fleet-one", adapters.source(seed=5))
        digests = {p.wait_state("fleet-one", "loaded")["digest"] for p, _ in replicas}
        assert len(digests) == 1
        for _, server in replicas:
            assert completion(server.url, "fleet-one", PROMPT).status_code == 200

        bucket_weights = (adapters.source(seed=6) / "adapter_model.safetensors").read_bytes()
        fleet_bucket.put("adapters/fleet-one/adapter_model.safetensors", bucket_weights)
        for proc, server in replicas:
            doc = wait_for(
                lambda p=proc: (
                    (d := p.adapter("fleet-one"))
                    and d["state"] == "loaded"
                    and d["digest"] not in digests
                    and d
                ),
                what="replaced on a replica",
            )
            assert lora_models(server.url)["fleet-one"] == doc["snapshot_path"]
        # The plugin's on-demand adapter is the sidecar's own: synced, not a conflict.
        assert b.adapter("s3-ondemand")["source"] == f"s3://{fleet_bucket.name}/adapters/"
        assert sources(b)["conflicts"] == []

        b.kill()
        b.start()
        b.wait_ready()
        wait_for(lambda: sources(b)["listings"] >= 2, what="two listings after the restart")
        assert sources(b)["downloads"] == 0
        assert b.wait_state("fleet-one", "loaded")["source"] is not None

        fleet_bucket.delete_adapter("adapters/", "fleet-one")
        for proc, server in replicas:
            wait_for(
                lambda p=proc, s=server: (
                    p.adapter("fleet-one") is None and "fleet-one" not in lora_models(s.url)
                ),
                what="deleted on a replica",
            )
        assert not (a_drop / "fleet-one").exists()
        assert not (plugin_replica.drop / "fleet-one").exists()
    shutil.rmtree(a_drop, ignore_errors=True)

"""The sync stage against a real S3 protocol server (moto) through boto3: publish, change,
removal, its guards, conflicts, restarts and faults."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from lorawarm.sources.sync import CONFIRM_FILE, SourceSync
from tests.support.s3 import Bucket, Fault, MotoS3, S3Proxy, credentials_env
from tests.unit.adapters import write_adapter

pytestmark = pytest.mark.usefixtures("aws_env")


def make_sync(bucket: Bucket, drop: Path, state: Path, prefix: str = "lora/") -> SourceSync:
    return SourceSync(
        [f"s3://{bucket.name}/{prefix}"],
        drop,
        state,
        CollectorRegistry(),
        poll_seconds=30,
        concurrency=2,
        timeout=2,
        max_bytes=10_000_000,
        max_backoff=0.01,
    )


def run_once(sync: SourceSync) -> None:
    """One listing-and-sync pass, as the daemon's loop runs it."""
    asyncio.run(sync.sync_once())


def again(sync: SourceSync) -> None:
    """The next pass, after the (10 ms) retry backoff of a failed download has passed."""
    time.sleep(0.05)
    asyncio.run(sync.sync_once())


def status(sync: SourceSync) -> dict[str, object]:
    return vars(sync.statuses()[0])


def put(bucket: Bucket, tmp_path: Path, name: str, seed: int = 0, prefix: str = "lora/") -> Path:
    folder = write_adapter(tmp_path / "src" / f"{name.replace('/', '_')}-{seed}", seed=seed)
    bucket.put_adapter(prefix, name, folder)
    return folder


def test_adapters_are_published_into_the_drop_dir(
    bucket: Bucket, drop: Path, state: Path, tmp_path: Path
) -> None:
    """`name/` and `org/name/` in the bucket become complete folders in the drop directory,
    with the bucket's bytes, and the source reports ok."""
    src = put(bucket, tmp_path, "alpha")
    put(bucket, tmp_path, "org/beta", seed=1)
    sync = make_sync(bucket, drop, state)
    run_once(sync)
    assert (drop / "alpha" / "adapter_model.safetensors").read_bytes() == (
        src / "adapter_model.safetensors"
    ).read_bytes()
    assert (drop / "org" / "beta" / "adapter_config.json").is_file()
    assert status(sync)["condition"] == "ok"
    assert status(sync)["synced"] == 2
    assert sync.source_of("org/beta") == f"s3://{bucket.name}/lora/"
    assert sorted(os.listdir(drop)) == [".lorawarm-sync", "alpha", "org"]
    assert os.listdir(drop / ".lorawarm-sync") == []


def test_unchanged_adapters_are_not_downloaded_again(
    bucket: Bucket, drop: Path, state: Path, tmp_path: Path, proxy: S3Proxy
) -> None:
    """A second pass, and a new sync on the same state (a restart), download nothing."""
    put(bucket, tmp_path, "alpha")
    run_once(make_sync(bucket, drop, state))
    gets = proxy.count("GET", "/alpha/")
    sync = make_sync(bucket, drop, state)
    run_once(sync)
    again(sync)
    assert proxy.count("GET", "/alpha/") == gets
    assert status(sync)["downloads"] == 0
    assert status(sync)["synced"] == 1


def test_a_changed_object_is_downloaded_and_swapped_in(
    bucket: Bucket, drop: Path, state: Path, tmp_path: Path
) -> None:
    """Overwriting the weights object replaces the folder's content; the folder never
    disappears (exchanged in one rename)."""
    put(bucket, tmp_path, "alpha", seed=0)
    sync = make_sync(bucket, drop, state)
    run_once(sync)
    new = put(bucket, tmp_path, "alpha", seed=5)
    again(sync)
    assert (drop / "alpha" / "adapter_model.safetensors").read_bytes() == (
        new / "adapter_model.safetensors"
    ).read_bytes()
    assert status(sync)["downloads"] == 2  # the first publish and the change


def test_deleted_adapter_is_removed_but_a_hand_dropped_folder_is_not(
    bucket: Bucket, drop: Path, state: Path, tmp_path: Path
) -> None:
    """Gone from the bucket -> the synced folder goes; a folder a user dropped, even one whose
    name the bucket also has (a conflict: the local one wins), stays untouched."""
    put(bucket, tmp_path, "alpha")
    put(bucket, tmp_path, "mine", seed=2)
    local = write_adapter(drop / "mine", seed=9)
    before = (local / "adapter_model.safetensors").read_bytes()
    write_adapter(drop / "handmade", seed=3)
    sync = make_sync(bucket, drop, state)
    run_once(sync)
    assert status(sync)["conflicts"] == ["mine"]
    assert (drop / "mine" / "adapter_model.safetensors").read_bytes() == before
    bucket.delete_adapter("lora/", "alpha")
    bucket.delete_adapter("lora/", "mine")
    again(sync)
    assert not (drop / "alpha").exists()
    assert (drop / "mine" / "adapter_model.safetensors").read_bytes() == before
    assert (drop / "handmade").is_dir()
    assert sync.source_of("mine") is None


def test_config_before_weights_waits_and_a_truncated_object_is_published_as_is(
    bucket: Bucket, drop: Path, state: Path, tmp_path: Path
) -> None:
    """A config uploaded without its weights is not published (`incomplete`); once the weights
    arrive it is."""
    folder = write_adapter(tmp_path / "src", seed=1)
    bucket.put("lora/late/adapter_config.json", (folder / "adapter_config.json").read_bytes())
    sync = make_sync(bucket, drop, state)
    run_once(sync)
    assert not (drop / "late").exists()
    assert status(sync)["waiting"] == 1
    assert "incomplete" in str(status(sync)["skipped"])
    bucket.put(
        "lora/late/adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()
    )
    again(sync)
    assert (drop / "late" / "adapter_model.safetensors").stat().st_size == (
        folder / "adapter_model.safetensors"
    ).stat().st_size


def test_mass_removal_is_held_until_confirmed(
    bucket: Bucket, drop: Path, state: Path, tmp_path: Path
) -> None:
    """Removing more than half of more than 10 synced adapters at once removes nothing until
    `<state>/sources/confirm-removal` exists."""
    folder = write_adapter(tmp_path / "src", seed=1)
    for i in range(12):
        bucket.put_adapter("lora/", f"a{i}", folder)
    sync = make_sync(bucket, drop, state)
    run_once(sync)
    for i in range(12):
        bucket.delete_adapter("lora/", f"a{i}")
    again(sync)
    assert len([n for n in os.listdir(drop) if not n.startswith(".")]) == 12
    assert status(sync)["condition"] == "removal_held"
    assert status(sync)["held_removals"] == 12
    (state / "sources" / CONFIRM_FILE).touch()
    again(sync)
    assert [n for n in os.listdir(drop) if not n.startswith(".")] == []
    assert status(sync)["condition"] == "ok"
    assert not (state / "sources" / CONFIRM_FILE).exists()


def test_wrong_credentials_then_right_ones(
    bucket: Bucket,
    drop: Path,
    state: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    proxy: S3Proxy,
) -> None:
    """A key the store does not know: `unauthorized`, nothing local removed, and the
    credential never appears in the status; with the right key it converges."""
    put(bucket, tmp_path, "alpha")
    sync = make_sync(bucket, drop, state)
    run_once(sync)
    proxy.access_key = "AKIDOTHER"
    again(sync)
    doc = status(sync)
    assert doc["condition"] == "unauthorized"
    assert "InvalidAccessKeyId" in str(doc["last_error"])
    assert credentials_env("x")["AWS_SECRET_ACCESS_KEY"] not in repr(doc)
    assert (drop / "alpha").is_dir()
    metrics = generate_latest(sync.metrics.registry).decode()
    assert f'lorawarm_source_up{{source="s3://{bucket.name}/lora/"}} 0.0' in metrics
    proxy.access_key = credentials_env("x")["AWS_ACCESS_KEY_ID"]
    again(sync)
    assert status(sync)["condition"] == "ok"


def test_missing_bucket_is_not_found(drop: Path, state: Path, tmp_path: Path) -> None:
    """A bucket that does not exist: `not_found`, nothing published or removed."""
    write_adapter(drop / "handmade")
    sync = SourceSync(
        ["s3://no-such-bucket-lorawarm/"],
        drop,
        state,
        CollectorRegistry(),
        poll_seconds=30,
        concurrency=1,
        timeout=2,
        max_bytes=10**7,
        max_backoff=0.01,
    )
    run_once(sync)
    assert status(sync)["condition"] == "not_found"
    assert (drop / "handmade").is_dir()


@pytest.mark.parametrize(
    ("fault", "condition"),
    [
        (Fault("status", count=20, key="adapter_model", status=503, code="SlowDown"), "throttled"),
        (
            Fault("status", count=20, key="adapter_model", status=500, code="InternalError"),
            "server_error",
        ),
        (Fault("reset", count=20, key="adapter_model"), "incomplete"),
        (Fault("slow", count=20, key="adapter_model", seconds=3), "timeout"),
    ],
    ids=["503-burst", "500-burst", "reset-mid-body", "slow-body"],
)
def test_download_faults_leave_nothing_half_visible_and_converge(
    fault: Fault,
    condition: str,
    bucket: Bucket,
    drop: Path,
    state: Path,
    tmp_path: Path,
    proxy: S3Proxy,
) -> None:
    """While downloads fail the condition shows, the drop directory has no partial folder and
    the previous content stays; when the fault ends the new content is published."""
    put(bucket, tmp_path, "alpha", seed=0)
    sync = make_sync(bucket, drop, state)
    run_once(sync)
    old = (drop / "alpha" / "adapter_model.safetensors").read_bytes()
    new = put(bucket, tmp_path, "alpha", seed=4)
    put(bucket, tmp_path, "fresh", seed=5)
    proxy.faults.append(fault)
    again(sync)
    doc = status(sync)
    assert doc["condition"] == condition, doc
    assert (drop / "alpha" / "adapter_model.safetensors").read_bytes() == old
    assert not (drop / "fresh").exists()
    assert os.listdir(drop / ".lorawarm-sync") == []
    proxy.clear()
    again(sync)
    assert (drop / "alpha" / "adapter_model.safetensors").read_bytes() == (
        new / "adapter_model.safetensors"
    ).read_bytes()
    assert (drop / "fresh").is_dir()
    assert status(sync)["condition"] == "ok"


def test_object_replaced_between_listing_and_download(
    bucket: Bucket, drop: Path, state: Path, tmp_path: Path, proxy: S3Proxy
) -> None:
    """An object overwritten after the listing is `changed` (the GET is conditional on the
    listed ETag): nothing mixed is published, and the next pass takes the new content."""
    put(bucket, tmp_path, "alpha", seed=0)
    newer = write_adapter(tmp_path / "newer", seed=7)
    proxy.faults.append(
        Fault(
            "before",
            count=1,
            key="alpha/adapter_model",
            before=lambda: bucket.put_adapter("lora/", "alpha", newer),
        )
    )
    sync = make_sync(bucket, drop, state)
    run_once(sync)
    assert status(sync)["condition"] == "changed"
    assert not (drop / "alpha").exists()
    again(sync)
    assert (drop / "alpha" / "adapter_model.safetensors").read_bytes() == (
        newer / "adapter_model.safetensors"
    ).read_bytes()


_DOWNLOAD_PEAK = """
import sys
from lorawarm.sources.bucket import download, list_source, make_client
from lorawarm.sources.location import parse_source
client = make_client(timeout=30, connections=1)
listing = list_source(client, parse_source(sys.argv[1]), max_bytes=1 << 30)
obj = listing.adapters["one"]["adapter_model.safetensors"]
assert download(client, parse_source(sys.argv[1]).bucket, obj, sys.argv[2]) == obj.size
# VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
"""


def test_memory_does_not_grow_with_the_object_size(
    bucket: Bucket, tmp_path: Path, moto: MotoS3
) -> None:
    """Downloading a 128 MB object peaks at about the memory of downloading an 8 MB one (the
    body is streamed to disk in 1 MiB chunks), measured as the peak RSS of a process that
    does nothing else."""
    import subprocess
    import sys

    env = {**os.environ, "AWS_ENDPOINT_URL_S3": moto.endpoint}  # past the buffering proxy
    peaks = {}
    for mb in (8, 128):
        bucket.put(f"m{mb}/one/adapter_config.json", b"{}")
        bucket.put(f"m{mb}/one/adapter_model.safetensors", os.urandom(1 << 20) * mb)
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _DOWNLOAD_PEAK,
                f"s3://{bucket.name}/m{mb}/",
                str(tmp_path / f"w{mb}"),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        peaks[mb] = int(done.stdout.split()[-1])  # KiB
        assert (tmp_path / f"w{mb}").stat().st_size == mb << 20
    assert peaks[128] - peaks[8] < 16 << 10, peaks


def test_hostile_keys_are_skipped_with_a_reason(
    bucket: Bucket, drop: Path, state: Path, tmp_path: Path
) -> None:
    """Keys that cannot be adapters (a name with a space or a dot-part, a file name with a space
    three levels deep, more than max_adapter_bytes) are never downloaded;
    each is reported with its reason and the valid neighbour is synced."""
    src = write_adapter(tmp_path / "src", seed=1)
    config = (src / "adapter_config.json").read_bytes()
    weights = (src / "adapter_model.safetensors").read_bytes()
    for name in ("bad name", "ok-name/.hidden", "a/b/c"):
        bucket.put(f"lora/{name}/adapter_config.json", config)
        bucket.put(f"lora/{name}/adapter_model.safetensors", weights)
    bucket.put("lora/spaced/adapter_config.json", config)
    bucket.put("lora/spaced/adapter_model.safetensors", weights)
    bucket.put("lora/spaced/evil name;rm", b"x")
    bucket.put("lora/huge/adapter_config.json", config)
    bucket.put("lora/huge/adapter_model.safetensors", b"\0" * 10_000_001)
    bucket.put_adapter("lora/", "fine", src)
    sync = make_sync(bucket, drop, state)
    run_once(sync)
    skipped = status(sync)["skipped"]
    assert isinstance(skipped, dict)
    assert skipped["bad name"].startswith("invalid_name")
    assert skipped["ok-name/.hidden"].startswith("invalid_name")
    assert skipped["spaced"].startswith("bad_key")
    assert skipped["huge"].startswith("too_large")
    assert sorted(n for n in os.listdir(drop) if not n.startswith(".")) == ["fine"]
    assert status(sync)["condition"] == "ok"

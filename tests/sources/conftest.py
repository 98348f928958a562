"""Fixtures of the source tests: one moto S3 server for the session, a fault proxy in front of
it per test, a bucket per test, and the standard-chain environment pointing at the proxy."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.s3 import Bucket, MotoS3, S3Proxy, credentials_env

_buckets = itertools.count()


@pytest.fixture
def proxy(moto: MotoS3) -> Iterator[S3Proxy]:
    with S3Proxy(moto.port).running() as running:
        yield running


@pytest.fixture
def bucket(moto: MotoS3) -> Bucket:
    return moto.bucket(f"adapters-{os.getpid()}-{next(_buckets)}")


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, proxy: S3Proxy) -> None:
    """The process's standard credential chain reaches the proxy with the right key."""
    for key in list(os.environ):
        if key.startswith(("AWS_", "LORAWARM_")):
            monkeypatch.delenv(key)
    for key, value in credentials_env(proxy.endpoint).items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    path = tmp_path / "drop"
    path.mkdir()
    return path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"

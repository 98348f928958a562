"""A real S3 protocol server on loopback (moto's `ThreadedMotoServer`), driven over HTTP by the
real boto3 client, and a thin proxy in front of it for the faults moto cannot make by itself:
wrong credentials (moto accepts any), 5xx bursts, slow bodies, connections reset mid-body, an
object replaced between the listing and the download."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.vllm_server import free_port

ACCESS_KEY = "AKIDLORAWARMTEST"
SECRET_KEY = "lorawarm-test-secret"


def credentials_env(endpoint: str, access_key: str = ACCESS_KEY) -> dict[str, str]:
    """The standard-chain variables a process needs to reach the test store."""
    return {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


class MotoS3:
    """moto's S3 server on a free loopback port; `client()` is a boto3 client for the test's
    own puts and deletes (straight to moto, past any proxy)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoS3:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def bucket(self, name: str) -> Bucket:
        client = self.client()
        client.create_bucket(Bucket=name)
        return Bucket(client, name)


@dataclass
class Bucket:
    client: Any
    name: str

    def put_adapter(
        self, prefix: str, name: str, folder: Path, *, weights_last: bool = True
    ) -> None:
        """Upload an adapter folder's files (the config first, the weights last)."""
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
        files.sort(key=lambda f: f.startswith("adapter_model") if weights_last else 0)
        for file in files:
            self.put(f"{prefix}{name}/{file}", (folder / file).read_bytes())

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def delete_adapter(self, prefix: str, name: str) -> None:
        for key in self.keys(f"{prefix}{name}/"):
            self.client.delete_object(Bucket=self.name, Key=key)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix
        )
        return [o["Key"] for page in pages for o in page.get("Contents", ())]


@dataclass
class Fault:
    """What the proxy does to requests matching `method` and `key` (a substring of the path):
    `status` answers an S3 error `count` times; `reset` sends the headers and half the body,
    then resets the connection; `slow` sleeps `seconds` after half the body; `trickle` sends
    the body 64 KiB at a time, `seconds` apart; `before` runs a callback before forwarding
    (e.g. replace the object)."""

    kind: str
    count: int = 1_000_000
    method: str = "GET"
    key: str = ""
    status: int = 503
    code: str = "SlowDown"
    seconds: float = 0.0
    before: Callable[[], None] | None = None
    hits: int = 0


@dataclass
class S3Proxy:
    """An HTTP proxy to moto on its own loopback port. Requests signed with an access key other
    than `access_key` get S3's 403 InvalidAccessKeyId, as S3 answers them."""

    upstream_port: int
    access_key: str = ACCESS_KEY
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    port: int = field(default_factory=free_port)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, method: str, key: str = "") -> int:
        return sum(1 for m, p in list(self.requests) if m == method and key in p)

    def clear(self) -> None:
        self.faults.clear()

    @contextlib.contextmanager
    def running(self) -> Iterator[S3Proxy]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                proxy.requests.append((self.command, self.path))
                auth = self.headers.get("Authorization", "")
                if f"Credential={proxy.access_key}/" not in auth:
                    return self._error(
                        403,
                        "InvalidAccessKeyId",
                        "The AWS Access Key Id you provided does not exist in our records.",
                    )
                fault = next(
                    (
                        f
                        for f in proxy.faults
                        if f.method == self.command and f.key in self.path and f.hits < f.count
                    ),
                    None,
                )
                if fault is not None:
                    fault.hits += 1
                    if fault.kind == "status":
                        return self._error(fault.status, fault.code, "injected by the test proxy")
                    if fault.before is not None:
                        fault.before()
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{proxy.upstream_port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault is not None and fault.kind == "slow":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    time.sleep(fault.seconds)
                if fault is not None and fault.kind == "reset":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.close_connection = True
                    return None
                if fault is not None and fault.kind == "slow":
                    self.wfile.write(data[len(data) // 2 :])
                    return None
                if fault is not None and fault.kind == "trickle":
                    with contextlib.suppress(OSError):
                        for at in range(0, len(data), 64 << 10):
                            self.wfile.write(data[at : at + (64 << 10)])
                            self.wfile.flush()
                            time.sleep(fault.seconds)
                    return None
                self.wfile.write(data)
                return None

            def _error(self, status: int, code: str, message: str) -> None:
                xml = (
                    '<?xml version="1.0" encoding="UTF-8"?>\n'
                    f"<Error><Code>{code}</Code><Message>{message}</Message>"
                    "<RequestId>lorawarmtest</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, name="s3-proxy", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

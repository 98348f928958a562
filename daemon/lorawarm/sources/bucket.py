"""The object store, through boto3: listings, streaming downloads, and what an error means.

Why boto3 (see the README, "Adapters from object storage"): botocore's credential chain is the
standard one (environment, shared config and profiles, SSO, web identity as on EKS, container
and instance metadata) and honours `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` by itself; it
validates the checksums S3 returns (`ChecksumMode`), and it is what moto's server, MinIO and
Ceph are tested with. It is blocking, so every call here runs in a thread
(`asyncio.to_thread`, bounded by the caller); a body is streamed to disk in 1 MiB chunks, so
memory does not grow with the size of an adapter.

Errors become one `SourceError(condition, message)`: `unauthorized`, `not_found`,
`unreachable`, `timeout`, `throttled`, `server_error`, `changed` (the object changed or vanished
since the listing), `incomplete` (fewer bytes than listed), `checksum_mismatch`, `error`.
Messages carry the store's error code and text, never a credential.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lorawarm.inspection import MAX_ENTRIES, WEIGHT_FILES
from lorawarm.names import is_name
from lorawarm.sources.location import SourceUrl

CONFIG_FILE = "adapter_config.json"
CHUNK = 1 << 20
# File names taken from a key: one plain component (no separators, no dot-files).
_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")


class SourceError(Exception):
    """A listing or a download failed; `condition` is a stable code, `message` for people."""

    def __init__(self, condition: str, message: str) -> None:
        super().__init__(f"{condition}: {message}")
        self.condition = condition
        self.message = message


@dataclass(frozen=True)
class ObjectInfo:
    """One object as listed: what a change is judged by (ETag and size)."""

    key: str
    size: int
    etag: str

    def token(self) -> dict[str, Any]:
        return {"etag": self.etag, "size": self.size}


@dataclass
class Listing:
    """A source's adapters: name -> file name -> object; `skipped`: names (or keys) that are
    not taken and why (a reason code and a message)."""

    adapters: dict[str, dict[str, ObjectInfo]] = field(default_factory=dict)
    skipped: dict[str, tuple[str, str]] = field(default_factory=dict)
    requests: int = 0
    keys: int = 0


def make_client(*, timeout: float, connections: int) -> Any:
    """An S3 client from the standard chain (credentials, region, endpoint), with bounded
    retries and timeouts. Imported here: the plugin loads boto3 only when sources are set."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=min(timeout, 10.0),
        read_timeout=timeout,
        max_pool_connections=max(connections, 1) + 2,
        user_agent_extra="lorawarm",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_supported",
    )
    return boto3.session.Session().client("s3", config=config)


def list_source(client: Any, source: SourceUrl, *, max_bytes: int, name: str = "") -> Listing:
    """Every adapter below `source` (or only `name`'s objects when given), judged from keys.

    An adapter is a folder `<name>/` or `<org>/<name>/` that holds `adapter_config.json`; its
    files are the objects directly in it. Taken only when its name passes the name rules, every
    file name is plain, there are at most as many files as inspection accepts, a weights file
    is there (a config uploaded before its weights waits), and the sizes fit `max_bytes`.
    """
    prefix = source.prefix + (name + "/" if name else "")
    folders: dict[str, dict[str, ObjectInfo]] = {}
    listing = Listing()
    for page in _pages(client, source.bucket, prefix, listing):
        for item in page.get("Contents", ()):
            key = str(item["Key"])
            listing.keys += 1
            rel = key[len(source.prefix) :]
            folder, _, file = rel.rpartition("/")
            if not folder or not file:
                continue  # an object at the prefix itself, or a folder marker
            entry = ObjectInfo(key, int(item["Size"]), str(item.get("ETag", "")).strip('"'))
            folders.setdefault(folder, {})[file] = entry
    adapters = {f for f, files in folders.items() if CONFIG_FILE in files and f.count("/") <= 1}
    for folder in sorted(adapters):
        top = folder.partition("/")[0]
        if "/" in folder and top in adapters:
            continue  # content of the adapter `top`, as the drop directory would judge it
        problem = _judge(folder, folders[folder], max_bytes)
        if problem is None:
            listing.adapters[folder] = folders[folder]
        else:
            listing.skipped[folder] = problem
    return listing


def _judge(name: str, files: dict[str, ObjectInfo], max_bytes: int) -> tuple[str, str] | None:
    shown = ascii(name)[:80]
    if not is_name(name):
        return ("invalid_name", f"{shown} is not an adapter name ('name' or 'org/name')")
    bad = [f for f in files if not _FILE.fullmatch(f)]
    if bad:
        return ("bad_key", f"{shown} holds an object named {ascii(bad[0])[:80]}, not a plain file")
    if len(files) > MAX_ENTRIES:
        return ("too_many_files", f"{shown} holds {len(files)} objects; at most {MAX_ENTRIES}")
    if not any(w in files for w in WEIGHT_FILES):
        return ("incomplete", f"{shown} has {CONFIG_FILE} but no weights yet")
    total = sum(o.size for o in files.values())
    if total > max_bytes:
        return ("too_large", f"{shown} is {total} bytes; at most {max_bytes} (max_adapter_bytes)")
    return None


def _pages(client: Any, bucket: str, prefix: str, listing: Listing) -> Iterator[dict[str, Any]]:
    token: str | None = None
    while True:
        args: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if token:
            args["ContinuationToken"] = token
        try:
            page: dict[str, Any] = client.list_objects_v2(**args)
        except Exception as err:  # noqa: BLE001 - every failure becomes a condition
            raise classify(err, listing=True) from None
        listing.requests += 1
        yield page
        if not page.get("IsTruncated"):
            return
        token = page.get("NextContinuationToken")
        if not token:
            raise SourceError("bad_response", "a truncated listing without a continuation token")


def download(
    client: Any,
    bucket: str,
    obj: ObjectInfo,
    dest: str,
    stopping: Callable[[], bool] | None = None,
) -> int:
    """Stream `obj` into the new file `dest`; the number of bytes written.

    The GET is conditional on the listed ETag (an object replaced since the listing is
    `changed`, never half old and half new); the size must be the listed one; the body's MD5
    must equal a plain (single-part, unencrypted) ETag, and botocore checks the store's
    flexible checksum (CRC32/SHA) where the object has one. `stopping` is asked after every
    chunk: a daemon asked to stop does not wait for a large download to finish.
    """
    try:
        response = client.get_object(
            Bucket=bucket, Key=obj.key, IfMatch=f'"{obj.etag}"', ChecksumMode="ENABLED"
        )
    except Exception as err:  # noqa: BLE001 - every failure becomes a condition
        raise classify(err) from None
    encrypted = "aws:kms" in str(response.get("ServerSideEncryption", "")) or response.get(
        "SSECustomerAlgorithm"
    )
    md5 = hashlib.md5(usedforsecurity=False) if _PLAIN_MD5.fullmatch(obj.etag) else None
    if encrypted:
        md5 = None
    written = 0
    body = response["Body"]
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                for chunk in body.iter_chunks(CHUNK):
                    if stopping is not None and stopping():
                        raise SourceError("stopped", "lorawarm is stopping")
                    written += len(chunk)
                    if written > obj.size:
                        raise SourceError(
                            "changed", f"{obj.key} is longer than the {obj.size} bytes listed"
                        )
                    if md5 is not None:
                        md5.update(chunk)
                    try:
                        out.write(chunk)
                    except OSError as err:  # the drop directory's disk, not the store
                        raise SourceError(
                            "local_error", f"writing {dest}: {err.strerror}"
                        ) from None
            except SourceError:
                raise
            except Exception as err:  # noqa: BLE001 - a stream cut short, a checksum
                raise classify(err) from None
            finally:
                body.close()
    except BaseException:
        os.unlink(dest)
        raise
    if written != obj.size:
        os.unlink(dest)
        raise SourceError("incomplete", f"{obj.key}: {written} of {obj.size} bytes arrived")
    if md5 is not None and md5.hexdigest() != obj.etag:
        os.unlink(dest)
        raise SourceError("checksum_mismatch", f"{obj.key}: MD5 differs from the ETag")
    return written


_UNAUTHORIZED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
}
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"}


def classify(err: BaseException, *, listing: bool = False) -> SourceError:
    """What a boto3/botocore exception means for a source."""
    from botocore import exceptions as bx

    if isinstance(err, SourceError):
        return err
    if isinstance(err, bx.ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        text = f"{code or status}: {str(error.get('Message', ''))[:300]}".rstrip(": ")
        if code in _UNAUTHORIZED or status in (401, 403):
            return SourceError("unauthorized", text)
        if code == "NoSuchBucket" or (listing and status == 404):
            return SourceError("not_found", text)
        if code in ("NoSuchKey", "PreconditionFailed") or status in (404, 412):
            return SourceError("changed", f"{text} (the object changed since the listing)")
        if code in _THROTTLED or status in (429, 503):
            return SourceError("throttled", text)
        if status >= 500:
            return SourceError("server_error", text)
        return SourceError("error", text)
    if isinstance(err, bx.NoCredentialsError | bx.PartialCredentialsError):
        return SourceError("unauthorized", f"no usable credentials in the standard chain: {err}")
    if isinstance(err, bx.ReadTimeoutError | bx.ConnectTimeoutError):
        return SourceError("timeout", str(err)[:300])
    if isinstance(err, bx.FlexibleChecksumError):
        return SourceError("checksum_mismatch", str(err)[:300])
    if isinstance(err, bx.IncompleteReadError | bx.ResponseStreamingError):
        return SourceError("incomplete", str(err)[:300])
    if isinstance(err, bx.EndpointConnectionError | bx.ConnectionError | bx.HTTPClientError):
        return SourceError("unreachable", str(err)[:300])
    if isinstance(err, OSError):
        return SourceError("unreachable", f"{type(err).__name__}: {err}"[:300])
    return SourceError("error", f"{type(err).__name__}: {err}"[:300])

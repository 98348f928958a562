"""A source URL: `s3://bucket/prefix/`. Only the bucket and the prefix are taken from it;
credentials never are (a URL carrying any is refused, so none can reach a log or the status)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# S3's bucket rules, loosened enough for S3-compatible stores (MinIO, Ceph allow underscores).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class SourceUrl:
    """Where adapters live: every `<prefix><name>/` (or `<prefix><org>/<name>/`) holding an
    `adapter_config.json` is one adapter."""

    bucket: str
    prefix: str  # "" or ends with "/"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def __str__(self) -> str:
        return self.url


def parse_source(text: str) -> SourceUrl:
    """`s3://bucket[/prefix/]` as a `SourceUrl`; `ValueError` saying why otherwise."""
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "s3":
        raise ValueError(f"{text!r} is not an s3:// URL such as s3://bucket/adapters/")
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        raise ValueError(
            "a source URL carries no credentials or endpoint; credentials come from the "
            "standard AWS chain, the endpoint from AWS_ENDPOINT_URL_S3"
        )
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"{bucket!r} is not a bucket name")
    if "//" in prefix or any(p in (".", "..") for p in prefix.split("/")):
        raise ValueError(f"prefix {prefix!r} has an empty, '.' or '..' part")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return SourceUrl(bucket, prefix)

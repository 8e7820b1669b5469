"""``s3://bucket/key`` URIs, parsed and checked: a value type the settings, the data roots and the
artifact store share (it imports nothing of the service)."""

from __future__ import annotations

import re
from dataclasses import dataclass

BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/key``; ``key`` has no leading or trailing slash ('' is the whole bucket)."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def split_s3_uri(uri: str) -> S3Location:
    """``s3://bucket/key`` -> S3Location; ValueError for anything else (the key is taken literally)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not BUCKET_PATTERN.fullmatch(bucket):
        raise ValueError(f"{uri!r}: {bucket!r} is not an S3 bucket name")
    if any(c in key for c in "\x00?#") or len(key) > 1024:
        raise ValueError(f"{uri!r}: an S3 key has no query, fragment or NUL and at most 1024 characters")
    return S3Location(bucket, key.strip("/"))

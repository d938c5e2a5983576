"""``s3://bucket/prefix`` URIs as values, so keys are built in one place and checked once.

Also ``redact_url``: endpoint URLs may carry ``user:password@`` and must never reach a log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

_SCHEME = "s3://"
# Rough S3 bucket rules: 3-63 chars of lowercase letters, digits, dots and hyphens,
# starting and ending with a letter or digit, no "..", not shaped like an IP address.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _bucket_problem(bucket: str) -> str | None:
    if not _BUCKET_RE.match(bucket):
        return (
            "a bucket name has 3-63 characters: lowercase letters, digits, dots and hyphens, "
            "starting and ending with a letter or digit"
        )
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "a bucket name cannot contain '..', '.-' or '-.'"
    if _IP_RE.match(bucket):
        return "a bucket name cannot look like an IP address"
    return None


def _key_problem(key: str) -> str | None:
    if _CONTROL_RE.search(key):
        return "the key prefix contains control characters"
    body = key[:-1] if key.endswith("/") else key
    if not body:
        return None
    for segment in body.split("/"):
        if segment == "":
            return "the key prefix has an empty path segment ('//' or a leading '/')"
        if segment in (".", ".."):
            return "the key prefix cannot contain '.' or '..' segments"
    return None


@dataclass(frozen=True)
class S3Uri:
    """A bucket and a key (prefix). A "directory" key ends in "/" or is empty."""

    bucket: str
    key: str = ""

    def __post_init__(self) -> None:
        problem = _bucket_problem(self.bucket) or _key_problem(self.key)
        if problem:
            raise ValueError(f"invalid S3 location s3://{self.bucket}/{self.key}: {problem}")

    @classmethod
    def parse(cls, text: str) -> S3Uri:
        """Parse ``s3://bucket[/prefix]``; raise ``ValueError`` saying what is wrong."""
        if not isinstance(text, str):
            raise ValueError(f"expected an s3:// URI string, got {type(text).__name__}")
        if not text.startswith(_SCHEME):
            raise ValueError(f"{text!r} is not an S3 URI: expected s3://bucket[/prefix]")
        rest = text[len(_SCHEME) :]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{text!r} has no bucket name: expected s3://bucket[/prefix]")
        problem = _bucket_problem(bucket)
        if problem:
            raise ValueError(f"{text!r} has an invalid bucket name {bucket!r}: {problem}")
        problem = _key_problem(key)
        if problem:
            raise ValueError(f"{text!r} is not a usable S3 location: {problem}")
        return cls(bucket, key)

    @property
    def is_dir(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def as_dir(self) -> S3Uri:
        """The same location as a "directory" prefix (trailing slash, or empty)."""
        if self.is_dir:
            return self
        return S3Uri(self.bucket, self.key + "/")

    def child(self, *parts: str) -> S3Uri:
        """Join key parts below this prefix; a trailing "/" on the last part makes a directory."""
        if not parts:
            return self
        for part in parts:
            if not part or part.startswith("/"):
                raise ValueError(f"invalid S3 key part {part!r}: empty or starts with '/'")
        joined = "/".join(p.rstrip("/") for p in parts[:-1]) if len(parts) > 1 else ""
        tail = parts[-1]
        key = self.as_dir().key + (joined + "/" if joined else "") + tail
        return S3Uri(self.bucket, key)

    @property
    def name(self) -> str:
        """Last path segment of the key (without a trailing slash)."""
        return self.key.rstrip("/").rpartition("/")[2]

    def __str__(self) -> str:
        return f"{_SCHEME}{self.bucket}/{self.key}"


def redact_url(url: str | None) -> str:
    """Drop ``user:password@`` from an endpoint URL so it can be logged."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        if "@" not in parts.netloc:
            return url
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    except ValueError:
        # Unparseable (e.g. a bad port): fall back to cutting anything before an "@".
        return re.sub(r"//[^/]*@", "//", url)

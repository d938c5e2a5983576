"""Fixtures for the S3 fault and chaos tests (a pytest plugin, registered in tests/conftest.py): the
tiny model and dataset in a bucket of the session's moto server, and a fault proxy in front of it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import boto3
import pytest

from loraresume_sandbox.s3_faults import S3FaultProxy
from tests.support.tiny_model import alpaca_rows, build_tiny_llama, write_jsonl


@pytest.fixture(scope="module")
def seeded_bucket(s3_server, tmp_path_factory) -> dict[str, str]:
    """A bucket holding the tiny base model (s3://B/models/tiny/) and dataset (s3://B/data/train.jsonl)."""
    root = tmp_path_factory.mktemp("chaos-seed")
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    for path in build_tiny_llama(root / "tiny").iterdir():
        client.upload_file(str(path), bucket, f"models/tiny/{path.name}")
    client.upload_file(str(write_jsonl(root / "train.jsonl", alpaca_rows(40))), bucket, "data/train.jsonl")
    return {"bucket": bucket, "model": f"s3://{bucket}/models/tiny/", "dataset": f"s3://{bucket}/data/train.jsonl"}


@pytest.fixture
def proxy(s3_server) -> Iterator[S3FaultProxy]:
    """A fault proxy (no faults until a test sets rates) in front of the session's moto server."""
    with S3FaultProxy(s3_server.endpoint, seed=1234) as running:
        yield running

"""Fixtures for trainer tests: a tiny offline base model and alpaca-style datasets."""

from __future__ import annotations

import uuid
from pathlib import Path

import boto3
import pytest

from tests.support.tiny_model import alpaca_rows, build_tiny_llama, write_jsonl
from tests.support.trainer_runs import job_config


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-base") / "model")


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", alpaca_rows(40))


@pytest.fixture(scope="session")
def alpaca_file_new(tmp_path_factory) -> Path:
    """Different rows: the 'new data' of the seed workflow."""
    return write_jsonl(tmp_path_factory.mktemp("data-new") / "new.jsonl", alpaca_rows(40, offset=500))


@pytest.fixture
def s3(s3_bucket):
    endpoint, bucket = s3_bucket
    return endpoint, bucket, boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def make_job(s3, tiny_base, alpaca_file, tmp_path):
    """Build a job config for a fresh storage prefix in the test's bucket."""
    endpoint, bucket, _ = s3

    def make(prefix: str | None = None, **overrides):
        prefix = prefix or f"jobs/{uuid.uuid4().hex[:8]}"
        work = tmp_path / prefix.replace("/", "_")
        config = job_config(
            work,
            endpoint=endpoint,
            storage_uri=f"s3://{bucket}/{prefix}/",
            base_model=str(tiny_base),
            dataset_file=str(alpaca_file),
            **overrides,
        )
        return config, work

    return make


def read_object(client, uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()

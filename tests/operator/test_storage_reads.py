"""What one full read of a job's storage costs (s3_view.read_storage), on moto: a never-launched job's
empty prefix is one listing; a job with checkpoints has only its newest complete manifest read, a
damaged newest falls back to the one before; progress.json and the adapter manifest are read beside
the listing when a pool is given, with the same result as read one after the other."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest

from loraresume_operator.defaults import OperatorDefaults, effective_spec
from loraresume_operator.s3_view import read_storage
from loraresume_operator.spec import LoraResumeSpec
from loraresume_trainer.checkpoint_store import MANIFEST_NAME, REQUIRED_CHECKPOINT_FILES, CheckpointStore
from loraresume_trainer.s3uri import S3Uri
from tests.support.specs import build_spec


class Counting:
    """An S3 client whose calls are counted by operation (and the threads they ran on)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls, self.threads = inner, Counter[str](), set[str]()
        self.lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self.lock:
            self.calls[name] += 1
            self.threads.add(threading.current_thread().name)

    def get_paginator(self, name: str) -> Any:
        paginator = self.inner.get_paginator(name)
        outer = self

        class Pages:
            def paginate(self, **kw: Any) -> Any:
                outer._count("list")
                return paginator.paginate(**kw)

        return Pages()

    def get_object(self, **kw: Any) -> Any:
        self._count(f"get {kw['Key'].split('/', 1)[1]}")
        return self.inner.get_object(**kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def job(s3_bucket: tuple[str, str]) -> tuple[LoraResumeSpec, Counting, CheckpointStore]:
    endpoint, bucket = s3_bucket
    raw = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")
    uri = f"s3://{bucket}/job/"
    spec = effective_spec(build_spec(storage={"uri": uri, "endpoint": endpoint}), OperatorDefaults(), uri)
    return spec, Counting(raw), CheckpointStore(raw, S3Uri.parse(f"s3://{bucket}/job/"))


def checkpoint(store: CheckpointStore, tmp_path: Path, step: int) -> None:
    d = tmp_path / f"ckpt-{step}"
    d.mkdir()
    for name in REQUIRED_CHECKPOINT_FILES:
        (d / name).write_text(f"{name} {step}")
    store.upload_checkpoint(d, step, {"fake": True})


def test_a_never_launched_job_with_an_empty_prefix_costs_one_listing(job):
    spec, client, _ = job
    view = read_storage(spec, client, maybe_empty=True)
    assert (view.checkpoint, view.progress, view.adapter_complete) == (None, None, False)
    assert client.calls == Counter({"list": 1})


def test_only_the_newest_complete_manifest_is_read(job, tmp_path):
    spec, client, store = job
    for step in (5, 10, 15):
        checkpoint(store, tmp_path, step)
    store.put_json("progress.json", {"step": 17, "attempt": 1})
    view = read_storage(spec, client, maybe_empty=True)  # not empty: the full read
    assert view.checkpoint is not None and view.checkpoint.step == 15 and view.progress == {"step": 17, "attempt": 1}
    manifests = [k for k in client.calls if k.startswith("get checkpoints/")]
    assert manifests == [f"get checkpoints/checkpoint-15/{MANIFEST_NAME}"]
    # a damaged newest manifest: the one before it
    key = store.checkpoint_uri(15).child(MANIFEST_NAME)
    store.client.put_object(Bucket=key.bucket, Key=key.key, Body=b"{not json")
    assert read_storage(spec, client).checkpoint.step == 10  # type: ignore[union-attr]


def test_the_parts_are_read_side_by_side_with_the_same_result(job, tmp_path):
    spec, client, store = job
    checkpoint(store, tmp_path, 5)
    store.put_json("progress.json", {"step": 6, "attempt": 1})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_text("weights")
    store.upload_adapter(adapter, {"fake": True})
    one_by_one = read_storage(spec, client)
    assert client.threads == {threading.current_thread().name}
    client.threads.clear()
    with ThreadPoolExecutor(2, thread_name_prefix="s3-reads") as pool:
        side_by_side = read_storage(spec, client, submit=pool.submit)
    assert side_by_side == one_by_one and side_by_side.adapter_complete
    assert any(name.startswith("s3-reads") for name in client.threads)

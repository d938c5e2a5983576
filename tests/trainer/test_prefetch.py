"""The start-up overlaps its downloads with the heavy imports, reads nothing twice, and changes no result.

A relaunch after a preemption in a fresh interpreter (the imports really run) and a fresh work dir
(a new node: nothing cached), with base model, dataset and checkpoints in S3 behind a proxy that
records every request: the downloads start (and here, with a tiny model, end) before the imports
are done, every object is fetched at most once, the checkpoint fetched ahead is the one resumed
from, and the adapter equals an uninterrupted run's, bitwise.
"""

from __future__ import annotations

import collections
import signal
from pathlib import Path

import boto3
import pytest

from loraresume_sandbox.s3_faults import RequestInfo
from tests.support.trainer_runs import Kill, run_attempt
from tests.trainer.test_s3_faults import trainer_job

pytestmark = pytest.mark.slow


def _job(seeded: dict[str, str], endpoint: str, prefix: str, work: Path) -> dict:
    config = trainer_job(seeded, endpoint, prefix, work)  # the tiny model and dataset from the seeded bucket
    config["training"].update(max_steps=16, save_steps=5)
    return config


def _adapter(endpoint: str, bucket: str, prefix: str) -> bytes:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return client.get_object(Bucket=bucket, Key=f"{prefix}/adapter/adapter_model.safetensors")["Body"].read()


def test_a_relaunch_downloads_while_importing_reads_nothing_twice_and_ends_bitwise_equal(
    proxy, s3_server, seeded_bucket, tmp_path, monkeypatch
):
    bucket = seeded_bucket["bucket"]
    baseline = run_attempt(_job(seeded_bucket, s3_server.endpoint, "whole", tmp_path / "a"), tmp_path / "a")
    assert baseline.exit_code == 0, baseline.stderr[-3000:]

    config = _job(seeded_bucket, proxy.endpoint, "resumed", tmp_path / "b")
    first = run_attempt(config, tmp_path / "b", kill=Kill(signal.SIGTERM, 6, after_durable=False))  # saves itself
    assert first.killed_with == "SIGTERM" and first.exit_code == 75, first.stderr[-3000:]
    stopped = first.of("preempted")[0]["durable_step"]

    gets: collections.Counter[str] = collections.Counter()  # object reads of the start-up
    training = []  # the first write (progress.json at the first logged step) ends the start-up

    def record(info: RequestInfo) -> None:
        if info.method == "PUT":
            training.append(info.key)
        elif info.method == "GET" and info.key and not training:
            gets[info.key] += 1

    remove = proxy.add_hook(record)
    monkeypatch.setenv("LORARESUME_TEST_TRAINER_LAUNCH", "spawn")  # a fresh interpreter: real imports
    config = {**config, "workDir": str(tmp_path / "new-node" / "work")}  # a new node: nothing cached
    second = run_attempt(config, tmp_path / "b", attempt=2, timeout=600)
    remove()
    assert second.exit_code == 0, second.stderr[-3000:]

    # Overlap: the downloads began, and with a tiny model ended, while the imports ran.
    (prefetch,) = second.of("prefetch")
    (prefetched,) = second.of("prefetch_done")
    phases = {e["phase"]: e for e in second.of("startup")}
    imports_done = phases["imports_done"]["seconds"]
    assert prefetch["seconds"] < prefetched["seconds"] < imports_done, (prefetch, prefetched, imports_done)
    assert imports_done > 2.0  # the imports really ran (a warm fork would have them done at once)
    assert set(prefetch["sources"]) == {seeded_bucket["model"], seeded_bucket["dataset"]}
    assert prefetch["checkpoint"].endswith(f"/resumed/checkpoints/checkpoint-{stopped}/")
    assert phases["checkpoint_verified"]["prefetched"] is True and phases["checkpoint_verified"]["step"] == stopped
    (start,) = second.of("start")
    assert (start["mode"], start["step"]) == ("exact", stopped)

    # Nothing read twice at start: every object (base model files, dataset, manifests, checkpoint files) once.
    assert training and gets
    twice = {key: n for key, n in gets.items() if n > 1}
    assert not twice, twice
    model_files = [k for k in gets if k.startswith("models/tiny/") and not k.endswith("_COMPLETE.json")]
    assert model_files and "data/train.jsonl" in gets
    assert f"resumed/checkpoints/checkpoint-{stopped}/optimizer.pt" in gets

    # The same result as the uninterrupted run.
    assert _adapter(s3_server.endpoint, bucket, "resumed") == _adapter(s3_server.endpoint, bucket, "whole")

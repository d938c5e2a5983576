"""What one full read of a job's storage costs (s3_view.read_storage), on moto: a never-launched job's
empty prefix is one listing; a job with checkpoints has only its newest complete manifest read, a
damaged newest falls back to the one before; progress.json and the adapter manifest are read beside
the listing when a pool is given, with the same result as read one after the other. An attempt that
exited 0 naming its durable checkpoint is counted on three reads side by side, without the listing."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest

from loraresume_operator.decide import counted_on_its_word, said_durable, said_stop, said_untrained
from loraresume_operator.defaults import OperatorDefaults, effective_spec
from loraresume_operator.observed import ObservedPod
from loraresume_operator.s3_view import LISTING_SECONDS, PROGRESS_SECONDS, DownloadSizes, read_said, read_storage
from loraresume_operator.spec import LoraResumeSpec, LoraResumeStatus
from loraresume_trainer.checkpoint_store import MANIFEST_NAME, REQUIRED_CHECKPOINT_FILES, CheckpointStore
from loraresume_trainer.s3uri import S3Uri
from tests.support.reconciler_harness import Cluster
from tests.support.specs import build_spec, resource


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


def adapter(store: CheckpointStore, tmp_path: Path) -> None:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_model.safetensors").write_text("weights")
    store.upload_adapter(d, {"fake": True})


def ended_pod(exit_code: int, termination: dict[str, Any] | None, name: str = "job-attempt-1") -> ObservedPod:
    return ObservedPod(
        name=name, phase="Succeeded" if exit_code == 0 else "Failed", exit_code=exit_code, termination=termination
    )


ATTEMPT_1 = LoraResumeStatus(attempt=1, pod_name="job-attempt-1")


@pytest.mark.parametrize(
    ("pod", "want"),
    [
        (None, None),
        (ObservedPod(name="job-attempt-1", phase="Running"), None),
        (ended_pod(0, {"outcome": "succeeded", "durable_step": 30}), 30),
        (ended_pod(0, {"outcome": "succeeded"}), None),  # no checkpoint named: the full read
        (ended_pod(0, None), None),
        (ended_pod(0, {"durable_step": "30"}), None),  # read as untrusted
        (ended_pod(0, {"durable_step": True}), None),
        (ended_pod(0, {"durable_step": 0}), None),
        (ended_pod(0, {"durable_step": -3}), None),
        (ended_pod(0, {"durable_step": 2**70}), None),
        (ended_pod(75, {"outcome": "preempted", "durable_step": 30}), 30),  # SIGTERM, checkpoint saved: said
        (ended_pod(1, {"outcome": "failed", "reason": "RuntimeError"}), None),  # a crash says none: listed
        (ended_pod(0, {"durable_step": 30}, name="job-attempt-0"), None),  # not the attempt's pod
    ],
)
def test_which_ends_are_read_without_the_listing(pod, want):
    assert said_durable(ATTEMPT_1, pod) == want


PREEMPTED_AT_23 = {"outcome": "preempted", "durable_step": 20, "step": 23}
UNTRAINED = {"outcome": "preempted", "reason": "SIGTERM before training started; nothing new to save", "trained": False}


@pytest.mark.parametrize(
    ("pod", "stop", "on_its_word"),
    [
        (ended_pod(75, PREEMPTED_AT_23), (23, 20), True),  # SIGTERM, checkpoint-20 durable, stopped at 23
        (ended_pod(75, {**PREEMPTED_AT_23, "step": 20}), (20, 20), True),  # saved where it stopped: none lost
        (ended_pod(75, {"outcome": "preempted", "durable_step": 20}), None, False),  # no stop step: read S3
        (ended_pod(75, {**PREEMPTED_AT_23, "step": 19}), None, False),  # stopped before its durable one: untrue
        (ended_pod(75, {**PREEMPTED_AT_23, "step": "23"}), None, False),  # read as untrusted
        (ended_pod(75, {**PREEMPTED_AT_23, "step": True}), None, False),
        (ended_pod(75, {**PREEMPTED_AT_23, "step": 2**70}), None, False),
        (ended_pod(0, {"outcome": "succeeded", "durable_step": 30, "step": 30}), (30, 30), False),  # the adapter
        (ended_pod(1, {**PREEMPTED_AT_23, "outcome": "failed"}), (23, 20), False),  # a failure: backoff, read
        (ended_pod(75, PREEMPTED_AT_23, name="job-attempt-0"), None, False),  # not the attempt's pod
        (ObservedPod(name="job-attempt-1", phase="Running"), None, False),
        (None, None, False),
        # SIGTERM while loading: it trained nothing, so nothing new is durable, whatever it found as it started
        (ended_pod(75, UNTRAINED), None, True),
        (ended_pod(75, {**UNTRAINED, "durable_step": 20}), None, True),
        (ended_pod(75, {**UNTRAINED, "trained": "false"}), None, False),  # read as untrusted
        (ended_pod(75, {**UNTRAINED, "trained": 0}), None, False),
        (ended_pod(75, {**UNTRAINED, "trained": True}), None, False),  # it trained, said no stop step: read S3
        (ended_pod(1, {**UNTRAINED, "outcome": "failed"}), None, False),  # a failure: backoff, read
        (ended_pod(75, UNTRAINED, name="job-attempt-0"), None, False),  # not the attempt's pod
    ],
)
def test_which_ends_are_counted_on_the_trainers_word(pod, stop, on_its_word):
    """decide.counted_on_its_word: a preemption whose trainer said where it stopped and what is durable, or
    that it stopped before it trained, is counted and relaunched without reading S3; anything else reads it
    (read_said or the full read)."""
    assert said_stop(ATTEMPT_1, pod) == stop
    assert counted_on_its_word(ATTEMPT_1, pod) is on_its_word


def test_a_finished_attempt_costs_three_reads_side_by_side_and_no_listing(job, tmp_path):
    spec, client, store = job
    for step in (10, 20, 30):
        checkpoint(store, tmp_path, step)
    adapter(store, tmp_path)
    store.put_json("progress.json", {"step": 30, "attempt": 1, "durable_step": 30})
    with ThreadPoolExecutor(3, thread_name_prefix="s3-reads") as pool:
        view = read_said(spec, client, 30, adapter_needed=True, submit=pool.submit)
    assert view is not None and view.adapter_complete and view.checkpoint is not None
    assert view.checkpoint.step == 30 and view.progress == {"step": 30, "attempt": 1, "durable_step": 30}
    assert view == read_storage(spec, Counting(store.client))  # what the full read says
    assert client.calls == Counter(
        {f"get checkpoints/checkpoint-30/{MANIFEST_NAME}": 1, "get progress.json": 1, f"get adapter/{MANIFEST_NAME}": 1}
    )


@pytest.mark.parametrize("missing", ["adapter", "manifest", "damaged"])
def test_a_finished_attempt_falls_back_to_the_full_read(job, tmp_path, missing):
    spec, client, store = job
    checkpoint(store, tmp_path, 10)
    if missing != "adapter":
        adapter(store, tmp_path)
    if missing == "damaged":
        checkpoint(store, tmp_path, 30)
        key = store.checkpoint_uri(30).child(MANIFEST_NAME)
        store.client.put_object(Bucket=key.bucket, Key=key.key, Body=b"{not json")
    assert read_said(spec, client, 30, adapter_needed=True) is None
    assert "list" not in client.calls


def test_a_success_is_counted_on_the_finished_read(job, tmp_path):
    """The Reconciler: an attempt's pod exited 0 naming checkpoint-30 durable: Succeeded, that checkpoint
    recorded (what resume.extendFrom reads), and no listing for it."""
    spec, client, store = job
    cluster = Cluster(resource(spec.model_dump(by_alias=True, mode="json", exclude_none=True)))
    cluster.reconciler.s3_factory = lambda *_: client
    cluster.reconcile()  # launched
    assert cluster.status["podName"] == "job-attempt-1"
    for step in (10, 20, 30):
        checkpoint(store, tmp_path, step)
    adapter(store, tmp_path)
    store.put_json("progress.json", {"step": 30, "max_steps": 30, "attempt": 1, "durable_step": 30, "loss": 0.5})
    cluster.core.pods["job-attempt-1"]["status"] = {
        "phase": "Succeeded",
        "containerStatuses": [
            {
                "name": "trainer",
                "state": {"terminated": {"exitCode": 0, "message": '{"outcome":"succeeded","durable_step":30}'}},
            }
        ],
    }
    client.calls.clear()
    cluster.reconcile()
    assert cluster.status["phase"] == "Succeeded"
    assert cluster.status["latestCheckpoint"]["step"] == 30 and cluster.status["step"] == 30
    assert "list" not in client.calls


def preempted_after_checkpoint_20(
    job: tuple[LoraResumeSpec, Counting, CheckpointStore], tmp_path: Path, progress: dict[str, Any], said: str
) -> tuple[Cluster, Counting]:
    """A launched job with checkpoints 10 and 20 and `progress` in S3, whose attempt-1 pod then ended with exit
    75 and the termination message `said`, reconciled once after its S3 request counts were cleared."""
    spec, client, store = job
    doc = spec.model_dump(by_alias=True, mode="json", exclude_none=True)
    doc["dataset"]["source"] = str(store.root.child("data.jsonl"))  # sized at the launch: it exists here
    store.client.put_object(Bucket=store.root.bucket, Key=store.root.child("data.jsonl").key, Body=b"{}\n")
    cluster = Cluster(resource(doc))
    cluster.reconciler.s3_factory = lambda *_: client
    cluster.reconcile()
    for step in (10, 20):
        checkpoint(store, tmp_path, step)
    store.put_json("progress.json", progress)
    cluster.core.pods["job-attempt-1"]["status"] = {
        "phase": "Failed",
        "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 75, "message": said}}}],
    }
    client.calls.clear()
    cluster.reconcile()
    return cluster, client


def test_a_preemption_said_durable_is_relaunched_from_that_checkpoint_without_a_listing(job, tmp_path):
    """SIGTERM: the trainer saved checkpoint-20 and said so; the relaunch resumes from it, the steps
    after it counted as lost, and no listing is read for it (the adapter is not needed)."""
    progress = {"step": 23, "max_steps": 30, "attempt": 1, "durable_step": 20}
    said = '{"outcome":"preempted","durable_step":20}'
    cluster, client = preempted_after_checkpoint_20(job, tmp_path, progress, said)
    assert (cluster.status["attempt"], cluster.status["preemptions"], cluster.status["lostSteps"]) == (2, 1, 3)
    assert cluster.status["latestCheckpoint"]["step"] == 20
    created = cluster.core.created[-1]
    assert "checkpoint-20" in str(created)  # resume_from
    assert "list" not in client.calls


@pytest.mark.parametrize("found", [None, 20])
def test_a_preemption_before_training_is_relaunched_from_the_recorded_checkpoint_without_a_read(job, tmp_path, found):
    """SIGTERM while the trainer loaded (a pool reclaimed before its trainers trained): it said it trained
    nothing, with or without the checkpoint it found durable as it started. The end is counted on that word
    (a preemption, no step lost) and the relaunch resumes from the checkpoint the status records, with no S3
    request at all: at a reclaim the store is busiest with the other trainers' last uploads."""
    spec, client, store = job
    doc = spec.model_dump(by_alias=True, mode="json", exclude_none=True)
    doc["dataset"]["source"] = str(store.root.child("data.jsonl"))
    store.client.put_object(Bucket=store.root.bucket, Key=store.root.child("data.jsonl").key, Body=b"{}\n")
    for step in (10, 20):  # an earlier run's, found by the launch's read
        checkpoint(store, tmp_path, step)
    cluster = Cluster(resource(doc))
    cluster.reconciler.s3_factory = lambda *_: client
    cluster.reconcile()
    assert cluster.status["podName"] == "job-attempt-1" and cluster.status["latestCheckpoint"]["step"] == 20
    said = {**UNTRAINED, **({"durable_step": found} if found else {})}
    pod = cluster.core.pods["job-attempt-1"]
    pod["status"] = {
        "phase": "Failed",
        "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"exitCode": 75, "message": json.dumps(said)}}}
        ],
    }
    client.calls.clear()
    cluster.reconcile()
    assert (cluster.status["attempt"], cluster.status["preemptions"], cluster.status["lostSteps"]) == (2, 1, 0)
    assert cluster.status["latestCheckpoint"]["step"] == 20
    assert "checkpoint-20" in str(cluster.core.created[-1])  # resume_from
    assert not client.calls


def test_a_running_jobs_newer_checkpoint_is_taken_on_progress_json_and_listed_when_due(job, tmp_path):
    """While its pod runs, progress.json naming a newer durable checkpoint updates latestCheckpoint on that
    word (the trainer writes it once the upload has landed) with no listing; the listing follows when
    LISTING_SECONDS are up and corrects what the word got wrong (here: a checkpoint without its manifest)."""
    spec, client, store = job
    doc = spec.model_dump(by_alias=True, mode="json", exclude_none=True)
    doc["dataset"]["source"] = str(store.root.child("data.jsonl"))
    store.client.put_object(Bucket=store.root.bucket, Key=store.root.child("data.jsonl").key, Body=b"{}\n")
    cluster = Cluster(resource(doc))
    cluster.reconciler.s3_factory = lambda *_: client
    clock = [1000.0]
    cluster.reconciler.monotonic = lambda: clock[0]
    cluster.reconcile()  # launched: the full read
    cluster.core.pods["job-attempt-1"]["status"] = {"phase": "Running"}
    cluster.reconcile()
    for step in (10, 20):
        checkpoint(store, tmp_path, step)
    store.put_json("progress.json", {"step": 21, "max_steps": 30, "attempt": 1, "durable_step": 20})
    client.calls.clear()
    clock[0] += PROGRESS_SECONDS
    cluster.reconcile()
    assert client.calls == Counter({"get progress.json": 1})
    assert cluster.status["latestCheckpoint"]["step"] == 20 and cluster.status["step"] == 21

    store.put_json("progress.json", {"step": 31, "max_steps": 40, "attempt": 1, "durable_step": 30})  # no manifest
    client.calls.clear()
    clock[0] += PROGRESS_SECONDS
    cluster.reconcile()
    assert "list" not in client.calls and cluster.status["latestCheckpoint"]["step"] == 30  # its word, for now
    clock[0] += LISTING_SECONDS
    cluster.reconcile()
    assert client.calls["list"] == 1 and cluster.status["latestCheckpoint"]["step"] == 20  # the listing says


def test_said_untrained_reads_only_a_preemption_of_the_attempts_ended_pod():
    running = ObservedPod(name="job-attempt-1", phase="Running", termination=UNTRAINED)
    assert not said_untrained(ATTEMPT_1, running)
    assert said_untrained(ATTEMPT_1, ended_pod(75, UNTRAINED))
    assert not said_untrained(ATTEMPT_1, ended_pod(75, {**UNTRAINED, "trained": None}))


def test_a_burst_of_launches_sizes_a_shared_input_once_per_client(job, tmp_path):
    """DownloadSizes: launches asking for the same base model at once list it once (the others wait for
    that answer); another client (other credentials) measures for itself; a failed measurement is not
    remembered."""
    _, client, store = job
    checkpoint(store, tmp_path, 10)
    uri = str(store.checkpoint_uri(10))
    sizes = DownloadSizes()
    start = threading.Barrier(16)

    def launch(_: int) -> int:
        start.wait()
        return sizes.bytes_at(client, uri, 0.0)

    with ThreadPoolExecutor(16) as pool:
        answers = set(pool.map(launch, range(16)))
    assert len(answers) == 1 and answers.pop() > 0
    assert client.calls["list"] == 1
    other = Counting(client.inner)
    assert sizes.bytes_at(other, uri, 1.0) > 0 and other.calls["list"] == 1
    assert sizes.bytes_at(client, uri, 700.0) > 0 and client.calls["list"] == 2  # past its ttl: measured again

    class Refused(Exception):
        pass

    broken = Counting(client.inner)
    broken.get_paginator = lambda name: (_ for _ in ()).throw(Refused())  # type: ignore[method-assign]
    with pytest.raises(Refused):
        sizes.bytes_at(broken, uri, 0.0)
    assert sizes.bytes_at(other, uri, 2.0) > 0 and other.calls["list"] == 1
    broken.get_paginator = other.get_paginator  # type: ignore[method-assign]
    assert sizes.bytes_at(broken, uri, 3.0) > 0  # the failure was not remembered


def test_a_preemption_the_trainer_said_is_relaunched_without_reading_s3(job, tmp_path):
    """A pool reclaimed: the trainer stopped at step 23 on SIGTERM with checkpoint-20 durable and said both.
    The end is counted (3 steps lost, as it said) and the relaunch created from checkpoint-20 with no S3
    request at all; the next reconcile of the running replacement lists the storage (the confirmation)."""
    stale = {"step": 17, "max_steps": 30, "attempt": 1, "durable_step": 10}
    said = '{"outcome":"preempted","durable_step":20,"step":23}'
    cluster, client = preempted_after_checkpoint_20(job, tmp_path, stale, said)
    assert (cluster.status["attempt"], cluster.status["preemptions"], cluster.status["lostSteps"]) == (2, 1, 3)
    assert cluster.status["latestCheckpoint"]["step"] == 20
    assert "checkpoint-20" in str(cluster.core.created[-1])  # resume_from
    assert client.calls == Counter()  # not one S3 request
    cluster.core.pods["job-attempt-2"]["status"] = {"phase": "Running"}
    cluster.reconcile()  # the launch's listing is recent: the said checkpoint stands for now
    assert client.calls["list"] == 0
    cluster.reconciler.views.listing_seconds = 0.0  # the listing is due
    cluster.reconcile()
    assert client.calls["list"] == 1 and cluster.status["latestCheckpoint"]["step"] == 20


def test_a_relaunch_that_waited_for_a_gpu_still_confirms_the_said_checkpoint(job, tmp_path):
    """The relaunch counted on the trainer's word waits Pending (no GPU free) past the listing interval: a
    pending pod reads nothing, but the wait does not stand for the confirming listing: it is read once the
    pod runs."""
    stale = {"step": 17, "max_steps": 30, "attempt": 1, "durable_step": 10}
    said = '{"outcome":"preempted","durable_step":20,"step":23}'
    cluster, client = preempted_after_checkpoint_20(job, tmp_path, stale, said)
    assert client.calls == Counter()
    clock = [time.monotonic()]
    cluster.reconciler.monotonic = lambda: clock[0]  # type: ignore[method-assign]
    cluster.core.pods["job-attempt-2"]["status"] = {"phase": "Pending"}
    for _ in range(3):
        clock[0] += cluster.reconciler.views.listing_seconds
        cluster.reconcile()
    assert client.calls == Counter()  # pending: nothing read
    cluster.core.pods["job-attempt-2"]["status"] = {"phase": "Running"}
    cluster.reconcile()
    assert client.calls["list"] == 1 and cluster.status["latestCheckpoint"]["step"] == 20


def test_the_operators_s3_requests_are_counted_by_operation(s3_bucket, tmp_path):
    """loraresume_s3_requests_total: every HTTP request the operator's own client sends, by operation."""
    from prometheus_client import REGISTRY

    from loraresume_operator.s3_view import s3_client

    def sent(operation: str) -> float:
        return REGISTRY.get_sample_value("loraresume_s3_requests_total", {"operation": operation}) or 0.0

    endpoint, bucket = s3_bucket
    client = s3_client(endpoint, "us-east-1", None)
    uri = f"s3://{bucket}/counted/"
    spec = effective_spec(build_spec(storage={"uri": uri, "endpoint": endpoint}), OperatorDefaults(), uri)
    before = {op: sent(op) for op in ("ListObjectsV2", "GetObject")}
    read_storage(spec, client, maybe_empty=True)  # a never-launched job's empty prefix: one listing
    assert {op: sent(op) - before[op] for op in before} == {"ListObjectsV2": 1, "GetObject": 0}
    store = CheckpointStore(client, S3Uri.parse(uri))
    checkpoint(store, tmp_path, 5)
    store.put_json("progress.json", {"step": 6})
    before = {op: sent(op) for op in ("ListObjectsV2", "GetObject")}
    assert read_storage(spec, client).checkpoint.step == 5  # type: ignore[union-attr]
    # the listing, the newest manifest, progress.json, the adapter manifest (missing: a 404 is a request too)
    assert {op: sent(op) - before[op] for op in before} == {"ListObjectsV2": 1, "GetObject": 3}

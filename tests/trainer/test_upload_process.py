"""A checkpoint published from a child process (upload_process.ChildPublisher), on moto over HTTP: the same
objects and manifest as the store's own upload, errors carried back (permanent or not, no foreign
message), a child that ended is started again, and a child never outlives the training process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loraresume_trainer.checkpoint_store import CheckpointStore
from loraresume_trainer.s3client import make_s3_client
from loraresume_trainer.s3uri import S3Uri
from loraresume_trainer.upload_process import ChildPublisher, UploadProcessError
from loraresume_trainer.uploader import BackgroundUploader

FP = {"base_model": "tiny", "dataset": "d"}


def checkpoint_dir(tmp_path: Path, step: int) -> Path:
    d = tmp_path / f"checkpoint-{step}"
    (d / "sub").mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(os.urandom(70_000) + bytes([step]))
    (d / "optimizer.pt").write_bytes(b"o" * 1000)
    (d / "sub" / "x.json").write_text('{"a": 1}')
    return d


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def test_a_checkpoint_published_by_the_child_is_the_stores_own(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    client = make_s3_client(endpoint, "us-east-1")
    here = CheckpointStore(client, S3Uri.parse(f"s3://{bucket}/here/"))
    there = CheckpointStore(client, S3Uri.parse(f"s3://{bucket}/there/"))
    publisher = ChildPublisher(endpoint, "us-east-1", there.root)
    try:
        assert publisher.pid != os.getpid()
        source = checkpoint_dir(tmp_path, 7)
        by_child = publisher.upload_checkpoint(source, 7, FP)
        by_store = here.upload_checkpoint(source, 7, FP)
        assert by_child.files == by_store.files and by_child.step == 7
        assert there.read_manifest(7) == by_child
        restored = there.download_checkpoint(7, by_child, tmp_path / "restored")
        for name in ("adapter_model.safetensors", "optimizer.pt", "sub/x.json"):
            assert (restored / name).read_bytes() == (source / name).read_bytes()
    finally:
        publisher.close()
    assert publisher.pid is None


def test_errors_come_back_with_their_kind_and_a_killed_child_is_started_again(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    missing = ChildPublisher(endpoint, "us-east-1", S3Uri.parse(f"s3://no-such-bucket-{bucket}/job/"))
    try:
        with pytest.raises(UploadProcessError) as caught:
            missing.upload_checkpoint(checkpoint_dir(tmp_path, 1), 1, FP)
        # the store's own error, permanent as it was in the child (a missing bucket is no transient fault)
        assert str(caught.value).startswith("StorageAuthError: S3 bucket does not exist")
        assert caught.value.permanent
    finally:
        missing.close()

    publisher = ChildPublisher(endpoint, "us-east-1", S3Uri.parse(f"s3://{bucket}/job/"))
    try:
        first = publisher.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert wait_gone(first, 10)
        manifest = publisher.upload_checkpoint(checkpoint_dir(tmp_path, 2), 2, FP)  # a new child
        assert manifest.step == 2 and publisher.pid not in (None, first)
    finally:
        publisher.close()


def test_the_child_ignores_sigterm_and_the_uploader_drives_it(s3_bucket, tmp_path):
    """SIGTERM is the trainer's to handle (it waits for the last upload): the child goes on. The
    BackgroundUploader publishes through it and closes it."""
    endpoint, bucket = s3_bucket
    store = CheckpointStore(make_s3_client(endpoint, "us-east-1"), S3Uri.parse(f"s3://{bucket}/job/"))
    publisher = ChildPublisher(endpoint, "us-east-1", store.root)
    child = publisher.pid
    assert child is not None
    time.sleep(1.0)  # its handlers are set once it runs
    os.kill(child, signal.SIGTERM)
    uploader = BackgroundUploader(store, keep=2, fingerprint=FP, staging_dir=tmp_path / "staging", publisher=publisher)
    uploader.submit_checkpoint(checkpoint_dir(tmp_path, 3), 3)
    assert uploader.close(timeout=60)
    assert uploader.durable_step == 3 and uploader.errors == []
    assert publisher.pid is None and wait_gone(child, 10)
    assert store.read_manifest(3) is not None


def test_the_child_dies_with_the_training_process(s3_bucket, tmp_path):
    """A trainer that ends abruptly (SIGKILL, os._exit after a preemption) takes its publisher with it: no
    upload of an ended attempt goes on beside the next attempt's."""
    endpoint, bucket = s3_bucket
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from loraresume_trainer.s3uri import S3Uri
        from loraresume_trainer.upload_process import ChildPublisher
        if __name__ == "__main__":
            p = ChildPublisher({endpoint!r}, "us-east-1", S3Uri.parse("s3://{bucket}/job/"))
            print(p.pid, flush=True)
            time.sleep(1.0)
            if sys.argv[1] == "exit":
                os._exit(75)
            time.sleep(60)
        """
    )
    path = tmp_path / "trainer.py"
    path.write_text(script)
    for how in ("exit", "kill"):
        trainer = subprocess.Popen([sys.executable, str(path), how], stdout=subprocess.PIPE, text=True)
        assert trainer.stdout is not None
        child = int(trainer.stdout.readline())
        assert alive(child)
        if how == "kill":
            trainer.kill()
        trainer.wait(30)
        assert wait_gone(child, 10), f"the publisher outlived its trainer ({how})"


def test_closing_with_an_upload_in_flight_abandons_it_without_a_manifest(s3_bucket, tmp_path):
    """An uploader closed with a timeout that runs out mid-upload: close() does not wait for the upload; the
    child is killed, and the checkpoint has no manifest (readers never see it)."""
    endpoint, bucket = s3_bucket
    store = CheckpointStore(make_s3_client(endpoint, "us-east-1"), S3Uri.parse(f"s3://{bucket}/job/"))
    publisher = ChildPublisher(endpoint, "us-east-1", store.root)
    child = publisher.pid
    assert child is not None
    os.kill(child, signal.SIGSTOP)  # the upload cannot progress: in flight for as long as the test wants
    uploader = BackgroundUploader(
        store, keep=2, fingerprint=FP, staging_dir=tmp_path / "staging", publisher=publisher, max_attempts=1
    )
    uploader.submit_checkpoint(checkpoint_dir(tmp_path, 4), 4)
    started = time.monotonic()
    assert uploader.close(timeout=1.0) is False
    assert time.monotonic() - started < 5
    assert wait_gone(child, 10)
    assert store.read_manifest(4) is None

"""The background uploader: training never waits, snapshots survive HF's rotation, failures are bounded."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from loraresume_trainer.checkpoint_store import CheckpointStore
from loraresume_trainer.errors import StorageAuthError, StorageError
from loraresume_trainer.manifest import FileEntry, Manifest
from loraresume_trainer.s3client import make_s3_client
from loraresume_trainer.s3uri import S3Uri
from loraresume_trainer.uploader import BackgroundUploader

FP = {"base_model": "tiny", "dataset": "d"}


def make_dir(parent: Path, name: str, files: dict[str, bytes]) -> Path:
    path = parent / name
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


class SlowStore(CheckpointStore):
    """A real store whose checkpoint uploads take a while, like a big optimizer state would."""

    delay = 0.4

    def upload_checkpoint(self, local_dir: Path, step: int, fingerprint: dict[str, Any]) -> Manifest:
        time.sleep(self.delay)
        return super().upload_checkpoint(local_dir, step, fingerprint)


class FakeStore:
    """Records what the uploader asks for; can block or fail on demand."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.fail_with: Exception | None = None
        self.uploads: list[int] = []
        self.retention: list[tuple[int, frozenset[int]]] = []
        self.json: list[tuple[str, Any]] = []
        self.files: list[Path] = []

    def upload_checkpoint(self, local_dir: Path, step: int, fingerprint: dict[str, Any]) -> Manifest:
        assert self.gate.wait(10)
        self.uploads.append(step)
        if self.fail_with is not None:
            raise self.fail_with
        entries = tuple(FileEntry(p.name, p.stat().st_size, "0" * 64) for p in sorted(Path(local_dir).iterdir()))
        return Manifest(kind="checkpoint", step=step, files=entries, fingerprint=fingerprint)

    def apply_retention(
        self, keep: int, fingerprint: dict[str, Any], protect: frozenset[int] = frozenset()
    ) -> list[int]:
        self.retention.append((keep, protect))
        return []

    def put_json(self, name: str, obj: Any) -> None:
        self.json.append((name, obj))

    def upload_files(self, local_dir: Path, prefix_uri: S3Uri) -> int:
        self.files.append(local_dir)
        return 1

    def checkpoint_uri(self, step: int) -> S3Uri:
        return S3Uri("bkt", f"run/checkpoints/checkpoint-{step}/")


def test_background_upload_end_to_end(s3_bucket: tuple[str, str], tmp_path: Path, caplog: Any) -> None:
    endpoint, bucket = s3_bucket
    store = SlowStore(make_s3_client(endpoint), S3Uri(bucket, "run/"))
    durable: list[tuple[int, Manifest]] = []
    staging = tmp_path / "staging"
    uploader = BackgroundUploader(
        store, keep=2, fingerprint=FP, staging_dir=staging, on_durable=lambda step, m: durable.append((step, m))
    )
    originals = {}
    caplog.set_level(logging.INFO, logger="loraresume_trainer.uploader")
    for step in (10, 20, 30, 40):
        files = {
            "adapter_model.safetensors": os.urandom(2048),
            "sub/optimizer.pt": os.urandom(4096),
            "training_args.bin": b"pickle",
        }
        local = make_dir(tmp_path / "out", f"checkpoint-{step}", files)
        started = time.monotonic()
        uploader.submit_checkpoint(local, step)
        assert time.monotonic() - started < 0.3  # never waits on the network
        if step == 20:  # still queued behind 10: its snapshot shares the original's bytes
            snap = staging / "checkpoint-20" / "adapter_model.safetensors"
            assert snap.stat().st_ino == (local / "adapter_model.safetensors").stat().st_ino
        originals[step] = {k: v for k, v in files.items() if k != "training_args.bin"}
        shutil.rmtree(local)  # HF's own rotation deletes the local checkpoint
    assert uploader.pending() >= 2
    assert uploader.durable_step is None

    assert uploader.flush(timeout=30)
    assert uploader.pending() == 0
    assert uploader.durable_step == 40
    assert [s for s, _ in durable] == [10, 20, 30, 40]
    assert [s for s, _ in store.complete_checkpoints()] == [40, 30]  # retention keep=2
    restored = store.download_checkpoint(40, durable[-1][1], tmp_path / "restore")
    got = {p.relative_to(restored).as_posix(): p.read_bytes() for p in restored.rglob("*") if p.is_file()}
    assert got == originals[40]
    assert os.listdir(staging) == []
    assert uploader.errors == [] and uploader.last_error is None
    assert (
        f"checkpoint-40 durable in s3://{bucket}/run/checkpoints/checkpoint-40/ (2 files, 6144 bytes) in" in caplog.text
    )
    assert uploader.close(timeout=5)
    with pytest.raises(RuntimeError):
        uploader.submit_json("progress.json", {})


def test_json_puts_coalesce_and_retention_protects_queued_steps(tmp_path: Path) -> None:
    store = FakeStore()
    store.gate.clear()
    uploader = BackgroundUploader(store, keep=3, fingerprint=FP, staging_dir=tmp_path / "s", durable_step=4)
    assert uploader.durable_step == 4
    uploader.submit_checkpoint(make_dir(tmp_path, "c10", {"a": b"1"}), 10)
    progress = {"step": 1}
    uploader.submit_json("progress.json", progress)
    progress["step"] = 99  # the uploader copied it at submit time
    uploader.submit_json("other.json", {"x": 1})
    uploader.submit_json("progress.json", {"step": 2})
    uploader.submit_json("progress.json", {"step": 3})
    uploader.submit_checkpoint(make_dir(tmp_path, "c20", {"a": b"2"}), 20)
    uploader.submit_checkpoint(make_dir(tmp_path, "c30", {"a": b"3"}), 30)
    uploader.submit_files(tmp_path / "c10", S3Uri("bkt", "run/logs/"))
    uploader.submit_files(tmp_path / "c10", S3Uri("bkt", "run/logs/"))
    assert uploader.pending() == 6  # busy checkpoint-10, 2 JSON puts, 2 checkpoints, 1 files job
    assert not uploader.flush(timeout=0.05)

    store.gate.set()
    assert uploader.flush(timeout=10)
    assert store.json == [("progress.json", {"step": 3}), ("other.json", {"x": 1})]
    assert store.uploads == [10, 20, 30]
    assert store.retention[0] == (3, frozenset({20, 30}))
    assert store.retention[-1] == (3, frozenset())
    assert len(store.files) == 1
    assert uploader.durable_step == 30
    uploader.close(timeout=5)


def test_failing_upload_is_retried_bounded_and_recorded(tmp_path: Path, caplog: Any) -> None:
    store = FakeStore()
    store.fail_with = StorageError("could not connect to minio:9000 (EndpointConnectionError)")
    durable: list[int] = []
    uploader = BackgroundUploader(
        store,
        keep=2,
        fingerprint=FP,
        staging_dir=tmp_path / "s",
        max_attempts=3,
        retry_delay=0.01,
        durable_step=5,
        on_durable=lambda step, m: durable.append(step),
    )
    with caplog.at_level(logging.WARNING, logger="loraresume_trainer.uploader"):
        uploader.submit_checkpoint(make_dir(tmp_path, "c7", {"a": b"1"}), 7)
        assert uploader.flush(timeout=10)
    assert store.uploads == [7, 7, 7]
    assert uploader.durable_step == 5 and durable == []
    assert len(uploader.errors) == 1 and "checkpoint-7" in uploader.last_error
    assert "StorageError" in uploader.last_error
    assert "attempt 1/3" in caplog.text and "attempt 2/3" in caplog.text and "StorageError" in caplog.text
    assert os.listdir(tmp_path / "s") == []  # the dropped snapshot is cleaned up

    # Training goes on: the next checkpoint uploads fine.
    store.fail_with = None
    uploader.submit_checkpoint(make_dir(tmp_path, "c8", {"a": b"2"}), 8)
    assert uploader.flush(timeout=10)
    assert uploader.durable_step == 8 and durable == [8]
    assert len(uploader.errors) == 1

    # A permanent error (refused credentials) is not retried.
    store.fail_with = StorageAuthError("S3 refused the credentials (InvalidAccessKeyId)")
    uploader.submit_checkpoint(make_dir(tmp_path, "c9", {"a": b"3"}), 9)
    assert uploader.flush(timeout=10)
    assert store.uploads.count(9) == 1
    assert "InvalidAccessKeyId" in uploader.last_error
    assert uploader.close(timeout=5)


def test_resubmitting_a_queued_step_replaces_it(tmp_path: Path) -> None:
    store = FakeStore()
    store.gate.clear()
    uploader = BackgroundUploader(store, keep=2, fingerprint=FP, staging_dir=tmp_path / "s")
    uploader.submit_checkpoint(make_dir(tmp_path, "c1", {"a": b"1"}), 1)
    uploader.submit_checkpoint(make_dir(tmp_path, "c2a", {"a": b"old"}), 2)
    uploader.submit_checkpoint(make_dir(tmp_path, "c2b", {"a": b"new", "b": b"x"}), 2)
    assert uploader.pending() == 2
    store.gate.set()
    assert uploader.flush(timeout=10)
    assert store.uploads == [1, 2]
    assert os.listdir(tmp_path / "s") == []
    uploader.close(timeout=5)


def test_close_stops_worker_and_missing_dir_is_refused(tmp_path: Path) -> None:
    uploader = BackgroundUploader(FakeStore(), keep=1, fingerprint=FP, staging_dir=tmp_path / "s")
    with pytest.raises(FileNotFoundError):
        uploader.submit_checkpoint(tmp_path / "nope", 3)
    assert uploader.close(timeout=5)
    assert not uploader._thread.is_alive()

"""Background checkpoint uploads, so the training loop never waits on the network.

``submit_checkpoint`` takes a hard-link snapshot of the checkpoint directory (fast, and
it survives HF deleting the original during its own local rotation) and queues it; one
worker thread uploads queued items in order, retries with exponential backoff, applies
retention and reports each checkpoint that became durable. A checkpoint that cannot
be uploaded is recorded and dropped: training goes on and the next one may succeed.

Callers must not rewrite a submitted directory's files in place (a hard link shares the
bytes); HF writes each checkpoint into a new directory, which is fine. Should a file
change anyway, the manifest no longer matches and readers reject the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import describe
from .manifest import Manifest
from .s3uri import S3Uri

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _CheckpointJob:
    step: int
    snapshot: Path
    submitted: float = field(default_factory=time.monotonic)

    @property
    def label(self) -> str:
        return f"checkpoint-{self.step}"


@dataclass
class _JsonJob:
    name: str
    obj: Any

    @property
    def label(self) -> str:
        return self.name


@dataclass
class _FilesJob:
    local_dir: Path
    prefix_uri: S3Uri

    @property
    def label(self) -> str:
        return f"files of {self.local_dir}"


_Job = _CheckpointJob | _JsonJob | _FilesJob


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def snapshot_tree(src: Path, dst: Path) -> None:
    """Hard-link copy of ``src`` at ``dst`` (plain copy where linking fails, e.g. across devices)."""
    try:
        shutil.copytree(src, dst, symlinks=False, copy_function=_link_or_copy, dirs_exist_ok=True)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise


class BackgroundUploader:
    """One daemon thread draining a FIFO of checkpoint, JSON and file uploads. Thread-safe.

    ``on_durable(step, manifest)`` runs on the worker thread after a checkpoint's
    manifest is in S3 and retention ran.
    """

    def __init__(
        self,
        store: Any,
        *,
        keep: int,
        fingerprint: dict[str, Any],
        staging_dir: Path,
        max_attempts: int = 5,
        on_durable: Callable[[int, Manifest], None] | None = None,
        durable_step: int | None = None,
        retry_delay: float = 1.0,
        observe: Callable[..., None] | None = None,
        publisher: Any = None,
    ):
        """``observe(name, t0, t1, **fields)``: told of every checkpoint upload (seams.Hooks.phase).
        ``publisher``: what publishes a checkpoint (``upload_checkpoint`` as CheckpointStore's, e.g. an
        upload_process.ChildPublisher: off the training process), the store when None; closed by close()."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self._store = store
        self._publisher = publisher if publisher is not None else store
        self._keep = keep
        self._fingerprint = dict(fingerprint)
        self._staging = Path(staging_dir)
        self._staging.mkdir(parents=True, exist_ok=True)
        self._max_attempts = max_attempts
        self._on_durable = on_durable
        self._retry_delay = retry_delay
        self._observe = observe

        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._busy: _Job | None = None
        self._closed = False
        self._stop = threading.Event()
        self._durable_step = durable_step
        self._errors: list[str] = []
        self._counter = 0
        self._thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ submission

    def submit_checkpoint(self, local_checkpoint_dir: Path, step: int) -> None:
        """Snapshot ``local_checkpoint_dir`` now and queue its upload as ``checkpoint-<step>``."""
        self._check_open()
        source = Path(local_checkpoint_dir)
        if not source.is_dir():
            raise FileNotFoundError(f"checkpoint directory {source} does not exist")
        with self._cond:  # reserve a fresh staging directory
            snapshot = self._staging / f"checkpoint-{step}"
            while True:
                try:
                    snapshot.mkdir()
                    break
                except FileExistsError:
                    self._counter += 1
                    snapshot = self._staging / f"checkpoint-{step}.{self._counter}"
        snapshot_tree(source, snapshot)
        with self._cond:
            # A newer snapshot of the same step replaces a queued one.
            for job in [j for j in self._queue if isinstance(j, _CheckpointJob) and j.step == step]:
                self._queue.remove(job)
                shutil.rmtree(job.snapshot, ignore_errors=True)
            self._queue.append(_CheckpointJob(step, snapshot))
            pending = self._pending_locked()
            self._cond.notify_all()
        log.info("checkpoint-%d queued for upload (%d pending)", step, pending)

    def submit_json(self, name: str, obj: Any) -> None:
        """Queue a small JSON put; a still-queued put of the same name gets the new content."""
        self._check_open()
        frozen = json.loads(json.dumps(obj))  # copy now, and fail here if not serializable
        with self._cond:
            for job in self._queue:
                if isinstance(job, _JsonJob) and job.name == name:
                    job.obj = frozen
                    return
            self._queue.append(_JsonJob(name, frozen))
            self._cond.notify_all()

    def submit_files(self, local_dir: Path, prefix_uri: S3Uri) -> None:
        """Queue an upload of the files under ``local_dir`` (e.g. TensorBoard logs)."""
        self._check_open()
        job = _FilesJob(Path(local_dir), prefix_uri)
        with self._cond:
            if any(isinstance(j, _FilesJob) and j == job for j in self._queue):
                return
            self._queue.append(job)
            self._cond.notify_all()

    # ----------------------------------------------------------------- state

    @property
    def durable_step(self) -> int | None:
        with self._cond:
            return self._durable_step

    @property
    def errors(self) -> list[str]:
        with self._cond:
            return list(self._errors)

    @property
    def last_error(self) -> str | None:
        with self._cond:
            return self._errors[-1] if self._errors else None

    def pending(self) -> int:
        """Items queued or being uploaded."""
        with self._cond:
            return self._pending_locked()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is done; False if ``timeout`` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending_locked() == 0, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the worker. Returns whether the queue drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        drained = self.flush(timeout)
        with self._cond:
            self._closed = True
            left = self._pending_locked()
            self._stop.set()
            self._cond.notify_all()
        if not drained:
            log.warning("uploader closed with %d item(s) not uploaded", left)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._thread.join(remaining)
        if self._publisher is not self._store and hasattr(self._publisher, "close"):
            self._publisher.close()
        return drained

    def __enter__(self) -> BackgroundUploader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------- worker

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the uploader is closed")

    def _pending_locked(self) -> int:
        return len(self._queue) + (1 if self._busy is not None else 0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                job = self._queue.popleft()
                self._busy = job
            try:
                self._process(job)
            except BaseException:  # keep the worker alive whatever happens
                log.exception("uploader: unexpected error on %s", job.label)
            finally:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()

    def _process(self, job: _Job) -> None:
        if isinstance(job, _CheckpointJob):
            self._process_checkpoint(job)
            return
        try:
            if isinstance(job, _JsonJob):
                self._with_retries(job.label, lambda: self._store.put_json(job.name, job.obj))
            else:
                self._with_retries(job.label, lambda: self._store.upload_files(job.local_dir, job.prefix_uri))
        except Exception as exc:
            self._record(f"{job.label}: upload failed: {describe(exc)}")

    def _process_checkpoint(self, job: _CheckpointJob) -> None:
        started = time.monotonic()
        try:
            manifest = self._with_retries(
                job.label,
                lambda: self._publisher.upload_checkpoint(job.snapshot, job.step, self._fingerprint),
            )
        except Exception as exc:
            self._record(f"{job.label}: upload failed: {describe(exc)}")
            shutil.rmtree(job.snapshot, ignore_errors=True)
            return
        if self._observe is not None:
            self._observe("upload_checkpoint", started, time.monotonic(), step=job.step, bytes=manifest.total_bytes)

        with self._cond:
            protect = frozenset(j.step for j in self._queue if isinstance(j, _CheckpointJob))
        try:
            self._store.apply_retention(self._keep, self._fingerprint, protect=protect)
        except Exception as exc:
            log.warning("retention after %s failed: %s", job.label, describe(exc))

        with self._cond:
            if self._durable_step is None or job.step > self._durable_step:
                self._durable_step = job.step
        log.info(
            "checkpoint-%d durable in %s (%d files, %d bytes) in %.1f s",
            job.step,
            self._store.checkpoint_uri(job.step),
            len(manifest.files),
            manifest.total_bytes,
            time.monotonic() - started,
        )
        if self._on_durable is not None:
            try:
                self._on_durable(job.step, manifest)
            except Exception:
                log.exception("on_durable callback failed for %s", job.label)
        shutil.rmtree(job.snapshot, ignore_errors=True)

    def _with_retries(self, label: str, action: Callable[[], T]) -> T:
        """Run ``action``; retry transient failures with exponential backoff."""
        attempt = 1
        while True:
            try:
                return action()
            except Exception as exc:
                permanent = bool(getattr(exc, "permanent", False))
                if attempt >= self._max_attempts or permanent or self._stop.is_set():
                    raise
                delay = self._retry_delay * (2 ** (attempt - 1))
                log.warning(
                    "upload of %s failed (attempt %d/%d, %s); retrying in %.1f s",
                    label,
                    attempt,
                    self._max_attempts,
                    describe(exc),
                    delay,
                )
                if self._stop.wait(delay):
                    raise
                attempt += 1

    def _record(self, message: str) -> None:
        log.error("%s; training continues", message)
        with self._cond:
            self._errors.append(message)

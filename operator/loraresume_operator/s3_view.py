"""What the operator reads from a job's S3 prefix: newest complete checkpoint, progress, adapter.

Uses the trainer's checkpoint store (light imports only). Credentials: the Secret the
resource names (read through the API, held in memory only, never logged), or the
operator's own identity when it names none.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.loaders import create_loader

from loraresume_trainer.checkpoint_store import PROGRESS_NAME, CheckpointStore, DamagedCheckpoint
from loraresume_trainer.errors import TrainerError
from loraresume_trainer.s3client import s3_errors
from loraresume_trainer.s3uri import S3Uri

from . import metrics
from .scratch import ScratchInputs
from .spec import CheckpointRef, LoraResumeSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StorageView:
    checkpoint: CheckpointRef | None
    progress: dict[str, Any] | None
    adapter_complete: bool
    checkpoint_created_at: str | None = None  # from the newest complete manifest
    checkpoint_bytes: int | None = None  # the newest complete checkpoint's files, from its manifest


# S3 reads in flight beside the reconcile threads' own (read_storage's progress.json and adapter manifest):
# bounded, so a burst of launches cannot open a connection per object at once.
READ_WORKERS = 16
# Connections the shared client keeps per endpoint: the reconcile threads of both pools plus READ_WORKERS
# (botocore's default of 10 made every further request open and drop a connection under load).
MAX_POOL_CONNECTIONS = 128
_CLIENTS_LOCK = threading.Lock()  # one S3 client build at a time (s3_client)
# botocore's data files (endpoints.json and partitions, the S3 model, its paginators and endpoint rules), read
# once per process into one loader that every client's session shares: a session of its own read them again
# for each client (~0.1 s of CPU; at a loaded restart 1.4 s of wall time with every reconcile thread waiting).
_LOADER = create_loader(os.environ.get("AWS_DATA_PATH"))  # what a session of its own would read
_WARM_DATA = ("endpoints", "partitions", "sdk-default-configuration")
_WARM_S3 = ("service-2", "paginators-1", "endpoint-rule-set-1")


def s3_client(endpoint: str | None, region: str | None, credentials: dict[str, str] | None) -> Any:
    """A client with bounded retries and timeouts: a slow store must not stall reconciles.

    One per (endpoint, region, credentials), reused: building a client parses botocore's S3 model
    (~0.1 s of CPU), which made client creation most of a reconcile. Clients are thread-safe; a
    rotated Secret gives new credentials, hence a new client.
    """
    creds = tuple(sorted((credentials or {}).items()))
    with _CLIENTS_LOCK:  # one build per key: a fresh process's many reconcile threads would each build one
        return _client(endpoint or None, region or None, creds)


def warm_s3() -> None:
    """Read botocore's data files into the shared loader before a reconcile needs a client (a thread at
    start-up, beside kopf's listing); a file that fails to load is loaded by the client build, as before."""
    try:
        for name in _WARM_DATA:
            _LOADER.load_data(name)
        for kind in _WARM_S3:
            _LOADER.load_service_model("s3", kind)
    except Exception:  # botocore's own error, raised again where a client is built
        log.debug("botocore data not preloaded", exc_info=True)


@functools.lru_cache(maxsize=256)
def _client(endpoint: str | None, region: str | None, creds: tuple[tuple[str, str], ...]) -> Any:
    credentials = dict(creds)
    kwargs: dict[str, Any] = {}
    if credentials:
        kwargs = {
            "aws_access_key_id": credentials.get("AWS_ACCESS_KEY_ID"),
            "aws_secret_access_key": credentials.get("AWS_SECRET_ACCESS_KEY"),
            "aws_session_token": credentials.get("AWS_SESSION_TOKEN"),
        }
    core = botocore.session.Session()
    core.register_component("data_loader", _LOADER)
    session = boto3.session.Session(region_name=region or None, botocore_session=core, **kwargs)
    config = Config(
        retries={"mode": "standard", "max_attempts": 3},
        max_pool_connections=MAX_POOL_CONNECTIONS,
        connect_timeout=3,
        read_timeout=10,
        s3={"addressing_style": "path"} if endpoint else None,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client = session.client("s3", endpoint_url=endpoint or None, config=config)
    client.meta.events.register("before-send.s3", _count_request)
    client.can_paginate("list_objects_v2")  # its paginators, read now: many threads' first listings each read them
    return client


def _count_request(event_name: str = "", **_: Any) -> None:
    """botocore's before-send.s3.<Operation>, once per HTTP attempt (retries too): what S3 bills."""
    metrics.S3_REQUESTS.labels(event_name.rsplit(".", 1)[-1]).inc()


Submit = Callable[..., "Future[Any]"]


def read_storage(
    spec: LoraResumeSpec, client: Any, *, submit: Submit | None = None, maybe_empty: bool = False
) -> StorageView:
    """Raises loraresume_trainer.errors.TrainerError (StorageError / StorageAuthError) on S3 trouble.

    `spec` is the effective spec: its storage.uri is resolved (effective_spec). The three parts are
    read side by side when `submit` (an executor's) is given: progress.json and the adapter manifest
    beside the checkpoint listing and the newest complete manifest (the only one read). `maybe_empty`:
    the job has never launched; one listing of its prefix tells an empty one (the usual new job: no
    further read) from one that holds a run already."""
    store = _store(spec, client)
    if maybe_empty and _empty(store):
        return StorageView(None, None, False)
    run: Submit = submit or _inline
    progress = run(store.get_json, PROGRESS_NAME)
    adapter = run(store.read_adapter_manifest)
    newest = next(store.iter_complete_checkpoints(), None)  # newest first: only that manifest is read
    return _view(store, newest, progress.result(), adapter.result() is not None)


def read_said(
    spec: LoraResumeSpec, client: Any, step: int, *, adapter_needed: bool, submit: Submit | None = None
) -> StorageView | None:
    """The storage of an attempt whose trainer exited saying checkpoint-`step` is durable: that
    checkpoint's manifest, the adapter manifest and progress.json, side by side (one round trip, no
    listing). None when that manifest is missing or unusable, or the adapter is not complete and
    `adapter_needed` (the trainer exited 0): then the full read (read_storage) decides. Raises what
    read_storage raises."""
    store = _store(spec, client)
    run: Submit = submit or _inline
    progress = run(store.get_json, PROGRESS_NAME)
    adapter = run(store.read_adapter_manifest)
    manifest = run(store.read_manifest, step)
    try:
        found = manifest.result()
    except DamagedCheckpoint:
        found = None
    complete = adapter.result() is not None
    said = progress.result()
    if found is None or (adapter_needed and not complete):
        return None
    return _view(store, (step, found), said, complete)


def _view(store: CheckpointStore, newest: tuple[int, Any] | None, progress: Any, complete: bool) -> StorageView:
    """A StorageView from a checkpoint's step and manifest (or none), progress.json and the adapter's state."""
    if newest is None:
        return StorageView(None, progress, complete)
    step, manifest = newest
    checkpoint = _checkpoint_ref(store, step)
    return StorageView(checkpoint, progress, complete, manifest.created_at or None, manifest.total_bytes)


def _inline(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    done: Future[Any] = Future()
    try:
        done.set_result(fn(*args))
    except BaseException as exc:
        done.set_exception(exc)
    return done


def _empty(store: CheckpointStore) -> bool:
    """Nothing at all under the job's prefix (one listing of at most one key)."""
    root = store.root.as_dir()
    with s3_errors("listing", root):
        pages = store.client.get_paginator("list_objects_v2").paginate(
            Bucket=root.bucket, Prefix=root.key, PaginationConfig={"PageSize": 1, "MaxItems": 1}
        )
        first: dict[str, Any] = next(iter(pages), {})
    return not first.get("Contents")


# While its pod runs, a job's progress.json is read at most this often (the operator passes its reconcile
# interval), and its checkpoint listing and adapter manifest at most every LISTING_SECONDS (a newer checkpoint
# progress.json says is durable is taken on that word until then): a pod event, a periodic round in between
# reuses the last read; while its pod is pending, nothing (StorageViews.view). A decision that needs them (a launch,
# an ended or vanished pod) reads them fresh (reconcile.py).
PROGRESS_SECONDS = 10.0
LISTING_SECONDS = 60.0


class StorageViews:
    """The last StorageView of each resource, and when its parts were read (monotonic seconds)."""

    def __init__(
        self,
        progress_seconds: float = PROGRESS_SECONDS,
        listing_seconds: float = LISTING_SECONDS,
        read_workers: int = READ_WORKERS,
    ) -> None:
        self.progress_seconds, self.listing_seconds = progress_seconds, listing_seconds
        self._reads = ThreadPoolExecutor(read_workers, thread_name_prefix="s3-reads")  # threads start on demand
        self._lock = threading.Lock()
        self._views: dict[tuple[str, str], tuple[float, float, StorageView]] = {}  # listed at, progress at
        self._unconfirmed: set[tuple[str, str]] = set()  # views taken on a trainer's word (said), not yet listed

    def view(
        self,
        key: tuple[str, str],
        spec: LoraResumeSpec,
        client: Any,
        now: float,
        *,
        running: bool = True,
        pending: bool = False,
        going: bool = False,
        seed: StorageView | None = None,
    ) -> tuple[StorageView, bool]:
        """(view, fresh): the last view while its parts are young enough; fresh is True when all of it
        was read now. `running`: the pod runs (progress.json is read only then). `pending`: the pod is
        Pending, its trainer not started: nothing of the job's changes in the store while it waits (the
        attempt before it ended first, and its uploads with it), so the last view serves however old it
        is, and the wait does not age it (at 500 resources on 100 GPUs, every resource that waited over
        LISTING_SECONDS for a GPU was listed again as its pod started); a view taken on a trainer's word
        (said) is the exception: its confirming listing stays due. `going`: the pod is going (deleted,
        DisruptionTarget): its trainer is saving its last checkpoint, so a read now is out of date when it
        ends, and its end is read fresh anyway; the last view serves, and nothing is read. `seed`: what
        the status recorded, taken as the last view when none is known (a restarted operator), as if just
        read: its first reconcile costs no read, pending or running (progress.json is read a round later;
        at a loaded restart 50 running jobs' reads held their first reconciles up to the slowest answer).
        A decision that launches or counts an end, and an ended or vanished pod, read fresh anyway
        (reconcile.py). Raises what read_storage raises."""
        with self._lock:
            known = self._views.get(key)
            if known is None and seed is not None:
                known = self._views[key] = (now, now, seed)
        if known is None:
            return self.read(key, spec, client, now), True
        if going:
            return known[2], False
        if pending:
            with self._lock:
                if key not in self._unconfirmed:  # as good as read now (a said view's listing stays due: said)
                    self._views[key] = (now, now, known[2])
            return known[2], False
        if now - known[0] >= self.listing_seconds:
            return self.read(key, spec, client, now), True
        listed_at, progress_at, view = known
        if running and now - progress_at >= self.progress_seconds:
            store = _store(spec, client)
            progress = store.get_json(PROGRESS_NAME)
            durable = _durable_step(progress)
            # The trainer writes progress.json once a checkpoint's upload has landed (manifest last): a newer
            # checkpoint is taken on that word, as an end's (said), and the listing confirms it when due, not
            # now (a trainer checkpointing often would cost a listing every progress read).
            newer = durable > (view.checkpoint.step if view.checkpoint else 0)
            checkpoint = _checkpoint_ref(store, durable) if newer else view.checkpoint
            view = dataclasses.replace(view, progress=progress, checkpoint=checkpoint)
            with self._lock:
                self._views[key] = (listed_at, now, view)
                if newer:
                    self._unconfirmed.add(key)
        return view, False

    def read(
        self, key: tuple[str, str], spec: LoraResumeSpec, client: Any, now: float, *, maybe_empty: bool = False
    ) -> StorageView:
        """All of it, now (its parts side by side; `maybe_empty`: see read_storage)."""
        view = read_storage(spec, client, submit=self._reads.submit, maybe_empty=maybe_empty)
        with self._lock:
            self._views[key] = (now, now, view)
            self._unconfirmed.discard(key)
        return view

    def read_said(
        self, key: tuple[str, str], spec: LoraResumeSpec, client: Any, now: float, step: int, *, adapter_needed: bool
    ) -> StorageView | None:
        """read_said, kept as the last view (as a full read's) when it answers."""
        view = read_said(spec, client, step, adapter_needed=adapter_needed, submit=self._reads.submit)
        if view is not None:
            with self._lock:
                self._views[key] = (now, now, view)
                self._unconfirmed.discard(key)
        return view

    def said(
        self,
        key: tuple[str, str],
        spec: LoraResumeSpec,
        client: Any,
        now: float,
        step: int | None,
        recorded: CheckpointRef | None,
    ) -> StorageView:
        """Without a read: checkpoint-`step` as the attempt's trainer said it is durable (decide.counted_on_its_word),
        or `recorded` (the status's) when it named none (it stopped before it trained: decide.said_untrained),
        with the last view's progress and checkpoint size. Kept as the last view, but not as a listing: the
        listing is read when it is next due."""
        checkpoint = recorded if step is None else _checkpoint_ref(_store(spec, client), step)
        with self._lock:
            listed_at, progress_at, last = self._views.get(key, (-math.inf, -math.inf, StorageView(None, None, False)))
            view = StorageView(checkpoint, last.progress, False, None, last.checkpoint_bytes)
            self._views[key] = (listed_at, progress_at, view)
            self._unconfirmed.add(key)
        return view

    def read_since(self, key: tuple[str, str], since: float) -> StorageView | None:
        """The view read (in full, or read_said's) at or after `since` (monotonic seconds), or None."""
        with self._lock:
            known = self._views.get(key)
        return known[2] if known is not None and known[0] >= since and known[1] >= since else None

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._views.pop(key, None)
            self._unconfirmed.discard(key)


def _durable_step(progress: Any) -> int:
    """The newest checkpoint step the trainer says is durable (progress.json, read as untrusted; 0: none)."""
    step = progress.get("durable_step") if isinstance(progress, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) and step > 0 else 0


def _checkpoint_ref(store: CheckpointStore, step: int) -> CheckpointRef:
    """checkpoint-`step` of the job's store, as a status names it."""
    return CheckpointRef(uri=str(store.checkpoint_uri(step)), step=step)


def _store(spec: LoraResumeSpec, client: Any) -> CheckpointStore:
    if spec.storage.uri is None:
        raise ValueError("reading storage needs the effective spec, with storage.uri resolved")
    return CheckpointStore(client, S3Uri.parse(spec.storage.uri))


class DownloadSizes:
    """Sizes of what a pod downloads (base model, adapter, dataset), measured in S3 at launch.

    Remembered for `ttl_seconds` per URI and S3 client (a client is one endpoint and one set of
    credentials: a job is never sized from what another job's credentials could read): a base model
    shared by a fleet is listed once, not once per pod (those are large prefixes that do not change
    under a running job). Measured once even when a burst of launches asks for it at the same moment:
    the first asker lists, the others wait for its answer (48 launch workers listed the same base
    model and dataset at the start of a burst).
    """

    def __init__(self, ttl_seconds: float = 600.0) -> None:
        self.ttl_seconds = ttl_seconds
        self._lock = threading.Lock()
        # (client id, uri) -> (measured at, the measurement, the client: kept so its id is not reused)
        self._known: dict[tuple[int, str], tuple[float, Future[int], Any]] = {}

    def bytes_at(self, client: Any, uri: str, now: float) -> int:
        key = (id(client), uri)
        with self._lock:
            known = self._known.get(key)
            fresh = known is not None and now - known[0] < self.ttl_seconds
            if not fresh:
                measuring: Future[int] = Future()
                self._known[key] = (now, measuring, client)
        if known is not None and fresh:
            return known[1].result()  # measured, or being measured by another launch: its answer
        parsed = S3Uri.parse(uri)
        try:
            size = CheckpointStore(client, parsed).stored_bytes(parsed)
        except BaseException as exc:
            with self._lock:  # not remembered: the next launch measures again
                if self._known.get(key, (0.0, None, None))[1] is measuring:
                    del self._known[key]
            measuring.set_exception(exc)
            raise
        measuring.set_result(size)
        return size

    def inputs(
        self, client: Any, spec: LoraResumeSpec, adapter_uri: str | None, view: StorageView, now: float
    ) -> ScratchInputs:
        def measured(uri: str | None) -> int | None:
            if not uri or not uri.startswith("s3://"):
                return None
            try:
                return self.bytes_at(client, uri, now)
            except TrainerError as exc:  # the trainer will say what is wrong with it; size it as unknown
                log.info("cannot measure %s for the scratch volume: %s", uri, exc)
                return None

        base = spec.base_model
        return ScratchInputs(
            base_model_bytes=measured(base),
            base_model_downloaded=not base.startswith("/"),
            adapter_bytes=measured(adapter_uri) or 0,
            dataset_bytes=measured(spec.dataset.source) or 0,
            checkpoint_bytes=view.checkpoint_bytes,
        )


__all__ = [
    "DownloadSizes",
    "StorageView",
    "StorageViews",
    "TrainerError",
    "read_said",
    "read_storage",
    "s3_client",
    "warm_s3",
]

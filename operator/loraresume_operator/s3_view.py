"""What the operator reads from a job's S3 prefix: newest complete checkpoint, progress, adapter.

Uses the trainer's checkpoint store (light imports only). Credentials: the Secret the
resource names (read through the API, held in memory only, never logged), or the
operator's own identity when it names none.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config

from loraresume_trainer.checkpoint_store import PROGRESS_NAME, CheckpointStore
from loraresume_trainer.errors import TrainerError
from loraresume_trainer.s3uri import S3Uri

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


def s3_client(endpoint: str | None, region: str | None, credentials: dict[str, str] | None) -> Any:
    """A client with bounded retries and timeouts: a slow store must not stall reconciles.

    One per (endpoint, region, credentials), reused: building a client parses botocore's S3 model
    (~0.1 s of CPU), which made client creation most of a reconcile. Clients are thread-safe; a
    rotated Secret gives new credentials, hence a new client.
    """
    creds = tuple(sorted((credentials or {}).items()))
    return _client(endpoint or None, region or None, creds)


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
    session = boto3.session.Session(region_name=region or None, **kwargs)
    config = Config(
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=3,
        read_timeout=10,
        s3={"addressing_style": "path"} if endpoint else None,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client("s3", endpoint_url=endpoint or None, config=config)


def read_storage(spec: LoraResumeSpec, client: Any) -> StorageView:
    """Raises loraresume_trainer.errors.TrainerError (StorageError / StorageAuthError) on S3 trouble.

    `spec` is the effective spec: its storage.uri is resolved (effective_spec)."""
    if spec.storage.uri is None:
        raise ValueError("read_storage needs the effective spec, with storage.uri resolved")
    store = CheckpointStore(client, S3Uri.parse(spec.storage.uri))
    complete = store.complete_checkpoints()
    checkpoint, created, size = None, None, None
    if complete:
        step, manifest = complete[0]
        checkpoint = CheckpointRef(uri=str(store.checkpoint_uri(step)), step=step)
        created, size = manifest.created_at or None, manifest.total_bytes
    progress = store.get_json(PROGRESS_NAME)
    adapter = store.read_adapter_manifest()
    return StorageView(checkpoint, progress, adapter is not None, created, size)


class DownloadSizes:
    """Sizes of what a pod downloads (base model, adapter, dataset), measured in S3 at launch.

    Remembered for `ttl_seconds` per URI: a base model shared by a fleet is listed once, not
    once per pod (those are large prefixes that do not change under a running job).
    """

    def __init__(self, ttl_seconds: float = 600.0) -> None:
        self.ttl_seconds = ttl_seconds
        self._known: dict[str, tuple[float, int]] = {}

    def bytes_at(self, client: Any, uri: str, now: float) -> int:
        known = self._known.get(uri)
        if known is not None and now - known[0] < self.ttl_seconds:
            return known[1]
        parsed = S3Uri.parse(uri)
        size = CheckpointStore(client, parsed).stored_bytes(parsed)
        self._known[uri] = (now, size)
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


__all__ = ["DownloadSizes", "StorageView", "TrainerError", "read_storage", "s3_client"]

"""The job's S3 prefix: checkpoints with manifests, the final adapter, progress and logs.

Layout under the job's root URI::

    checkpoints/checkpoint-<step>/<files>            HF Trainer checkpoint files
    checkpoints/checkpoint-<step>/_COMPLETE.json     written last; the checkpoint counts only then
    adapter/<files> + adapter/_COMPLETE.json         the final adapter and tokenizer
    compile-cache/<key>/<name>.tar + _COMPLETE.json  compile caches for a relaunch (compile_cache.py)
    progress.json                                    read by the operator for the status
    logs/                                            TensorBoard event files

Invariants: a manifest is written after every file it lists and deleted before any of
them; downloads verify every size and hash into a temporary directory and only then
rename it into place; names from listings are validated, never used as paths.

The checkpoint contract lives here, whole: the files a checkpoint must hold to resume
exactly (REQUIRED_CHECKPOINT_FILES), the pickled ones and their weights-only check
(check_pickles_safe), the one parser of a checkpoint URI (parse_checkpoint_uri), the
progress object's name (PROGRESS_NAME) and the one verified download with fallback
(fetch_first_verified) that the trainer, the stand-in trainer and the tests all use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .attempt_plan import CheckpointState
from .errors import ConfigError, DamagedCheckpoint, StorageAuthError, StorageError, TrainerError
from .fingerprint import same_run
from .manifest import (
    MANIFEST_NAME,
    MAX_FILES,
    Manifest,
    build_manifest,
    parse_checkpoint_name,
    relpath_problem,
    safe_join,
    tree_problem,
)
from .progress import emit_event
from .resume_plan import Candidate
from .s3client import is_not_found, s3_errors
from .s3uri import S3Uri

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints/"
ADAPTER_DIR = "adapter/"
COMPILE_CACHE_DIR = "compile-cache/"
LOGS_DIR = "logs/"
PROGRESS_NAME = "progress.json"
# An arbitrary pickle that HF does not need to resume: never published.
CHECKPOINT_EXCLUDES = frozenset({"training_args.bin"})
# Files that are pickles in an HF checkpoint; HF loads them with weights_only=True and
# so do we, once, before the Trainer sees the checkpoint (an unsafe one is "damaged").
PICKLED_STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt")
# Without any of these HF resumes silently inexact (notes/training-stack.md) or crashes.
REQUIRED_CHECKPOINT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
)
# Trainer state in a checkpoint; everything else in it is the adapter + tokenizer as saved.
TRAINER_STATE_FILES = frozenset(PICKLED_STATE_FILES) | {"trainer_state.json", "training_args.bin"}
MiB = 1 << 20
GiB = 1 << 30
# Download caps: a manifest or listing is storage content, so nothing is fetched blindly. Both can
# be raised per store or through the environment (big base models fetched with fetch_tree).
MAX_FILE_BYTES = 64 * GiB
MAX_DOWNLOAD_BYTES = 512 * GiB
ENV_MAX_FILE_BYTES = "LORARESUME_MAX_FILE_BYTES"
ENV_MAX_DOWNLOAD_BYTES = "LORARESUME_MAX_DOWNLOAD_BYTES"
MAX_MANIFEST_BYTES = 16 * MiB
MAX_JSON_BYTES = 4 * MiB
_DELETE_BATCH = 1000
_CHUNK = MiB
_JSON_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*\.json$")


class DownloadTooLarge(DamagedCheckpoint):
    """A manifest or listing asks for more bytes than the store's caps allow; nothing was fetched."""


def _cap(explicit: int | None, env_name: str, default: int) -> int:
    if explicit is not None:
        value = explicit
    else:
        text = os.environ.get(env_name, "").strip()
        if not text:
            return default
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{env_name} must be a whole number of bytes, got {text!r}") from None
    if value < 1:
        raise ConfigError(f"{env_name} must be at least 1 byte, got {value}")
    return value


@dataclass(frozen=True)
class CheckpointListing:
    """A ``checkpoint-<step>`` prefix seen in S3; ``complete`` when its manifest exists."""

    step: int
    complete: bool


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=64 * MiB,
        multipart_chunksize=16 * MiB,
        max_concurrency=8,
    )


def _normalized(obj: Any) -> Any:
    """``obj`` as it reads back from JSON, so fingerprints compare like manifests store them."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _replace_dir(src: Path, dest: Path) -> None:
    """Move the finished directory ``src`` to ``dest``, replacing what was there."""
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dest, old)
    os.rename(src, dest)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


SMALL_READ_ATTEMPTS = 4


def _broken_body_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import ProtocolError

    return (ConnectionClosedError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError, ProtocolError)


class CheckpointStore:
    """Checkpoint, adapter and progress I/O for one job's S3 prefix."""

    def __init__(
        self,
        client: Any,
        root: S3Uri,
        *,
        max_file_bytes: int | None = None,
        max_download_bytes: int | None = None,
    ):
        """``max_file_bytes`` / ``max_download_bytes``: caps on one object and on one download
        (a checkpoint, an adapter, a fetched tree); default from $LORARESUME_MAX_FILE_BYTES /
        $LORARESUME_MAX_DOWNLOAD_BYTES, else 64 GiB / 512 GiB."""
        self.client = client
        self.root = root.as_dir()
        self.max_file_bytes = _cap(max_file_bytes, ENV_MAX_FILE_BYTES, MAX_FILE_BYTES)
        self.max_download_bytes = _cap(max_download_bytes, ENV_MAX_DOWNLOAD_BYTES, MAX_DOWNLOAD_BYTES)
        self._transfer = _transfer_config()
        self._uploaded_stats: dict[tuple[str, str], tuple[int, int]] = {}

    # ----------------------------------------------------------------- layout

    def checkpoint_uri(self, step: int) -> S3Uri:
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
        return self.root.child(CHECKPOINTS_DIR, f"checkpoint-{step}/")

    def adapter_uri(self) -> S3Uri:
        return self.root.child(ADAPTER_DIR)

    def logs_uri(self) -> S3Uri:
        return self.root.child(LOGS_DIR)

    def compile_cache_uri(self, key: str) -> S3Uri:
        if not re.fullmatch(r"[0-9a-f]{16,64}", key):
            raise ValueError(f"compile cache key must be lowercase hex, got {key!r}")
        return self.root.child(COMPILE_CACHE_DIR, f"{key}/")

    def compile_cache_keys(self) -> list[tuple[str, str]]:
        """(key, created_at) of the complete compile caches under this job's prefix, newest first; keys
        not shaped like one, and caches without a usable manifest, are left out."""
        prefix = self.root.child(COMPILE_CACHE_DIR)
        found: list[tuple[str, str]] = []
        with s3_errors("listing", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key, Delimiter="/"):
                for common in page.get("CommonPrefixes", []) or []:
                    key = common.get("Prefix", "")[len(prefix.key) :].rstrip("/")
                    if not re.fullmatch(r"[0-9a-f]{16,64}", key):
                        continue
                    try:
                        manifest = self.read_tree_manifest(self.compile_cache_uri(key))
                    except DamagedCheckpoint:
                        continue
                    if manifest is not None and manifest.kind == "compile-cache":
                        found.append((key, manifest.created_at))
        return sorted(found, key=lambda kc: kc[1], reverse=True)

    def delete_compile_caches(self) -> None:
        """Every compile cache of this job, complete or not (the job itself is being deleted): all the
        manifests first, so no cache is ever complete while half gone."""
        prefix = self.root.child(COMPILE_CACHE_DIR)
        keys = [key for key, _ in self._list_objects(prefix)]
        manifests = [key for key in keys if key.endswith("/" + MANIFEST_NAME)]
        self._delete_keys(prefix.bucket, manifests, prefix)
        self._delete_keys(prefix.bucket, [key for key in keys if key not in set(manifests)], prefix)

    def delete_tree(self, prefix_uri: S3Uri) -> None:
        """Remove everything under a prefix: its manifest first, so it is never complete while half gone."""
        prefix = prefix_uri.as_dir()
        self._delete_object(prefix.child(MANIFEST_NAME), "deleting the manifest")
        keys = [key for key, _ in self._list_objects(prefix)]
        self._delete_keys(prefix.bucket, keys, prefix)

    def read_tree_manifest(self, prefix_uri: S3Uri) -> Manifest | None:
        """The ``_COMPLETE.json`` under a prefix (None until it is complete; DamagedCheckpoint if unusable)."""
        uri = prefix_uri.as_dir().child(MANIFEST_NAME)
        data = self._get_small(uri, MAX_MANIFEST_BYTES)
        return None if data is None else Manifest.from_bytes(data, source=str(uri))

    # -------------------------------------------------------------- low level

    def _list_objects(self, prefix: S3Uri) -> Iterator[tuple[str, int]]:
        """(key, size) of every object below ``prefix`` (no delimiter)."""
        with s3_errors("listing", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key):
                for obj in page.get("Contents", []) or []:
                    yield obj["Key"], int(obj.get("Size", 0))

    def _head_size(self, uri: S3Uri) -> int | None:
        """ContentLength of an object, or None when it does not exist."""
        from botocore.exceptions import ClientError

        with s3_errors("checking", uri):
            try:
                response = self.client.head_object(Bucket=uri.bucket, Key=uri.key)
            except ClientError as exc:
                if is_not_found(exc):
                    return None
                raise
        return int(response.get("ContentLength", -1))

    def stored_bytes(self, uri: S3Uri) -> int:
        """Bytes stored at ``uri``: the object's size, or the sum below a directory-like prefix
        (0 when nothing is there). What a download of it will take on disk."""
        if not uri.is_dir:
            size = self._head_size(uri)
            if size is not None:
                return max(size, 0)
        return sum(size for _, size in self._list_objects(uri.as_dir()))

    def _get_small(self, uri: S3Uri, limit: int) -> bytes | None:
        """Body of a small object (at most ``limit`` bytes), or None when it does not exist."""
        from botocore.exceptions import ClientError

        for attempt in range(1, SMALL_READ_ATTEMPTS + 1):
            with s3_errors("reading", uri):
                try:
                    response = self.client.get_object(Bucket=uri.bucket, Key=uri.key)
                    body = response["Body"]
                    try:
                        data = body.read(limit + 1)
                    finally:
                        body.close()
                    break
                except ClientError as exc:
                    if is_not_found(exc):
                        return None
                    raise
                except _broken_body_errors() as exc:  # the connection broke mid-body, past botocore's retries
                    if attempt == SMALL_READ_ATTEMPTS:
                        raise StorageError(
                            f"S3 connection broke while reading {uri} ({type(exc).__name__}); retry later"
                        ) from None
                    log.warning("reading %s: connection broke (%s); retrying", uri, type(exc).__name__)
                    time.sleep(0.2 * 2**attempt)
        if len(data) > limit:
            raise DamagedCheckpoint(f"{uri} is larger than the limit of {limit} bytes")
        return data

    def _delete_keys(self, bucket: str, keys: list[str], where: S3Uri) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            with s3_errors("deleting objects under", where):
                response = self.client.delete_objects(
                    Bucket=bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            errors = response.get("Errors") or []
            if errors:
                code = errors[0].get("Code", "unknown")
                raise StorageError(f"S3 did not delete {len(errors)} object(s) under {where} ({code})")

    def _delete_object(self, uri: S3Uri, operation: str) -> None:
        with s3_errors(operation, uri):
            self.client.delete_object(Bucket=uri.bucket, Key=uri.key)

    def _download_object(
        self,
        uri: S3Uri,
        target: Path,
        *,
        size: int,
        sha256: str | None,
        label: str,
        rel: str,
    ) -> None:
        """Stream one object to ``target``, checking its length and (when given) its hash."""
        from botocore.exceptions import ClientError

        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        written = 0
        with s3_errors("downloading", uri):
            try:
                response = self.client.get_object(Bucket=uri.bucket, Key=uri.key)
            except ClientError as exc:
                if is_not_found(exc):
                    raise DamagedCheckpoint(f"{label} is damaged: {rel} is missing") from None
                raise
            body = response["Body"]
            try:
                length = response.get("ContentLength")
                if length is not None and int(length) != size:
                    raise DamagedCheckpoint(f"{label} is damaged: {rel} has {length} bytes, expected {size}")
                with open(target, "wb") as out:
                    for chunk in body.iter_chunks(_CHUNK):
                        written += len(chunk)
                        if written > size:
                            raise DamagedCheckpoint(
                                f"{label} is damaged: {rel} is longer than the expected {size} bytes"
                            )
                        digest.update(chunk)
                        out.write(chunk)
            finally:
                body.close()
        if written != size:
            raise DamagedCheckpoint(f"{label} is damaged: {rel} is truncated ({written} of {size} bytes)")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DamagedCheckpoint(f"{label} is damaged: {rel} does not match its sha256")

    def _download_into(self, dest: Path, fill: Callable[[Path], None]) -> Path:
        """Run ``fill(tmpdir)`` and move the result to ``dest``; nothing at ``dest`` on failure."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            fill(tmp)
            _replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    # ---------------------------------------------------------------- listing

    def _checkpoint_steps(self) -> list[int]:
        """Steps of the validly named ``checkpoint-<step>/`` prefixes, newest first."""
        prefix = self.root.child(CHECKPOINTS_DIR)
        steps: set[int] = set()
        with s3_errors("listing", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key, Delimiter="/")
            for page in pages:
                for common in page.get("CommonPrefixes", []) or []:
                    full = common.get("Prefix", "")
                    name = full[len(prefix.key) : -1] if full.endswith("/") else ""
                    step = parse_checkpoint_name(name) if full.startswith(prefix.key) else None
                    if step is None:
                        log.warning("ignoring unexpected entry %r under %s", full, prefix)
                        continue
                    steps.add(step)
        return sorted(steps, reverse=True)

    def list_checkpoints(self) -> list[CheckpointListing]:
        """Every ``checkpoint-<step>/`` prefix, newest first, with whether its manifest exists."""
        listings = []
        for step in self._checkpoint_steps():
            manifest_uri = self.checkpoint_uri(step).child(MANIFEST_NAME)
            listings.append(CheckpointListing(step, self._head_size(manifest_uri) is not None))
        return listings

    def read_manifest(self, step: int) -> Manifest | None:
        """The manifest of ``checkpoint-<step>``; None if absent, DamagedCheckpoint if unusable."""
        uri = self.checkpoint_uri(step).child(MANIFEST_NAME)
        data = self._get_small(uri, MAX_MANIFEST_BYTES)
        if data is None:
            return None
        manifest = Manifest.from_bytes(data, source=str(uri))
        if manifest.kind != "checkpoint" or manifest.step != step:
            raise DamagedCheckpoint(
                f"manifest {uri} describes {manifest.kind} step {manifest.step}, not checkpoint step {step}"
            )
        return manifest

    def complete_checkpoints(self) -> list[tuple[int, Manifest]]:
        """Checkpoints with a usable manifest, newest first; unusable ones are skipped with a warning."""
        return list(self.iter_complete_checkpoints())

    def iter_complete_checkpoints(self) -> Iterator[tuple[int, Manifest]]:
        """complete_checkpoints, newest first, reading each manifest only when asked for the next one
        (the newest complete checkpoint costs the listing and its own manifest)."""
        for step in self._checkpoint_steps():
            try:
                manifest = self.read_manifest(step)
            except DamagedCheckpoint as exc:
                log.warning("skipping checkpoint-%d: %s", step, exc)
                continue
            if manifest is not None:
                yield step, manifest

    # -------------------------------------------------------------- downloads

    def _check_plan(self, label: str, entries: list[tuple[str, int]], *, max_file_bytes: int | None = None) -> None:
        """Refuse a download before any request: unsafe or clashing paths (DamagedCheckpoint),
        sizes over the caps (DownloadTooLarge)."""
        per_file = min(self.max_file_bytes, max_file_bytes or self.max_file_bytes)
        for rel, _ in entries:
            problem = relpath_problem(rel)
            if problem:
                raise DamagedCheckpoint(f"{label} is damaged: file path {rel!r} {problem}")
        problem = tree_problem([rel for rel, _ in entries])
        if problem:
            raise DamagedCheckpoint(f"{label} is damaged: {problem}")
        for rel, size in entries:
            if size > per_file:
                raise DownloadTooLarge(
                    f"{label} is too large: {rel} has {size} bytes, over the limit of {per_file} bytes per file "
                    f"(${ENV_MAX_FILE_BYTES}); nothing was downloaded"
                )
        total = sum(size for _, size in entries)
        if total > self.max_download_bytes:
            raise DownloadTooLarge(
                f"{label} is too large: {len(entries)} files with {total} bytes in all, over the limit of "
                f"{self.max_download_bytes} bytes (${ENV_MAX_DOWNLOAD_BYTES}); nothing was downloaded"
            )

    def download_tree(
        self,
        prefix_uri: S3Uri,
        manifest: Manifest,
        dest: Path,
        *,
        max_file_bytes: int | None = None,
    ) -> Path:
        """Download and verify every manifest file; ``dest`` appears only when all are good.

        Before any request, every path is checked (safe, no clashes) and every size against
        the caps (``DownloadTooLarge``); before any body is fetched, every object's size (HEAD)
        against the manifest; while streaming, nothing past the manifest's size is written.
        """
        prefix = prefix_uri.as_dir()
        label = f"checkpoint {prefix}" if manifest.kind == "checkpoint" else f"{manifest.kind} {prefix}"
        self._check_plan(label, [(f.path, f.size) for f in manifest.files], max_file_bytes=max_file_bytes)

        # Check presence and sizes of everything before spending time on large bodies.
        for entry in manifest.files:
            size = self._head_size(prefix.child(entry.path))
            if size is None:
                raise DamagedCheckpoint(f"{label} is damaged: {entry.path} is missing")
            if size != entry.size:
                raise DamagedCheckpoint(f"{label} is damaged: {entry.path} has {size} bytes, expected {entry.size}")

        def fill(tmp: Path) -> None:
            for entry in manifest.files:
                self._download_object(
                    prefix.child(entry.path),
                    safe_join(tmp, entry.path),
                    size=entry.size,
                    sha256=entry.sha256,
                    label=label,
                    rel=entry.path,
                )

        result = self._download_into(dest, fill)
        log.info("downloaded %s (%d files, %d bytes) to %s", label, len(manifest.files), manifest.total_bytes, dest)
        return result

    def download_checkpoint(self, step: int, manifest: Manifest, dest_parent: Path) -> Path:
        """Verified download of ``checkpoint-<step>`` to ``dest_parent/checkpoint-<step>``."""
        return self.download_tree(self.checkpoint_uri(step), manifest, Path(dest_parent) / f"checkpoint-{step}")

    def download_newest_complete(
        self, dest_parent: Path, *, verify: Callable[[Path], None] | None = None
    ) -> tuple[int, Manifest, Path] | None:
        """The newest complete checkpoint that verifies (fetch_first_verified), falling back past
        damaged ones; None if none."""
        complete = self.complete_checkpoints()
        manifests = {str(self.checkpoint_uri(step)): m for step, m in complete}
        candidates = [Candidate(step, str(self.checkpoint_uri(step)), m.fingerprint) for step, m in complete]
        found = fetch_first_verified(self.client, candidates, dest_parent, verify=verify, manifests=manifests)
        if found is None:
            return None
        return found.candidate.step, manifests[found.candidate.uri], found.path

    def download_verified(
        self, step: int, dest_parent: Path, *, manifest: Manifest | None = None
    ) -> tuple[Manifest, Path]:
        """``checkpoint-<step>`` checked against the contract: its manifest (``manifest``, as the
        listing read it moments ago, or read now), every required file listed, every size (HEAD
        before any body) and hash. A checkpoint deleted or replaced since fails those checks.
        Raises DamagedCheckpoint."""
        manifest = manifest if manifest is not None else self.read_manifest(step)
        uri = self.checkpoint_uri(step)
        if manifest is None:
            raise DamagedCheckpoint(f"{uri} lost its manifest")
        listed = {f.path for f in manifest.files}
        missing = [name for name in REQUIRED_CHECKPOINT_FILES if name not in listed]
        if missing:
            raise DamagedCheckpoint(f"{uri} lacks {', '.join(missing)}: it cannot resume exactly")
        return manifest, self.download_checkpoint(step, manifest, dest_parent)

    def fetch_tree(self, uri: S3Uri, dest: Path) -> Path:
        """Download a directory-like prefix (a base model, a user's adapter) to ``dest``.

        With a ``_COMPLETE.json`` there, everything is verified against it; without one,
        every object under the prefix is downloaded with its size checked.
        """
        prefix = uri.as_dir()
        manifest_uri = prefix.child(MANIFEST_NAME)
        data = self._get_small(manifest_uri, MAX_MANIFEST_BYTES)
        if data is not None:
            manifest = Manifest.from_bytes(data, source=str(manifest_uri))
            try:
                return self.download_tree(prefix, manifest, dest)
            except DownloadTooLarge as exc:
                raise ConfigError(f"{exc}; raise the limit if that is expected") from None

        objects: list[tuple[str, int]] = []
        for key, size in self._list_objects(prefix):
            if key.endswith("/"):
                continue  # "directory marker" written by consoles and some tools
            rel = key[len(prefix.key) :]
            problem = relpath_problem(rel)
            if problem:
                raise ConfigError(f"cannot fetch {prefix}: object key {key!r} {problem}; rename or remove it")
            objects.append((rel, size))
            if len(objects) > MAX_FILES:
                raise ConfigError(f"cannot fetch {prefix}: more than {MAX_FILES} objects")
        if not objects:
            raise ConfigError(f"nothing found at {prefix}: check the URI and that the upload finished")
        try:
            self._check_plan(str(prefix), objects)
        except DownloadTooLarge as exc:
            raise ConfigError(f"{exc}; raise the limit if that is expected") from None
        except DamagedCheckpoint as exc:  # two keys clash (`x` and `x/y`)
            raise ConfigError(f"cannot fetch {exc}; rename or remove the objects") from None

        label = f"download of {prefix}"

        def fill(tmp: Path) -> None:
            for rel, size in objects:
                self._download_object(
                    prefix.child(rel), safe_join(tmp, rel), size=size, sha256=None, label=label, rel=rel
                )

        result = self._download_into(dest, fill)
        log.info("fetched %s (%d files, %d bytes) to %s", prefix, len(objects), sum(s for _, s in objects), dest)
        return result

    # ---------------------------------------------------------------- uploads

    def upload_tree(
        self,
        local_dir: Path,
        prefix_uri: S3Uri,
        *,
        kind: str,
        step: int | None,
        fingerprint: dict[str, Any],
        exclude: frozenset[str] = frozenset(),
    ) -> Manifest:
        """Publish ``local_dir`` at ``prefix_uri``: old manifest off first, new manifest on last.

        The manifest is built from the local files before uploading, so ``local_dir``
        must not change meanwhile (callers pass a snapshot).
        """
        local_dir = Path(local_dir)
        prefix = prefix_uri.as_dir()
        manifest = build_manifest(local_dir, kind=kind, step=step, fingerprint=fingerprint, exclude=exclude)
        manifest_uri = prefix.child(MANIFEST_NAME)
        self._delete_object(manifest_uri, "removing the old manifest of")

        wanted = {prefix.key + entry.path for entry in manifest.files}
        stale = [key for key, _ in self._list_objects(prefix) if key not in wanted]
        if stale:
            log.info("removing %d stale object(s) under %s", len(stale), prefix)
            self._delete_keys(prefix.bucket, stale, prefix)

        for entry in manifest.files:
            path = local_dir / entry.path
            if path.stat().st_size != entry.size:
                raise TrainerError(f"{path} changed while it was being published")
            target = prefix.child(entry.path)
            with s3_errors("uploading to", target):
                self.client.upload_file(str(path), target.bucket, target.key, Config=self._transfer)

        with s3_errors("writing the manifest", manifest_uri):
            self.client.put_object(
                Bucket=manifest_uri.bucket,
                Key=manifest_uri.key,
                Body=manifest.to_bytes(),
                ContentType="application/json",
            )
        return manifest

    def upload_checkpoint(self, local_dir: Path, step: int, fingerprint: dict[str, Any]) -> Manifest:
        """Publish an HF checkpoint directory as ``checkpoint-<step>`` (without training_args.bin)."""
        return self.upload_tree(
            local_dir,
            self.checkpoint_uri(step),
            kind="checkpoint",
            step=step,
            fingerprint=fingerprint,
            exclude=CHECKPOINT_EXCLUDES,
        )

    def upload_adapter(self, local_dir: Path, fingerprint: dict[str, Any], *, step: int | None = None) -> Manifest:
        """Publish the final adapter + tokenizer at ``adapter/``."""
        return self.upload_tree(
            local_dir,
            self.adapter_uri(),
            kind="adapter",
            step=step,
            fingerprint=fingerprint,
            exclude=CHECKPOINT_EXCLUDES,
        )

    def read_adapter_manifest(self) -> Manifest | None:
        """The adapter's manifest (None until the adapter is complete)."""
        uri = self.adapter_uri().child(MANIFEST_NAME)
        data = self._get_small(uri, MAX_MANIFEST_BYTES)
        return None if data is None else Manifest.from_bytes(data, source=str(uri))

    def upload_files(self, local_dir: Path, prefix_uri: S3Uri) -> int:
        """Upload the regular files under ``local_dir`` that changed since the last call; no manifest."""
        local_dir = Path(local_dir)
        prefix = prefix_uri.as_dir()
        uploaded = 0
        if not local_dir.is_dir():
            return 0
        for dirpath, dirnames, filenames in os.walk(local_dir, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if path.is_symlink() or not path.is_file():
                    continue
                rel = path.relative_to(local_dir).as_posix()
                info = path.stat()
                stamp = (info.st_size, info.st_mtime_ns)
                memo = (str(prefix), rel)
                if self._uploaded_stats.get(memo) == stamp:
                    continue
                target = prefix.child(rel)
                with s3_errors("uploading to", target):
                    self.client.upload_file(str(path), target.bucket, target.key, Config=self._transfer)
                self._uploaded_stats[memo] = stamp
                uploaded += 1
        return uploaded

    # -------------------------------------------------------------- retention

    def abort_unfinished_uploads(self) -> list[str]:
        """Abort the multipart uploads left under this job's prefix (a pod killed mid-upload leaves
        its parts stored, and billed, until someone aborts them); returns the keys.

        Call it before this attempt uploads anything: one attempt of a job runs at a time, so every
        unfinished upload under the prefix is an earlier attempt's. Best effort: a server without
        the API, or credentials without s3:ListBucketMultipartUploads / s3:AbortMultipartUpload,
        gives a warning, not a failed job.
        """
        aborted: list[str] = []
        try:
            with s3_errors("listing unfinished uploads", self.root):
                paginator = self.client.get_paginator("list_multipart_uploads")
                for page in paginator.paginate(Bucket=self.root.bucket, Prefix=self.root.key):
                    for upload in page.get("Uploads", []) or []:
                        key, upload_id = upload["Key"], upload["UploadId"]
                        self.client.abort_multipart_upload(Bucket=self.root.bucket, Key=key, UploadId=upload_id)
                        aborted.append(key)
        except (StorageError, StorageAuthError) as exc:
            log.warning("could not abort unfinished uploads under %s: %s", self.root, exc)
        return aborted

    def delete_checkpoint(self, step: int) -> None:
        """Remove ``checkpoint-<step>``: its manifest first, so it is never complete while half gone."""
        prefix = self.checkpoint_uri(step)
        self._delete_object(prefix.child(MANIFEST_NAME), "deleting the manifest")
        keys = [key for key, _ in self._list_objects(prefix)]
        self._delete_keys(prefix.bucket, keys, prefix)

    def apply_retention(
        self,
        keep: int,
        fingerprint: dict[str, Any],
        protect: frozenset[int] = frozenset(),
    ) -> list[int]:
        """Delete old checkpoints of this job and leftovers of killed uploads; returns the deleted steps.

        Keeps the newest ``keep`` complete checkpoints whose fingerprint matches, never the
        newest complete one; deletes incomplete checkpoints below the newest complete step
        unless protected; leaves checkpoints with another fingerprint and unreadable
        manifests alone.
        """
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        wanted = _normalized(fingerprint)
        complete: dict[int, Manifest] = {}
        incomplete: list[int] = []
        for step in self._checkpoint_steps():
            try:
                manifest = self.read_manifest(step)
            except DamagedCheckpoint as exc:
                log.warning("retention leaves checkpoint-%d alone: %s", step, exc)
                continue
            if manifest is None:
                incomplete.append(step)
            else:
                complete[step] = manifest
        if not complete:
            return []
        newest = max(complete)
        matching = sorted(
            (s for s, m in complete.items() if same_run(_normalized(m.fingerprint), wanted)), reverse=True
        )
        doomed = {s for s in matching[keep:] if s != newest and s not in protect}
        doomed |= {s for s in incomplete if s < newest and s not in protect}
        deleted: list[int] = []
        for step in sorted(doomed):
            self.delete_checkpoint(step)
            deleted.append(step)
        if deleted:
            log.info("retention deleted checkpoint(s) %s under %s", deleted, self.root)
        return deleted

    # --------------------------------------------------------------- progress

    def _json_uri(self, name: str) -> S3Uri:
        if not _JSON_NAME_RE.match(name):
            raise ValueError(f"invalid JSON object name {name!r}")
        return self.root.child(name)

    def put_json(self, name: str, obj: Any) -> None:
        """Write a small JSON document (e.g. progress.json) under the root."""
        uri = self._json_uri(name)
        body = json.dumps(obj, sort_keys=True, indent=2).encode("utf-8")
        with s3_errors("writing", uri):
            self.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=body, ContentType="application/json")

    def get_json(self, name: str) -> dict[str, Any] | None:
        """Read a JSON object written by ``put_json``; None when absent or not a JSON object."""
        uri = self._json_uri(name)
        try:
            data = self._get_small(uri, MAX_JSON_BYTES)
        except DamagedCheckpoint as exc:
            log.warning("ignoring %s: %s", uri, exc)
            return None
        if data is None:
            return None
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            log.warning("ignoring %s: not valid JSON", uri)
            return None
        if not isinstance(doc, dict):
            log.warning("ignoring %s: not a JSON object", uri)
            return None
        return doc


# ----------------------------------------------------------------- the checkpoint contract


def parse_checkpoint_uri(text: str) -> tuple[S3Uri, int] | None:
    """``s3://bucket/<root>/checkpoints/checkpoint-<step>[/]`` as (the job's root, step); None when
    the URI does not name a checkpoint that way. Raises ValueError for a malformed URI."""
    uri = S3Uri.parse(text)
    parts = uri.key.rstrip("/").split("/")
    if len(parts) < 2 or parts[-2] != CHECKPOINTS_DIR.rstrip("/"):
        return None
    step = parse_checkpoint_name(parts[-1])
    if step is None:
        return None
    root = "/".join(parts[:-2])
    return S3Uri(uri.bucket, root + "/" if root else ""), step


def check_pickles_safe(checkpoint_dir: Path) -> None:
    """Load each pickled state file with torch's weights-only unpickler; refuse anything else
    (DamagedCheckpoint). Uses transformers' allow-list (numpy RNG state) exactly as its resume does."""
    import pickle

    import torch
    from transformers.trainer import safe_globals

    for name in PICKLED_STATE_FILES:
        path = checkpoint_dir / name
        if not path.is_file():
            continue
        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DamagedCheckpoint(f"{name} is not a plain tensor/state file ({first[:200]})") from None


def read_checkpoint_state(checkpoint_dir: Path) -> CheckpointState:
    """The run a checkpoint's trainer_state.json describes; DamagedCheckpoint when it does not parse."""
    path = Path(checkpoint_dir) / "trainer_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        return CheckpointState(
            global_step=int(state["global_step"]),
            max_steps=int(state.get("max_steps") or 0),
            epoch=float(state.get("epoch") or 0.0),
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise DamagedCheckpoint(f"trainer_state.json is unusable ({type(exc).__name__}: {exc})"[:300]) from None


@dataclass(frozen=True)
class Fetched:
    """A checkpoint downloaded and verified: the candidate it was, and where it lies now."""

    candidate: Candidate
    path: Path


def fetch_verified(
    client: Any,
    cand: Candidate,
    dest_parent: Path,
    *,
    verify: Callable[[Path], None] | None,
    manifest: Manifest | None = None,
) -> Path:
    """Download one candidate under ``dest_parent`` checked against the contract (manifest, required
    files, sizes, hashes, a trainer_state.json that parses), then ``verify(path)`` (the trainer's
    pickle check). ``manifest``: the candidate's as already read (else read now). Raises
    DamagedCheckpoint; a checkpoint that fails a check is removed again."""
    parsed = parse_checkpoint_uri(cand.uri)
    if parsed is None or parsed[1] != cand.step:
        raise DamagedCheckpoint(f"{cand.uri} does not name checkpoint-{cand.step}")
    _, path = CheckpointStore(client, parsed[0]).download_verified(cand.step, dest_parent, manifest=manifest)
    _verify_or_remove(path, verify)
    return path


def _verify_or_remove(path: Path, verify: Callable[[Path], None] | None) -> None:
    try:
        if verify is not None:
            verify(path)
        read_checkpoint_state(path)
    except DamagedCheckpoint:
        shutil.rmtree(path, ignore_errors=True)
        raise


def fetch_first_verified(
    client: Any,
    candidates: Sequence[Candidate],
    dest_parent: Path,
    *,
    verify: Callable[[Path], None] | None = None,
    ready: Mapping[str, Path | DamagedCheckpoint] | None = None,
    manifests: Mapping[str, Manifest] | None = None,
) -> Fetched | None:
    """The first candidate that downloads and verifies (fetch_verified); a damaged one is skipped
    with a warning and a ``checkpoint_damaged`` event, for the next. None when none verifies.

    ``ready``: candidates already downloaded and verified but for ``verify`` (by URI), or the
    damage found doing so (the start-up prefetch): used instead of reading them again.
    ``manifests``: the candidates' manifests as the listing read them (by URI): not read again."""
    for cand in candidates:
        try:
            done = (ready or {}).get(cand.uri)
            if isinstance(done, DamagedCheckpoint):
                raise done
            if done is not None:
                _verify_or_remove(done, verify)
                path = done
            else:
                path = fetch_verified(
                    client, cand, dest_parent, verify=verify, manifest=(manifests or {}).get(cand.uri)
                )
            return Fetched(cand, path)
        except DamagedCheckpoint as exc:
            log.warning("skipping damaged checkpoint %s: %s", cand.uri, exc)
            emit_event("checkpoint_damaged", uri=cand.uri, reason=str(exc))
    return None

"""The ``_COMPLETE.json`` manifest: what makes a checkpoint in S3 count, and how it is verified.

A checkpoint exists only once its manifest does (written last), and every file is
checked against the manifest's size and sha256 on download. Manifests come from
storage that anyone with bucket access can write, so parsing is strict: paths are
validated before they ever touch the local filesystem. Pure: no S3, no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

from .errors import DamagedCheckpoint, TrainerError

MANIFEST_NAME = "_COMPLETE.json"
FORMAT_VERSION = 1
MAX_FILES = 10_000
MAX_SEGMENT_CHARS = 255  # NAME_MAX of the usual Linux filesystems
MAX_PATH_CHARS = 1024
KINDS = frozenset({"checkpoint", "adapter", "compile-cache"})
CHECKPOINT_NAME_RE = re.compile(r"^checkpoint-([0-9]{1,12})$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_BLOCK = 1 << 20


def parse_checkpoint_name(name: str) -> int | None:
    """Step of a ``checkpoint-<digits>`` name, or None.

    Only the canonical spelling counts (``checkpoint-7``, not ``checkpoint-007``), so a
    step always maps back to exactly the name it was read from.
    """
    if not isinstance(name, str):
        return None
    match = CHECKPOINT_NAME_RE.match(name)
    if not match:
        return None
    digits = match.group(1)
    if len(digits) > 1 and digits.startswith("0"):
        return None
    return int(digits)


def relpath_problem(path: str) -> str | None:
    """Why ``path`` is not a safe relative POSIX file path, or None when it is."""
    if not isinstance(path, str) or not path:
        return "is empty"
    if "\\" in path:
        return "contains a backslash"
    if path.startswith("/"):
        return "is absolute"
    if len(path) > MAX_PATH_CHARS:
        return f"is longer than {MAX_PATH_CHARS} characters"
    for segment in path.split("/"):
        if segment == "":
            return "has an empty segment"
        if segment in (".", ".."):
            return f"has a {segment!r} segment"
        if not _SEGMENT_RE.match(segment):
            return "has characters outside [A-Za-z0-9._-]"
        if len(segment) > MAX_SEGMENT_CHARS:
            return f"has a segment longer than {MAX_SEGMENT_CHARS} characters"
    return None


def tree_problem(paths: list[str]) -> str | None:
    """Why a set of safe relative paths cannot all be files of one directory tree, or None.

    A path listed twice, or a path that is also a directory of another (``x`` and ``x/y``),
    would make a download fail half-way with an OS error instead of a verification error.
    """
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            return f"file path {path!r} is listed twice"
        seen.add(path)
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in seen:
                return f"{parent!r} is listed as a file and as the directory of {path!r}"
    return None


def _aware_timestamp(text: str) -> bool:
    """An ISO 8601 date-time with a UTC offset (what build_manifest writes)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return moment.tzinfo is not None


@dataclass(frozen=True)
class FileEntry:
    """One file of a manifest: relative POSIX path, size in bytes, lowercase hex sha256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a complete checkpoint (or adapter) in S3 consists of."""

    kind: str  # "checkpoint" | "adapter" | "compile-cache"
    step: int | None
    files: tuple[FileEntry, ...]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_bytes(self) -> bytes:
        doc = {
            "format_version": self.format_version,
            "kind": self.kind,
            "step": self.step,
            "created_at": self.created_at,
            "fingerprint": self.fingerprint,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }
        return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str) -> Manifest:
        """Parse and validate; any problem is a ``DamagedCheckpoint`` naming ``source``."""

        def damaged(why: str) -> DamagedCheckpoint:
            return DamagedCheckpoint(f"manifest {source} is unusable: {why}")

        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise damaged(f"not valid JSON ({exc})") from None
        except RecursionError:
            raise damaged("JSON nested too deeply") from None
        if not isinstance(doc, dict):
            raise damaged("top level is not a JSON object")

        version = doc.get("format_version")
        if not _is_int(version):
            raise damaged("format_version missing or not an integer")
        if version != FORMAT_VERSION:
            raise damaged(f"unknown format_version {version} (this trainer reads {FORMAT_VERSION})")

        kind = doc.get("kind")
        if kind not in KINDS:
            raise damaged(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        step = doc.get("step")
        if step is not None and not (_is_int(step) and step >= 0):
            raise damaged(f"step must be a non-negative integer or null, got {step!r}")
        if kind == "checkpoint" and step is None:
            raise damaged("a checkpoint manifest needs a step")
        created_at = doc.get("created_at", "")
        if not isinstance(created_at, str):
            raise damaged("created_at is not a string")
        if not _aware_timestamp(created_at):
            created_at = ""  # informational only (readers compute an age from it): unknown, not damaged
        fingerprint = doc.get("fingerprint", {})
        if not isinstance(fingerprint, dict):
            raise damaged("fingerprint is not an object")

        raw_files = doc.get("files")
        if not isinstance(raw_files, list):
            raise damaged("files is missing or not a list")
        if len(raw_files) > MAX_FILES:
            raise damaged(f"{len(raw_files)} files, more than the limit of {MAX_FILES}")
        files: list[FileEntry] = []
        seen: set[str] = set()
        for i, raw in enumerate(raw_files):
            if not isinstance(raw, dict):
                raise damaged(f"files[{i}] is not an object")
            path, size, digest = raw.get("path"), raw.get("size"), raw.get("sha256")
            if not isinstance(path, str):
                raise damaged(f"files[{i}].path is not a string")
            problem = relpath_problem(path)
            if problem:
                raise damaged(f"file path {path!r} {problem}")
            if path == MANIFEST_NAME:
                raise damaged(f"lists its own name {MANIFEST_NAME} as a file")
            if path in seen:
                raise damaged(f"file path {path!r} is listed twice")
            seen.add(path)
            if not _is_int(size) or size < 0:
                raise damaged(f"size of {path!r} must be a non-negative integer, got {size!r}")
            if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                raise damaged(f"sha256 of {path!r} is not 64 lowercase hex digits")
            files.append(FileEntry(path, size, digest))
        problem = tree_problem([f.path for f in files])
        if problem:
            raise damaged(problem)

        return cls(
            kind=kind,
            step=step,
            files=tuple(files),
            fingerprint=fingerprint,
            created_at=created_at,
            format_version=version,
        )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _walk_files(root: Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``root``, sorted; refuses symlinks."""
    found: list[str] = []

    def visit(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = prefix + entry.name
                if entry.is_symlink():
                    raise TrainerError(f"refusing to publish {directory / entry.name}: it is a symlink")
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    visit(Path(entry.path), rel + "/")
                elif stat.S_ISREG(mode):
                    found.append(rel)

    visit(root, "")
    return found


def build_manifest(
    local_dir: Path,
    *,
    kind: str,
    step: int | None,
    fingerprint: dict[str, Any],
    exclude: frozenset[str] = frozenset(),
) -> Manifest:
    """Describe the regular files under ``local_dir`` (sizes and hashes) as a manifest.

    ``exclude`` holds relative POSIX paths to leave out; a top-level ``_COMPLETE.json``
    is always left out (it is regenerated).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise TrainerError(f"cannot publish {local_dir}: not a directory")
    entries: list[FileEntry] = []
    for rel in _walk_files(local_dir):
        if rel in exclude or rel == MANIFEST_NAME:
            continue
        problem = relpath_problem(rel)
        if problem:
            raise TrainerError(f"cannot publish {local_dir / rel}: its name {problem}")
        path = local_dir / rel
        entries.append(FileEntry(rel, path.stat().st_size, sha256_file(path)))
    if len(entries) > MAX_FILES:
        raise TrainerError(f"cannot publish {local_dir}: {len(entries)} files, limit {MAX_FILES}")
    return Manifest(
        kind=kind,
        step=step,
        files=tuple(entries),
        fingerprint=dict(fingerprint),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def safe_join(root: Path, rel: str) -> Path:
    """``root / rel`` for a validated relative path; refuses anything that escapes ``root``."""
    problem = relpath_problem(rel)
    if problem:
        raise DamagedCheckpoint(f"refusing path {rel!r}: it {problem}")
    root_resolved = Path(root).resolve()
    target = (root_resolved / rel).resolve()
    if target != root_resolved and not target.is_relative_to(root_resolved):
        raise DamagedCheckpoint(f"refusing path {rel!r}: it escapes {root}")
    return Path(root) / rel

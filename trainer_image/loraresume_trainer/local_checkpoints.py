"""Local checkpoint directories are scratch: once a newer one is durable in S3, they go.

HF's own rotation is off (`save_total_limit=None`: retention is S3's, `storage.keepCheckpoints`),
so without this a run's scratch disk would grow by one checkpoint per `save_steps` for as long
as it trains. After checkpoint-N is durable, every local `checkpoint-K` with K < N is removed:
the disk holds the newest durable checkpoint and the ones still being saved or uploaded (their
upload snapshots are hard links, so removing an original never touches what is uploading).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .manifest import parse_checkpoint_name


def local_steps(output_dir: Path) -> list[int]:
    """Steps of the `checkpoint-<N>` directories under the Trainer's output_dir, ascending."""
    if not output_dir.is_dir():
        return []
    steps = (parse_checkpoint_name(p.name) for p in output_dir.iterdir() if p.is_dir() and not p.is_symlink())
    return sorted(s for s in steps if s is not None)


def prune_older_than(output_dir: Path, durable_step: int) -> list[int]:
    """Remove the local checkpoints older than the durable `durable_step`; returns the steps removed."""
    removed = [step for step in local_steps(output_dir) if step < durable_step]
    for step in removed:
        shutil.rmtree(output_dir / f"checkpoint-{step}", ignore_errors=True)
    return removed

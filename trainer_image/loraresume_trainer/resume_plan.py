"""Which checkpoint a run starts from: a pure decision over what the store holds."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ResumeRefused
from .fingerprint import fingerprint_diff, same_run


class ResumeMode(enum.Enum):
    FRESH = "fresh"  # no usable checkpoint: start from the adapter (or a new LoRA)
    EXACT = "exact"  # full trainer state: optimizer, scheduler, RNG, step, data position
    WARM = "warm"  # job changed and warm_start is set: adapter weights only, new schedule


@dataclass(frozen=True)
class Candidate:
    """A checkpoint to try, with where it lives (`uri`) and the fingerprint it was made with."""

    step: int
    uri: str
    fingerprint: Mapping[str, Any]


@dataclass(frozen=True)
class ResumePlan:
    mode: ResumeMode
    # Tried in order; a damaged one is skipped for the next. Empty for FRESH.
    candidates: tuple[Candidate, ...] = field(default=())


def plan_resume(
    complete: Sequence[Candidate],
    current: Mapping[str, Any],
    *,
    explicit: Candidate | None = None,
    warm_start: bool = False,
) -> ResumePlan:
    """Decide how to start.

    `complete` are this job's complete checkpoints, newest first. An explicit checkpoint is
    the starting point unless this job has since saved newer ones (they continue from it,
    so a relaunch must not go back). Checkpoints made with the current fingerprint resume
    exactly; if none match, a changed job is refused with the list of changes unless
    `warm_start` is set. Raises ResumeRefused.
    """
    if explicit is None:
        ordered = list(complete)
    else:
        rest = [c for c in complete if c.uri != explicit.uri]
        ordered = (
            [c for c in rest if c.step > explicit.step] + [explicit] + [c for c in rest if c.step <= explicit.step]
        )
    matching = tuple(c for c in ordered if same_run(c.fingerprint, current))
    if matching:
        return ResumePlan(ResumeMode.EXACT, matching)
    if not ordered:
        return ResumePlan(ResumeMode.FRESH)
    if warm_start:
        return ResumePlan(ResumeMode.WARM, tuple(ordered))
    newest = ordered[0]
    changes = "; ".join(fingerprint_diff(newest.fingerprint, current))
    raise ResumeRefused(
        f"cannot resume exactly from {newest.uri}: the job changed since it was saved ({changes}). "
        "Restore the old values, use a new storage.uri for a new run, or set resume.warm_start: true "
        "to start a new schedule from that checkpoint's adapter weights"
    )

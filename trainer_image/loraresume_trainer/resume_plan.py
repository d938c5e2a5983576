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
    # This job's complete checkpoints made with another fingerprint (an earlier job under the same
    # storage.uri): never resumed from exactly, never deleted by retention, reported.
    foreign: tuple[Candidate, ...] = field(default=())


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
    foreign = tuple(c for c in complete if not same_run(c.fingerprint, current))
    if matching:
        return ResumePlan(ResumeMode.EXACT, matching, foreign)
    if not ordered:
        return ResumePlan(ResumeMode.FRESH)
    if warm_start:
        return ResumePlan(ResumeMode.WARM, tuple(ordered), foreign)
    newest = ordered[0]
    changes = "; ".join(fingerprint_diff(newest.fingerprint, current))
    raise ResumeRefused(
        f"cannot resume exactly from {newest.uri}: the job changed since it was saved ({changes}). "
        "Restore the old values, or use a new storage.uri for a new run (with resume.from_checkpoint set to "
        "that checkpoint and resume.warm_start: true to start a new schedule from its adapter weights)"
    )


def refuse_overwriting_foreign(plan: ResumePlan, *, start_step: int, max_steps: int) -> None:
    """A run numbers its checkpoints by step, so from `start_step` on it would write over another
    job's checkpoint of the same step (a warm start in place, typically). Raises ResumeRefused naming
    them; `max_steps` < 1 (by epochs) counts every later step as reachable."""
    reachable = [c for c in plan.foreign if c.step > start_step and (max_steps < 1 or c.step <= max_steps)]
    if not reachable:
        return
    names = ", ".join(f"checkpoint-{c.step}" for c in sorted(reachable, key=lambda c: c.step))
    raise ResumeRefused(
        f"this run would overwrite {names} made by a different job under the same storage.uri; they are "
        f"kept. Use a new storage.uri (resume.from_checkpoint: {reachable[0].uri} with resume.warm_start: true "
        "starts from its adapter weights there), or delete them to reuse this prefix"
    )


def refuse_other_adapter(saved: Mapping[str, Any], current: Mapping[str, Any], *, adapter_uri: str) -> None:
    """A finished adapter already in this job's storage must be this run's: training again would
    overwrite another job's result (whose checkpoints retention may have deleted, so the resume
    plan alone could not tell). Raises ResumeRefused listing every difference."""
    if same_run(saved, current):
        return
    changes = "; ".join(fingerprint_diff(saved, current))
    raise ResumeRefused(
        f"{adapter_uri} already holds the finished adapter of a different job ({changes}); training "
        "would overwrite it. Use a new storage.uri for this job, or delete that adapter to train again here"
    )

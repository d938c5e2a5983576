"""Which checkpoint a run starts from: a pure decision over what the store holds."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ResumeRefused
from .fingerprint import LENGTH_KEYS, fingerprint_diff, same_run, with_length_of


class ResumeMode(enum.Enum):
    FRESH = "fresh"  # no usable checkpoint: start from the adapter (or a new LoRA)
    EXACT = "exact"  # full trainer state: optimizer, scheduler, RNG, step, data position (also resume.extend)
    WARM = "warm"  # job changed and resume.warmStart is set: adapter weights only, new schedule


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
    # resume.extend: the explicit checkpoint of the (shorter) run this job extends, among the candidates.
    extends: Candidate | None = None


def plan_resume(
    complete: Sequence[Candidate],
    current: Mapping[str, Any],
    *,
    explicit: Candidate | None = None,
    warm_start: bool = False,
    extend: bool = False,
) -> ResumePlan:
    """Decide how to start.

    `complete` are this job's complete checkpoints, newest first. An explicit checkpoint is
    the starting point unless this job has since saved newer ones (they continue from it,
    so a relaunch must not go back). Checkpoints made with the current fingerprint resume
    exactly; if none match, a changed job is refused with the list of changes unless
    `warm_start` is set. With `extend`, an explicit checkpoint that is not one of this job's own
    resumes exactly too although its run was shorter (check_extension: only the length may differ,
    and the job must be longer); one of the job's own (the operator's relaunch names the job's newest)
    is resumed as any of them. Raises ResumeRefused.
    """
    ordered = ordered_candidates(complete, explicit)
    own = {c.uri for c in complete}
    extended = explicit if extend and explicit is not None and explicit.uri not in own else None
    if extended is not None:
        check_extension(extended, current)
    matching = tuple(c for c in ordered if c is extended or same_run(c.fingerprint, current))
    foreign = tuple(c for c in complete if not same_run(c.fingerprint, current))
    if matching:
        return ResumePlan(ResumeMode.EXACT, matching, foreign, extends=extended)
    if not ordered:
        return ResumePlan(ResumeMode.FRESH)
    if warm_start:
        return ResumePlan(ResumeMode.WARM, tuple(ordered), foreign)
    newest = ordered[0]
    changes = "; ".join(fingerprint_diff(newest.fingerprint, current))
    raise ResumeRefused(
        f"cannot resume exactly from {newest.uri}: the job changed since it was saved ({changes}). "
        "Restore the old values, or use a new storage.uri for a new run (with resume.fromCheckpoint set to "
        "that checkpoint and resume.warmStart: true to start a new schedule from its adapter weights, or "
        "resume.extend: true to continue it exactly with a larger max_steps or num_train_epochs)"
    )


def ordered_candidates(complete: Sequence[Candidate], explicit: Candidate | None) -> list[Candidate]:
    """The order a resume tries checkpoints in: this job's newest first, an explicit checkpoint
    after the job's own newer ones (they continue from it) and before its older ones."""
    if explicit is None:
        return list(complete)
    rest = [c for c in complete if c.uri != explicit.uri]
    return [c for c in rest if c.step > explicit.step] + [explicit] + [c for c in rest if c.step <= explicit.step]


def check_extension(cand: Candidate, current: Mapping[str, Any], *, epochs_done: float | None = None) -> None:
    """`resume.extend` from `cand`: its fingerprint may differ from the job's in the run length
    (LENGTH_KEYS) only, and the job must train past it: `max_steps` above its step, or by epochs
    (`max_steps` < 1) more `num_train_epochs` than the `epochs_done` its trainer state records
    (checked once that is known; None skips it). Raises ResumeRefused listing every difference,
    or naming the numbers."""
    if not same_run(with_length_of(cand.fingerprint, current), current):
        changes = "; ".join(fingerprint_diff(cand.fingerprint, current))
        raise ResumeRefused(
            f"cannot extend {cand.uri} (resume.extend: true): only {' and '.join(LENGTH_KEYS)} may differ from "
            f"the run that saved it, but the job changed ({changes}). Restore the other values, or use "
            "resume.warmStart: true instead of resume.extend to start a new schedule from its adapter weights"
        )
    max_steps = int(current.get("max_steps", -1))
    if max_steps >= 1 and max_steps <= cand.step:
        raise ResumeRefused(
            f"resume.extend: the job's max_steps {max_steps} does not go past {cand.uri}, which has trained "
            f"{cand.step} steps; an extension must train longer: set max_steps above {cand.step}"
        )
    epochs = float(current.get("num_train_epochs", 0.0))
    if max_steps < 1 and epochs_done is not None and epochs <= epochs_done:
        raise ResumeRefused(
            f"resume.extend: the job's num_train_epochs {epochs:g} does not go past {cand.uri}, which has trained "
            f"{epochs_done:g} epochs ({cand.step} steps); an extension must train longer: set num_train_epochs "
            f"above {epochs_done:g}"
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
        f"kept. Use a new storage.uri (resume.fromCheckpoint: {reachable[0].uri} with resume.warmStart: true "
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

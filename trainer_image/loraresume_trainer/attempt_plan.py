"""What one attempt does, decided from what the store holds: pure functions the executor carries out.

1. `plan_prefetch` (before the heavy imports): what to download while they run: the job's inputs
   (base model, adapter, dataset from S3) and the checkpoint a resume will most likely start from.
2. `plan_attempt` (once the fingerprint is known): nothing to do (the adapter is already complete),
   or the checkpoints to try, in order, each downloaded and verified against the checkpoint
   contract (checkpoint_store: manifest, required files, sizes, hashes, pickles, trainer state).
3. `plan_start` (once one verified, or none did): where training starts, whether it extends a
   shorter run, or whether the run is already at its end (publish the checkpoint's adapter).

No S3, no torch, no files: the executor (pipeline.Pipeline) observes, downloads and trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import JobConfig
from .errors import ConfigError, TrainerError
from .fingerprint import with_length_of
from .grad_checkpointing import kept_mode
from .resume_plan import (
    Candidate,
    ResumeMode,
    ResumePlan,
    check_extension,
    ordered_candidates,
    plan_resume,
    refuse_other_adapter,
    refuse_overwriting_foreign,
)


@dataclass(frozen=True)
class StoreView:
    """What the job's storage holds, read once before the imports."""

    complete: tuple[Candidate, ...] = ()  # this job's complete checkpoints, newest first
    adapter_fingerprint: Mapping[str, Any] | None = None  # the finished adapter's, when there is one
    explicit: Candidate | None = None  # resume.fromCheckpoint, resolved to its manifest
    # Resolving resume.fromCheckpoint failed: raised only where the attempt needs it (a job whose
    # adapter is complete has nothing to do, whatever became of the checkpoint it started from).
    explicit_error: ConfigError | None = None

    @property
    def durable_step(self) -> int | None:
        return self.complete[0].step if self.complete else None


@dataclass(frozen=True)
class Download:
    """One input to fetch: `kind` names the cache entry (base, adapter, dataset), `field` the job field."""

    kind: str
    source: str
    field: str


@dataclass(frozen=True)
class Prefetch:
    inputs: tuple[Download, ...] = ()
    checkpoint: Candidate | None = None  # the first a resume would try: fetched while the imports run


@dataclass(frozen=True)
class AttemptPlan:
    done: bool  # the job's adapter is complete: nothing to train
    resume: ResumePlan = field(default_factory=lambda: ResumePlan(ResumeMode.FRESH))


@dataclass(frozen=True)
class CheckpointState:
    """What a checkpoint's trainer_state.json says about its run."""

    global_step: int
    max_steps: int
    epoch: float


@dataclass(frozen=True)
class StartPoint:
    mode: ResumeMode
    checkpoint: Candidate | None = None  # the one that verified (EXACT or WARM)
    checkpoint_dir: Path | None = None  # where it lies, verified
    step: int = 0  # the first step trained is step + 1
    extending: bool = False  # resume.extend from another (shorter) run's checkpoint
    finished: bool = False  # the checkpoint is at the run's end: publish its adapter, train nothing

    @property
    def resume_dir(self) -> Path | None:
        """The checkpoint the Trainer resumes from (full trainer state), or None."""
        return self.checkpoint_dir if self.mode is ResumeMode.EXACT else None

    @property
    def warm_adapter(self) -> tuple[Path, str] | None:
        """A warm start's adapter: the checkpoint's weights (directory, URI)."""
        if self.mode is ResumeMode.WARM and self.checkpoint_dir is not None and self.checkpoint is not None:
            return self.checkpoint_dir, self.checkpoint.uri
        return None


def refuse_early(view: StoreView) -> None:
    """What can be refused before the slow imports: an unusable resume.fromCheckpoint, unless the
    job's adapter is complete (then there is nothing to do, whatever became of it). Raises ConfigError."""
    if view.explicit_error is not None and view.adapter_fingerprint is None:
        raise view.explicit_error


def plan_prefetch(job: JobConfig, view: StoreView, *, inputs: bool = True) -> Prefetch:
    """What to download before the fingerprint is known. Inputs come from S3 only (a local path
    or a hub id is used as is); the checkpoint is the first in resume order, which the fingerprint
    almost always confirms (a relaunch of this job); if it does not, nothing is lost but its download."""
    wanted: list[Download] = []
    if inputs:
        for kind, source, name in (
            ("base", job.base_model, "base_model"),
            ("adapter", job.adapter, "adapter"),
            ("dataset", job.dataset.source, "dataset.source"),
        ):
            if source is not None and source.startswith("s3://"):
                wanted.append(Download(kind, source, name))
    if view.adapter_fingerprint is not None:
        return Prefetch(tuple(wanted))
    order = ordered_candidates(view.complete, view.explicit)
    return Prefetch(tuple(wanted), order[0] if order else None)


def saved_fingerprints(view: StoreView, current: Mapping[str, Any], *, extend: bool) -> list[Mapping[str, Any]]:
    """The fingerprints of the run this attempt continues, newest first, for the gradient-checkpointing
    mode it keeps (`auto` never changes mode on a resume): the job's adapter and checkpoints, else the
    explicit checkpoint (an extension's compared with the job's length, which is all that differs)."""
    saved: list[Mapping[str, Any]] = [view.adapter_fingerprint] if view.adapter_fingerprint is not None else []
    saved += [c.fingerprint for c in view.complete]
    if kept_mode(saved, current) is None and view.explicit is not None:
        extended = with_length_of(view.explicit.fingerprint, current) if extend else None
        saved.append(extended or view.explicit.fingerprint)
    return saved


def plan_attempt(job: JobConfig, view: StoreView, fingerprint: Mapping[str, Any], *, adapter_uri: str) -> AttemptPlan:
    """Nothing to do, or how to resume (resume_plan.plan_resume). Raises ResumeRefused (another job's
    adapter at `adapter_uri`, a changed job) or the ConfigError of an unusable resume.fromCheckpoint."""
    if view.adapter_fingerprint is not None:
        refuse_other_adapter(view.adapter_fingerprint, fingerprint, adapter_uri=adapter_uri)
        return AttemptPlan(done=True)
    if view.explicit_error is not None:
        raise view.explicit_error
    resume = plan_resume(
        view.complete,
        fingerprint,
        explicit=view.explicit,
        warm_start=job.resume.warm_start,
        extend=job.resume.extend,
    )
    return AttemptPlan(done=False, resume=resume)


def training_finished(state: CheckpointState, max_steps: int) -> bool:
    """Whether the checkpoint is at the end of this job's run. `max_steps` is the job's (its trainer
    state records the length of the run that saved it: an extended run's is shorter); by epochs
    (< 1) the checkpoint's own total counts, which is the job's for a checkpoint of its fingerprint."""
    total = max_steps if max_steps >= 1 else state.max_steps
    return total > 0 and state.global_step >= total


def plan_start(
    plan: AttemptPlan,
    fingerprint: Mapping[str, Any],
    fetched: tuple[Candidate, Path, CheckpointState] | None,
    *,
    checkpoints_uri: str,
) -> StartPoint:
    """Where training starts, given the first candidate that verified (None: none did, or none to try).

    Raises TrainerError when there were candidates and none verified (never start over silently on
    top of work that exists: a retry may read them intact), ResumeRefused when the run would write
    over another job's checkpoints or does not extend the run it names."""
    resume = plan.resume
    if resume.candidates and fetched is None:
        raise TrainerError(
            f"none of the {len(resume.candidates)} complete checkpoints under {checkpoints_uri} verified (see "
            "the checkpoint_damaged events); not starting over on top of them. Inspect or delete them to start "
            "from scratch"
        )
    max_steps = int(fingerprint["max_steps"])
    if fetched is None:
        refuse_overwriting_foreign(resume, start_step=0, max_steps=max_steps)
        return StartPoint(ResumeMode.FRESH)
    cand, path, state = fetched
    exact = resume.mode is ResumeMode.EXACT
    step = cand.step if exact else 0
    refuse_overwriting_foreign(resume, start_step=step, max_steps=max_steps)
    # Extending another run's checkpoint (not continuing this job's own): by epochs, whether the job
    # goes past it is known from its trainer state only.
    extending = exact and cand == resume.extends
    if extending:
        check_extension(cand, fingerprint, epochs_done=state.epoch)
    finished = exact and not extending and training_finished(state, max_steps)
    return StartPoint(resume.mode, cand, path, step, extending=extending, finished=finished)

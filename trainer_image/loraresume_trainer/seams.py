"""The executor's seams: what trains (an Engine) and who watches (Hooks), both handed in.

`pipeline.Pipeline` observes the store, downloads and verifies, plans (attempt_plan) and publishes;
the Engine loads the stack, derives the fingerprint and trains. The trainer's engine is
`unsloth_engine.UnslothEngine`; the sandbox's stand-in trainer passes its own (a timed loop, no
torch) and the GPU benchmarks pass Hooks that time phases and instrument the Trainer: nothing is
monkeypatched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .attempt_plan import StartPoint, StoreView
    from .outcome import TerminationMessage
    from .pipeline import Pipeline


@dataclass(frozen=True)
class Inputs:
    """The job's inputs as local paths (prefetched while the imports ran)."""

    base_path: str | None = None  # a local directory, or a hub id as given
    adapter_dir: Path | None = None
    dataset_file: Path | None = None
    # Checkpoints fetched ahead (by URI): verified but for the engine's own check, or the damage found.
    checkpoints: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """What the engine derived before planning: the run's fingerprint, and its own state for train()."""

    fingerprint: dict[str, Any]
    state: Any = None


class Engine(Protocol):
    @property
    def fetches_inputs(self) -> bool:
        """Whether the executor fetches the job's inputs (base model, adapter, dataset) for it."""

    @property
    def event_fields(self) -> Mapping[str, Any]:
        """Extra fields of the `start` event (the stand-in marks itself)."""

    @property
    def compiles(self) -> bool:
        """Whether it compiles kernels whose caches are worth keeping across attempts (compile_cache.py)."""

    def load_stack(self, run: Pipeline) -> None:
        """The heavy imports; the executor's downloads run meanwhile. Must not touch S3."""

    def prepare(self, run: Pipeline, inputs: Inputs, view: StoreView) -> Prepared:
        """Texts, model sources and the fingerprint (everything that decides the trajectory)."""

    def verify_checkpoint(self, path: Path) -> None:
        """The engine's own check of a downloaded checkpoint; raises DamagedCheckpoint."""

    def train(self, run: Pipeline, prepared: Prepared, start: StartPoint) -> TerminationMessage:
        """Train from `start` to the end (or to a SIGTERM) and publish through `run`."""


class Hooks:
    """Observation points for benchmarks and tests; every one is a no-op here. Subclass to watch."""

    def phase(self, name: str, t0: float, t1: float, **fields: Any) -> None:
        """A timed part of the attempt ended (time.monotonic() at start and end)."""

    def before_inputs(self) -> None:
        """Called once on the download thread, before the first download (the imports run meanwhile):
        a benchmark may wait here for its inputs to exist and the GPU to be free."""

    def before_model_load(self) -> None:
        """Called once, after the imports, right before the model is loaded."""

    def model_loaded(self, model: Any) -> None:
        """The model is loaded and its LoRA is ready."""

    def trainer_ready(self, trainer: Any) -> None:
        """The Trainer is built; train() comes next (add callbacks, wrap its methods)."""

    def upload_checkpoint(self, step: int) -> bool:
        """Whether to upload the checkpoint of `step` (False leaves it local: a benchmark's uploads-off
        cycles). Never False in production: a checkpoint left local does not survive the pod."""
        return True

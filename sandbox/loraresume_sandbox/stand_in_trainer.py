"""A stand-in for the trainer image: the trainer's contract without torch (sandbox, benchmarks).

`python -m loraresume_sandbox.stand_in_trainer` is `loraresume-train` with the training
replaced by a timed loop: the trainer's `cli.main` and its executor (`pipeline.Pipeline`:
observing the store, planning with `attempt_plan`, the verified download with fallback,
publishing) run unchanged with this module's `StandInEngine` handed in through the executor's
seam (`seams.Engine`). Everything the operator reads is written by the trainer's own code: the
job config (`config.load_job`, so a bad config exits 78 with the field), the checkpoint store
(`CheckpointStore`: files first, `_COMPLETE.json` manifest last, retention), `progress.json`
(`progress.progress_record`, start-up phases included), the final adapter with its manifest,
the JSON event lines on stdout, and the exit codes and termination message. SIGTERM is the trainer's
`StopRequest`: before training it exits 75 at once; during training the current step
finishes, a checkpoint is saved there (off the save grid), made durable, and it exits 75.

It starts in ~0.4 s of CPU and ~50 MB (boto3 and pydantic, no torch), so the sandbox's node
agent can run hundreds of them. Use it through the node agent's `entrypoints`:

    NodeAgent(kube, workdir=..., entrypoints={"*": [sys.executable, "-m",
              "loraresume_sandbox.stand_in_trainer"]}, extra_env={ENV_STEP_SECONDS: "0.3"})

Steps, checkpoints and logging follow the job's `training.max_steps`, `save_steps`,
`logging_steps`; the environment tunes the rest:

- `LORARESUME_STANDIN_STEP_SECONDS` (default 0.2): wall time of one "optimizer step".
- `LORARESUME_STANDIN_LOAD_SECONDS` (default 0): time "loading the model" before training
  (a SIGTERM then exits 75 at once, as the trainer does).
- `LORARESUME_STANDIN_FAIL_AT_STEP`: crash (exit 1) after that step, in attempt 1 only.
- `LORARESUME_STANDIN_FILE_BYTES` (default 256): size of each fake weight/state file.

Checkpoints hold the files the real trainer requires (adapter, optimizer, scheduler, RNG
state, trainer_state.json) with fake contents and a fingerprint marked `stand_in`, so the
real trainer refuses to resume from them (and the stand-in from the real trainer's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from loraresume_trainer.attempt_plan import StartPoint, StoreView
from loraresume_trainer.checkpoint_store import read_checkpoint_state
from loraresume_trainer.errors import ConfigError
from loraresume_trainer.fingerprint import job_fingerprint
from loraresume_trainer.outcome import TerminationMessage
from loraresume_trainer.pipeline import Pipeline
from loraresume_trainer.progress import emit_event
from loraresume_trainer.seams import Inputs, Prepared

log = logging.getLogger("loraresume_trainer.stand_in")

ENV_STEP_SECONDS = "LORARESUME_STANDIN_STEP_SECONDS"
ENV_LOAD_SECONDS = "LORARESUME_STANDIN_LOAD_SECONDS"
ENV_FAIL_AT_STEP = "LORARESUME_STANDIN_FAIL_AT_STEP"
ENV_FILE_BYTES = "LORARESUME_STANDIN_FILE_BYTES"
_POLL = 0.05


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def synthetic_loss(step: int, max_steps: int, seed: int) -> float:
    """A deterministic, decreasing loss curve (same step, same loss, across resumes)."""
    wobble = (int(hashlib.sha256(f"{seed}:{step}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF - 0.5) * 0.05
    return round(2.5 * math.exp(-3.0 * step / max(1, max_steps)) + 0.3 + wobble, 6)


class StandInEngine:
    """The trainer's Engine with the model replaced: a fingerprint without data, a timed loop."""

    fetches_inputs = False  # no model, no data: nothing of the job's inputs is read
    compiles = False  # no kernels: no compile caches to keep
    event_fields: Mapping[str, Any] = MappingProxyType({"stand_in": True})

    def __init__(self) -> None:
        self.step_seconds = max(0.0, _env_float(ENV_STEP_SECONDS, 0.2))
        self.load_seconds = max(0.0, _env_float(ENV_LOAD_SECONDS, 0.0))
        self.fail_at = int(_env_float(ENV_FAIL_AT_STEP, 0))
        self.file_bytes = max(1, int(_env_float(ENV_FILE_BYTES, 256)))

    # -- the executor's seams -----------------------------------------------------------------------
    def load_stack(self, run: Pipeline) -> None:
        if int(run.job.training.get("max_steps") or 0) < 1:
            raise ConfigError(
                "the stand-in trainer needs max_steps >= 1 (epochs are not simulated)", field="training.max_steps"
            )
        # "Loading the model": the StopRequest is in phase "loading", so a SIGTERM exits 75 at once.
        deadline = time.monotonic() + self.load_seconds
        while time.monotonic() < deadline:
            time.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))

    def prepare(self, run: Pipeline, inputs: Inputs, view: StoreView) -> Prepared:
        job = run.job
        source = job.dataset.source or f"{job.dataset.name}:{job.dataset.split}"
        fingerprint = job_fingerprint(
            job,
            dataset_sha256=hashlib.sha256(f"stand-in:{source}".encode()).hexdigest(),
            lora=job.lora.model_dump(mode="json"),
        )
        return Prepared({**fingerprint, "stand_in": True})

    def verify_checkpoint(self, path: Path) -> None:
        """The contract's checks are all a stand-in checkpoint can pass (its state files are not pickles)."""
        read_checkpoint_state(path)

    def train(self, run: Pipeline, prepared: Prepared, start: StartPoint) -> TerminationMessage:
        job, fingerprint = run.job, prepared.fingerprint
        max_steps = int(job.training.get("max_steps") or 0)
        save_steps = max(1, int(job.training.get("save_steps") or 10))
        logging_steps = max(1, int(job.training.get("logging_steps") or 1))
        run.clock.mark("model_loaded")
        step, loss = start.step, None
        run.stop.phase = "training"
        try:
            while step < max_steps:
                if step == start.step:
                    run.clock.mark("state_restored", step=step)
                time.sleep(self.step_seconds)  # one step; a SIGTERM lets it finish (the handler only sets a flag)
                step += 1
                run.clock.mark("first_step", step=step)
                loss = synthetic_loss(step, max_steps, job.seed)
                if step % logging_steps == 0 or step == max_steps:
                    emit_event("log", step=step, attempt=job.attempt, loss=loss)
                    run.put_progress(
                        step, max_steps, {"loss": loss, "learning_rate": 1e-4, "epoch": step / max_steps}, "Running"
                    )
                if self.fail_at and step == self.fail_at and job.attempt == 1:
                    raise RuntimeError(f"stand-in: simulated crash after step {step}")
                if run.stop.requested:
                    break
                if step % save_steps == 0 or step == max_steps:  # HF saves at the end too
                    self.save_checkpoint(run, step, loss, fingerprint)
        finally:
            run.stop.phase = "finishing"

        if run.stop.requested and step < max_steps:
            if run.durable_step != step:
                self.save_checkpoint(run, step, loss, fingerprint)
            return run.preempted(step, max_steps, {"loss": loss})
        out = run.dirs.final / "adapter"
        shutil.rmtree(out, ignore_errors=True)
        self.write_adapter(run, out, step)
        run.publish_adapter(out, fingerprint)
        run.put_progress(step, max_steps, {"loss": loss} if loss is not None else {}, "Succeeded")
        return run.succeeded(step)

    # -- checkpoints ------------------------------------------------------------------------------
    def _fill(self, path: Path, seed: str) -> None:
        block = hashlib.sha256(seed.encode()).digest()
        path.write_bytes((block * (self.file_bytes // 32 + 1))[: self.file_bytes])

    def write_adapter(self, run: Pipeline, directory: Path, step: int) -> None:
        """Adapter weights and tokenizer as a checkpoint and the final adapter hold them (fake contents)."""
        job = run.job
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "r": job.lora.r,
                    "lora_alpha": job.lora.alpha,
                    "target_modules": list(job.lora.target_modules),
                    "base_model_name_or_path": job.base_model,
                    "stand_in": True,
                },
                indent=2,
            )
        )
        self._fill(directory / "adapter_model.safetensors", f"{job.seed}:{step}")
        (directory / "tokenizer_config.json").write_text(json.dumps({"stand_in": True}))

    def save_checkpoint(self, run: Pipeline, step: int, loss: float | None, fingerprint: dict[str, Any]) -> None:
        """A checkpoint-<step> directory as HF writes it, published through the store (manifest last)."""
        job = run.job
        directory = run.dirs.output / f"checkpoint-{step}"
        shutil.rmtree(directory, ignore_errors=True)
        self.write_adapter(run, directory, step)
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            self._fill(directory / name, f"{name}:{step}")
        (directory / "trainer_state.json").write_text(
            json.dumps(
                {
                    "global_step": step,
                    "max_steps": int(job.training.get("max_steps") or 0),
                    "save_steps": int(job.training.get("save_steps") or 10),
                    "logging_steps": int(job.training.get("logging_steps") or 1),
                    "log_history": [{"step": step, "loss": loss}],
                    "stand_in": True,
                },
                indent=2,
            )
        )
        run.store.upload_checkpoint(directory, step, fingerprint)
        run.durable_step = step
        run.store.apply_retention(job.storage.keep_checkpoints, fingerprint)
        shutil.rmtree(directory, ignore_errors=True)
        emit_event("checkpoint_durable", step=step, uri=str(run.store.checkpoint_uri(step)))


def main(argv: list[str] | None = None) -> int:
    """The trainer's own CLI (exit codes, termination message, SIGTERM handling) around the stand-in."""
    from loraresume_trainer.cli import main as trainer_main

    return trainer_main(argv, engine=StandInEngine())


if __name__ == "__main__":
    sys.exit(main())

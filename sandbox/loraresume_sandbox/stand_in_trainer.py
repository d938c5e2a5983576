"""A stand-in for the trainer image: the trainer's contract without torch (sandbox, benchmarks).

`python -m loraresume_sandbox.stand_in_trainer` is `loraresume-train` with the training
replaced by a timed loop. Everything the operator reads is written by the trainer's own
code: the job config (`config.load_job`, so a bad config exits 78 with the field), the
checkpoint store (`CheckpointStore`: files first, `_COMPLETE.json` manifest last,
retention), `progress.json` (`progress.progress_record`), the final adapter with its
manifest, the JSON event lines on stdout, and the exit codes and termination message
(the trainer's `cli.main` runs unchanged around this pipeline). SIGTERM is the trainer's
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
from pathlib import Path
from typing import Any

from loraresume_trainer import pipeline as _trainer_pipeline
from loraresume_trainer.errors import ConfigError, DamagedCheckpoint
from loraresume_trainer.fingerprint import job_fingerprint
from loraresume_trainer.outcome import Outcome, TerminationMessage
from loraresume_trainer.pipeline import Pipeline
from loraresume_trainer.progress import emit_event
from loraresume_trainer.resume_plan import (
    Candidate,
    ResumeMode,
    ResumePlan,
    plan_resume,
    refuse_other_adapter,
    refuse_overwriting_foreign,
)

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


class StandInPipeline(Pipeline):
    """The trainer's Pipeline (work dirs, S3 client, store, adapter publishing) with a timed loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        training = self.job.training
        self.max_steps = int(training.get("max_steps") or 0)
        self.save_steps = max(1, int(training.get("save_steps") or 10))
        self.logging_steps = max(1, int(training.get("logging_steps") or 1))
        self.step_seconds = max(0.0, _env_float(ENV_STEP_SECONDS, 0.2))
        self.load_seconds = max(0.0, _env_float(ENV_LOAD_SECONDS, 0.0))
        self.fail_at = int(_env_float(ENV_FAIL_AT_STEP, 0))
        self.file_bytes = max(1, int(_env_float(ENV_FILE_BYTES, 256)))

    # -- what the real pipeline derives from the model and the data -------------------------------
    def stand_in_fingerprint(self) -> dict[str, Any]:
        job = self.job
        source = job.dataset.source or f"{job.dataset.name}:{job.dataset.split}"
        fingerprint = job_fingerprint(
            job,
            dataset_sha256=hashlib.sha256(f"stand-in:{source}".encode()).hexdigest(),
            lora=job.lora.model_dump(mode="json"),
        )
        return {**fingerprint, "stand_in": True}

    def fetch_stand_in(self, plan: ResumePlan) -> tuple[Candidate, int] | None:
        """The first candidate that downloads and verifies (sizes, sha256, required files); its step."""
        for cand in plan.candidates:
            try:
                path = self.download_verified(cand)
                state = json.loads((path / "trainer_state.json").read_text())
                return cand, int(state["global_step"])
            except (DamagedCheckpoint, ValueError, KeyError) as exc:
                log.warning("skipping damaged checkpoint %s: %s", cand.uri, exc)
                emit_event("checkpoint_damaged", uri=cand.uri, reason=str(exc))
        return None

    # -- checkpoints ------------------------------------------------------------------------------
    def _write_weights(self, directory: Path, step: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "r": self.job.lora.r,
                    "lora_alpha": self.job.lora.alpha,
                    "target_modules": list(self.job.lora.target_modules),
                    "base_model_name_or_path": self.job.base_model,
                    "stand_in": True,
                },
                indent=2,
            )
        )
        block = hashlib.sha256(f"{self.job.seed}:{step}".encode()).digest()
        (directory / "adapter_model.safetensors").write_bytes((block * (self.file_bytes // 32 + 1))[: self.file_bytes])

    def save_checkpoint(self, step: int, loss: float | None, fingerprint: dict[str, Any]) -> None:
        """A checkpoint-<step> directory as HF writes it, published through the store (manifest last)."""
        directory = self.dirs.output / f"checkpoint-{step}"
        shutil.rmtree(directory, ignore_errors=True)
        self._write_weights(directory, step)
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            block = hashlib.sha256(f"{name}:{step}".encode()).digest()
            (directory / name).write_bytes((block * (self.file_bytes // 32 + 1))[: self.file_bytes])
        (directory / "trainer_state.json").write_text(
            json.dumps(
                {
                    "global_step": step,
                    "max_steps": self.max_steps,
                    "save_steps": self.save_steps,
                    "logging_steps": self.logging_steps,
                    "log_history": [{"step": step, "loss": loss}],
                    "stand_in": True,
                },
                indent=2,
            )
        )
        self.store.upload_checkpoint(directory, step, fingerprint)
        self.durable_step = step
        self.store.apply_retention(self.job.storage.keep_checkpoints, fingerprint)
        shutil.rmtree(directory, ignore_errors=True)
        emit_event("checkpoint_durable", step=step, uri=str(self.store.checkpoint_uri(step)))

    # -- the attempt ------------------------------------------------------------------------------
    def run(self) -> TerminationMessage:
        job = self.job
        t_start = time.monotonic()
        # Listing first, like the trainer: bad credentials or an unreachable endpoint fail fast.
        complete = [
            Candidate(s, str(self.store.checkpoint_uri(s)), m.fingerprint) for s, m in self.store.complete_checkpoints()
        ]
        if complete:
            self.durable_step = complete[0].step
        if self.max_steps < 1:
            raise ConfigError(
                "the stand-in trainer needs max_steps >= 1 (epochs are not simulated)", field="training.max_steps"
            )
        self._sleep_loading(self.load_seconds)
        fingerprint = self.stand_in_fingerprint()
        done = self.store.read_adapter_manifest()
        if done is not None:
            refuse_other_adapter(done.fingerprint, fingerprint, adapter_uri=str(self.store.adapter_uri()))
            log.info("adapter already complete in %s: nothing to do", self.store.adapter_uri())
            return self._succeeded(None)

        plan = plan_resume(
            complete,
            fingerprint,
            explicit=self.explicit_candidate(),
            warm_start=job.resume.warm_start,
            extend=job.resume.extend,  # the checkpoint of a shorter run, continued exactly (the trainer's rules)
        )
        fetched = self.fetch_stand_in(plan) if plan.candidates else None
        self.report_foreign(plan)
        mode = plan.mode if fetched else ResumeMode.FRESH
        start = fetched[1] if fetched and mode is ResumeMode.EXACT else 0
        refuse_overwriting_foreign(plan, start_step=start, max_steps=self.max_steps)
        emit_event(
            "start",
            attempt=job.attempt,
            mode=mode.value,
            checkpoint=fetched[0].uri if fetched else None,
            step=start,
            prepare_seconds=round(time.monotonic() - t_start, 3),
            stand_in=True,
        )
        if start >= self.max_steps:  # killed after the last checkpoint, before the adapter
            self.publish(start, None, fingerprint)
            return self._succeeded(start)
        return self.run_steps(start, fingerprint)

    def _sleep_loading(self, seconds: float) -> None:
        # The trainer's StopRequest is in phase "loading": a SIGTERM exits 75 from its handler.
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))

    def run_steps(self, start: int, fingerprint: dict[str, Any]) -> TerminationMessage:
        job = self.job
        step, loss = start, None
        self.stop.phase = "training"
        try:
            while step < self.max_steps:
                time.sleep(self.step_seconds)  # one step; a SIGTERM lets it finish (the handler only sets a flag)
                step += 1
                loss = synthetic_loss(step, self.max_steps, job.seed)
                if step % self.logging_steps == 0 or step == self.max_steps:
                    emit_event("log", step=step, attempt=job.attempt, loss=loss)
                    self._put_progress(
                        step,
                        self.max_steps,
                        {"loss": loss, "learning_rate": 1e-4, "epoch": step / self.max_steps},
                        "Running",
                    )
                if self.fail_at and step == self.fail_at and job.attempt == 1:
                    raise RuntimeError(f"stand-in: simulated crash after step {step}")
                if self.stop.requested:
                    break
                if step % self.save_steps == 0 or step == self.max_steps:  # HF saves at the end too
                    self.save_checkpoint(step, loss, fingerprint)
        finally:
            self.stop.phase = "finishing"

        if self.stop.requested and step < self.max_steps:
            t_flush = time.monotonic()
            if self.durable_step != step:
                self.save_checkpoint(step, loss, fingerprint)
            since = time.monotonic() - (self.stop.received_at or t_flush)
            log.warning(
                "preempted: checkpoint-%s durable %.2f s after %s", self.durable_step, since, self.stop.signal_name
            )
            emit_event("preempted", step=step, durable_step=self.durable_step, seconds=round(since, 3))
            self._put_progress(step, self.max_steps, {"loss": loss}, "Preempted")
            return TerminationMessage(
                outcome="preempted",
                reason=f"SIGTERM: stopped at step {step}; checkpoint-{self.durable_step} is durable",
                exit_code=Outcome.PREEMPTED.code,
                step=step,
                durable_step=self.durable_step,
                checkpoint=str(self.store.checkpoint_uri(self.durable_step)) if self.durable_step is not None else None,
            )
        self.publish(step, loss, fingerprint)
        return self._succeeded(step)

    def publish(self, step: int, loss: float | None, fingerprint: dict[str, Any]) -> None:
        out = self.dirs.final / "adapter"
        shutil.rmtree(out, ignore_errors=True)
        self._write_weights(out, step)
        (out / "tokenizer_config.json").write_text(json.dumps({"stand_in": True}))
        self.publish_adapter(out, fingerprint)
        self._put_progress(step, self.max_steps, {"loss": loss} if loss is not None else {}, "Succeeded")


def main(argv: list[str] | None = None) -> int:
    """The trainer's own CLI (exit codes, termination message, SIGTERM handling) around the stand-in."""
    # cli.main imports `Pipeline` from loraresume_trainer.pipeline when it runs: hand it this one.
    _trainer_pipeline.Pipeline = StandInPipeline  # type: ignore[misc]
    from loraresume_trainer.cli import main as trainer_main

    return trainer_main(argv)


if __name__ == "__main__":
    sys.exit(main())

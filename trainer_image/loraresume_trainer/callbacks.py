"""The Trainer hooks that make checkpoints durable, honour SIGTERM and report progress."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .checkpoint_store import PROGRESS_NAME
from .compile_cache import lookup_counts
from .progress import StartupClock, emit_event, mean_train_loss, progress_record, tokens_before
from .stop_signal import StopRequest
from .uploader import BackgroundUploader

log = logging.getLogger(__name__)


class DurableCheckpointCallback(TrainerCallback):
    """Hands every saved checkpoint to the background uploader; stops and saves on SIGTERM."""

    def __init__(
        self,
        uploader: BackgroundUploader,
        stop: StopRequest,
        *,
        attempt: int,
        logs: tuple[Path, Any] | None = None,
        foreign_checkpoints: Sequence[int] = (),
        clock: StartupClock | None = None,
        upload: Callable[[int], bool] | None = None,
        on_warm: Callable[[], None] | None = None,
        warm_steps: int = 3,
    ) -> None:
        """`logs`: (local TensorBoard dir, S3 prefix) uploaded with every checkpoint, so a preempted
        attempt's curves survive too. `foreign_checkpoints`: reported in every progress record.
        `clock`: marks the start-up's last phases (state restored, first step). `upload(step)`: whether
        to upload that checkpoint (Hooks.upload_checkpoint; always in production). `on_warm()`: called
        once after `warm_steps` optimizer steps of this attempt (the compile cache's save)."""
        self.uploader = uploader
        self.foreign_checkpoints = tuple(foreign_checkpoints)
        self.logs = logs
        self.stop = stop
        self.attempt = attempt
        self.clock = clock or StartupClock(attempt=attempt)
        self.upload = upload
        self.on_warm = on_warm
        self.warm_steps = warm_steps
        self.resumed_from = 0
        self.count_offset = 0.0
        self.trl_offset = 0.0
        self.last_save_seconds: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.resumed_from = state.global_step
        # num_tokens is the Trainer's own count (training_args: include_num_input_tokens_seen), which
        # the checkpoint's trainer state carries across resumes; a checkpoint saved before it was
        # counted restores 0: carry on from its logged history (TRL's count) instead.
        restored = float(getattr(state, "num_input_tokens_seen", 0) or 0)
        before = tokens_before(state.log_history, state.global_step) if state.global_step else 0.0
        self.count_offset = 0.0 if restored else before
        self.trl_offset = before  # TRL counts from this process's start

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # HF calls this after it restored optimizer, scheduler and RNG and fetched the first batches
        # (past the skipped ones): the state is restored and the data positioned.
        self.clock.mark("state_restored", step=state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if "first_step" not in self.clock.phases:
            self.clock.mark("first_step", step=state.global_step, compiled=lookup_counts() or None)
        if self.on_warm is not None and state.global_step - self.resumed_from >= self.warm_steps:
            on_warm, self.on_warm = self.on_warm, None
            on_warm()
        if self.stop.requested and not control.should_training_stop:
            log.warning("%s received: saving checkpoint-%d and stopping", self.stop.signal_name, state.global_step)
            control.should_save = True
            control.should_training_stop = True
        self._save_started = time.monotonic()
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        self.last_save_seconds = time.monotonic() - self._save_started
        if self.upload is not None and not self.upload(step):
            return
        self.uploader.submit_checkpoint(Path(args.output_dir) / f"checkpoint-{step}", step)
        if self.logs and self.logs[0].is_dir():
            self.uploader.submit_files(*self.logs)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None:
            return
        fixed: dict[str, Any] = {}
        if "num_tokens" in logs:  # TRL's count, none on Unsloth's GPU path: kept beside ours (this run's part)
            fixed["num_tokens_trl"] = float(logs["num_tokens"])
        if "num_input_tokens_seen" in logs:
            fixed["num_tokens"] = self.count_offset + float(logs["num_input_tokens_seen"])
        elif "num_tokens_trl" in fixed:
            fixed["num_tokens"] = self.trl_offset + fixed["num_tokens_trl"]
        if "train_loss" in logs:
            fixed["train_loss"] = mean_train_loss(state.log_history, args.logging_steps)
        logs.update(fixed)
        if state.log_history:  # the entry HF appended for this log; checkpoints carry it
            state.log_history[-1].update(fixed)
        emit_event("log", step=state.global_step, attempt=self.attempt, **logs)
        if "loss" in logs:
            record = progress_record(
                step=state.global_step,
                max_steps=state.max_steps,
                logs=logs,
                attempt=self.attempt,
                durable_step=self.uploader.durable_step,
                phase="Running",
                foreign_checkpoints=self.foreign_checkpoints,
                startup=self.clock.phases,
            )
            self.uploader.submit_json(PROGRESS_NAME, record)

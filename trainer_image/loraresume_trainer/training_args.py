"""The job's `training` section to a TRL SFTConfig: passthrough with checks and sane defaults."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import JobConfig
from .errors import ConfigError
from .grad_checkpointing import Mode, sft_gradient_checkpointing

if TYPE_CHECKING:
    from trl import SFTConfig

# The seed notebook's values; every one can be overridden in `training`.
DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "warmup_steps": 5,
    "max_steps": 60,
    "learning_rate": 2e-4,
    "optim": "adamw_8bit",  # Unsloth's CPU mode swaps in adamw_torch by itself
    "weight_decay": 0.01,
    "lr_scheduler_type": "linear",
    "logging_steps": 1,
    "save_steps": 10,
    "seed": 3407,
    # Padded batches (Unsloth compiles its blocks for them) were faster than padding-free ones in
    # every measured case on the H200 (8B, batch 2: +9 % without checkpointing, full rows; +3 %
    # with variable-length rows), at ~15-23 s more compilation per process
    # (benchmarks/RESULTS.md, issue 16). `padding_free: true` in `training` turns it back on.
    "padding_free": False,
}


def sft_field_names() -> set[str]:
    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig) if f.init}


def check_training_fields(training: dict[str, Any]) -> None:
    """Unknown SFTConfig fields are errors naming the field (with a suggestion)."""
    known = sft_field_names()
    for key in training:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(f"unknown SFTConfig field{hint}", field=f"training.{key}")


def precision_defaults(on_gpu: bool, bf16_supported: bool) -> dict[str, bool]:
    """bf16 only where the hardware has it; fp16 on older GPUs; fp32 on CPU (exact and portable)."""
    if not on_gpu:
        return {"bf16": False, "fp16": False}
    return {"bf16": bf16_supported, "fp16": not bf16_supported}


# What `training.full_determinism` needs in the environment before torch loads. transformers sets it
# too, but only when the Trainer is built, after the model is on the GPU; cuBLAS sizes its workspace
# once, from the value it sees at its first call (PyTorch's reproducibility notes).
DETERMINISM_ENV: dict[str, str] = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def determinism_env(training: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set before the imports: DETERMINISM_ENV for a job that asks for full
    determinism, less what the pod's environment already sets (an operator's explicit choice wins)."""
    if training.get("full_determinism") is not True:
        return {}
    return {k: v for k, v in DETERMINISM_ENV.items() if k not in environ}


def effective_training(job: JobConfig) -> dict[str, Any]:
    """Defaults overlaid with the job's values: what decides batches and schedule.

    A job that sets `num_train_epochs` but no `max_steps` trains by epochs: the default step count
    would otherwise win (transformers lets max_steps > 0 override epochs)."""
    values = {**DEFAULTS, **job.training}
    if "num_train_epochs" in job.training and "max_steps" not in job.training:
        values["max_steps"] = -1
    return values


def build_sft_config(
    job: JobConfig,
    output_dir: Path,
    *,
    on_gpu: bool,
    bf16_supported: bool,
    tensorboard: bool,
    gradient_checkpointing: Mode = "unsloth",
) -> SFTConfig:
    """Raises ConfigError for unknown fields, an inconsistent max_length or values SFTConfig rejects.

    `gradient_checkpointing`: the run's mode (grad_checkpointing.choose); SFTConfig's flag follows it,
    so TRL's default (on) cannot turn recompute back on under `false`.
    """
    from trl import SFTConfig

    check_training_fields(job.training)
    values = {**precision_defaults(on_gpu, bf16_supported), **effective_training(job)}
    max_length = values.get("max_length", job.max_seq_length)
    if max_length != job.max_seq_length:
        raise ConfigError(
            f"{max_length} differs from max_seq_length {job.max_seq_length}; Unsloth uses max_seq_length, "
            "so set only that one",
            field="training.max_length",
        )
    values.update(
        output_dir=str(output_dir),
        save_strategy="steps",
        save_total_limit=None,  # retention happens in S3; local copies are snapshotted at save
        report_to=["tensorboard"] if tensorboard else "none",
        max_length=job.max_seq_length,
        dataset_text_field="text",
        disable_tqdm=True,
        save_only_model=False,
        ignore_data_skip=False,
        gradient_checkpointing=sft_gradient_checkpointing(gradient_checkpointing),
    )
    # num_tokens in logs and progress: the Trainer's own count of the batches' real tokens (attention
    # mask; without one, tokens other than padding), kept in its state across resumes. TRL's count
    # comes from its loss, which Unsloth's GPU path replaces: it logs none there. (A job may choose
    # another counting; with "no", num_tokens is TRL's where TRL counts.)
    values.setdefault("include_num_input_tokens_seen", "non_padding")
    try:
        return SFTConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"rejected by SFTConfig: {str(exc).splitlines()[0]}", field="training") from None

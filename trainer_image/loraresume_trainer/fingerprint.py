"""What makes a resume exact, recorded in every checkpoint manifest and compared on resume."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .grad_checkpointing import FINGERPRINT_KEY, recorded_mode

if TYPE_CHECKING:
    from .config import JobConfig

# Order here is the order a refusal message lists changes in.
FINGERPRINT_KEYS = (
    "base_model",
    "dataset_sha256",
    "template",
    "max_seq_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "seed",
    "lora",
    "training",
    "gradient_checkpointing",
)
TRAINING_KEY = "training"
# The run's length: the only keys `resume.extend` lets differ from the extended checkpoint's.
LENGTH_KEYS = ("max_steps", "num_train_epochs")

# `training` (SFTConfig) keys left out of the fingerprint's `training` mapping because they do not
# change which rows, in which order, produce which weights: what is logged and when, when
# checkpoints are saved, progress bars and tracking names, and how batches reach the device.
# Everything else in `training` is in the fingerprint (when in doubt it is: eval settings, precision,
# dataloader_num_workers, dataloader_drop_last, logging_nan_inf_filter ...).
TRAJECTORY_NEUTRAL_TRAINING_KEYS = frozenset(
    {
        "logging_steps",
        "logging_first_step",
        "logging_strategy",
        "logging_dir",
        "log_level",
        "log_level_replica",
        "save_steps",
        "disable_tqdm",
        "report_to",
        "run_name",
        # Host-to-device transfer only; the sampler (data order) runs in the main process.
        "dataloader_pin_memory",
        "dataloader_prefetch_factor",
        "dataloader_persistent_workers",
    }
)
# `training` keys recorded at the fingerprint's top level (max_length is max_seq_length: the
# trainer refuses any other value), so they are not listed twice.
TOP_LEVEL_TRAINING_KEYS = frozenset(
    {
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_steps",
        "num_train_epochs",
        "seed",
        "max_length",
    }
)
# Keys added to the fingerprint after checkpoints were first saved without them. A saved
# fingerprint lacking one is compared without it (an upgrade must not refuse every running job);
# `unchecked_keys` names what could not be checked so the caller can warn.
# (The gradient-checkpointing mode, also added later, has a known legacy value instead.)
ADDED_LATER_KEYS = (TRAINING_KEY,)


def texts_sha256(texts: Iterable[str]) -> str:
    """Hash of the training texts in order (length-prefixed, so row boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def normalised_value(value: Any) -> Any:
    """A JSON-stable form: integral floats become ints (1.0 and 1 alike, before and after a JSON
    round trip), non-finite floats strings (NaN never equals itself), tuples lists, mappings dicts."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, Mapping):
        return {str(k): normalised_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalised_value(v) for v in value]
    return str(value)


def training_fingerprint(effective: Mapping[str, Any]) -> dict[str, Any]:
    """The trajectory-relevant part of the effective `training` values (training_args.effective_training)."""
    skip = TRAJECTORY_NEUTRAL_TRAINING_KEYS | TOP_LEVEL_TRAINING_KEYS
    return {k: normalised_value(v) for k, v in sorted(effective.items()) if k not in skip}


def make_fingerprint(
    *,
    base_model: str,
    dataset_sha256: str,
    template: str,
    max_seq_length: int,
    per_device_train_batch_size: int,
    gradient_accumulation_steps: int,
    max_steps: int,
    num_train_epochs: float,
    seed: int,
    lora: Mapping[str, Any],
    training: Mapping[str, Any],
    gradient_checkpointing: str | None = None,
) -> dict[str, Any]:
    """A JSON-able dict; equal dicts mean the same rows, order, batches, schedule, optimizer, LoRA shape and
    gradient-checkpointing mode (omitted when None: a caller that has none, like the stand-in trainer).

    `training`: the effective `training` values; the trajectory-neutral keys and those recorded at
    the top level are dropped (training_fingerprint).
    """
    lora_norm = dict(lora)
    if "target_modules" in lora_norm:
        lora_norm["target_modules"] = sorted(lora_norm["target_modules"])
    return {
        "base_model": base_model,
        "dataset_sha256": dataset_sha256,
        "template": template,
        "max_seq_length": int(max_seq_length),
        "per_device_train_batch_size": int(per_device_train_batch_size),
        "gradient_accumulation_steps": int(gradient_accumulation_steps),
        "max_steps": int(max_steps),
        "num_train_epochs": float(num_train_epochs),
        "seed": int(seed),
        "lora": lora_norm,
        TRAINING_KEY: training_fingerprint(training),
        **({FINGERPRINT_KEY: str(gradient_checkpointing)} if gradient_checkpointing is not None else {}),
    }


def job_fingerprint(job: JobConfig, *, dataset_sha256: str, lora: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint of `job` over a dataset with this content hash (without the checkpointing
    mode, which is chosen later): the trainer's defaults overlaid with the job's `training`."""
    from .training_args import effective_training  # imports TRL's names lazily only

    training = effective_training(job)
    return make_fingerprint(
        base_model=job.base_model,
        dataset_sha256=dataset_sha256,
        template=job.dataset.template,
        max_seq_length=job.max_seq_length,
        per_device_train_batch_size=training["per_device_train_batch_size"],
        gradient_accumulation_steps=training["gradient_accumulation_steps"],
        max_steps=training.get("max_steps", -1),
        num_train_epochs=training.get("num_train_epochs", 3.0),
        seed=job.seed,
        lora=lora,
        training=training,
    )


def with_recorded_mode(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """`fingerprint` with its gradient-checkpointing mode spelled out: checkpoints saved before the
    mode was recorded were trained with Unsloth's (it was hard-coded), and compare as such."""
    return {**fingerprint, FINGERPRINT_KEY: recorded_mode(fingerprint)}


def unchecked_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys `current` records that an older `saved` fingerprint did not: a resume cannot check them."""
    return [k for k in ADDED_LATER_KEYS if k in current and k not in saved]


def comparable(saved: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both fingerprints as compared: modes spelled out, keys the saved one predates left out."""
    skip = set(unchecked_keys(saved, current))
    current_view = {k: v for k, v in with_recorded_mode(current).items() if k not in skip}
    return with_recorded_mode(saved), current_view


def same_run(saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether a saved fingerprint resumes exactly under the current one (see `comparable`)."""
    old, new = comparable(saved, current)
    return old == new


def with_length_of(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """`saved` with the run length (LENGTH_KEYS) of `current`: what an extension compares."""
    return {**saved, **{k: current[k] for k in LENGTH_KEYS if k in current}}


def _short(value: Any) -> str:
    if value is _UNSET:
        return "(not set)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_UNSET = object()


def _changes(path: str, old: Any, new: Any) -> list[str]:
    """One line per changed leaf; mappings are walked (added and removed keys read `(not set)`)."""
    if old == new:
        return []
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        lines = []
        for sub in sorted(set(old) | set(new), key=str):
            lines += _changes(f"{path}.{sub}", old.get(sub, _UNSET), new.get(sub, _UNSET))
        return lines
    return [f"{path}: {_short(old)} -> {_short(new)}"]


def fingerprint_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable changes, e.g. ``max_steps: 30 -> 40`` or ``training.learning_rate: 0.0002 -> 0.0003``;
    empty when resume is exact. Every change is listed."""
    saved, current = comparable(saved, current)
    keys = list(FINGERPRINT_KEYS) + sorted((set(saved) | set(current)) - set(FINGERPRINT_KEYS))
    changes: list[str] = []
    for key in keys:
        old, new = saved.get(key, _UNSET), current.get(key, _UNSET)
        if old == new:
            continue
        if key == "dataset_sha256":
            changes.append(f"dataset content: {str(old)[:12]} -> {str(new)[:12]} (different rows or order)")
        else:
            changes += _changes(key, old, new)
    return changes


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """Hash of named tensors (sorted names, dtype, shape, raw bytes): equal iff bitwise equal."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

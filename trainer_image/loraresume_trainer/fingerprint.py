"""What makes a resume exact, recorded in every checkpoint manifest and compared on resume."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from .grad_checkpointing import FINGERPRINT_KEY, recorded_mode

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
    "gradient_checkpointing",
)


def texts_sha256(texts: Iterable[str]) -> str:
    """Hash of the training texts in order (length-prefixed, so row boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


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
    gradient_checkpointing: str | None = None,
) -> dict[str, Any]:
    """A JSON-able dict; equal dicts mean the same rows, order, batches, schedule, LoRA shape and
    gradient-checkpointing mode (omitted when None: a caller that has none, like the stand-in trainer)."""
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
        **({FINGERPRINT_KEY: str(gradient_checkpointing)} if gradient_checkpointing is not None else {}),
    }


def with_recorded_mode(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """`fingerprint` with its gradient-checkpointing mode spelled out: checkpoints saved before the
    mode was recorded were trained with Unsloth's (it was hard-coded), and compare as such."""
    return {**fingerprint, FINGERPRINT_KEY: recorded_mode(fingerprint)}


def same_run(saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether a saved fingerprint resumes exactly under the current one."""
    return with_recorded_mode(saved) == with_recorded_mode(current)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fingerprint_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable changes, e.g. ``max_steps: 30 -> 40``; empty when resume is exact."""
    saved, current = with_recorded_mode(saved), with_recorded_mode(current)
    keys = list(FINGERPRINT_KEYS) + sorted((set(saved) | set(current)) - set(FINGERPRINT_KEYS))
    changes = []
    for key in keys:
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if key == "dataset_sha256":
            changes.append(f"dataset content: {str(old)[:12]} -> {str(new)[:12]} (different rows or order)")
        elif isinstance(old, Mapping) and isinstance(new, Mapping):
            for sub in sorted(set(old) | set(new)):
                if old.get(sub) != new.get(sub):
                    changes.append(f"{key}.{sub}: {_short(old.get(sub))} -> {_short(new.get(sub))}")
        else:
            changes.append(f"{key}: {_short(old)} -> {_short(new)}")
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

"""Metrics that stay right across resumes, and the progress record the operator reads.

HF's `train_loss` after a resume averages only post-resume steps over all steps, and
TRL's `num_tokens` restarts at 0 (notes/training-stack.md). The log history restored
from the checkpoint holds the truth for the steps before the resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any


def mean_train_loss(log_history: Sequence[Mapping[str, Any]], logging_steps: int) -> float | None:
    """Per-step mean loss over the whole run, from the logged interval means.

    Each `loss` entry averages the steps since the previous one, so weights are step gaps.
    """
    total, steps, last_step = 0.0, 0, 0
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue
        gap = int(entry["step"]) - last_step
        if gap <= 0:
            gap = logging_steps
        total += float(entry["loss"]) * gap
        steps += gap
        last_step = int(entry["step"])
    return total / steps if steps else None


def tokens_before(log_history: Sequence[Mapping[str, Any]], step: int) -> float:
    """The cumulative `num_tokens` logged at or before `step` (0 if none)."""
    best = 0.0
    for entry in log_history:
        if "num_tokens" in entry and int(entry.get("step", 0)) <= step:
            best = float(entry["num_tokens"])
    return best


def progress_record(
    *,
    step: int,
    max_steps: int,
    logs: Mapping[str, Any],
    attempt: int,
    durable_step: int | None,
    phase: str,
    foreign_checkpoints: Sequence[int] = (),
) -> dict[str, Any]:
    """`foreign_checkpoints`: steps of complete checkpoints under the job's prefix made with another
    fingerprint (ResumePlan.foreign); the operator reports them."""

    def num(key: str) -> float | None:
        value = logs.get(key)
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    return {
        "step": step,
        "max_steps": max_steps,
        "loss": num("loss"),
        "learning_rate": num("learning_rate"),
        "grad_norm": num("grad_norm"),
        "epoch": num("epoch"),
        "num_tokens": num("num_tokens"),
        "attempt": attempt,
        "durable_step": durable_step,
        "phase": phase,
        "foreign_checkpoints": sorted(foreign_checkpoints),
        "time": time.time(),
    }


def emit_event(event: str, **fields: Any) -> None:
    """One JSON object per line on stdout: what `kubectl logs` shows and tests read."""
    import json
    import sys

    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items() if v is not None
    }
    sys.stdout.write(json.dumps({"event": event, **clean}, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()

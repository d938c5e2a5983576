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
    startup: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """`foreign_checkpoints`: steps of complete checkpoints under the job's prefix made with another
    fingerprint (ResumePlan.foreign); the operator reports them. `startup`: this attempt's start-up
    phases reached so far, seconds since its process started (StartupClock.phases)."""

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
        "startup": dict(startup or {}),
        "time": time.time(),
    }


# The start-up of an attempt, in order: where a restart's time goes.
STARTUP_PHASES = (
    "compile_cache_restored",  # the compile caches of an earlier attempt are in place (if any were saved)
    "imports_done",  # unsloth, transformers, trl, peft imported (the downloads run meanwhile)
    "inputs_ready",  # base model, adapter and dataset downloaded (or found in the pod's cache)
    "checkpoint_verified",  # the checkpoint to resume from downloaded and verified (or none to resume)
    "model_loaded",  # base + adapter loaded, LoRA ready
    "state_restored",  # optimizer, scheduler, RNG restored and the data positioned: the first step begins
    "first_step",  # the first optimizer step of this attempt done
)


def process_age() -> float:
    """Seconds since this process started, from the kernel's record of it (Linux), so the interpreter's
    own start-up counts; 0.0 where that is not readable."""
    import os

    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rpartition(")")[2].split()
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: ticks after boot
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - started)


class StartupClock:
    """Marks the start-up phases of one attempt: a `startup` event per phase (seconds since the
    process started, and since the phase before), kept for progress.json. A phase is marked once."""

    def __init__(self, *, started: float | None = None, attempt: int | None = None) -> None:
        """`started`: time.monotonic() at process start (default: now less the process's age)."""
        self.started = started if started is not None else time.monotonic() - process_age()
        self.attempt = attempt
        self.phases: dict[str, float] = {}
        self._last = 0.0

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def mark(self, phase: str, **fields: Any) -> float:
        """Record `phase` now; returns its seconds since process start (the first mark's, if repeated)."""
        if phase not in STARTUP_PHASES:
            raise ValueError(f"unknown start-up phase {phase!r}")
        if phase in self.phases:
            return self.phases[phase]
        now = round(self.seconds(), 3)
        self.phases[phase] = now
        emit_event("startup", phase=phase, seconds=now, took=round(now - self._last, 3), attempt=self.attempt, **fields)
        self._last = now
        return now


def emit_event(event: str, **fields: Any) -> None:
    """One JSON object per line on stdout: what `kubectl logs` shows and tests read."""
    import json
    import sys

    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items() if v is not None
    }
    sys.stdout.write(json.dumps({"event": event, **clean}, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()

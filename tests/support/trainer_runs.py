"""Run `loraresume-train` as real processes, read its JSON events, kill it on cue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support import warm_trainer

TRAIN = [sys.executable, "-m", "loraresume_trainer.cli"]


def job_config(
    work: Path,
    *,
    endpoint: str,
    storage_uri: str,
    base_model: str,
    dataset_file: str,
    training: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A small, fast job: fp32 on CPU, 4-bit off, checkpoints every 5 steps."""
    config: dict[str, Any] = {
        "name": "test",
        "baseModel": base_model,
        "maxSeqLength": 128,
        "loadIn4bit": False,
        "dataset": {"source": dataset_file, "template": "alpaca"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "warmup_steps": 2,
            "max_steps": 24,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 5,
            "seed": 1234,
            **(training or {}),
        },
        "storage": {"uri": storage_uri, "endpoint": endpoint, "keepCheckpoints": 3},
        "workDir": str(work / "work"),
        "terminationLog": str(work / "termination-log"),
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@dataclass
class Attempt:
    exit_code: int
    events: list[dict[str, Any]]
    stderr: str
    termination: dict[str, Any] | None
    killed_with: str | None = None
    seconds: float = 0.0  # wall time of the process

    def first_seconds(self, kind: str) -> float | None:
        """Seconds from process start until the first event of `kind` arrived."""
        return next((e["_t"] for e in self.events if e.get("event") == kind), None)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    def losses(self) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in self.of("log") if "loss" in e}


@dataclass
class Kill:
    """Send `sig` once the process has logged step >= `at_step` (and, if set, made one checkpoint durable)."""

    sig: signal.Signals
    at_step: int
    after_durable: bool = True


@dataclass
class Story:
    attempts: list[Attempt] = field(default_factory=list)

    def losses_after_resume(self) -> dict[int, float]:
        """Losses logged by every attempt after the first: the post-resume steps."""
        merged: dict[int, float] = {}
        for attempt in self.attempts[1:]:
            merged.update(attempt.losses())
        return merged

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        UNSLOTH_DISABLE_STATISTICS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra or {})
    return env


def run_attempt(
    config: dict[str, Any],
    work: Path,
    *,
    kill: Kill | None = None,
    env: dict[str, str] | None = None,
    attempt: int = 1,
    timeout: float = 300,
    python: str | None = None,
) -> Attempt:
    """`python`: the interpreter to run the trainer with (default this one's)."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"job-{attempt}.yaml"
    path.write_text(yaml.safe_dump(config))
    term = Path(config.get("terminationLog", work / "termination-log"))
    term.unlink(missing_ok=True)
    started = time.monotonic()
    argv = ["--config", str(path), "--termination-log", str(term)]
    launch_env = _env({**(env or {}), "LORARESUME_ATTEMPT": str(attempt)})
    proc: subprocess.Popen[str] | warm_trainer.WarmProcess
    if warm_trainer.warm_enabled() and python is None:
        proc = warm_trainer.launch(argv, launch_env, server_env=_env(None))
    else:
        proc = subprocess.Popen(
            [python or TRAIN[0], *TRAIN[1:], *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=launch_env,
        )
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    events: list[dict[str, Any]] = []
    killed = None
    durable_seen = False
    deadline = time.monotonic() + timeout
    for line in proc.stdout:  # type: ignore[union-attr]
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(event, dict) or "event" not in event:
            continue
        event["_t"] = round(time.monotonic() - started, 3)
        events.append(event)
        durable_seen |= event["event"] == "checkpoint_durable"
        if (
            kill
            and not killed
            and event["event"] == "log"
            and event.get("step", 0) >= kill.at_step
            and (durable_seen or not kill.after_durable)
        ):
            proc.send_signal(kill.sig)
            killed = kill.sig.name
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"trainer attempt {attempt} ran over {timeout} s")
    code = proc.wait(timeout=timeout)
    reader.join(timeout=10)
    termination = json.loads(term.read_text()) if term.is_file() and term.read_text() else None
    seconds = time.monotonic() - started
    return Attempt(code, events, "".join(stderr_lines), termination, killed, seconds)


def run_story(
    config: dict[str, Any],
    work: Path,
    kills: list[Kill] | None = None,
    *,
    env: dict[str, str] | None = None,
    max_attempts: int = 8,
) -> Story:
    """Run attempts like the operator would: relaunch after preemption or crash until success."""
    story = Story()
    pending = list(kills or [])
    for number in range(1, max_attempts + 1):
        attempt = run_attempt(config, work, kill=pending.pop(0) if pending else None, env=env, attempt=number)
        story.attempts.append(attempt)
        if attempt.exit_code == 0 and not attempt.killed_with:
            return story
        if attempt.exit_code == 78:
            raise AssertionError(f"config error in attempt {number}: {attempt.termination} {attempt.stderr[-2000:]}")
    raise AssertionError(f"no success after {max_attempts} attempts: {[a.exit_code for a in story.attempts]}")

"""The gradient-checkpointing mode through the real trainer: logged, recorded, kept on resume."""

from __future__ import annotations

import json
import signal

import pytest

from tests.support.trainer_runs import Kill, run_attempt
from tests.trainer.conftest import read_object

pytestmark = pytest.mark.slow


def test_the_mode_is_recorded_kept_by_auto_and_a_changed_mode_is_refused(make_job, s3):
    _, _, client = s3
    cfg, work = make_job(training={"max_steps": 40}, gradientCheckpointing="unsloth")
    # SIGTERM at step 6 without waiting for an upload to be durable (its own save makes one): waiting
    # for checkpoint-5's upload let the tiny run finish all its steps first on a loaded machine.
    stopped = run_attempt(cfg, work, kill=Kill(signal.SIGTERM, 6, after_durable=False))
    assert stopped.exit_code == 75, stopped.stderr[-2000:]
    (chosen,) = stopped.of("gradient_checkpointing")
    assert chosen["mode"] == "unsloth" and chosen["requested"] == "unsloth"
    assert "gradient checkpointing: unsloth" in stopped.stderr  # the log line
    step = stopped.termination["durable_step"]
    manifest = json.loads(read_object(client, cfg["storage"]["uri"] + f"checkpoints/checkpoint-{step}/_COMPLETE.json"))
    assert manifest["fingerprint"]["gradient_checkpointing"] == "unsloth"

    # A changed explicit mode would change the numerics: refused like any other change, naming it.
    refused = run_attempt({**cfg, "gradientCheckpointing": "false"}, work, attempt=2)
    assert refused.exit_code == 78, refused.stderr[-2000:]
    assert "gradient_checkpointing: 'unsloth' -> 'false'" in refused.termination["reason"]

    # `auto` (which would pick `false` here: no GPU) keeps the checkpoint's mode and resumes exactly.
    resumed = run_attempt({**cfg, "gradientCheckpointing": "auto"}, work, attempt=3)
    assert resumed.exit_code == 0, resumed.stderr[-2000:]
    (kept,) = resumed.of("gradient_checkpointing")
    assert kept["mode"] == "unsloth" and kept["requested"] == "auto"
    assert "kept from the checkpoint" in kept["reason"]
    (start,) = resumed.of("start")
    assert start["mode"] == "exact" and start["step"] == step


def test_auto_without_a_gpu_trains_without_recompute(make_job):
    cfg, work = make_job(training={"max_steps": 2, "save_steps": 2})
    attempt = run_attempt(cfg, work)
    assert attempt.exit_code == 0, attempt.stderr[-2000:]
    (chosen,) = attempt.of("gradient_checkpointing")
    assert chosen["mode"] == "false" and chosen["requested"] == "auto" and chosen.get("gpu_total_gib") is None
    assert chosen["estimated_peak_gib"].keys() == {"false", "true", "unsloth"}

"""Exact resume, bitwise: an interrupted run ends with the same adapter bytes and losses.

Each story runs `loraresume-train` as real processes against a real S3 server; the
interrupted story is killed and relaunched (as the operator would) until it succeeds.
"""

from __future__ import annotations

import random
import signal

import pytest

from tests.support.trainer_runs import Kill, run_story
from tests.trainer.conftest import read_object

pytestmark = pytest.mark.slow

KILL, TERM = signal.SIGKILL, signal.SIGTERM
RNG = random.Random(20261128)  # seeded: the "random" kill steps are reproducible


def adapter_bytes(s3_client, config) -> bytes:
    return read_object(s3_client, config["storage"]["uri"] + "adapter/adapter_model.safetensors")


def assert_same_result(s3, baseline_cfg, baseline, cfg, story):
    _, _, client = s3
    assert len(story.attempts) > 1, "the run was never interrupted"
    resumed = story.losses_after_resume()
    assert resumed, "no step was logged after a resume"
    want = baseline.losses()
    assert {step: want[step] for step in resumed} == resumed
    assert story.final.exit_code == 0
    assert adapter_bytes(client, cfg) == adapter_bytes(client, baseline_cfg)
    # Metrics HF gets wrong after a resume are reported as the uninterrupted run has them.
    last = max(want)
    assert tokens_at(story.final, last) == tokens_at(baseline, last)
    assert final_train_loss(story.final) == final_train_loss(baseline)


def tokens_at(attempt, step):
    return next(e["num_tokens"] for e in attempt.of("log") if e["step"] == step and "num_tokens" in e)


def final_train_loss(attempt):
    (summary,) = [e for e in attempt.of("log") if "train_loss" in e]
    return summary["train_loss"]


# 40 steps, checkpoints every 5; kills leave room before the end, so a slow machine still
# gets each kill in while training. Later kills need no new durable checkpoint in their
# attempt: the one the attempt resumed from is durable already.
LONG = {"training": {"max_steps": 40}}
SCENARIOS = {
    "sigkill-after-checkpoint": (LONG, [Kill(KILL, RNG.randint(7, 17))]),
    "sigterm-off-grid": (LONG, [Kill(TERM, 12)]),
    "several-kills": (
        LONG,
        [Kill(KILL, RNG.randint(6, 9)), Kill(TERM, RNG.randint(12, 14)), Kill(KILL, 22, after_durable=False)],
    ),
    "grad-accum-2-dropout": (
        {"training": {"max_steps": 40, "gradient_accumulation_steps": 2}, "lora": {"dropout": 0.1}},
        [Kill(KILL, RNG.randint(7, 13)), Kill(TERM, 21, after_durable=False)],
    ),
}


@pytest.fixture(scope="module")
def baselines():
    return {}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_interrupted_run_equals_uninterrupted(name, make_job, s3, baselines, tmp_path):
    overrides, kills = SCENARIOS[name]
    key = repr(sorted(overrides.items()))
    if key not in baselines:  # one uninterrupted run per configuration
        base_cfg, base_work = make_job(**overrides)
        baselines[key] = (base_cfg, run_story(base_cfg, base_work).final)
    base_cfg, baseline = baselines[key]
    cfg, work = make_job(**overrides)
    story = run_story(cfg, work, kills)

    assert [a.killed_with for a in story.attempts[:-1]] == [k.sig.name for k in kills]
    for attempt in story.attempts[:-1]:
        if attempt.killed_with == "SIGTERM":
            # Saved where it stopped (off the save grid) and said so.
            assert attempt.exit_code == 75
            assert attempt.termination["outcome"] == "preempted"
            (stopped,) = attempt.of("preempted")
            assert stopped["durable_step"] == stopped["step"]
            assert attempt.termination["durable_step"] == stopped["step"]
        else:
            assert attempt.exit_code == -signal.SIGKILL
    for attempt in story.attempts[1:]:
        (start,) = attempt.of("start")
        assert start["mode"] == "exact" and start["step"] > 0
    assert_same_result(s3, base_cfg, baseline, cfg, story)

"""resume.extend, as real trainer processes: a finished run continued exactly by a longer job.

A trains N = 12 steps to completion; B, under a new storage.uri, extends A's final checkpoint to
2N with `resume.extend`; C trains 2N steps uninterrupted. With a constant LR (past its warmup)
B is bitwise C; with a linear schedule B follows HF's schedule re-derived over 2N and differs.
40 rows, 2 per step: an epoch is 20 steps, so B also crosses into the second epoch.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest

from tests.support.trainer_runs import Attempt, Kill, run_attempt, run_story
from tests.trainer.conftest import read_object

pytestmark = pytest.mark.slow

N = 12
BASE_LR = 1e-3  # tests.support.trainer_runs.job_config's learning_rate
WARMUP = 2  # and its warmup_steps
COMMON = {"learning_rate": BASE_LR, "warmup_steps": WARMUP, "save_steps": 4}
CONSTANT = {**COMMON, "lr_scheduler_type": "constant_with_warmup"}
LINEAR = {**COMMON, "lr_scheduler_type": "linear"}


def adapter_bytes(client, cfg: dict[str, Any]) -> bytes:
    return read_object(client, cfg["storage"]["uri"] + "adapter/adapter_model.safetensors")


def rates(attempt: Attempt) -> dict[int, float]:
    return {e["step"]: e["learning_rate"] for e in attempt.of("log") if "learning_rate" in e}


@pytest.fixture(scope="module")
def finished() -> dict[str, Any]:
    """Runs shared by the tests of this module, made once: {(schedule, name): (config, story)}."""
    return {}


@pytest.fixture
def run_once(make_job, finished):
    def run(schedule: str, name: str, **overrides: Any):
        if (schedule, name) not in finished:
            training = {**(CONSTANT if schedule == "constant" else LINEAR), **overrides.pop("training", {})}
            kills = overrides.pop("kills", None)
            cfg, work = make_job(training=training, **overrides)
            if training.get("max_steps", 0) is None:  # by epochs
                del cfg["training"]["max_steps"]
            finished[schedule, name] = (cfg, run_story(cfg, work, kills))
        return finished[schedule, name]

    return run


def shorter_and_longer(run_once, schedule: str):
    """A (N steps, finished), B (A's final checkpoint extended to 2N), C (2N steps uninterrupted)."""
    a_cfg, a = run_once(schedule, "A", training={"max_steps": N})
    assert a.final.exit_code == 0
    final = a_cfg["storage"]["uri"] + f"checkpoints/checkpoint-{N}/"
    b_cfg, b = run_once(schedule, "B", training={"max_steps": 2 * N}, resume={"fromCheckpoint": final, "extend": True})
    c_cfg, c = run_once(schedule, "C", training={"max_steps": 2 * N})
    return (a_cfg, a.final), (b_cfg, b.final), (c_cfg, c.final), final


def test_extending_with_a_constant_lr_equals_one_longer_run(run_once, s3):
    _, _, client = s3
    _, (b_cfg, b), (c_cfg, c), final = shorter_and_longer(run_once, "constant")
    (start,) = b.of("start")
    assert (start["mode"], start["step"], start["checkpoint"]) == ("exact", N, final)
    assert sorted(b.losses()) == list(range(N + 1, 2 * N + 1))
    assert b.losses() == {s: loss for s, loss in c.losses().items() if s > N}
    assert rates(b) == {s: lr for s, lr in rates(c).items() if s > N}
    assert adapter_bytes(client, b_cfg) == adapter_bytes(client, c_cfg)
    progress = json.loads(read_object(client, b_cfg["storage"]["uri"] + "progress.json"))
    assert (progress["step"], progress["max_steps"], progress["phase"]) == (2 * N, 2 * N, "Succeeded")
    manifest = json.loads(read_object(client, b_cfg["storage"]["uri"] + "adapter/_COMPLETE.json"))
    assert manifest["fingerprint"]["max_steps"] == 2 * N


def test_extending_a_linear_schedule_re_derives_it_over_the_new_total(run_once, s3):
    """HF builds the scheduler for 2N steps and loads the saved one's state (its step count and last
    LR; the lambda is a functools.partial, so its arguments are not in the state): step N+1 runs at
    the LR A's schedule set after its last step (0: it decayed to 0 at N), every later step k at
    lr * (2N - (k-1)) / (2N - warmup), the LR jumping back up; the result differs from C's."""
    _, _, client = s3
    (_, a), (b_cfg, b), (c_cfg, c), _ = shorter_and_longer(run_once, "linear")
    total = 2 * N
    want = {N + 1: BASE_LR * max(0.0, (N - N) / max(1, N - WARMUP))}
    want |= {
        k: BASE_LR * max(0.0, float(total - (k - 1)) / float(max(1, total - WARMUP))) for k in range(N + 2, total + 1)
    }
    assert rates(b) == pytest.approx(want, rel=1e-12, abs=0.0)
    assert rates(b)[N + 1] == 0.0 and rates(b)[N + 2] > rates(a)[N]  # it jumps back up
    assert {k: rates(c)[k] for k in range(N + 2, total + 1)} == {k: rates(b)[k] for k in range(N + 2, total + 1)}
    assert adapter_bytes(client, b_cfg) != adapter_bytes(client, c_cfg)


def test_a_preempted_extension_continues_from_its_own_checkpoint_to_the_same_adapter(run_once, s3):
    """SIGTERM mid-extension: the relaunch resumes from the job's own newer checkpoint (not the
    explicit one again) and still ends bitwise equal to the uninterrupted run."""
    _, _, client = s3
    _, _, (c_cfg, _), final = shorter_and_longer(run_once, "constant")
    cfg, story = run_once(
        "constant",
        "B-preempted",
        training={"max_steps": 2 * N},
        resume={"fromCheckpoint": final, "extend": True},
        kills=[Kill(signal.SIGTERM, at_step=N + 3, after_durable=False)],
    )
    assert [a.exit_code for a in story.attempts] == [75, 0]
    stopped = story.attempts[0].termination["durable_step"]
    assert stopped > N
    (start,) = story.final.of("start")
    assert (start["mode"], start["step"]) == ("exact", stopped)
    assert start["checkpoint"] == cfg["storage"]["uri"] + f"checkpoints/checkpoint-{stopped}/"
    assert adapter_bytes(client, cfg) == adapter_bytes(client, c_cfg)


def test_an_extension_killed_before_its_adapter_publishes_its_own_final_checkpoint(run_once, s3, tmp_path):
    """The operator relaunches an extending job with the job's own newest checkpoint as fromCheckpoint
    (and extend still set): at the job's max_steps that is its end, so the adapter is published from
    it, no step trained again (an extension's checkpoint records its predecessor's length, the job's
    counts), bitwise what the first attempt would have published."""
    _, _, client = s3
    _, (b_cfg, _), (c_cfg, _), _ = shorter_and_longer(run_once, "constant")
    bucket, _, key = (b_cfg["storage"]["uri"] + "adapter/").removeprefix("s3://").partition("/")
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]:
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    own = b_cfg["storage"]["uri"] + f"checkpoints/checkpoint-{2 * N}/"
    again = run_attempt({**b_cfg, "resume": {"fromCheckpoint": own, "extend": True}}, tmp_path, attempt=2)
    assert again.exit_code == 0, again.stderr[-2000:]
    (start,) = again.of("start")
    assert (start["mode"], start["step"], start["checkpoint"]) == ("exact", 2 * N, own)
    assert not again.losses()
    assert adapter_bytes(client, b_cfg) == adapter_bytes(client, c_cfg)


def test_extending_by_epochs(run_once, make_job, s3):
    """One epoch (20 steps) extended to two equals two epochs uninterrupted; extending it to one
    epoch again is refused once the checkpoint's trainer state says how far it got."""
    _, _, client = s3
    a_cfg, a = run_once("constant", "A-epoch", training={"max_steps": None, "num_train_epochs": 1})
    final = a_cfg["storage"]["uri"] + "checkpoints/checkpoint-20/"
    assert max(a.final.losses()) == 20
    extension = {"resume": {"fromCheckpoint": final, "extend": True}}
    b_cfg, b = run_once("constant", "B-epoch", training={"max_steps": None, "num_train_epochs": 2}, **extension)
    c_cfg, c = run_once("constant", "C-epoch", training={"max_steps": None, "num_train_epochs": 2})
    (start,) = b.final.of("start")
    assert (start["mode"], start["step"]) == ("exact", 20)
    assert b.final.losses() == {s: loss for s, loss in c.final.losses().items() if s > 20}
    assert adapter_bytes(client, b_cfg) == adapter_bytes(client, c_cfg)

    one_cfg, one_work = make_job(training={**CONSTANT, "num_train_epochs": 1}, **extension)
    del one_cfg["training"]["max_steps"]
    refused = run_attempt(one_cfg, one_work)
    assert refused.exit_code == 78, refused.stderr[-2000:]
    assert "resume.extend: the job's num_train_epochs 1 does not go past" in refused.termination["reason"]
    assert "which has trained 1 epochs (20 steps)" in refused.termination["reason"]
    assert not refused.losses()

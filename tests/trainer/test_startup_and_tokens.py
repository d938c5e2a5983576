"""Where a restart's time goes (the `startup` events and progress.json), and num_tokens from the batches.

Real `loraresume-train` processes on the tiny model against moto's S3 server. On the CPU, TRL
counts tokens in its loss; the trainer's num_tokens is the Trainer's own count of the batches
(which Unsloth's GPU path keeps, where TRL's count is missing), so here the two must agree.
"""

from __future__ import annotations

import itertools
import json
import signal

import pytest

from loraresume_trainer.progress import STARTUP_PHASES
from tests.support.trainer_runs import Attempt, Kill, run_story
from tests.trainer.conftest import read_object

# What a run with a checkpoint to resume from goes through (no compile cache saved on the CPU).
PHASES = [p for p in STARTUP_PHASES if p != "compile_cache_restored"]


def startup(attempt: Attempt) -> list[dict]:
    return attempt.of("startup")


def assert_startup_split(attempt: Attempt) -> None:
    events = startup(attempt)
    assert [e["phase"] for e in events] == PHASES, events
    seconds = [e["seconds"] for e in events]
    assert seconds == sorted(seconds) and seconds[0] > 0
    # The trainer's clock runs with the test's: from the first phase to the first step's log line the
    # two measure the same stretch (the log line comes right after the step's end).
    first_log = next(e["_t"] for e in attempt.of("log") if "loss" in e)
    by_trainer = events[-1]["seconds"] - events[0]["seconds"]
    by_test = first_log - events[0]["_t"]
    assert by_test - 1.0 < by_trainer <= by_test + 0.05, (by_trainer, by_test)
    # Each phase says how long it took since the one before.
    assert [e["took"] for e in events] == pytest.approx([seconds[0]] + [b - a for a, b in itertools.pairwise(seconds)])
    # Nothing of the heavy stack runs before the downloads were started.
    (prefetch,) = attempt.of("prefetch")
    assert prefetch["_t"] <= events[0]["_t"]


@pytest.mark.slow
def test_startup_phases_and_token_counts_across_a_preemption(make_job, s3, monkeypatch):
    _, _, client = s3
    monkeypatch.setenv("LORARESUME_TEST_TRAINER_LAUNCH", "spawn")  # fresh interpreters: real imports and exits
    config, work = make_job(training={"max_steps": 16, "save_steps": 5})
    story = run_story(config, work, [Kill(signal.SIGTERM, 7, after_durable=False)])  # it saves its own
    first, second = story.attempts
    assert first.killed_with == "SIGTERM" and second.exit_code == 0

    for attempt in story.attempts:
        assert_startup_split(attempt)
    (preempted,) = first.of("preempted")
    stopped = preempted["durable_step"]
    # Once its checkpoint is durable the preempted process ends at once, without the interpreter's slow
    # teardown of the ML stack (~1.6 s here): the pod ends, and is relaunched, sooner.
    assert first.seconds - preempted["_t"] < 0.8, (first.seconds, preempted["_t"])
    verified = next(e for e in startup(second) if e["phase"] == "checkpoint_verified")
    restored = next(e for e in startup(second) if e["phase"] == "state_restored")
    assert verified["step"] == restored["step"] == stopped and verified["attempt"] == 2

    # progress.json carries the attempt's start-up for the operator.
    progress = json.loads(read_object(client, config["storage"]["uri"] + "progress.json"))
    assert progress["attempt"] == 2
    assert progress["startup"] == {e["phase"]: e["seconds"] for e in startup(second)}

    # num_tokens: the Trainer's count equals TRL's on every step of the first attempt (TRL counts from
    # this process's start), and carries on across the resume with the restored trainer state.
    logs1 = {e["step"]: e for e in first.of("log") if "loss" in e}
    logs2 = {e["step"]: e for e in second.of("log") if "loss" in e}
    assert logs1 and all(e["num_tokens"] == e["num_tokens_trl"] > 0 for e in logs1.values())
    resumed = min(logs2)
    assert resumed == stopped + 1
    for step, entry in logs2.items():
        before = logs2[step - 1]["num_tokens"] if step > resumed else logs1[stopped]["num_tokens"]
        trl_before = logs2[step - 1]["num_tokens_trl"] if step > resumed else 0.0
        assert entry["num_tokens"] - before == entry["num_tokens_trl"] - trl_before > 0, step
    # ... because it is the Trainer's own count, restored with its state (not TRL's plus an offset).
    assert all(e["num_tokens"] == e["num_input_tokens_seen"] for e in [*logs1.values(), *logs2.values()])
    assert progress["num_tokens"] == logs2[max(logs2)]["num_tokens"]


class _State:
    def __init__(self, step: int, seen: int, history: list[dict]) -> None:
        self.global_step, self.num_input_tokens_seen, self.log_history = step, seen, history
        self.max_steps = 20


class _Args:
    logging_steps = 1


@pytest.mark.parametrize(
    ("restored", "logs", "expected"),
    [
        # Unsloth's GPU path: TRL logs no num_tokens; the Trainer's count is num_tokens.
        pytest.param(300, {"loss": 1.0, "num_input_tokens_seen": 350}, 350.0, id="gpu-path-count-only"),
        # CPU: both; the count wins and TRL's is kept beside it.
        pytest.param(300, {"loss": 1.0, "num_tokens": 50.0, "num_input_tokens_seen": 350}, 350.0, id="cpu-both"),
        # A checkpoint saved before the count existed restores 0: its logged history is the offset.
        pytest.param(0, {"loss": 1.0, "num_input_tokens_seen": 50}, 290.0, id="old-checkpoint-count"),
        # Counting switched off by the job (include_num_input_tokens_seen: no): TRL's plus the history.
        pytest.param(300, {"loss": 1.0, "num_tokens": 50.0}, 290.0, id="count-off-trl-only"),
    ],
)
def test_num_tokens_from_the_trainers_count(restored: int, logs: dict, expected: float, capsys) -> None:
    from loraresume_trainer.callbacks import DurableCheckpointCallback
    from loraresume_trainer.stop_signal import StopRequest

    class Uploader:
        durable_step = None

        def submit_json(self, name: str, obj: dict) -> None:
            self.progress = obj

    uploader = Uploader()
    callback = DurableCheckpointCallback(uploader, StopRequest(), attempt=2)  # type: ignore[arg-type]
    history = [{"step": 6, "loss": 1.2, "num_tokens": 240.0}]
    callback.on_train_begin(_Args(), _State(6, restored, history), None)
    state = _State(7, restored, [*history, {**logs, "step": 7}])
    callback.on_log(_Args(), state, None, logs=dict(logs))
    assert uploader.progress["num_tokens"] == expected
    assert state.log_history[-1]["num_tokens"] == expected  # what the next checkpoint carries
    (event,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"log"' in line]
    assert event["num_tokens"] == expected

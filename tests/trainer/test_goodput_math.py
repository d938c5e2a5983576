"""benchmarks/goodput.py's accounting, on made-up attempts whose answer is known."""

from __future__ import annotations

import importlib.util
import itertools
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.trainer_runs import Attempt

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "goodput.py"
_spec = importlib.util.spec_from_file_location("goodput_under_test", _PATH)
assert _spec is not None and _spec.loader is not None
goodput = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = goodput
_spec.loader.exec_module(goodput)


def attempt(
    *,
    seconds: float,
    steps: range,
    step_s: float = 1.0,
    first_step_at: float = 10.0,
    start_step: int = 0,
    preempted: dict[str, Any] | None = None,
) -> Attempt:
    """Steps logged one per `step_s` from `first_step_at` (seconds since process start)."""
    events: list[dict[str, Any]] = [
        {"event": "start", "step": start_step, "_t": first_step_at - 2},
        {"event": "startup", "phase": "imports_done", "seconds": first_step_at - 3, "_t": first_step_at - 3},
        {"event": "startup", "phase": "first_step", "seconds": first_step_at, "_t": first_step_at},
    ]
    events += [{"event": "log", "step": s, "loss": 1.0, "_t": first_step_at + i * step_s} for i, s in enumerate(steps)]
    if preempted is not None:
        events.append({"event": "preempted", **preempted})
    return Attempt(75 if preempted else 0, events, "", None, "SIGTERM" if preempted else None, seconds)


def test_steady_step_time_skips_the_first_steps() -> None:
    a = attempt(seconds=60, steps=range(1, 41), step_s=1.5)
    a.events[3]["_t"] -= 5.0  # a slow (compiling) first step does not count
    assert goodput.steady_step_s(a) == pytest.approx(1.5)


def test_one_preemption_is_accounted_in_its_parts() -> None:
    # Uninterrupted: 10 s to the first step, 40 steps of 1 s, 2 s to finish: 51 s.
    baseline = attempt(seconds=51.0, steps=range(1, 41))
    # Preempted at step 20 (logged at 29 s), durable 1.5 s after the signal, exit 0.5 s later;
    # the relaunch resumes at step 19 (one step lost), first step done at 12 s, ends at 12 + 21 + 2.
    killed = attempt(seconds=31.0, steps=range(1, 21), preempted={"step": 20, "seconds": 1.5, "_t": 30.5})
    relaunch = attempt(seconds=35.0, steps=range(20, 41), first_step_at=12.0, start_step=19)
    result = goodput.summarize([killed, relaunch], baseline, 1.0)
    assert result["preemptions"] == 1
    assert result["overhead_per_preemption_s"] == pytest.approx(31.0 + 35.0 - 51.0)
    parts = result["parts_mean_s"]
    assert parts["jit_save"] == pytest.approx(1.5 + 0.5)  # signal -> durable, durable -> exit
    assert parts["startup"] == pytest.approx(12.0 - 1.0)  # first step done, less the step itself
    assert parts["lost_work"] == pytest.approx(1.0)  # step 20 trained again
    assert parts["unexplained"] == pytest.approx(15.0 - 2.0 - 11.0 - 1.0)
    assert result["goodput"]["per_20_min"] == pytest.approx(1 - 15 / 1200, abs=1e-4)  # reported to 4 places
    assert result["goodput"]["per_hour"] == pytest.approx(1 - 15 / 3600, abs=1e-4)
    assert result["relaunch_startup_split_mean_s"] == {"imports_done": 9.0, "first_step": 3.0}


def test_overhead_is_per_preemption() -> None:
    baseline = attempt(seconds=50.0, steps=range(1, 41))
    story = [
        attempt(seconds=20.0, steps=range(1, 10), preempted={"step": 9, "seconds": 1.0, "_t": 19.5}),
        attempt(seconds=20.0, steps=range(10, 20), start_step=9, preempted={"step": 19, "seconds": 1.0, "_t": 19.5}),
        attempt(seconds=40.0, steps=range(20, 41), start_step=19),
    ]
    result = goodput.summarize(story, baseline, 1.0)
    assert result["preemptions"] == 2 and result["overhead_per_preemption_s"] == pytest.approx(15.0)
    assert [p["lost_steps"] for p in result["per_preemption"]] == [0, 0]


@pytest.mark.parametrize("seed", range(20))
def test_kill_steps_leave_every_attempt_room_to_train(seed: int) -> None:
    steps = goodput.kill_steps(random.Random(seed), 30, 3)
    assert len(set(steps)) == 3 and steps == sorted(steps)
    assert steps[0] >= 3 and steps[-1] <= 28
    assert all(b - a >= 2 for a, b in itertools.pairwise(steps))

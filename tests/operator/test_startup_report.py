"""status.lastStartup and the start-up metric, from the trainer's progress.json `startup` (read as untrusted)."""

from __future__ import annotations

import pytest

from loraresume_operator.spec import LastStartup
from loraresume_operator.startup import last_startup, to_observe

WHOLE = {
    "compile_cache_restored": 1.5,
    "imports_done": 20.0,
    "inputs_ready": 20.25,
    "checkpoint_verified": 22.0,
    "model_loaded": 31.0,
    "state_restored": 33.5,
    "first_step": 37.0,
}


def names(startup: LastStartup | None) -> list[str]:
    return [p.phase for p in startup.phases] if startup else []


def test_every_phase_in_the_trainers_order_with_what_each_took() -> None:
    startup = last_startup({"attempt": 3, "startup": dict(reversed(list(WHOLE.items())))})
    assert startup is not None
    assert startup.attempt == 3 and startup.seconds == 37.0
    assert names(startup) == list(WHOLE)
    took = {p.phase: p.took_seconds for p in startup.phases}
    assert took == {
        "compile_cache_restored": 1.5,
        "imports_done": 18.5,
        "inputs_ready": 0.25,
        "checkpoint_verified": 1.75,
        "model_loaded": 9.0,
        "state_restored": 2.5,
        "first_step": 3.5,
    }
    assert startup.model_dump(by_alias=True)["phases"][0] == {
        "phase": "compile_cache_restored",
        "atSeconds": 1.5,
        "tookSeconds": 1.5,
    }


@pytest.mark.parametrize(
    ("progress", "expected"),
    [
        pytest.param({"attempt": 2}, None, id="no-startup"),
        pytest.param({"startup": WHOLE}, None, id="no-attempt"),
        pytest.param({"attempt": True, "startup": WHOLE}, None, id="attempt-not-a-number"),
        pytest.param({"attempt": -1, "startup": WHOLE}, None, id="attempt-negative"),
        pytest.param({"attempt": 2, "startup": ["imports_done"]}, None, id="startup-not-a-mapping"),
        pytest.param({"attempt": 2, "startup": {}}, None, id="startup-empty"),
        pytest.param(
            {"attempt": 2, "startup": {"imports_done": 9.0, "made_up": 1.0, "first_step": "soon"}},
            ["imports_done"],
            id="unknown-phases-and-non-numbers-dropped",
        ),
        pytest.param(
            {"attempt": 2, "startup": {"imports_done": 9.0, "model_loaded": 4.0, "first_step": 12.0}},
            ["imports_done", "first_step"],
            id="a-time-running-backwards-dropped",
        ),
        pytest.param(
            {"attempt": 2, "startup": {"imports_done": float("nan"), "first_step": float("inf")}},
            None,
            id="not-finite",
        ),
        pytest.param(
            {"attempt": 2, "startup": {"imports_done": 9.0, "inputs_ready": 9.0}},
            ["imports_done", "inputs_ready"],
            id="still-starting",
        ),
    ],
)
def test_what_progress_json_reports_is_read_as_untrusted(progress: dict, expected: list[str] | None) -> None:
    startup = last_startup(progress)
    if expected is None:
        assert startup is None
    else:
        assert names(startup) == expected


PARTIAL = last_startup({"attempt": 2, "startup": {"imports_done": 9.0}})
DONE_2 = last_startup({"attempt": 2, "startup": WHOLE})
DONE_3 = last_startup({"attempt": 3, "startup": WHOLE})


@pytest.mark.parametrize(
    ("before", "after", "observed"),
    [
        pytest.param(None, None, False, id="nothing-reported"),
        pytest.param(None, PARTIAL, False, id="still-starting"),
        pytest.param(PARTIAL, DONE_2, True, id="first-step-reached"),
        pytest.param(None, DONE_2, True, id="first-seen-complete"),
        pytest.param(DONE_2, DONE_2, False, id="same-attempt-again"),
        pytest.param(DONE_2, DONE_3, True, id="next-attempt"),
        pytest.param(DONE_3, None, False, id="progress-unreadable"),
    ],
)
def test_the_metric_sees_each_attempts_startup_once(
    before: LastStartup | None, after: LastStartup | None, observed: bool
) -> None:
    got = to_observe(before, after)
    if not observed:
        assert got == []
        return
    assert got[-1] == ("total", 37.0)
    assert [phase for phase, _ in got[:-1]] == list(WHOLE)
    assert sum(took for _, took in got[:-1]) == pytest.approx(37.0)

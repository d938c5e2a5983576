"""What a problem found before any decision means (decide.decide_problem), and what goes with a
deleted resource (decide.deletion_actions): the whole policy in decide.py, table-style."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from loraresume_operator import conditions as c
from loraresume_operator.decide import (
    POD_FORBIDDEN,
    STORAGE_RETRY_SECONDS,
    DeleteCheckpoints,
    EmitEvent,
    Problem,
    Requeue,
    Resource,
    decide_problem,
    deletion_actions,
)
from loraresume_operator.spec import LoraResumeStatus, Phase
from tests.support.specs import build_spec

NOW = datetime(2026, 12, 5, 1, 0, 0, tzinfo=UTC)
RES = Resource("bot", "ml", "uid-1", 4)
RUNNING = LoraResumeStatus(phase=Phase.RUNNING, attempt=2, pod_name="bot-attempt-2", preemptions=1, failures=1)


def events(plan) -> list[tuple[str, str]]:
    return [(a.reason, a.message) for a in plan.actions if isinstance(a, EmitEvent)]


@pytest.mark.parametrize(
    ("problem", "phase", "message", "condition", "requeue"),
    [
        (
            Problem(c.INVALID_SPEC, "spec.training.maxSteps: must be > 0"),
            Phase.FAILED,
            "invalid spec: spec.training.maxSteps: must be > 0",
            (c.FAILED, "True", c.INVALID_SPEC),
            None,
        ),
        (
            Problem(c.POLICY_VIOLATION, "spec.image: not allowed"),
            Phase.FAILED,
            "refused by the operator's policy: spec.image: not allowed",
            (c.FAILED, "True", c.POLICY_VIOLATION),
            None,
        ),
        (
            Problem(c.STORAGE_UNAVAILABLE, "AccessDenied"),
            Phase.RUNNING,
            "cannot read storage: AccessDenied",
            (c.STORAGE_READY, "False", c.STORAGE_UNAVAILABLE),
            STORAGE_RETRY_SECONDS,
        ),
        (Problem(POD_FORBIDDEN, "exceeded quota"), Phase.RUNNING, "exceeded quota", None, None),
    ],
    ids=["invalid-spec", "policy", "storage", "pod-forbidden"],
)
def test_a_problem_is_said_once_and_keeps_the_budgets(problem, phase, message, condition, requeue):
    plan = decide_problem(RES, RUNNING, problem, NOW)
    st = plan.status
    assert (st.phase, st.message) == (phase, message)
    assert (st.attempt, st.preemptions, st.failures) == (2, 1, 1)  # nothing counted
    if condition is not None:
        found = next(x for x in st.conditions if x.type == condition[0])
        assert (found.status, found.reason) == condition[1:]
    assert events(plan) == [(problem.kind, message)]
    assert (plan.requeue.after_seconds if plan.requeue else None) == requeue
    again = decide_problem(RES, st, problem, NOW)  # found again: no write, no event
    assert again.status == st and events(again) == []


def test_a_failed_spec_records_the_generation_it_judged():
    plan = decide_problem(RES, RUNNING, Problem(c.INVALID_SPEC, "x"), NOW)
    assert plan.status.observed_generation == RES.generation


def test_an_unknown_problem_is_a_bug():
    with pytest.raises(ValueError, match="unknown problem"):
        decide_problem(RES, RUNNING, Problem("Nonsense", "x"), NOW)


BASE = {"baseModel": "m", "dataset": {"source": "/d.jsonl"}}


@pytest.mark.parametrize(
    ("storage", "want"),
    [
        ({"uri": "s3://bucket/run/", "deleteOnResourceDeletion": True}, (DeleteCheckpoints("s3://bucket/run/"),)),
        ({"uri": "s3://bucket/run/"}, ()),
        ({"deleteOnResourceDeletion": True}, ()),  # no prefix: nothing was stored
    ],
    ids=["asked", "kept-by-default", "no-uri"],
)
def test_checkpoints_go_with_the_resource_only_when_asked(storage, want):
    assert deletion_actions(build_spec(BASE, storage=storage)) == want


def test_a_requeue_is_an_action():
    plan = decide_problem(RES, RUNNING, Problem(c.STORAGE_UNAVAILABLE, "down"), NOW)
    assert Requeue(STORAGE_RETRY_SECONDS) in plan.actions

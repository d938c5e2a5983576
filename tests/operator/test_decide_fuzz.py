"""The pure decision and pod observation, fuzzed with hypothesis-drawn observations.

`decide()` must never raise, never create a pod for a finished job, never let a counter go
back, create at most one pod per plan (named as the status says), requeue after a finite,
positive delay, and write a status the CRD accepts. `ObservedPod.from_api` and
`classify_end` must take any pod the API could return (fields missing, odd states, junk
termination messages) without raising.

Storage content is drawn as junk too (progress.json is whatever is in the bucket), and the
status's timestamps in any spelling: the classes of input that crashed decide() before
(test_findings.py).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraresume_operator.decide import (
    CreatePod,
    EmitEvent,
    Observation,
    Requeue,
    Resource,
    SourceState,
    decide,
    iso,
    pod_name,
)
from loraresume_operator.observed import EndKind, ObservedPod, PodEnd, classify_end
from loraresume_operator.spec import CheckpointRef, Condition, LoraResumeSpec, LoraResumeStatus, Phase
from tests.support.api_judge import ApiJudge
from tests.support.reconciler_harness import OperatorDefaults
from tests.support.spec_strategies import INT64_MAX, valid_specs

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
DEFAULTS = OperatorDefaults(storage_uri_prefix="s3://fuzz-default/runs/")
RESOURCE_NAMES = st.sampled_from(["bot", "a", "x" * 63, "support-bot-v2.stage-1"])


def _effective(doc: dict[str, Any]) -> LoraResumeSpec:
    try:
        from loraresume_operator.defaults import effective_spec
    except ImportError:  # pragma: no cover - before operator defaults existed
        return LoraResumeSpec.model_validate(doc)
    spec = LoraResumeSpec.model_validate(doc)
    return effective_spec(spec, DEFAULTS, spec.storage.uri or DEFAULTS.storage_uri_for("fuzz", "bot"))


def specs() -> st.SearchStrategy[LoraResumeSpec]:
    return valid_specs().map(_effective)


# ------------------------------------------------------------------------------ pods as the API has them

_TEXT = st.text(max_size=30)
_REASONS = st.one_of(
    st.sampled_from(
        [
            "Evicted",
            "Preempted",
            "DeletionByTaintManager",
            "TerminationByKubelet",
            "NodeLost",
            "Shutdown",
            "OOMKilled",
            "Error",
            "Completed",
            "ContainerCannotRun",
            "DeadlineExceeded",
            "",
            "UnexpectedAdmissionError",
            "CreateContainerConfigError",
            "InvalidImageName",
            "ImagePullBackOff",
            "CrashLoopBackOff",
        ]
    ),
    _TEXT,
)
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_TEXT, inner, max_size=3)),
    max_leaves=8,
)
_TERMINATION = st.one_of(
    st.none(),
    _TEXT,
    st.builds(json.dumps, _JSON),
    st.builds(
        json.dumps,
        st.fixed_dictionaries(
            {},
            optional={
                "outcome": st.one_of(st.sampled_from(["succeeded", "failed", "preempted", "config_error"]), _JSON),
                "reason": st.one_of(_TEXT, _JSON),
                "field": _JSON,
                "durable_step": _JSON,
                "exit_code": _JSON,
            },
        ),
    ),
)


def _state() -> st.SearchStrategy[dict[str, Any]]:
    waiting = st.fixed_dictionaries({}, optional={"reason": _REASONS, "message": _TEXT})
    running = st.fixed_dictionaries({}, optional={"startedAt": st.just("2026-11-28T12:00:00Z")})
    terminated = st.fixed_dictionaries(
        {},
        optional={
            "exitCode": st.one_of(
                st.sampled_from([0, 1, 2, 75, 78, 124, 137, 143, 255, -1]), st.integers(-(2**31), 2**31 - 1)
            ),
            "reason": _REASONS,
            "message": _TERMINATION,
            "signal": st.integers(0, 64),
        },
    )
    return st.fixed_dictionaries({}, optional={"waiting": waiting, "running": running, "terminated": terminated})


def api_pods(name: st.SearchStrategy[str] = _TEXT) -> st.SearchStrategy[dict[str, Any]]:
    container = st.fixed_dictionaries(
        {"name": st.sampled_from(["trainer", "trainer", "sidecar", ""])},
        optional={"state": _state(), "lastState": _state(), "ready": st.booleans(), "restartCount": st.integers(0, 9)},
    )
    condition = st.fixed_dictionaries(
        {"type": st.sampled_from(["DisruptionTarget", "Ready", "PodScheduled", "ContainersReady", "X"])},
        optional={"status": st.sampled_from(["True", "False", "Unknown", ""]), "reason": _REASONS, "message": _TEXT},
    )
    status = st.fixed_dictionaries(
        {},
        optional={
            "phase": st.one_of(st.sampled_from(["Pending", "Running", "Succeeded", "Failed", "Unknown"]), _TEXT),
            "reason": _REASONS,
            "message": _TEXT,
            "conditions": st.lists(condition, max_size=3),
            "containerStatuses": st.lists(container, max_size=3),
            "initContainerStatuses": st.lists(container, max_size=1),
        },
    )
    metadata = st.fixed_dictionaries(
        {},
        optional={
            "name": name,
            "deletionTimestamp": st.just("2026-11-28T12:00:00Z"),
            "uid": st.just("u"),
        },
    )
    return st.fixed_dictionaries({}, optional={"metadata": metadata, "status": status, "spec": st.just({})})


@FUZZ
@given(api_pods(), st.booleans())
def test_pods_of_any_shape_are_observed_and_classified(raw: dict[str, Any], adapter_complete: bool) -> None:
    pod = ObservedPod.from_api(copy.deepcopy(raw))
    assert isinstance(pod.name, str) and isinstance(pod.phase, str)
    end = classify_end(pod, adapter_complete=adapter_complete)
    assert isinstance(end, PodEnd) and isinstance(end.kind, EndKind)
    assert isinstance(end.reason, str)
    if end.kind is EndKind.SUCCEEDED:
        assert adapter_complete and pod.exit_code == 0  # success needs the adapter in S3, whatever the pod says
    assert classify_end(None, adapter_complete=adapter_complete).kind is EndKind.PREEMPTED


# ------------------------------------------------------------------------------------- observations

NOWS = st.datetimes(datetime(2001, 1, 1), datetime(2099, 12, 31), timezones=st.just(UTC))
COUNT = st.integers(0, 10**6)


@st.composite
def observations(draw: st.DrawFn) -> Observation:
    name = draw(RESOURCE_NAMES)
    res = Resource(name, "ns", "uid-1", draw(st.integers(1, 10**6)))
    spec = draw(specs())
    now = draw(NOWS)
    attempt = draw(COUNT)
    moments = st.one_of(
        st.none(),
        st.builds(lambda s: iso(now + timedelta(seconds=s)), st.integers(-(10**7), 10**7)),
        st.builds(
            lambda s, f: (now + timedelta(seconds=s)).isoformat(timespec=f),
            st.integers(-(10**7), 10**7),
            st.sampled_from(["seconds", "milliseconds", "microseconds"]),
        ),
        _TEXT,
    )
    named = draw(st.one_of(st.none(), st.just(pod_name(name, attempt)), _TEXT.filter(bool)))
    conditions = draw(
        st.lists(
            st.builds(
                lambda t, s, r, m, when: Condition(
                    type=t, status=s, reason=r, message=m, last_transition_time=iso(when)
                ),
                st.sampled_from(["Succeeded", "Failed", "Running", "StorageReady", "Ready"]),
                st.sampled_from(["True", "False", "Unknown"]),
                st.sampled_from(["PodRunning", "X"]),
                _TEXT,
                NOWS,
            ),
            max_size=4,
            unique_by=lambda c: c.type,
        )
    )
    status = LoraResumeStatus(
        phase=draw(st.sampled_from(list(Phase))),
        message=draw(_TEXT),
        attempt=attempt,
        preemptions=draw(COUNT),
        failures=draw(COUNT),
        step=draw(COUNT),
        max_steps=draw(COUNT),
        lost_steps=draw(COUNT),
        pod_name=named,
        last_attempt_ended=draw(moments),
        next_attempt_after=draw(moments),
        on_demand=draw(st.booleans()),
        conditions=conditions,
        observed_generation=draw(st.integers(0, res.generation)),
        latest_checkpoint=draw(
            st.one_of(st.none(), st.builds(CheckpointRef, uri=st.just("s3://b/c/checkpoint-1/"), step=COUNT))
        ),
    )
    pod = None
    if named is not None and draw(st.booleans()):
        raw = draw(api_pods(st.just(named)))
        raw.setdefault("metadata", {})["name"] = named
        pod = ObservedPod.from_api(raw)
    checkpoint = draw(
        st.one_of(
            st.none(),
            st.builds(
                lambda step: CheckpointRef(uri=f"{spec.storage.uri}checkpoints/checkpoint-{step}/", step=step), COUNT
            ),
        )
    )
    # progress.json as the trainer writes it, or whatever else is in the bucket under that name
    sane = st.fixed_dictionaries(
        {},
        optional={
            "step": COUNT,
            "max_steps": COUNT,
            "attempt": COUNT,
            "epoch": st.floats(0, 100),
            "loss": st.floats(0, 1e6, allow_nan=False),
            "learning_rate": st.floats(0, 1),
            "phase": _TEXT,
            "time": st.floats(0, 2e9),
        },
    )
    junk_value = st.one_of(_JSON, st.integers(), st.floats(), st.just(10**30))
    junk = st.fixed_dictionaries({}, optional={k: junk_value for k in ("step", "max_steps", "attempt", "loss")})
    progress = draw(st.one_of(st.none(), sane, junk))
    source = draw(
        st.one_of(
            st.none(),
            st.builds(
                SourceState,
                exists=st.booleans(),
                phase=st.one_of(st.none(), st.sampled_from([p.value for p in Phase])),
                output_adapter=st.one_of(st.none(), st.just("s3://src/adapter/")),
            ),
        )
    )
    return Observation(
        resource=res,
        spec=spec,
        status=status,
        pod=pod,
        checkpoint=checkpoint,
        progress=progress,
        adapter_complete=draw(st.booleans()),
        now=now,
        source=source,
    )


def _ints(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, dict):
        return [i for v in value.values() for i in _ints(v)]
    if isinstance(value, list):
        return [i for v in value for i in _ints(v)]
    return []


@FUZZ
@given(observations(), st.sampled_from([Phase.SUCCEEDED, Phase.FAILED]))
def test_decide_never_raises_and_keeps_its_invariants(judge: ApiJudge, obs: Observation, terminal: Phase) -> None:
    plan = decide(obs)
    check_plan(judge, obs, plan)
    assert decide(obs) == plan  # a function of the observation: no clock, no randomness, no state
    # Whatever else is observed, a finished job stays finished and gets no pod.
    done = replace(obs, status=obs.status.model_copy(update={"phase": terminal}))
    finished = decide(done)
    check_plan(judge, done, finished)
    assert finished.status.phase is terminal


def check_plan(judge: ApiJudge, obs: Observation, plan: Any) -> None:
    before, after = obs.status, plan.status
    creates = [a for a in plan.actions if isinstance(a, CreatePod)]
    requeues = [a for a in plan.actions if isinstance(a, Requeue)]

    assert len(creates) <= 1
    if before.phase.is_terminal or after.phase.is_terminal:
        assert creates == [], "a pod for a finished job"
    for counter in ("attempt", "preemptions", "failures", "lost_steps"):
        assert getattr(after, counter) >= getattr(before, counter), counter
    assert after.attempt - before.attempt in (0, 1)
    if creates:
        (create,) = creates
        assert (create.name, create.attempt) == (after.pod_name, after.attempt), "the status names the pod it creates"
        assert len(create.name) <= 253
    assert len(requeues) <= 1
    for requeue in requeues:
        assert math.isfinite(requeue.after_seconds) and requeue.after_seconds > 0
    for event in plan.actions:
        if isinstance(event, EmitEvent):
            assert event.type in ("Normal", "Warning") and event.reason and isinstance(event.message, str)
    assert after.observed_generation == obs.resource.generation
    # The API server must take the status: the CRD's status schema, int64 numbers.
    status = after.model_dump(by_alias=True, mode="json", exclude_none=True)
    judge.admit_status(status)
    assert all(abs(i) <= INT64_MAX for i in _ints(status))

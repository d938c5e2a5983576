"""Table tests for the reconcile decision: every row of DESIGN.md's preemption table and more."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from loraresume_operator import conditions as c
from loraresume_operator.decide import (
    EXTRA_CHANGED,
    PENDING_RECHECK_SECONDS,
    UNCONFIRMED_DELETION_SECONDS,
    UNSCHEDULABLE_REPORT_SECONDS,
    CreatePod,
    DeletePod,
    EmitEvent,
    Observation,
    ReleasePod,
    Requeue,
    Resource,
    SourceState,
    decide,
    duration,
    iso,
    pod_name,
    wants_on_demand,
)
from loraresume_operator.observed import ACCOUNTING_FINALIZER, ObservedPod
from loraresume_operator.spec import CheckpointRef, LoraResumeSpec, LoraResumeStatus, Phase
from tests.support.specs import build_spec

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
RES = Resource("bot", "ml", "uid-1", 3)
CKPT = CheckpointRef(uri="s3://ckpt/bot/checkpoints/checkpoint-20/", step=20)


BASE: dict[str, Any] = {
    "baseModel": "unsloth/llama-3-8b-bnb-4bit",
    "dataset": {"source": "s3://data/d.jsonl"},
    "storage": {"uri": "s3://ckpt/bot/"},
    "training": {"maxSteps": 100},
    "restartPolicy": {"maxPreemptions": 2, "backoffLimit": 2, "backoffSeconds": 10, "maxBackoffSeconds": 25},
}


def spec(**over: Any) -> LoraResumeSpec:
    return build_spec(BASE, **over)


def status(**over: Any) -> LoraResumeStatus:
    return LoraResumeStatus(**over)


RUNNING_1 = dict(phase=Phase.RUNNING, attempt=1, pod_name="bot-attempt-1")


def pod(**over: Any) -> ObservedPod:
    return ObservedPod(**{"name": "bot-attempt-1", "phase": "Running", **over})


def ended(exit_code: int, **over: Any) -> ObservedPod:
    return pod(phase="Failed" if exit_code else "Succeeded", exit_code=exit_code, **over)


def obs(st: LoraResumeStatus, p: ObservedPod | None = None, **over: Any) -> Observation:
    base = dict(
        resource=RES,
        spec=spec(),
        status=st,
        pod=p,
        checkpoint=CKPT,
        progress={"step": 27, "max_steps": 100, "loss": 1.2345, "attempt": st.attempt},
        adapter_complete=False,
        now=NOW,
    )
    base.update(over)
    return Observation(**base)


def creates(plan) -> list[CreatePod]:
    return [a for a in plan.actions if isinstance(a, CreatePod)]


def cond(plan, type_: str):
    return next((x for x in plan.status.conditions if x.type == type_), None)


# --- DESIGN.md's preemption-versus-failure table ------------------------------------------

ENDINGS = [
    # (id, pod observed (None: gone), adapter_complete, expected phase, preemptions, failures, relaunch now, reason)
    ("exit0-adapter", ended(0), True, Phase.SUCCEEDED, 0, 0, False, c.ADAPTER_SAVED),
    ("exit0-no-adapter", ended(0), False, Phase.RESUMING, 0, 1, False, "NoAdapter"),
    (
        "disruption-target",
        ended(137, disrupted=True, disruption_reason="PreemptionByScheduler"),
        False,
        Phase.RESUMING,
        1,
        0,
        True,
        "PreemptionByScheduler",
    ),
    (
        "taint-eviction",
        ended(143, disrupted=True, disruption_reason="DeletionByTaintManager"),
        False,
        Phase.RESUMING,
        1,
        0,
        True,
        "DeletionByTaintManager",
    ),
    (
        "evicted",
        pod(phase="Failed", pod_reason="Evicted", message="node low on memory"),
        False,
        Phase.RESUMING,
        1,
        0,
        True,
        "Evicted",
    ),
    ("node-lost", pod(phase="Failed", pod_reason="NodeLost"), False, Phase.RESUMING, 1, 0, True, "NodeLost"),
    ("pod-deleted-by-someone", None, False, Phase.RESUMING, 1, 0, True, "PodDeleted"),
    ("pod-terminating-killed", ended(137, terminating=True), False, Phase.RESUMING, 1, 0, True, "PodDeleted"),
    (
        "sigterm-saved",
        ended(75, termination={"outcome": "preempted", "reason": "SIGTERM: checkpoint-27 durable"}),
        False,
        Phase.RESUMING,
        1,
        0,
        True,
        "SigtermCheckpointSaved",
    ),
    ("oom", ended(137, container_reason="OOMKilled"), False, Phase.RESUMING, 0, 1, False, "OOMKilled"),
    (
        "crash",
        ended(1, termination={"outcome": "failed", "reason": "RuntimeError: boom"}),
        False,
        Phase.RESUMING,
        0,
        1,
        False,
        "TrainerFailed",
    ),
    (
        "missing-secret",
        pod(
            phase="Pending", waiting_reason="CreateContainerConfigError", waiting_message='secret "s3-creds" not found'
        ),
        False,
        Phase.FAILED,
        0,
        0,
        False,
        c.CONFIG_ERROR,
    ),
    (
        "config-error",
        ended(78, termination={"outcome": "config_error", "reason": "dataset.template: needs column(s) output"}),
        False,
        Phase.FAILED,
        0,
        0,
        False,
        c.CONFIG_ERROR,
    ),
]


@pytest.mark.parametrize(
    ("p", "adapter", "phase", "pre", "fail", "relaunch", "reason"),
    [e[1:] for e in ENDINGS],
    ids=[e[0] for e in ENDINGS],
)
def test_ended_attempt(p, adapter, phase, pre, fail, relaunch, reason):
    plan = decide(obs(status(**RUNNING_1), p, adapter_complete=adapter))
    st = plan.status
    assert (st.phase, st.preemptions, st.failures) == (phase, pre, fail)
    assert bool(creates(plan)) is relaunch
    assert any(isinstance(a, EmitEvent) and a.reason == reason for a in plan.actions), plan.actions
    if relaunch:
        (create,) = creates(plan)
        assert create == CreatePod("bot-attempt-2", 2, CKPT.uri, False, None)
        assert st.attempt == 2 and st.pod_name == "bot-attempt-2"
    if phase is Phase.RESUMING and not relaunch:  # failure: backoff, no pod
        assert st.pod_name is None and st.next_attempt_after == iso(NOW + timedelta(seconds=10))
        assert plan.requeue == Requeue(10.0)


def test_success_sets_the_condition_kubectl_waits_for():
    plan = decide(obs(status(**RUNNING_1), ended(0), adapter_complete=True))
    assert cond(plan, c.SUCCEEDED).status == "True"
    assert cond(plan, c.FAILED).status == "False"
    assert plan.status.output_adapter == "s3://ckpt/bot/adapter/"


def test_config_error_fails_at_once_with_the_trainers_message():
    p = ended(78, termination={"outcome": "config_error", "reason": "dataset.template: needs column(s) output"})
    plan = decide(obs(status(**RUNNING_1), p))
    assert cond(plan, c.FAILED).status == "True" and cond(plan, c.FAILED).reason == c.CONFIG_ERROR
    assert "dataset.template: needs column(s) output" in plan.status.message
    assert not creates(plan) and plan.requeue is None


def test_lost_steps_are_progress_minus_durable_checkpoint():
    plan = decide(obs(status(**RUNNING_1, lost_steps=4), None))
    assert plan.status.lost_steps == 4 + (27 - 20)


def test_lost_steps_ignore_progress_of_another_attempt():
    plan = decide(obs(status(**RUNNING_1), None, progress={"step": 27, "attempt": 0}))
    assert plan.status.lost_steps == 0


# --- budgets, backoff ------------------------------------------------------------------------


def test_preemption_budget_exhausted():
    plan = decide(obs(status(**RUNNING_1, preemptions=2), None))
    assert plan.status.phase is Phase.FAILED and plan.status.preemptions == 3
    assert cond(plan, c.FAILED).reason == c.PREEMPTION_BUDGET_EXHAUSTED
    assert not creates(plan)


def test_failure_budget_exhausted():
    plan = decide(obs(status(**RUNNING_1, failures=2), ended(1)))
    assert plan.status.phase is Phase.FAILED and cond(plan, c.FAILED).reason == c.BACKOFF_LIMIT_EXCEEDED


def test_preemptions_never_count_as_failures():
    plan = decide(obs(status(**RUNNING_1, failures=2), None))
    assert plan.status.failures == 2 and plan.status.phase is Phase.RESUMING and creates(plan)


DISK_LOW = "The node was low on resource: ephemeral-storage. Threshold quantity: 10Gi, available: 9Gi. "
SCRATCH_OVER = 'Usage of EmptyDir volume "work" exceeds the limit "18Gi". '


@pytest.mark.parametrize(
    ("message", "before", "reason", "phase", "relaunch", "hint"),
    [
        (DISK_LOW, 0, c.DISK_EVICTED, Phase.RESUMING, True, "resources.ephemeralStorage"),
        (SCRATCH_OVER, 0, c.SCRATCH_FULL, Phase.RESUMING, True, "resources.scratchSize"),
        (SCRATCH_OVER, 3, c.SCRATCH_FULL, Phase.FAILED, False, "resources.scratchSize"),  # budget 3 spent
    ],
    ids=["node-low", "own-limit", "budget-spent"],
)
def test_an_eviction_for_disk_is_counted_as_one(message, before, reason, phase, relaunch, hint):
    evicted = ended(
        137, pod_reason="Evicted", message=message, disrupted=True, disruption_reason="TerminationByKubelet"
    )
    plan = decide(obs(status(**RUNNING_1, disk_evictions=before), evicted))
    st = plan.status
    assert (st.disk_evictions, st.preemptions, st.failures, st.phase) == (before + 1, 0, 0, phase)
    assert bool(creates(plan)) is relaunch
    assert st.lost_steps == 27 - CKPT.step
    [event] = [e for e in plan.actions if isinstance(e, EmitEvent) and e.reason == reason]
    assert message.strip()[:40] in event.message and hint in event.message
    if not relaunch:
        assert cond(plan, c.FAILED).reason == c.DISK_EVICTION_BUDGET_EXHAUSTED and hint in st.message
    else:
        assert creates(plan)[0].resume_from == CKPT.uri  # at once, from the newest checkpoint


@pytest.mark.parametrize(("failures_before", "delay"), [(0, 10), (1, 20), (2, 25)], ids=["first", "doubles", "capped"])
def test_backoff_doubles_and_is_capped(failures_before, delay):
    sp = spec(restartPolicy={"backoffLimit": 5, "backoffSeconds": 10, "maxBackoffSeconds": 25})
    plan = decide(obs(status(**RUNNING_1, failures=failures_before), ended(1), spec=sp))
    assert plan.requeue == Requeue(float(delay))


def test_backoff_waits_then_relaunches_from_the_newest_checkpoint():
    waiting = status(phase=Phase.RESUMING, attempt=1, failures=1, next_attempt_after=iso(NOW + timedelta(seconds=7)))
    plan = decide(obs(waiting))
    assert not creates(plan) and plan.requeue == Requeue(7.0)
    later = decide(obs(waiting, now=NOW + timedelta(seconds=8)))
    assert creates(later) == [CreatePod("bot-attempt-2", 2, CKPT.uri, False, None)]


# --- first attempt, missing or incomplete checkpoint, restarts --------------------------------


def test_first_attempt_without_checkpoint_starts_fresh():
    plan = decide(obs(status(), checkpoint=None, progress=None))
    assert creates(plan) == [CreatePod("bot-attempt-1", 1, None, False, None)]
    assert plan.status.phase is Phase.PENDING and plan.status.attempt == 1
    assert plan.status.observed_generation == 3


def test_relaunch_without_a_complete_checkpoint_starts_fresh():
    """An incomplete checkpoint is not reported (no manifest): the next attempt starts from scratch."""
    plan = decide(obs(status(**RUNNING_1), None, checkpoint=None))
    (create,) = creates(plan)
    assert create.resume_from is None and plan.status.lost_steps == 27


def test_operator_restart_before_the_pod_was_seen_recreates_the_same_pod():
    """Status names attempt 2's pod, the pod does not exist yet: create it, count nothing."""
    st = status(phase=Phase.RESUMING, attempt=2, pod_name="bot-attempt-2", preemptions=1)
    plan = decide(obs(st, None, progress={"step": 27, "max_steps": 100, "attempt": 1}))
    assert creates(plan) == [CreatePod("bot-attempt-2", 2, CKPT.uri, False, None)]
    assert plan.status.preemptions == 1 and plan.status.attempt == 2


def test_pod_gone_before_it_was_seen_but_whose_trainer_ran_is_a_preemption():
    """A busy operator may never see a short-lived pod Running; its progress.json shows it ran."""
    st = status(phase=Phase.RESUMING, attempt=2, pod_name="bot-attempt-2", preemptions=1)
    plan = decide(obs(st, None, progress={"step": 27, "max_steps": 100, "attempt": 2}))
    assert creates(plan) == [CreatePod("bot-attempt-3", 3, CKPT.uri, False, None)]
    assert (plan.status.preemptions, plan.status.attempt, plan.status.lost_steps) == (2, 3, 7)


def test_operator_restart_while_the_pod_runs_changes_nothing():
    st = status(**RUNNING_1)
    plan = decide(obs(st, pod()))
    assert not creates(plan) and plan.status.phase is Phase.RUNNING
    assert not [a for a in plan.actions if isinstance(a, EmitEvent)]  # no duplicate "running" event


def test_running_pod_marks_the_attempt_seen_and_ends_the_wait():
    st = status(phase=Phase.PENDING, attempt=1, pod_name="bot-attempt-1", pending_since=iso(NOW), pending_reason="X")
    plan = decide(obs(st, pod()))
    assert plan.status.phase is Phase.RUNNING and cond(plan, c.RUNNING).status == "True"
    assert plan.status.pending_since is None and plan.status.pending_reason is None


NO_GPU = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
SPOT = {"enabled": True, "pendingTimeoutSeconds": 600}
UNSCHEDULABLE = dict(phase="Pending", unschedulable=True, scheduling_message=NO_GPU)
PULL_FAILS = dict(phase="Pending", waiting_reason="ImagePullBackOff", waiting_message='Back-off pulling image "x"')


@pytest.mark.parametrize(
    ("p", "spot", "on_demand", "waited", "want"),
    [
        # what the pod is waiting for, the job's spot settings, seconds since the pod was created -> what happens
        (dict(phase="Pending"), SPOT, False, 0, "quiet"),
        (UNSCHEDULABLE, SPOT, False, 9, "quiet"),  # a moment's wait for a node: said from 10 s on
        (UNSCHEDULABLE, SPOT, False, 599, "waits:Unschedulable"),
        (UNSCHEDULABLE, SPOT, False, 600, "on-demand"),
        (UNSCHEDULABLE, {"enabled": False}, False, 10_000, "waits:Unschedulable"),  # nowhere else to go
        (UNSCHEDULABLE, SPOT, True, 10_000, "waits:Unschedulable"),  # on-demand already
        (dict(phase="Pending", waiting_reason="ContainerCreating"), SPOT, False, 10_000, "quiet"),
        (dict(phase="Pending", waiting_reason="PodInitializing"), SPOT, False, 30, "quiet"),
        (PULL_FAILS, SPOT, False, 299, "waits:ImagePullBackOff"),
        (PULL_FAILS, SPOT, False, 300, "failed"),
        ({**PULL_FAILS, "waiting_reason": "ErrImagePull"}, {"enabled": False}, False, 300, "failed"),
    ],
    ids=[
        "just-created",
        "unschedulable-a-moment",
        "unschedulable-before-timeout",
        "unschedulable-spot-timeout",
        "unschedulable-no-spot",
        "unschedulable-on-demand",
        "container-creating",
        "pod-initializing",
        "image-pull-before-timeout",
        "image-pull-timeout",
        "err-image-pull-timeout",
    ],
)
def test_a_pod_that_has_not_started(p, spot, on_demand, waited, want):
    created = NOW - timedelta(seconds=waited)
    st = status(phase=Phase.PENDING, attempt=1, pod_name="bot-attempt-1", on_demand=on_demand, observed_generation=1)
    plan = decide(obs(st, pod(**p, created=created), spec=spec(scheduling={"spot": spot})))
    deleted = [a.name for a in plan.actions if isinstance(a, DeletePod)]
    events = [a for a in plan.actions if isinstance(a, EmitEvent)]
    assert plan.status.preemptions == 0 and plan.status.failures == 0  # neither a preemption nor a failure
    if want == "quiet":  # what every pod waits for: the status (as the launch wrote it) stays, no event
        assert said_of(plan.status) == said_of(st) and not events and not creates(plan) and not deleted
        assert 1 <= plan.requeue.after_seconds <= PENDING_RECHECK_SECONDS
    elif want.startswith("waits:"):
        reason = want.removeprefix("waits:")
        assert not creates(plan) and not deleted and plan.status.phase is Phase.PENDING
        assert plan.status.pending_reason == reason and plan.status.pending_since == iso(created)  # from creation
        assert cond(plan, c.RUNNING).status == "False" and cond(plan, c.RUNNING).reason == reason
        assert reason in plan.status.message and (NO_GPU in plan.status.message) == bool(p.get("unschedulable"))
        assert 1 <= plan.requeue.after_seconds <= PENDING_RECHECK_SECONDS
        # a Warning for what a person must fix; Unschedulable has the scheduler's own event on the pod
        assert [e.reason for e in events] == ([] if p.get("unschedulable") else [reason])
        assert all(e.type == "Warning" for e in events)
    elif want == "on-demand":
        [new] = creates(plan)
        assert deleted == ["bot-attempt-1"] and new.on_demand and new.attempt == 2
        assert plan.status.spot_timeouts == 1 and plan.status.on_demand and plan.status.pending_since is None
        assert c.SPOT_CAPACITY_TIMEOUT in [a.reason for a in plan.actions if isinstance(a, EmitEvent)]
        later = decide(obs(plan.status, None, spec=spec(scheduling={"spot": spot})))  # next attempt stays on-demand
        assert all(x.on_demand for x in creates(later))
    else:
        assert deleted == ["bot-attempt-1"] and not creates(plan) and plan.status.phase is Phase.FAILED
        assert cond(plan, c.FAILED).reason == c.IMAGE_PULL_FAILED and "imagePullTimeoutSeconds" in plan.status.message


def said_of(st: LoraResumeStatus) -> tuple[Any, ...]:
    """What a pending pod's decision may change in the status (progress and generation aside)."""
    return (st.phase, st.message, st.pending_since, st.pending_reason, st.conditions)


CREATED = NOW - timedelta(seconds=40)
BOUND_LONG_AGO = dict(phase="Pending", waiting_reason="ContainerCreating", scheduled_at=NOW - timedelta(seconds=20))
BOUND_JUST_NOW = dict(phase="Pending", waiting_reason="ContainerCreating", scheduled_at=NOW - timedelta(seconds=2))


@pytest.mark.parametrize(
    ("said", "p", "written", "event"),
    [
        # the wait the status names, the pod now -> the status rewritten?, an event?
        (None, dict(phase="Pending"), False, False),  # Scheduling: the launch's status says "starting"
        (None, dict(phase="Pending", waiting_reason="ContainerCreating"), False, False),
        (None, UNSCHEDULABLE, True, False),  # a wait for a node: said; the scheduler posts its own event
        ("Unschedulable", UNSCHEDULABLE, False, False),  # said already (its node count may tick)
        ("Unschedulable", {**UNSCHEDULABLE, "scheduling_message": "0/9 nodes are available"}, False, False),
        ("Unschedulable", BOUND_JUST_NOW, False, False),  # bound a moment ago: Running usually follows
        ("Unschedulable", BOUND_LONG_AGO, True, False),  # bound long ago: no longer a wait for a node
        ("Unschedulable", dict(phase="Pending"), False, False),  # no PodScheduled=True yet
        (None, PULL_FAILS, True, True),
        ("ErrImagePull", PULL_FAILS, False, False),  # the kubelet's two pull reasons take turns: one wait
        ("ImagePullBackOff", BOUND_LONG_AGO, False, False),  # a pull retried: still that wait
        ("Unschedulable", PULL_FAILS, True, True),
        ("ContainerCreating", dict(phase="Pending"), False, False),  # written by an earlier version: left
    ],
)
def test_the_status_names_a_wait_a_person_would_act_on_once(said, p, written, event):
    st = status(
        phase=Phase.PENDING,
        attempt=1,
        pod_name="bot-attempt-1",
        observed_generation=1,
        pending_since=iso(CREATED) if said else None,
        pending_reason=said,
    )
    plan = decide(obs(st, pod(**p, created=CREATED)))
    events = [a.reason for a in plan.actions if isinstance(a, EmitEvent)]
    assert (said_of(plan.status) != said_of(st)) == written and bool(events) == event
    if written:
        reason = pod(**p).pending_reason[0]
        assert plan.status.pending_reason == reason and plan.status.pending_since == iso(CREATED)
        assert cond(plan, c.RUNNING).reason == reason
    assert 1 <= plan.requeue.after_seconds <= PENDING_RECHECK_SECONDS
    if p is BOUND_JUST_NOW:  # back when it is bound long enough to tell
        assert plan.requeue.after_seconds == pytest.approx(PENDING_RECHECK_SECONDS - 2)


def test_a_moments_wait_for_a_node_is_rechecked_when_it_would_be_said():
    st = status(phase=Phase.RESUMING, attempt=2, pod_name="bot-attempt-2", observed_generation=1)
    p = pod(name="bot-attempt-2", **UNSCHEDULABLE, created=NOW - timedelta(seconds=3))
    plan = decide(obs(st, p, spec=spec(scheduling={"spot": SPOT})))
    assert said_of(plan.status) == said_of(st) and not [a for a in plan.actions if isinstance(a, EmitEvent)]
    assert plan.requeue.after_seconds == pytest.approx(UNSCHEDULABLE_REPORT_SECONDS - 3)
    later = decide(obs(st, p, spec=spec(scheduling={"spot": SPOT}), now=NOW + timedelta(seconds=7)))
    assert later.status.pending_reason == "Unschedulable" and later.status.phase is Phase.PENDING


def test_the_wait_is_timed_from_the_pods_creation_and_said_once():
    st = status(phase=Phase.PENDING, attempt=1, pod_name="bot-attempt-1")
    created = NOW - timedelta(seconds=30)
    first = decide(obs(st, pod(**UNSCHEDULABLE, created=created), spec=spec(scheduling={"spot": SPOT})))
    assert first.status.pending_since == iso(created) and f"pending since {iso(created)}" in first.status.message
    assert not [a for a in first.actions if isinstance(a, EmitEvent)]
    later = decide(
        obs(
            first.status,
            pod(**UNSCHEDULABLE, created=created),
            spec=spec(scheduling={"spot": SPOT}),
            now=NOW + timedelta(seconds=200),
        )
    )
    assert later.status == first.status  # no rewrite
    assert not [a for a in later.actions if isinstance(a, EmitEvent)]
    assert later.requeue.after_seconds == PENDING_RECHECK_SECONDS
    # no creation time known (a pod from an older API answer): from the first observation, as before
    unknown = decide(obs(st, pod(**UNSCHEDULABLE), spec=spec(scheduling={"spot": SPOT})))
    assert unknown.status.pending_since == iso(NOW)


def test_a_later_preemption_relaunch_stays_on_demand_after_a_spot_timeout():
    assert wants_on_demand(spec(scheduling={"spot": SPOT}), preemptions=0, spot_timeouts=1)
    assert not wants_on_demand(spec(scheduling={"spot": SPOT}), preemptions=0, spot_timeouts=0)


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.9, "59s"), (200, "3m20s"), (7500, "2h05m")])
def test_durations_read_as_people_write_them(seconds, text):
    assert duration(seconds) == text


def test_progress_is_reported():
    plan = decide(obs(status(**RUNNING_1), pod()))
    assert (plan.status.step, plan.status.max_steps, plan.status.progress, plan.status.loss) == (
        27,
        100,
        "27/100",
        "1.234",
    )
    assert plan.status.latest_checkpoint == CKPT


def test_terminal_phase_is_left_alone():
    st = status(phase=Phase.SUCCEEDED, attempt=3, pod_name="bot-attempt-3")
    plan = decide(obs(st, None))
    assert plan.actions == () and plan.status.phase is Phase.SUCCEEDED


# --- spot fallback ---------------------------------------------------------------------------


@pytest.mark.parametrize(("preemptions_before", "on_demand"), [(0, False), (1, True), (2, True)])
def test_on_demand_after_n_preemptions(preemptions_before, on_demand):
    sp = spec(
        scheduling={"spot": {"enabled": True, "fallbackToOnDemandAfter": 2}}, restartPolicy={"maxPreemptions": 10}
    )
    before = status(**RUNNING_1, preemptions=preemptions_before, on_demand=preemptions_before >= 2)
    plan = decide(obs(before, None, spec=sp))
    (create,) = creates(plan)
    assert create.on_demand is on_demand and plan.status.on_demand is on_demand
    fallback_events = [a for a in plan.actions if isinstance(a, EmitEvent) and a.reason == "FallbackToOnDemand"]
    assert len(fallback_events) == (1 if preemptions_before == 1 else 0)


# --- chained resources -----------------------------------------------------------------------

CHAINED = spec(adapter={"fromResource": "stage-1"})


@pytest.mark.parametrize(
    ("source", "phase", "created", "failed"),
    [
        (None, Phase.PENDING, False, False),
        (SourceState(exists=False), Phase.PENDING, False, False),
        (SourceState(True, "Running"), Phase.PENDING, False, False),
        (SourceState(True, "Failed"), Phase.FAILED, False, True),
        (SourceState(True, "Succeeded", "s3://ckpt/stage-1/adapter/"), Phase.PENDING, True, False),
    ],
    ids=["unobserved", "missing", "running", "failed", "succeeded"],
)
def test_chained_resource_waits_for_its_source(source, phase, created, failed):
    plan = decide(obs(status(), spec=CHAINED, source=source, checkpoint=None))
    assert plan.status.phase is phase
    if created:
        assert creates(plan) == [CreatePod("bot-attempt-1", 1, None, False, "s3://ckpt/stage-1/adapter/")]
    else:
        assert not creates(plan)
    if failed:
        assert cond(plan, c.FAILED).reason == c.ADAPTER_SOURCE_FAILED
    elif not created:
        assert plan.requeue is not None and "stage-1" in plan.status.message


def test_chained_relaunch_keeps_the_sources_adapter():
    source = SourceState(True, "Succeeded", "s3://ckpt/stage-1/adapter/")
    plan = decide(obs(status(**RUNNING_1), None, spec=CHAINED, source=source))
    (create,) = creates(plan)
    assert create.adapter_uri == "s3://ckpt/stage-1/adapter/" and create.resume_from == CKPT.uri


# --- spec edits ------------------------------------------------------------------------------


def test_budget_raised_during_the_run_takes_effect():
    """maxPreemptions edited from 2 to 5: the 3rd preemption relaunches instead of failing."""
    sp = spec(restartPolicy={"maxPreemptions": 5})
    plan = decide(obs(status(**RUNNING_1, preemptions=2), None, spec=sp, resource=replace(RES, generation=4)))
    assert creates(plan) and plan.status.observed_generation == 4


def test_pod_names_are_deterministic_and_bounded():
    assert pod_name("bot", 7) == "bot-attempt-7"
    long = pod_name("x" * 253, 12)
    assert len(long) <= 253 and long.endswith("-a12") and long == pod_name("x" * 253, 12)


def _extra(extra: dict[str, Any]) -> LoraResumeSpec:
    return spec(training={"maxSteps": 100, "extra": extra})


def test_the_first_launch_records_trainings_extra():
    plan = decide(obs(status(), spec=_extra({"max_grad_norm": 0.3})))
    assert creates(plan) and plan.status.training_extra_digest == _extra({"max_grad_norm": 0.3}).training.extra_digest()


@pytest.mark.parametrize(
    ("recorded", "now", "held"),
    [
        ({"max_grad_norm": 1}, {"max_grad_norm": 1.0}, False),  # the API server stores 1.0 as 1: the same run
        ({"max_grad_norm": 1}, {"max_grad_norm": 0.3}, True),
        ({"lr_scheduler_kwargs": {"num_cycles": 2}}, {"lr_scheduler_kwargs": {"num_cycles": 2.0}}, False),
        ({}, {"adam_beta2": 0.99}, True),
        ({"adam_beta2": 0.99}, {}, True),
    ],
    ids=["1-vs-1.0", "changed", "nested-1-vs-1.0", "added", "removed"],
)
@pytest.mark.parametrize("pod_state", ["running", "ended", "backoff-over"])
def test_a_changed_extra_holds_the_job(recorded, now, held, pod_state):
    digest = _extra(recorded).training.extra_digest()
    if pod_state == "backoff-over":
        st, p = status(phase=Phase.RESUMING, attempt=1, failures=1, training_extra_digest=digest), None
    else:
        st, p = (
            status(**RUNNING_1, training_extra_digest=digest),
            pod() if pod_state == "running" else ended(75),
        )  # preempted: relaunch at once
    plan = decide(obs(st, p, spec=_extra(now)))
    if held:
        assert not creates(plan) and plan.status.message == EXTRA_CHANGED
        assert plan.status.failures == st.failures and plan.status.preemptions == st.preemptions
        assert [a.reason for a in plan.actions if isinstance(a, EmitEvent)] == [c.TRAINING_CHANGED]
        assert plan.requeue is not None
        again = decide(obs(plan.status, p, spec=_extra(now)))
        assert not [a for a in again.actions if isinstance(a, EmitEvent)]  # one event, not one per reconcile
        released = decide(obs(plan.status, p, spec=_extra(recorded)))  # changed back: the job goes on
        assert released.status.message != EXTRA_CHANGED
        assert bool(creates(released)) == (pod_state != "running")
    else:
        assert plan.status.message != EXTRA_CHANGED
        assert bool(creates(plan)) == (pod_state != "running")


SUSPENDED = {"suspend": True}


@pytest.mark.parametrize(
    ("st", "p", "adapter", "want_phase", "deletes"),
    [
        (dict(**RUNNING_1), dict(), False, Phase.RUNNING, True),  # the graceful stop starts
        (dict(**RUNNING_1), dict(terminating=True), False, Phase.RUNNING, False),  # already stopping
        (dict(**RUNNING_1), dict(phase="Failed", exit_code=75), False, Phase.SUSPENDED, False),
        (dict(**RUNNING_1), dict(phase="Succeeded", exit_code=0), True, Phase.SUCCEEDED, False),  # finished anyway
        (
            dict(phase=Phase.RESUMING, attempt=1, failures=1, next_attempt_after=iso(NOW + timedelta(seconds=9))),
            None,
            False,
            Phase.SUSPENDED,
            False,
        ),
        (dict(), None, False, Phase.SUSPENDED, False),  # before the first attempt
    ],
    ids=["running", "terminating", "stopped-with-checkpoint", "succeeded-meanwhile", "in-backoff", "never-started"],
)
def test_suspend(st, p, adapter, want_phase, deletes):
    before = status(**st)
    plan = decide(obs(before, pod(**p) if p is not None else None, spec=spec(**SUSPENDED), adapter_complete=adapter))
    assert plan.status.phase is want_phase
    assert [a.name for a in plan.actions if isinstance(a, DeletePod)] == (["bot-attempt-1"] if deletes else [])
    assert not creates(plan)
    assert (plan.status.preemptions, plan.status.failures) == (before.preemptions, before.failures)
    if want_phase is Phase.SUSPENDED:
        assert plan.status.pod_name is None and plan.status.next_attempt_after is None
        assert cond(plan, c.RUNNING).reason == c.SUSPENDED and CKPT.uri in plan.status.message
        again = decide(obs(plan.status, None, spec=spec(**SUSPENDED)))
        assert not again.actions  # stays suspended, quietly


def test_unsuspending_resumes_from_the_newest_checkpoint():
    st = status(phase=Phase.SUSPENDED, attempt=1, preemptions=0, failures=0)
    plan = decide(obs(st, None, spec=spec(suspend=False)))
    [create] = creates(plan)
    assert create.attempt == 2 and create.resume_from == CKPT.uri
    assert c.RESUMED in [a.reason for a in plan.actions if isinstance(a, EmitEvent)]
    assert (plan.status.preemptions, plan.status.failures) == (0, 0)


# The accounting finalizer ------------------------------------------------------------------
HELD = dict(finalizers=("other.io/keep", ACCOUNTING_FINALIZER), attempt=1)
SPOT_RECLAIMED = dict(
    phase="Failed",
    exit_code=143,
    disrupted=True,
    disruption_reason="TerminationByKubelet",
    pod_reason="Terminated",
    message="Pod was terminated in response to imminent node shutdown.",
    termination={"outcome": "preempted", "reason": "SIGTERM: checkpoint-20 is durable"},
)


def released(plan) -> list[str]:
    return [a.name for a in plan.actions if isinstance(a, ReleasePod)]


@pytest.mark.parametrize(
    ("st", "p", "other", "want"),
    [
        # the pod of the attempt in flight is kept while it runs or is pending
        (status(**RUNNING_1), pod(**HELD), None, []),
        (status(phase=Phase.PENDING, attempt=1, pod_name="bot-attempt-1"), pod(phase="Pending", **HELD), None, []),
        # its end is counted in the same plan that lets it go: preempted, failed (backoff), succeeded
        (status(**RUNNING_1), ended(143, **HELD), None, ["bot-attempt-1"]),
        (status(**RUNNING_1), ended(1, **HELD), None, ["bot-attempt-1"]),
        (status(**RUNNING_1), ended(0, **HELD), None, ["bot-attempt-1"]),
        # being deleted but not ended: still kept (its SIGTERM checkpoint is what the next attempt needs)
        (status(**RUNNING_1), pod(terminating=True, deletion_deadline=NOW, **HELD), None, []),
        # a pod without the finalizer (created before it existed) needs nothing
        (status(**RUNNING_1), ended(143), None, []),
        # an earlier attempt's pod, seen by its event: counted before the next attempt began
        (
            status(phase=Phase.RUNNING, attempt=2, pod_name="bot-attempt-2"),
            pod(name="bot-attempt-2", attempt=2, finalizers=(ACCOUNTING_FINALIZER,)),
            ended(143, **HELD),
            ["bot-attempt-1"],
        ),
        # ... and kept while the current one runs
        (
            status(phase=Phase.RUNNING, attempt=2, pod_name="bot-attempt-2"),
            pod(name="bot-attempt-2", attempt=2, finalizers=(ACCOUNTING_FINALIZER,)),
            None,
            [],
        ),
        # a pod of an attempt the status does not know yet is never let go
        (
            status(phase=Phase.RUNNING, attempt=1, pod_name="bot-attempt-1"),
            pod(**HELD),
            pod(name="bot-attempt-2", attempt=2, finalizers=(ACCOUNTING_FINALIZER,)),
            [],
        ),
        # backing off: the failed pod is counted
        (status(phase=Phase.RESUMING, attempt=1, failures=1), None, ended(1, **HELD), ["bot-attempt-1"]),
    ],
    ids=[
        "running",
        "pending",
        "preempted",
        "failed",
        "succeeded",
        "terminating",
        "no-finalizer",
        "earlier-attempt",
        "current-kept",
        "later-attempt",
        "backing-off",
    ],
)
def test_a_pod_is_let_go_once_its_end_is_counted(st, p, other, want):
    plan = decide(obs(st, p, other_pod=other, adapter_complete=p is not None and p.exit_code == 0))
    assert released(plan) == want
    if want and p is not None and p.name in want:
        assert plan.status.pod_name != p.name or plan.status.phase.is_terminal


def test_a_spot_reclaim_seen_late_is_counted_once_as_a_preemption_with_the_trainers_words():
    plan = decide(obs(status(**RUNNING_1), pod(**HELD, **SPOT_RECLAIMED), progress={"step": 22, "attempt": 1}))
    assert plan.status.preemptions == 1 and plan.status.failures == 0 and plan.status.lost_steps == 2
    event = next(a for a in plan.actions if isinstance(a, EmitEvent) and a.reason == "TerminationByKubelet")
    assert "imminent node shutdown" in event.message and "checkpoint-20 is durable" in event.message
    assert released(plan) == ["bot-attempt-1"] and creates(plan)[0].name == "bot-attempt-2"
    # the next reconcile (the status written, the pod still there until released) counts nothing
    again = decide(obs(plan.status, None, other_pod=pod(**HELD, **SPOT_RECLAIMED), progress={"step": 22, "attempt": 1}))
    assert again.status.preemptions == 1 and released(again) == ["bot-attempt-1"]


@pytest.mark.parametrize(
    ("overdue", "counted"),
    [(UNCONFIRMED_DELETION_SECONDS, False), (UNCONFIRMED_DELETION_SECONDS + 1, True)],
    ids=["within", "past"],
)
def test_a_deleted_pod_nobody_ends_is_counted_after_a_while(overdue, counted):
    gone = pod(terminating=True, deletion_deadline=NOW - timedelta(seconds=overdue), **HELD)
    plan = decide(obs(status(**RUNNING_1), gone))
    assert (plan.status.preemptions == 1) is counted
    assert (released(plan) == ["bot-attempt-1"]) is counted


@pytest.mark.parametrize(
    ("p", "spot", "waited", "want_phase"),
    [
        (
            pod(phase="Pending", unschedulable=True, **HELD),
            {"enabled": True, "pendingTimeoutSeconds": 60},
            61,
            Phase.RESUMING,
        ),
        (pod(phase="Pending", waiting_reason="ImagePullBackOff", **HELD), {"enabled": False}, 10_000, Phase.FAILED),
    ],
    ids=["spot-timeout", "image-pull"],
)
def test_a_pod_the_operator_deletes_is_let_go_with_it(p, spot, waited, want_phase):
    st = status(
        phase=Phase.PENDING, attempt=1, pod_name="bot-attempt-1", pending_since=iso(NOW - timedelta(seconds=waited))
    )
    plan = decide(obs(st, p, spec=spec(scheduling={"spot": spot})))
    assert [a.name for a in plan.actions if isinstance(a, DeletePod)] == ["bot-attempt-1"]
    assert released(plan) == ["bot-attempt-1"] and plan.status.phase is want_phase


@pytest.mark.parametrize(
    ("before", "reported", "want", "event"),
    [
        ([], [30, 10, 10], [10, 30], True),  # first reported: said once, sorted, unique
        ([10, 30], [30, 10], [10, 30], False),  # unchanged: no new event
        ([10, 30], [], [], False),  # removed by a person: cleared quietly
        ([], ["x", True, None, 5.0], [5], True),  # written by the trainer, read as untrusted
        ([10], None, [10], False),  # an older trainer's progress.json says nothing
    ],
    ids=["first", "unchanged", "removed", "untrusted", "absent"],
)
def test_another_jobs_checkpoints_are_reported(before, reported, want, event):
    progress = {"step": 3, "attempt": 1}
    if reported is not None:
        progress["foreign_checkpoints"] = reported
    plan = decide(obs(status(**RUNNING_1, foreign_checkpoints=before), pod(), progress=progress))
    assert plan.status.foreign_checkpoints == want
    said = [a for a in plan.actions if isinstance(a, EmitEvent) and a.reason == c.FOREIGN_CHECKPOINTS]
    assert bool(said) is event
    if event:
        assert "s3://ckpt/bot/" in said[0].message and "never resumed from" in said[0].message


# resume.extendFrom ---------------------------------------------------------------------------
PRED_CKPT = CheckpointRef(uri="s3://ckpt/stage-1/checkpoints/checkpoint-100/", step=100)
FINISHED = SourceState(True, "Succeeded", "s3://ckpt/stage-1/adapter/", "s3://ckpt/stage-1/", PRED_CKPT, 100)


@pytest.mark.parametrize(
    ("pred", "own", "want_phase", "want_from", "reason"),
    [
        (None, None, Phase.PENDING, None, c.WAITING_FOR_PREDECESSOR),
        (SourceState(False), None, Phase.PENDING, None, c.WAITING_FOR_PREDECESSOR),
        (replace(FINISHED, phase="Running"), None, Phase.PENDING, None, c.WAITING_FOR_PREDECESSOR),
        (replace(FINISHED, phase="Failed"), None, Phase.FAILED, None, c.CANNOT_EXTEND),
        (replace(FINISHED, checkpoint=None), None, Phase.FAILED, None, c.CANNOT_EXTEND),
        (replace(FINISHED, storage_uri="s3://ckpt/bot/"), None, Phase.FAILED, None, c.CANNOT_EXTEND),
        (replace(FINISHED, max_steps=120), None, Phase.FAILED, None, c.CANNOT_EXTEND),
        (FINISHED, None, Phase.PENDING, PRED_CKPT.uri, None),
        # a relaunch continues from the job's own newest checkpoint; the finished run is not needed
        (None, CKPT, Phase.PENDING, CKPT.uri, None),
    ],
    ids=["unseen", "absent", "running", "failed", "no-checkpoint", "same-storage", "not-final", "ready", "own"],
)
def test_extending_a_finished_run(pred, own, want_phase, want_from, reason):
    extending = spec(resume={"extendFrom": "stage-1"}, training={"maxSteps": 200})
    plan = decide(obs(status(), None, spec=extending, predecessor=pred, checkpoint=own))
    assert plan.status.phase is want_phase
    made = creates(plan)
    assert [p.resume_from for p in made] == ([want_from] if want_from else [])
    if reason:
        assert cond(plan, c.FAILED if want_phase is Phase.FAILED else c.RUNNING).reason == reason
        assert "stage-1" in plan.status.message


def test_resume_from_checkpoint_is_where_a_new_job_starts():
    other = "s3://ckpt/other/checkpoints/checkpoint-40/"
    first = decide(obs(status(), None, spec=spec(resume={"fromCheckpoint": other}), checkpoint=None))
    assert creates(first)[0].resume_from == other
    later = decide(obs(status(), None, spec=spec(resume={"fromCheckpoint": other})))
    assert creates(later)[0].resume_from == CKPT.uri  # the job's own newer checkpoint wins


def test_storage_read_again_ends_a_storage_ready_false():
    down = c.set_condition([], c.STORAGE_READY, False, c.STORAGE_UNAVAILABLE, "cannot read storage", iso(NOW), 3)
    plan = decide(obs(status(**RUNNING_1, conditions=down), pod()))
    ready = cond(plan, c.STORAGE_READY)
    assert (ready.status, ready.reason) == ("True", c.STORAGE_OK)
    assert cond(decide(obs(status(**RUNNING_1), pod())), c.STORAGE_READY) is None  # never down: not added


def test_by_epochs_a_decision_without_progress_keeps_the_step_count_the_status_has():
    by_epochs = spec(training={"numTrainEpochs": 2, "maxSteps": None})
    st = status(**RUNNING_1, step=40, max_steps=120, progress="40/120")
    plan = decide(obs(st, pod(), spec=by_epochs, progress=None))  # e.g. a restarted operator, nothing read yet
    assert (plan.status.step, plan.status.max_steps, plan.status.progress) == (40, 120, "40/120")
    read = decide(obs(st, pod(), spec=by_epochs, progress={"step": 41, "max_steps": 118, "attempt": 1}))
    assert (read.status.max_steps, read.status.progress) == (118, "41/118")  # what the trainer counted wins

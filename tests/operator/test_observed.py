"""Parsing a pod as the API returns it into what the decision needs."""

from __future__ import annotations

import json

import pytest

from loraresume_operator.observed import EndKind, ObservedPod, classify_end, parse_termination_message


def api_pod(phase="Running", *, terminated=None, conditions=(), reason=None, deleting=False, container="trainer"):
    status = {"phase": phase, "conditions": list(conditions)}
    if reason:
        status["reason"] = reason
    if terminated is not None:
        status["containerStatuses"] = [{"name": container, "state": {"terminated": terminated}}]
    meta = {"name": "bot-attempt-1"}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-28T12:00:00Z"
    return {"metadata": meta, "status": status}


def test_running_pod():
    pod = ObservedPod.from_api(api_pod())
    assert (pod.name, pod.phase, pod.ended, pod.terminating) == ("bot-attempt-1", "Running", False, False)


def test_the_node_that_runs_it():
    raw = api_pod()
    assert ObservedPod.from_api(raw).node_name is None
    raw["spec"] = {"nodeName": "spot-3"}
    assert ObservedPod.from_api(raw).node_name == "spot-3"


def test_terminated_trainer_with_termination_message():
    message = json.dumps({"outcome": "preempted", "reason": "SIGTERM", "durable_step": 14})
    pod = ObservedPod.from_api(api_pod("Failed", terminated={"exitCode": 75, "reason": "Error", "message": message}))
    assert pod.ended and pod.exit_code == 75 and (pod.termination or {}).get("durable_step") == 14


def test_other_containers_are_ignored():
    pod = ObservedPod.from_api(api_pod(terminated={"exitCode": 1}, container="sidecar"))
    assert pod.exit_code is None and not pod.ended


def test_disruption_condition():
    cond = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    pod = ObservedPod.from_api(api_pod("Failed", conditions=[cond], deleting=True))
    assert pod.disrupted and pod.disruption_reason == "PreemptionByScheduler" and pod.terminating


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("", None),
        ('{"outcome": "failed"}', {"outcome": "failed"}),
        ("Traceback ...\n  File x\nRuntimeError: boom\n\n", {"reason": "RuntimeError: boom"}),
        ("[1, 2]", {"reason": "[1, 2]"}),
        ("x" * 900, {"reason": "x" * 297 + "..."}),
    ],
    ids=["none", "empty", "json", "log-tail", "not-an-object", "long-line"],
)
def test_termination_message(text, expected):
    assert parse_termination_message(text) == expected


def test_disruption_wins_over_the_exit_code_of_a_killed_trainer():
    cond = {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}
    pod = ObservedPod.from_api(api_pod("Failed", terminated={"exitCode": 137, "reason": "Error"}, conditions=[cond]))
    assert classify_end(pod, adapter_complete=False).kind is EndKind.PREEMPTED


@pytest.mark.parametrize(
    ("adapter_complete", "want"),
    [(True, EndKind.SUCCEEDED), (False, EndKind.PREEMPTED)],
    ids=["adapter-saved", "no-adapter"],
)
def test_a_trainer_that_finished_as_its_node_shut_down_succeeded(adapter_complete, want):
    """Graceful node shutdown marks every pod Failed (reason Terminated), also one whose trainer had
    just saved the adapter and exited 0 (found by benchmarks/scale.py: counted as a preemption)."""
    cond = {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}
    raw = api_pod("Failed", terminated={"exitCode": 0, "reason": "Completed"}, conditions=[cond], reason="Terminated")
    assert classify_end(ObservedPod.from_api(raw), adapter_complete=adapter_complete).kind is want


@pytest.mark.parametrize(
    ("conditions", "reason", "deleting", "want_reason"),
    [
        (
            [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}],
            None,
            False,
            "TerminationByKubelet",
        ),
        ([], "Evicted", False, "Evicted"),
        ([], None, True, "PodDeleted"),
    ],
    ids=["disruption-target", "evicted", "deleted"],
)
def test_a_preemption_carries_what_the_trainer_said(conditions, reason, deleting, want_reason):
    said = "SIGTERM: stopped at step 8; checkpoint-8 is durable"
    message = json.dumps({"outcome": "preempted", "reason": said})
    pod = api_pod(
        "Failed",
        terminated={"exitCode": 75, "message": message},
        conditions=conditions,
        reason=reason,
        deleting=deleting,
    )
    end = classify_end(ObservedPod.from_api(pod), adapter_complete=False)
    assert (end.kind, end.reason) == (EndKind.PREEMPTED, want_reason) and end.message.endswith(f"the trainer: {said}")


NO_GPU = "0/12 nodes are available: 12 Insufficient nvidia.com/gpu. preemption: 0/12 nodes are available."


@pytest.mark.parametrize(
    ("conditions", "waiting", "want"),
    [
        ([], None, ("Scheduling", "")),
        (
            [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": NO_GPU}],
            None,
            ("Unschedulable", NO_GPU),
        ),
        (
            [{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated", "message": "gated"}],
            None,
            ("Scheduling", ""),
        ),
        (
            [{"type": "PodScheduled", "status": "True"}],
            {"reason": "ErrImagePull", "message": "not found"},
            ("ErrImagePull", "not found"),
        ),
        ([{"type": "PodScheduled", "status": "True"}], {"reason": "ContainerCreating"}, ("ContainerCreating", "")),
    ],
    ids=["just-created", "unschedulable", "gated", "image-pull", "creating"],
)
def test_why_a_pod_has_not_started(conditions, waiting, want):
    pod = api_pod("Pending", conditions=conditions)
    if waiting is not None:
        pod["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": waiting}}]
    observed = ObservedPod.from_api(pod)
    assert observed.pending_reason == want and not observed.ended
    assert observed.pulling_fails == (want[0] == "ErrImagePull")


NODE_LOW = (
    "The node was low on resource: ephemeral-storage. Threshold quantity: 10Gi, available: 9Gi. "
    "Container trainer was using 150Gi, request is 22Gi, has larger consumption of ephemeral-storage. "
)
EMPTYDIR_FULL = 'Usage of EmptyDir volume "work" exceeds the limit "18Gi". '
MEMORY_LOW = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 90Mi. "
KUBELET = {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}


@pytest.mark.parametrize(
    ("reason", "conditions", "message", "want"),
    [
        ("Evicted", [KUBELET], NODE_LOW, (EndKind.DISK_EVICTED, "EvictedForDisk")),
        ("Evicted", [], NODE_LOW, (EndKind.DISK_EVICTED, "EvictedForDisk")),
        ("Evicted", [KUBELET], EMPTYDIR_FULL, (EndKind.DISK_EVICTED, "ScratchVolumeFull")),
        (
            "Evicted",
            [],
            'Container trainer exceeded its local ephemeral storage limit "20Gi". ',
            (EndKind.DISK_EVICTED, "ScratchVolumeFull"),
        ),
        ("Evicted", [KUBELET], MEMORY_LOW, (EndKind.PREEMPTED, "TerminationByKubelet")),  # memory: not disk
        ("Evicted", [], "", (EndKind.PREEMPTED, "Evicted")),
        (
            None,
            [{**KUBELET, "reason": "PreemptionByScheduler"}],
            NODE_LOW,
            (EndKind.PREEMPTED, "PreemptionByScheduler"),
        ),
    ],
    ids=["node-low", "node-low-no-condition", "emptydir", "container-limit", "memory", "no-message", "not-kubelet"],
)
def test_an_eviction_for_disk_is_told_from_a_preemption(reason, conditions, message, want):
    pod = api_pod("Failed", terminated={"exitCode": 137, "reason": "Error"}, conditions=conditions, reason=reason)
    pod["status"]["message"] = message
    end = classify_end(ObservedPod.from_api(pod), adapter_complete=False)
    assert (end.kind, end.reason) == want
    if want[0] is EndKind.DISK_EVICTED:
        assert end.message.startswith(message.strip()[:30])


def test_the_attempt_label_finalizers_and_deletion_time_are_read():
    raw = api_pod(deleting=True)
    raw["metadata"].update(
        labels={"loraresume.dev/attempt": "3"}, finalizers=["x.io/other", "loraresume.dev/attempt-accounting"]
    )
    pod = ObservedPod.from_api(raw)
    assert (pod.attempt, pod.held, pod.terminating) == (3, True, True)
    assert pod.deletion_deadline is not None and pod.deletion_deadline.isoformat() == "2026-11-28T12:00:00+00:00"
    bare = ObservedPod.from_api(api_pod())
    assert (bare.attempt, bare.held, bare.deletion_deadline) == (None, False, None)

"""The work queue behind the event handlers: one reconcile queued and one running per resource, whichever
watch asked, no event lost, a worker never waiting on another's resource, relaunches first."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from loraresume_operator.observed import ObservedPod
from loraresume_operator.work_queue import CHANGES, PODS, WorkQueue, rank, urgent


def pod(name: str, phase: str = "Running") -> ObservedPod:
    return ObservedPod(name=name, phase=phase)


class Recorder:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[tuple[str, str], str | None, str | None]] = []
        self.gate, self.lock = gate, threading.Lock()
        self.active: Counter[tuple[str, str]] = Counter()
        self.overlap = False

    def __call__(self, key: tuple[str, str], p: ObservedPod | None) -> None:
        with self.lock:
            self.active[key] += 1
            self.overlap |= self.active[key] > 1
        if self.gate is not None:
            self.gate.wait(10)
        with self.lock:
            self.active[key] -= 1
            self.calls.append((key, p.name if p else None, p.phase if p else None))


def settle(queue: WorkQueue, *executors: ThreadPoolExecutor) -> None:
    deadline = time.monotonic() + 10
    while queue.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    for executor in executors:
        executor.shutdown(wait=True)


def one_lane(executor: ThreadPoolExecutor, reconcile: Any) -> WorkQueue:
    """Both lanes on one executor: the tests of merging and ordering within a lane."""
    return WorkQueue({CHANGES: executor, PODS: executor}, reconcile)


def test_events_for_a_queued_resource_join_it_with_each_pods_newest_state():
    gate = threading.Event()
    rec = Recorder(gate)
    executor = ThreadPoolExecutor(1)
    queue = one_lane(executor, rec)
    queue.submit(("ns", "blocker"))  # the one worker is busy with another resource
    time.sleep(0.05)
    queue.submit(("ns", "a"), pod("a-attempt-1", "Running"))
    queue.submit(("ns", "a"), pod("a-attempt-1", "Failed"))
    queue.submit(("ns", "a"), pod("a-attempt-2", "Pending"))
    queue.submit(("ns", "a"))
    assert queue.pending() == 1
    gate.set()
    settle(queue, executor)
    assert rec.calls == [
        (("ns", "blocker"), None, None),
        (("ns", "a"), "a-attempt-1", "Failed"),  # its newest state, once
        (("ns", "a"), "a-attempt-2", "Pending"),
    ]


def test_an_event_during_a_reconcile_runs_it_once_more_and_never_beside_it():
    gate = threading.Event()
    rec = Recorder(gate)
    executor = ThreadPoolExecutor(4)
    queue = one_lane(executor, rec)
    queue.submit(("ns", "a"), pod("a-attempt-1"))
    time.sleep(0.05)  # running now, held at the gate
    for phase in ("Running", "Failed"):
        queue.submit(("ns", "a"), pod("a-attempt-1", phase))
    time.sleep(0.05)
    gate.set()
    settle(queue, executor)
    assert [c[2] for c in rec.calls] == ["Running", "Failed"]  # the first, then the newest that came meanwhile
    assert not rec.overlap


def test_many_resources_many_events_each_reconciled_after_its_last_event():
    rec = Recorder()
    executor = ThreadPoolExecutor(8)
    queue = one_lane(executor, rec)
    keys = [("ns", f"r{i}") for i in range(50)]

    def events(key: tuple[str, str]) -> None:
        for n in range(20):
            queue.submit(key, pod(f"{key[1]}-p", str(n)))

    threads = [threading.Thread(target=events, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    settle(queue, executor)
    assert not rec.overlap
    last: dict[Any, str | None] = {}
    for key, _name, phase in rec.calls:
        last[key] = phase
    assert last == {k: "19" for k in keys}  # no event lost: each saw its newest state last
    assert len(rec.calls) < 50 * 20  # and joined, not one reconcile per event


def test_a_failing_reconcile_does_not_stop_the_queue():
    calls: list[tuple[str, str]] = []

    def reconcile(key: tuple[str, str], _p: ObservedPod | None) -> None:
        calls.append(key)
        if key[1] == "bad":
            raise RuntimeError("boom")

    executor = ThreadPoolExecutor(1)
    queue = one_lane(executor, reconcile)
    queue.submit(("ns", "bad"))
    queue.submit(("ns", "good"))
    settle(queue, executor)
    queue2 = one_lane(ThreadPoolExecutor(1), reconcile)
    queue2.submit(("ns", "bad"))
    time.sleep(0.1)
    queue2.submit(("ns", "bad"))  # not stuck as "running" after the failure
    time.sleep(0.1)
    assert calls.count(("ns", "bad")) == 3 and ("ns", "good") in calls


def ended(name: str, exit_code: int | None, phase: str = "Failed", **kw: Any) -> ObservedPod:
    return ObservedPod(name=name, phase=phase, exit_code=exit_code, **kw)


@pytest.mark.parametrize(
    ("observed", "want"),
    [
        (None, False),  # the resource's own event
        (ObservedPod(name="p", phase="Pending"), False),
        (ObservedPod(name="p", phase="Running"), False),
        (ended("p", 0, "Succeeded"), False),  # counted as a success: no hurry
        (ended("p", 0, "Failed"), False),  # exit 0 on a node that went away: a success if the adapter is there
        (ended("p", 1), True),  # crashed: relaunch after backoff, counted now
        (ended("p", 75), True),  # SIGTERM, checkpoint saved: preempted
        (ended("p", 137, container_reason="OOMKilled"), True),
        (ObservedPod(name="p", phase="Failed", pod_reason="Evicted"), True),  # no container status at all
        (ObservedPod(name="p", phase="Running", terminating=True), True),  # deleted: its end comes
        (ObservedPod(name="p", phase="Running", disrupted=True, disruption_reason="PreemptionByScheduler"), True),
        (ObservedPod(name="p", phase="Succeeded", exit_code=0, terminating=True), True),  # going: its count comes
    ],
)
def test_which_pod_events_go_ahead(observed: ObservedPod | None, want: bool):
    assert urgent(observed) is want


def test_ranks():
    assert rank(CHANGES, False) < rank(PODS, False) < rank(PODS, True)


def test_a_relaunch_goes_ahead_of_counting_successes_and_a_queued_entry_moves_ahead():
    gate = threading.Event()
    rec = Recorder(gate)
    executor = ThreadPoolExecutor(1)
    queue = one_lane(executor, rec)
    queue.submit(("ns", "blocker"))
    time.sleep(0.05)  # the one worker is busy
    for name in ("s1", "s2", "s3"):
        queue.submit(("ns", name), ended(f"{name}-attempt-1", 0, "Succeeded"))
    queue.submit(("ns", "lost"), ended("lost-attempt-1", 75))
    queue.submit(("ns", "s3"), ObservedPod(name="s3-attempt-2", phase="Running", terminating=True))  # moves ahead
    gate.set()
    settle(queue, executor)
    # urgent first, in the order they became urgent; s3 in one turn, once per pod that asked
    assert [(key[1], name) for key, name, _phase in rec.calls] == [
        ("blocker", None),
        ("lost", "lost-attempt-1"),
        ("s3", "s3-attempt-1"),
        ("s3", "s3-attempt-2"),
        ("s1", "s1-attempt-1"),
        ("s2", "s2-attempt-1"),
    ]


def test_an_entry_that_came_in_during_its_run_is_placed_ahead_if_urgent():
    gates = {"a": threading.Event(), "b": threading.Event()}
    calls: list[str] = []

    def reconcile(key: tuple[str, str], p: ObservedPod | None) -> None:
        calls.append(f"{key[1]}:{p.name if p else None}")
        if key[1] in gates and len([c for c in calls if c.startswith(key[1])]) == 1:
            gates[key[1]].wait(10)

    executor = ThreadPoolExecutor(2)
    queue = one_lane(executor, reconcile)
    queue.submit(("ns", "a"), ObservedPod(name="a-1", phase="Running"))
    queue.submit(("ns", "b"), ObservedPod(name="b-1", phase="Running"))
    time.sleep(0.05)  # both workers busy
    queue.submit(("ns", "c"), ended("c-1", 0, "Succeeded"))
    queue.submit(("ns", "a"), ended("a-1", 1))  # a's pod crashed while a was being reconciled
    gates["a"].set()  # a's run ends: its new entry is placed ahead of c
    time.sleep(0.05)
    gates["b"].set()
    settle(queue, executor)
    assert calls.index("a:a-1", 1) < calls.index("c:c-1")


def test_one_resource_asked_for_by_both_watches_is_reconciled_once_on_the_pod_lane():
    """At start-up a resource's listing event and its pods' listing events come together."""
    gate = threading.Event()
    rec = Recorder()
    changes, pods = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    queue = WorkQueue({CHANGES: changes, PODS: pods}, rec)
    changes.submit(gate.wait, 10)  # the changes pool is busy (a burst of creations)
    queue.submit(("ns", "a"), lane=CHANGES)
    queue.submit(("ns", "a"), pod("a-attempt-1", "Running"), lane=PODS)
    queue.submit(("ns", "b"), lane=CHANGES)
    deadline = time.monotonic() + 5
    while not rec.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rec.calls == [(("ns", "a"), "a-attempt-1", "Running")]  # served by the pods' workers, not held
    gate.set()
    settle(queue, changes, pods)
    assert rec.calls == [(("ns", "a"), "a-attempt-1", "Running"), (("ns", "b"), None, None)]


def test_a_burst_of_creations_does_not_hold_back_pod_events():
    gate, relaunched = threading.Event(), threading.Event()
    calls: list[str] = []

    def reconcile(key: tuple[str, str], _p: ObservedPod | None) -> None:
        calls.append(key[1])
        if key[1] == "old":
            relaunched.set()
        else:
            gate.wait(10)  # the creations hold every change worker

    changes, pods = ThreadPoolExecutor(2), ThreadPoolExecutor(1)
    queue = WorkQueue({CHANGES: changes, PODS: pods}, reconcile)
    for i in range(20):
        queue.submit(("ns", f"new-{i}"), lane=CHANGES)
    time.sleep(0.05)
    queue.submit(("ns", "old"), ended("old-attempt-1", 75), lane=PODS)
    assert relaunched.wait(5), "the pod event waited for the creations"
    gate.set()
    settle(queue, changes, pods)
    assert sorted(calls) == sorted(["old"] + [f"new-{i}" for i in range(20)])


def test_never_two_runs_of_one_resource_across_the_lanes():
    gate = threading.Event()
    rec = Recorder(gate)
    changes, pods = ThreadPoolExecutor(4), ThreadPoolExecutor(4)
    queue = WorkQueue({CHANGES: changes, PODS: pods}, rec)
    queue.submit(("ns", "a"), lane=CHANGES)
    time.sleep(0.05)  # running on the changes lane
    queue.submit(("ns", "a"), ended("a-attempt-1", 75), lane=PODS)
    queue.submit(("ns", "a"), lane=CHANGES)
    time.sleep(0.05)
    assert rec.active[("ns", "a")] == 1
    gate.set()
    settle(queue, changes, pods)
    assert not rec.overlap
    assert rec.calls == [(("ns", "a"), None, None), (("ns", "a"), "a-attempt-1", "Failed")]


def test_every_lane_needs_its_executor():
    with pytest.raises(ValueError, match="executor for each"):
        WorkQueue({PODS: ThreadPoolExecutor(1)}, lambda *_: None)

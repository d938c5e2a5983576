"""The work queue behind the event handlers: one reconcile queued and one running per resource, no
event lost, a worker never waiting on another's resource."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from loraresume_operator.observed import ObservedPod
from loraresume_operator.work_queue import WorkQueue


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


def settle(queue: WorkQueue, executor: ThreadPoolExecutor) -> None:
    deadline = time.monotonic() + 10
    while queue.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    executor.shutdown(wait=True)


def test_events_for_a_queued_resource_join_it_with_each_pods_newest_state():
    gate = threading.Event()
    rec = Recorder(gate)
    executor = ThreadPoolExecutor(1)
    queue = WorkQueue(executor, rec)
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
    queue = WorkQueue(executor, rec)
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
    queue = WorkQueue(executor, rec)
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
    queue = WorkQueue(executor, reconcile)
    queue.submit(("ns", "bad"))
    queue.submit(("ns", "good"))
    settle(queue, executor)
    queue2 = WorkQueue(ThreadPoolExecutor(1), reconcile)
    queue2.submit(("ns", "bad"))
    time.sleep(0.1)
    queue2.submit(("ns", "bad"))  # not stuck as "running" after the failure
    time.sleep(0.1)
    assert calls.count(("ns", "bad")) == 3 and ("ns", "good") in calls

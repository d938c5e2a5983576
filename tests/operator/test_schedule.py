"""When the periodic loop reconciles a resource: when its plan asked (schedule.py), and not every interval."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from loraresume_operator import handlers
from loraresume_operator.decide import Requeue
from loraresume_operator.schedule import MIN_WAIT_SECONDS, RESYNC_SECONDS, Schedule, next_wait

A, B = ("ns", "a"), ("ns", "b")


@pytest.mark.parametrize(
    ("requeue", "want"),
    [
        (None, 10.0),  # nothing timed: the interval (a running job's progress read)
        (Requeue(60.0, idle=True), 60.0),  # a pending pod with no deadline of its own
        (Requeue(15.0, idle=True), 15.0),
        (Requeue(30.0), 10.0),  # not idle (e.g. waiting on another resource): no later than the interval
        (Requeue(3.5), 3.5),  # a deadline sooner than the interval: kept
        (Requeue(3.5, idle=True), 3.5),
        (Requeue(0.0), MIN_WAIT_SECONDS),  # due now: the loop's next turn
        (Requeue(-4.0, idle=True), MIN_WAIT_SECONDS),  # already past
        (Requeue(86_400.0, idle=True), RESYNC_SECONDS),  # a long backoff: still looked at now and then
    ],
)
def test_next_wait(requeue, want) -> None:
    assert next_wait(requeue, interval=10.0) == want


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_resource_is_due_when_its_plan_asked() -> None:
    clock = Clock()
    schedule = Schedule(interval=10.0, clock=clock)
    schedule.add(A)
    schedule.add(B)
    assert schedule.due() == []  # their events reconcile them now; the loop after an interval
    clock.now += 10
    assert schedule.due() == [A, B]
    schedule.reconciled(A, Requeue(60.0, idle=True))
    schedule.reconciled(B, None)
    clock.now += 10
    assert schedule.due() == [B]
    schedule.add(A)  # another event: does not bring its look forward or push it back
    clock.now += 50
    assert schedule.due() == [A, B]
    schedule.discard(A)
    schedule.reconciled(A, Requeue(1.0))  # a reconcile that ended after the resource went: not brought back
    assert A not in schedule and B in schedule and len(schedule) == 1


class Reconciler:
    """Counts reconciles; each resource's plan asks for the requeue given."""

    def __init__(self, requeues: dict[tuple[str, str], Requeue | None]) -> None:
        self.requeues = requeues
        self.calls: dict[tuple[str, str], int] = {key: 0 for key in requeues}
        self.lock = threading.Lock()

    def reconcile(self, namespace: str, name: str, event_pod: Any = None) -> Requeue | None:
        with self.lock:
            self.calls[(namespace, name)] += 1
        return self.requeues[(namespace, name)]

    def is_terminal(self, namespace: str, name: str) -> bool:
        return False


def test_the_periodic_loop_reconciles_a_waiting_resource_when_its_plan_asked_not_every_interval() -> None:
    rec = Reconciler({A: Requeue(60.0, idle=True), B: None})  # A: a pod waiting for a GPU; B: a running job
    rt = handlers.Runtime(cluster_wide=False, interval=0.2, reconciler=rec)  # type: ignore[arg-type]
    rt.known.add(A)
    rt.known.add(B)
    loop = threading.Thread(target=handlers._periodic, args=(rt,), daemon=True)
    loop.start()
    time.sleep(1.5)
    rt.stop.set()
    loop.join(timeout=5)
    assert rec.calls[A] == 1  # once, then not before the 60 s its plan asked for
    assert rec.calls[B] >= 3  # every interval, as before


def test_an_event_reconcile_reschedules_the_resource() -> None:
    rec = Reconciler({A: Requeue(60.0, idle=True)})
    rt = handlers.Runtime(cluster_wide=False, interval=0.05, reconciler=rec)  # type: ignore[arg-type]
    rt.known.add(A)
    rt._after_event(A, None)  # as the work queue calls it after a pod event
    time.sleep(0.2)
    assert rt.known.due() == []  # the event's plan said 60 s
    rt.changes.shutdown()
    rt.pod_events.shutdown()
    rt.event_posts.shutdown()

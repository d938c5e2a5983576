"""When the periodic loop next reconciles each resource: when its last reconcile's plan asked.

decide's plan says when a resource next needs a look by itself: a deadline (a pending pod's timeout, the
end of a backoff, a pod that should have appeared) or, with nothing timed, the operator's interval (a
running job's progress is read at that rate). A deadline later than the interval is kept only where the
plan is idle until then (decide.Requeue.idle: a waiting pod, a backoff); other plans are looked at no
later than the interval, as before. Everything else arrives as a watch event, which reconciles
at once whatever is scheduled here. The loop used to reconcile every resource every interval whatever its
plan said: a resource waiting for a GPU was looked at every 10 s for nothing (at 500 resources on 100
GPUs, about 14 times each; the periodic loop was 12 % of the operator's CPU at 200, RESULTS.md round 9).
Like controller-runtime's RequeueAfter, bounded by a resync period."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .decide import Requeue

Key = tuple[str, str]  # (namespace, name) of a LoraResume

MIN_WAIT_SECONDS = 1.0  # a deadline already past, or a moment away: the loop's next turn
RESYNC_SECONDS = 300.0  # no resource goes longer without a reconcile, whatever its plan said


def next_wait(requeue: Requeue | None, interval: float) -> float:
    """Seconds until a resource's next periodic reconcile, from its plan's requeue: the interval when
    nothing is timed; a sooner deadline when one is; a later one only when the plan is idle until then."""
    if requeue is None:
        return interval
    wait = min(max(requeue.after_seconds, MIN_WAIT_SECONDS), RESYNC_SECONDS)
    return wait if requeue.idle else min(wait, interval)


class Schedule:
    """The resources the periodic loop reconciles, each with its next time (thread-safe: kopf's event
    loop adds and drops them, the event workers and the loop reschedule them)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._due: dict[Key, float] = {}

    def add(self, key: Key) -> None:
        """A resource to keep an eye on: its event reconciles it now, the loop after an interval."""
        with self._lock:
            self._due.setdefault(key, self._clock() + self.interval)

    def discard(self, key: Key) -> None:
        with self._lock:
            self._due.pop(key, None)

    def reconciled(self, key: Key, requeue: Requeue | None) -> None:
        """A reconcile of `key` ended (by an event or the loop) asking for `requeue`: its next look."""
        with self._lock:
            if key in self._due:
                self._due[key] = self._clock() + next_wait(requeue, self.interval)

    def due(self) -> list[Key]:
        """The resources whose time has come, in a stable order."""
        now = self._clock()
        with self._lock:
            return sorted(key for key, moment in self._due.items() if moment <= now)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._due

    def __len__(self) -> int:
        with self._lock:
            return len(self._due)

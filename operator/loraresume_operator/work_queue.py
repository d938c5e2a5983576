"""Reconciles asked for by watch events: one queue for every resource, whichever watch asked.

A spot reclaim ends dozens of pods at once, and each pod brings several events (DisruptionTarget,
deletionTimestamp, its end, its removal); a burst of creations brings an event per resource and
one per pod. As in client-go's work queue, an event for a resource that is queued already joins
that entry (its pods' newest states kept by name), and one for a resource being reconciled queues
it once more, placed when that run ends: every worker reconciles a resource nobody else is
working on, and no event is lost (the entry placed after a running reconcile sees everything that
came in meanwhile). Level-based: what a reconcile reads is the newest state anyway (the watch
cache); the pods carried here are only those whose events asked (decide's `other_pod`, and a pod to
let go once its resource is gone).

Two lanes, each served by its own executor, so that a burst of creations (CHANGES: a LoraResume's
own events) cannot starve pod events (PODS), and one registry of queued and running resources across
both, so that a resource's listing event and its pods' listing events at start-up reconcile it once.
An entry asked for by a pod event is served on the PODS lane, whichever lane asked first. Within
PODS, an entry whose pods include one that needs a relaunch (`urgent`: it ended other than by
success, or it is going: deleted, evicted, preempted) goes ahead of the others: at 500 resources a
relaunch waited a minute behind the counting of pods that had ended well, each of which reads S3.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

from .observed import ObservedPod

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name) of a LoraResume
Reconcile = Callable[[Key, ObservedPod | None], None]

CHANGES = "changes"  # a LoraResume's own events: created, listed at start-up, spec changed
PODS = "pods"  # its trainer pods' events
LANES = (CHANGES, PODS)


def urgent(pod: ObservedPod | None) -> bool:
    """Whether a pod event asks for a relaunch (or the count of a loss, which comes with one): the pod
    ended other than by success, or it is going (deleted, DisruptionTarget). A pod that exited 0 is
    counted as a success (or found without its adapter) without hurry."""
    if pod is None:
        return False
    if pod.going:
        return True
    if pod.exit_code is not None:
        return pod.exit_code != 0
    return pod.phase == "Failed"


def rank(lane: str, is_urgent: bool) -> int:
    """Where an entry is served: CHANGES < PODS < PODS ahead of the others."""
    return 2 if is_urgent else (1 if lane == PODS else 0)


@dataclass
class _Entry:
    pods: dict[str | None, ObservedPod | None] = field(default_factory=dict)
    lane: str = CHANGES
    urgent: bool = False
    ticket: int = -1  # its place in a lane's deque (-1: not placed: its resource is being reconciled)


class WorkQueue:
    """`submit(key, pod, lane=...)` from any thread (kopf's event loop); `reconcile(key, pod)` runs on
    the lane's executor, once per pod that asked since the last run (once with None when only the
    resource did)."""

    def __init__(self, executors: Mapping[str, Executor], reconcile: Reconcile) -> None:
        unknown = set(executors) ^ set(LANES)
        if unknown:
            raise ValueError(f"WorkQueue needs an executor for each of {LANES}, got {sorted(executors)}")
        self._executors, self._reconcile = dict(executors), reconcile
        self._lock = threading.Lock()
        self._entries: dict[Key, _Entry] = {}  # queued (placed), or waiting for its run in flight to end
        self._running: set[Key] = set()
        # per lane, its deques in the order they are served: (ticket, key); a ticket no longer its
        # entry's (the entry moved ahead, or was taken) is skipped
        self._ready: dict[str, tuple[deque[tuple[int, Key]], ...]] = {CHANGES: (deque(),), PODS: (deque(), deque())}
        self._tickets = 0

    def submit(self, key: Key, pod: ObservedPod | None = None, *, lane: str = PODS) -> None:
        if lane not in LANES:
            raise ValueError(f"unknown lane {lane!r}")
        hurry = urgent(pod)
        with self._lock:
            entry = self._entries.get(key)
            fresh = entry is None
            if entry is None:
                entry = self._entries[key] = _Entry(lane=lane, urgent=hurry)
            entry.pods[pod.name if pod is not None else None] = pod
            ahead = rank(lane, hurry) > rank(entry.lane, entry.urgent)
            if ahead:
                entry.lane, entry.urgent = PODS, entry.urgent or hurry
            if key in self._running or not (fresh or ahead):  # placed already, or when the run in flight ends
                return
            served = self._place(key, entry)
        self._executors[served].submit(self._work, served)

    def _place(self, key: Key, entry: _Entry) -> str:
        """Into its lane's deque (under the lock); a worker of that lane is asked for by the caller."""
        self._tickets += 1
        entry.ticket = self._tickets
        deques = self._ready[entry.lane]
        deques[0 if entry.urgent or len(deques) == 1 else 1].append((entry.ticket, key))
        return entry.lane

    def _take(self, lane: str) -> tuple[Key, _Entry] | None:
        """The next entry of `lane`, most urgent first (under the lock)."""
        for ready in self._ready[lane]:
            while ready:
                ticket, key = ready.popleft()
                entry = self._entries.get(key)
                if entry is not None and entry.ticket == ticket:
                    del self._entries[key]
                    return key, entry
        return None

    def _work(self, lane: str) -> None:
        """One worker's turn: as many turns are asked for as entries are placed, and each takes the best
        entry of its lane then (one that moved to another lane is left for that lane's turn)."""
        with self._lock:
            taken = self._take(lane)
            if taken is None:
                return
            key, entry = taken
            self._running.add(key)
        try:
            asked: list[ObservedPod | None] = [p for p in entry.pods.values() if p is not None]
            for pod in asked or [None]:
                try:
                    self._reconcile(key, pod)
                except Exception:  # the periodic loop retries; the queue must go on
                    log.exception("reconcile of %s/%s after an event failed; the periodic loop retries", *key)
        finally:
            with self._lock:
                self._running.discard(key)
                waiting = self._entries.get(key)
                served = self._place(key, waiting) if waiting is not None else None
            if served is not None:
                self._executors[served].submit(self._work, served)

    def pending(self) -> int:
        """Resources queued and not yet taken by a worker."""
        with self._lock:
            return len(self._entries)

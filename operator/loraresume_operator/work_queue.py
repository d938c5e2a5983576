"""Reconciles asked for by watch events, at most one queued and one running per resource.

A spot reclaim ends dozens of pods at once, and each pod brings several events (DisruptionTarget,
deletionTimestamp, its end, its removal); a burst of creations brings an event per resource and
one per pod. Handing each event to a thread pool as its own reconcile filled the pool with threads
waiting on the same resources' locks while other resources' relaunches queued behind them. Here,
as in client-go's work queue, an event for a resource that is queued already joins that entry (its
pods' newest states kept by name), and one for a resource being reconciled queues it once more:
every worker reconciles a resource nobody else is working on, and no event is lost (the entry
queued after a running reconcile sees everything that came in meanwhile). Level-based: what a
reconcile reads is the newest state anyway (the watch cache); the pods carried here are only those
whose events asked (decide's `other_pod`, and a pod to let go once its resource is gone).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor

from .observed import ObservedPod

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name) of a LoraResume
Reconcile = Callable[[Key, ObservedPod | None], None]


class WorkQueue:
    """`submit(key, pod)` from any thread (kopf's event loop); `reconcile(key, pod)` runs on `executor`,
    once per pod that asked since the last run (once with None when only the resource did)."""

    def __init__(self, executor: Executor, reconcile: Reconcile) -> None:
        self._executor, self._reconcile = executor, reconcile
        self._lock = threading.Lock()
        self._queued: dict[Key, dict[str | None, ObservedPod | None]] = {}
        self._running: set[Key] = set()

    def submit(self, key: Key, pod: ObservedPod | None = None) -> None:
        with self._lock:
            entry = self._queued.get(key)
            fresh = entry is None
            if entry is None:
                entry = self._queued[key] = {}
            entry[pod.name if pod is not None else None] = pod
            if not fresh or key in self._running:  # a worker will take it (after the run in flight)
                return
        self._executor.submit(self._drain, key)

    def _drain(self, key: Key) -> None:
        while True:
            with self._lock:
                entry = self._queued.pop(key, None)
                if entry is None:
                    self._running.discard(key)
                    return
                self._running.add(key)
            pods: list[ObservedPod | None] = [p for p in entry.values() if p is not None] or [None]
            for pod in pods:
                try:
                    self._reconcile(key, pod)
                except Exception:  # the periodic loop retries; the queue must go on
                    log.exception("reconcile of %s/%s after an event failed; the periodic loop retries", *key)

    def pending(self) -> int:
        """Resources queued and not yet taken by a worker."""
        with self._lock:
            return len(self._queued)

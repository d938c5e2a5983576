"""What the watch streams delivered: LoraResume bodies and trainer pods, for reconciles without GETs.

kopf already watches both kinds; its event handlers (handlers.py) put every body they are given
here, and a reconcile reads from here first. A miss (not delivered yet: the operator is starting,
or a pod created a moment ago) falls back to a GET, so the cache never decides that something is
gone. A body older than the stored one cannot matter for the counting: the status is written
conditionally on the resourceVersion read (reconcile.py), so a reconcile from a stale body writes
nothing and acts on nothing, and reads the resource again.

At start-up the cache is seeded from one list of each kind (`seed`), before kopf's watches deliver
anything: a restarted operator then knows every LoraResume and trainer pod before its first decision,
without a request per object and without a kopf indexer (kopf holds every handler until every indexed
object is indexed, and wakes every waiting object at each one indexed: at 500 resources that held a
loaded restart for 7-13 s). A seeded entry is provisional: the watch's own delivery of the object
replaces it, and one the watch has not delivered within SEED_SECONDS is no longer served (a miss: a
GET), so an object deleted between the seeding list and kopf's listing is not taken for present for long.

Thread-safe: kopf's event loop writes, the reconcile threads read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .observed import ObservedPod

Key = tuple[str, str]  # (namespace, name)

# How long a seeded entry is served without the watch delivering its object (kopf lists every watched
# object at its start: well within this, also under load).
SEED_SECONDS = 30.0


def _newer(candidate: str | None, stored: str | None) -> bool:
    """Whether `candidate` may replace `stored`. resourceVersions are opaque strings; the API server's
    are etcd revisions, so digits compare as numbers (a late watch event never overwrites the answer
    to a status write); anything else replaces."""
    if candidate and stored and candidate.isdigit() and stored.isdigit():
        return int(candidate) >= int(stored)
    return True


class WatchCache:
    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._monotonic = monotonic
        self._resources: dict[Key, dict[str, Any]] = {}
        self._pods: dict[Key, tuple[str | None, ObservedPod]] = {}
        # seeded, and not yet delivered by the watch: when each was seeded
        self._seeded_resources: dict[Key, float] = {}
        self._seeded_pods: dict[Key, float] = {}

    # ---- seeding at start-up ----------------------------------------------------------------------
    def seed(self, resources: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]) -> None:
        """One list of each kind, read before the watches start: provisional entries (see the module
        docstring). Never over what a watch delivered."""
        now = self._monotonic()
        for body in resources:
            meta = body.get("metadata") or {}
            key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
            with self._lock:
                if key not in self._resources:
                    self._resources[key] = _plain(body)
                    self._seeded_resources[key] = now
        for body in pods:
            meta = body.get("metadata") or {}
            pod = ObservedPod.from_api(dict(body))
            key = (str(meta.get("namespace", "")), pod.name)
            with self._lock:
                if key not in self._pods:
                    self._pods[key] = (meta.get("resourceVersion"), pod)
                    self._seeded_pods[key] = now

    def _served(self, seeded: dict[Key, float], key: Key) -> bool:
        """Whether an entry may be served: delivered by the watch, or seeded less than SEED_SECONDS ago
        (under the lock)."""
        at = seeded.get(key)
        return at is None or self._monotonic() - at < SEED_SECONDS

    # ---- LoraResumes ----------------------------------------------------------------------------
    def put_resource(self, body: Mapping[str, Any]) -> None:
        """A body a watch event (or a status write's answer) delivered."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        with self._lock:
            stored = self._resources.get(key)
            if stored is None or _newer(meta.get("resourceVersion"), stored["metadata"].get("resourceVersion")):
                self._resources[key] = _plain(body)
            self._seeded_resources.pop(key, None)

    def refresh_resource(self, body: Mapping[str, Any]) -> None:
        """The answer to this process's own write: stored only over a body the watch delivered (a
        resource the watch does not deliver, e.g. outside the watched namespaces, is not kept)."""
        meta = body.get("metadata") or {}
        with self._lock:
            if (str(meta.get("namespace", "")), str(meta.get("name", ""))) not in self._resources:
                return
        self.put_resource(body)

    def drop_resource(self, namespace: str, name: str) -> None:
        with self._lock:
            self._resources.pop((namespace, name), None)
            self._seeded_resources.pop((namespace, name), None)

    def resource(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The newest body delivered (read-only: the reconciler parses it, never edits it), or None."""
        with self._lock:
            if not self._served(self._seeded_resources, (namespace, name)):
                return None
            return self._resources.get((namespace, name))

    # ---- trainer pods ---------------------------------------------------------------------------
    def put_pod(self, namespace: str, body: Mapping[str, Any]) -> tuple[ObservedPod, bool]:
        """(the pod as observed, whether that differs from what was held for it). An event that changes
        nothing the operator observes of a pod (ObservedPod: its kubelet's readiness conditions, its IP; or
        the watch's ADDED of a pod this process created, held since the creation's answer) asks for no
        reconcile: the last one decided on that same pod."""
        pod = ObservedPod.from_api(dict(body))
        version = (body.get("metadata") or {}).get("resourceVersion")
        with self._lock:
            stored = self._pods.get((namespace, pod.name))
            if stored is None or _newer(version, stored[0]):
                self._pods[(namespace, pod.name)] = (version, pod)
            self._seeded_pods.pop((namespace, pod.name), None)
        return pod, stored is None or stored[1] != pod

    def refresh_pod(self, namespace: str, owner: str, body: Mapping[str, Any]) -> None:
        """The answer to this process's own pod creation, so that the reconciles before its watch event
        need no list of it: stored only when the watch delivers the owning LoraResume (then it delivers
        its pods too, and their later events replace this)."""
        with self._lock:
            if (namespace, owner) not in self._resources:
                return
        self.put_pod(namespace, body)

    def drop_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            self._pods.pop((namespace, name), None)
            self._seeded_pods.pop((namespace, name), None)

    def pod(self, namespace: str, name: str) -> ObservedPod | None:
        with self._lock:
            if not self._served(self._seeded_pods, (namespace, name)):
                return None
            found = self._pods.get((namespace, name))
        return found[1] if found else None

    def sizes(self) -> tuple[int, int]:
        """(LoraResumes, pods) held."""
        with self._lock:
            return len(self._resources), len(self._pods)


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain-dict copy of the parts a reconcile reads (kopf's Body is a live view of its own copy), less
    metadata.managedFields: the API server's field-ownership records, read by nobody here, were most of
    what was copied for every event and status answer."""
    plain = {key: _copy(body.get(key)) for key in ("apiVersion", "kind", "spec", "status") if key in body}
    meta = body.get("metadata")
    if isinstance(meta, Mapping):
        plain["metadata"] = {k: _copy(v) for k, v in meta.items() if k != "managedFields"}
    return plain


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value

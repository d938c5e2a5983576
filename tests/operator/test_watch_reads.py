"""A reconcile observes from what the watches delivered, not by GETs (issue 15).

The real Reconciler over the harness's stand-ins, with its WatchCache filled as kopf's event
handlers fill it: every API read and S3 request is counted. What is read, and when:
- the resource and its pods from the cache; a GET only on a miss or after a 409 (stale body);
- the credentials Secret once per SECRET_TTL_SECONDS, again at once after a storage error;
- S3 in full when the decision needs it (a launch, an ended pod), else progress.json at most every
  PROGRESS_SECONDS and the listing every LISTING_SECONDS.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
from botocore.exceptions import ClientError
from kubernetes.client import ApiException

from loraresume_operator.observed import ACCOUNTING_FINALIZER
from loraresume_operator.reconcile import SECRET_TTL_SECONDS
from loraresume_operator.s3_view import LISTING_SECONDS, PROGRESS_SECONDS, StorageViews
from loraresume_operator.watch_cache import SEED_SECONDS, WatchCache
from tests.support.reconciler_harness import NS, Cluster, EmptyBucket
from tests.support.specs import resource

SPEC = {
    "baseModel": "/models/base",
    "dataset": {"source": "/data/d.jsonl"},
    "storage": {"uri": "s3://bucket/bot/", "credentialsSecret": "creds"},
}


class CountingBucket(EmptyBucket):
    def __init__(self, calls: Counter[str], denied: bool = False) -> None:
        self.calls, self.denied = calls, denied

    def get_paginator(self, name: str) -> Any:
        self.calls["list"] += 1
        if self.denied:
            raise ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "List")
        return super().get_paginator(name)

    def get_object(self, **kw: Any) -> Any:
        self.calls[f"get {kw.get('Key', '').rsplit('/', 1)[-1]}"] += 1
        return super().get_object(**kw)

    def head_object(self, **kw: Any) -> Any:
        self.calls[f"head {kw.get('Key', '').rsplit('/', 1)[-1]}"] += 1
        return super().head_object(**kw)


class Counted:
    """Wraps a stand-in: every call of a method is counted by name."""

    def __init__(self, inner: Any, calls: Counter[str]) -> None:
        self._inner, self._calls = inner, calls

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if not callable(target):
            return target

        def call(*args: Any, **kw: Any) -> Any:
            self._calls[name] += 1
            return target(*args, **kw)

        return call


class Fleet:
    """One LoraResume, the Reconciler with a watch cache, a clock, and counters of every read."""

    def __init__(self) -> None:
        self.cluster = Cluster(resource(SPEC, name="bot"), secrets={"creds": {"AWS_ACCESS_KEY_ID": "k"}})
        self.api: Counter[str] = Counter()
        self.s3: Counter[str] = Counter()
        rec = self.cluster.reconciler
        rec.core, rec.custom = Counted(self.cluster.core, self.api), Counted(self.cluster.custom, self.api)
        self.denied = False  # S3 refuses the credentials
        rec.s3_factory = lambda *_: CountingBucket(self.s3, self.denied)
        self.t = 1000.0
        rec.monotonic = lambda: self.t
        rec.cache = self.cache = WatchCache()
        self.deliver()

    def deliver(self) -> None:
        """The watch delivers the resource as stored now (kopf's event handler)."""
        self.cache.put_resource(copy.deepcopy(self.cluster.custom.body))

    def deliver_pod(self, phase: str, **status: Any) -> None:
        pod = self.cluster.core.pods["bot-attempt-1"]
        pod["status"] = {"phase": phase, **status}
        self.cache.put_pod(NS, pod)

    def reconcile(self) -> None:
        self.cluster.reconciler.reconcile(NS, "bot")

    @property
    def status(self) -> dict[str, Any]:
        return self.cluster.status


def test_a_lifecycle_reads_neither_the_resource_nor_its_pods():
    f = Fleet()
    f.reconcile()  # launch
    assert f.status["podName"] == "bot-attempt-1"
    f.deliver_pod("Pending")
    f.reconcile()
    f.deliver_pod("Running")
    f.reconcile()
    assert f.status["phase"] == "Running"
    assert f.api["list_namespaced_custom_object"] == 0 and f.api["list_namespaced_pod"] == 0, f.api
    # launched, running: a pod on its way to Running (Scheduling, ContainerCreating) writes nothing
    assert f.api["replace_namespaced_custom_object_status"] == 2


def test_the_creation_answer_serves_until_the_watch_delivers_the_pod():
    f = Fleet()
    f.reconcile()  # launch: the created pod is kept from the API server's answer
    f.reconcile()  # before the pod's ADDED event: read from there, no list
    assert f.api["list_namespaced_pod"] == 0 and f.status["podName"] == "bot-attempt-1"
    assert f.cluster.core.created == [f.cluster.core.created[0]]  # not created again


def test_a_pod_the_watch_has_not_delivered_is_read_not_taken_for_gone():
    f = Fleet()
    f.reconcile()
    f.cluster.core.pods["bot-attempt-1"]["status"] = {"phase": "Running"}
    f.cache.drop_pod(NS, "bot-attempt-1")  # e.g. a restarted process: its watch has not delivered the pod yet
    f.reconcile()
    assert f.api["list_namespaced_pod"] == 1
    assert f.status["phase"] == "Running" and f.status.get("preemptions", 0) == 0


def test_a_stale_body_costs_one_get_and_counts_nothing_twice():
    f = Fleet()
    f.reconcile()
    stale = copy.deepcopy(f.cache.resource(NS, "bot"))
    assert stale is not None
    f.deliver_pod("Running")
    f.reconcile()
    f.cache.drop_resource(NS, "bot")
    f.cache.put_resource(stale)  # e.g. a late event: the cache holds the launch, not Running
    f.deliver_pod("Failed", reason="Evicted", message="The node was low on memory")
    before = f.api["list_namespaced_custom_object"]
    f.reconcile()  # decided on the stale body: its write conflicts, the resource is read, decided again
    assert f.api["list_namespaced_custom_object"] == before + 1
    assert (f.status["preemptions"], f.status["attempt"]) == (1, 2)
    f.reconcile()
    assert (f.status["preemptions"], f.status["attempt"]) == (1, 2)


@pytest.mark.parametrize("delivered", [True, False], ids=["watch-delivered-it", "watch-behind"])
def test_a_first_status_write_refused_after_kopfs_finalizer_patch_decides_again_without_reading_s3_again(delivered):
    """A new resource is reconciled before kopf's finalizer lands (handlers.wants_reconcile); when the
    finalizer patch comes first, the launch's status write is refused (409). The resource as the watch
    delivered it since serves (no list), else one list; the storage read just made serves again."""
    f = Fleet()
    custom = f.cluster.custom
    real_write = custom.replace_namespaced_custom_object_status
    raced: list[bool] = []

    def write(*args: Any, **kw: Any) -> Any:
        if not raced:  # kopf's finalizer patch lands just before the operator's first status write
            raced.append(True)
            custom.body["metadata"]["finalizers"] = ["loraresume.dev/cleanup"]
            custom.body["metadata"]["resourceVersion"] = "2"
            if delivered:
                f.deliver()
        return real_write(*args, **kw)

    custom.replace_namespaced_custom_object_status = write  # type: ignore[method-assign]
    f.reconcile()
    assert f.status["podName"] == "bot-attempt-1" and len(f.cluster.core.created) == 1
    assert f.api["list_namespaced_custom_object"] == (0 if delivered else 1)
    assert f.s3["list"] == 1  # the new job's empty prefix, listed once


def test_a_newer_version_delivered_during_the_storage_read_is_decided_on_without_a_refused_write():
    """kopf's finalizer patch lands, and its event is in, while a new resource's first reconcile reads
    S3: the status write would be refused, so it is not sent; the decision is taken again on the newer
    body, with the same storage read."""
    f = Fleet()
    views = f.cluster.reconciler.views
    real_read = views.read

    def read(*args: Any, **kw: Any) -> Any:
        f.cluster.custom.body["metadata"]["finalizers"] = ["loraresume.dev/cleanup"]
        f.cluster.custom.body["metadata"]["resourceVersion"] = "2"
        f.deliver()
        return real_read(*args, **kw)

    views.read = read  # type: ignore[method-assign]
    f.reconcile()
    assert f.status["podName"] == "bot-attempt-1" and len(f.cluster.core.created) == 1
    assert f.api["replace_namespaced_custom_object_status"] == 1  # none refused
    assert f.api["list_namespaced_custom_object"] == 0 and f.s3["list"] == 1


@pytest.mark.parametrize(
    ("pod_status", "terminating", "deleted"),
    [
        ({"phase": "Pending"}, False, True),  # deleted right after creation: its pod goes and is let go
        ({"phase": "Running"}, False, True),
        ({"phase": "Running"}, True, False),  # going already (the garbage collector): let go only
        ({"phase": "Failed", "reason": "Evicted"}, False, False),  # ended: let go only
    ],
    ids=["pending", "running", "terminating", "ended"],
)
def test_a_pod_whose_resource_is_gone_is_deleted_and_let_go(pod_status, terminating, deleted):
    """A resource deleted before kopf's finalizer landed goes without the delete handler; its pods'
    events find it gone (a list says so, not the cache) and clean up, as the garbage collector would."""
    from loraresume_operator.observed import ObservedPod

    f = Fleet()
    f.reconcile()  # launched
    pod = f.cluster.core.pods["bot-attempt-1"]
    pod["status"] = pod_status
    if terminating:
        pod["metadata"]["deletionTimestamp"] = "2026-12-05T00:00:00Z"
    removed: list[str] = []
    f.cluster.core.delete_namespaced_pod = lambda name, _ns: removed.append(name)  # type: ignore[attr-defined]
    f.cache.drop_resource(NS, "bot")  # its DELETED event
    f.cluster.custom.list_namespaced_custom_object = lambda *_a, **_k: {"items": []}  # type: ignore[method-assign]
    f.cluster.reconciler.reconcile(NS, "bot", event_pod=ObservedPod.from_api(copy.deepcopy(pod)))
    assert removed == (["bot-attempt-1"] if deleted else [])
    assert f.cluster.core.pods["bot-attempt-1"]["metadata"]["finalizers"] == []  # let go


def test_a_seeded_body_of_a_resource_gone_since_lets_its_pods_go():
    """A resource deleted between the start-up list that seeded the cache and kopf's listing: kopf never
    delivers it, nor its deletion. Its pod's event decides on the seeded body; the status write is answered
    404; the body is dropped and the fresh read finds the resource gone: its pod is let go."""
    from loraresume_operator.observed import ObservedPod

    f = Fleet()
    f.reconcile()  # launched
    pod = f.cluster.core.pods["bot-attempt-1"]
    crashed = {"name": "trainer", "state": {"terminated": {"exitCode": 1}}}
    f.deliver_pod("Failed", containerStatuses=[crashed])

    def gone(*_a: Any, **_k: Any) -> Any:
        raise ApiException(status=404, reason="Not Found")

    f.cluster.custom.replace_namespaced_custom_object_status = gone  # type: ignore[method-assign]
    f.cluster.custom.list_namespaced_custom_object = lambda *_a, **_k: {"items": []}  # type: ignore[method-assign]
    f.cluster.reconciler.reconcile(NS, "bot", event_pod=ObservedPod.from_api(copy.deepcopy(pod)))
    assert f.cache.resource(NS, "bot") is None
    assert f.cluster.core.pods["bot-attempt-1"]["metadata"]["finalizers"] == []  # let go


def test_the_status_write_answer_keeps_the_cache_current():
    f = Fleet()
    f.reconcile()
    assert f.cache.resource(NS, "bot")["status"]["podName"] == "bot-attempt-1"  # type: ignore[index]


def test_the_credentials_secret_is_read_once_per_ttl_and_again_after_a_storage_error():
    f = Fleet()
    f.reconcile()
    f.deliver_pod("Running")
    for _ in range(3):
        f.t += PROGRESS_SECONDS
        f.reconcile()
    assert f.api["read_namespaced_secret"] == 1
    f.t += SECRET_TTL_SECONDS
    f.reconcile()
    assert f.api["read_namespaced_secret"] == 2

    f.deliver_pod("Failed", reason="Evicted", message="evicted")  # an end: S3 is read in full
    f.denied = True
    f.reconcile()
    assert "cannot read storage" in f.status["message"]
    f.reconcile()
    assert f.api["read_namespaced_secret"] == 3


@pytest.mark.parametrize(
    ("after", "want"),
    [
        (1.0, Counter()),
        (PROGRESS_SECONDS, Counter({"get progress.json": 1})),
        (LISTING_SECONDS, Counter({"list": 1, "get progress.json": 1, "get _COMPLETE.json": 1})),
    ],
    ids=["within", "progress-due", "listing-due"],
)
def test_storage_is_read_at_a_bounded_rate_while_the_pod_runs(after, want):
    f = Fleet()
    f.reconcile()
    f.deliver_pod("Running")
    f.reconcile()
    f.s3.clear()
    f.t += after
    f.reconcile()
    assert +f.s3 == want


def test_nothing_is_read_while_the_pod_is_pending_however_long_it_waits():
    """A pod Pending for minutes (no GPU free: the scheduler keeps it waiting): its trainer has not started,
    so nothing in the job's storage changes, and the wait does not age the last read: once the pod runs,
    progress.json and the listing are read on their usual clocks from then."""
    f = Fleet()
    f.reconcile()  # launch
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/20 nodes"}
    f.deliver_pod("Pending", conditions=[unschedulable])
    f.reconcile()
    f.s3.clear()
    for _ in range(5):
        f.t += LISTING_SECONDS
        f.reconcile()
    assert +f.s3 == Counter()
    f.deliver_pod("Running")
    f.reconcile()
    assert +f.s3 == Counter()
    f.t += PROGRESS_SECONDS
    f.reconcile()
    assert +f.s3 == Counter({"get progress.json": 1})
    f.t += LISTING_SECONDS
    f.reconcile()
    assert f.s3["list"] == 1


@pytest.mark.parametrize(
    "going",
    [{"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}]}, "deleted"],
    ids=["disrupted", "deleted"],
)
def test_a_going_pod_is_not_read_for_until_it_ends(going):
    """A pod being reclaimed or deleted is saving its last checkpoint: a read now is out of date when it ends,
    and one in flight would hold the reconcile of that end (a spot reclaim is when S3 is busiest)."""
    f = Fleet()
    f.reconcile()
    f.deliver_pod("Running")
    f.reconcile()
    if going == "deleted":
        f.cluster.core.pods["bot-attempt-1"]["metadata"]["deletionTimestamp"] = "2026-12-05T00:00:00Z"
        f.deliver_pod("Running")
    else:
        f.deliver_pod("Running", **going)
    f.s3.clear()
    for _ in range(3):
        f.t += LISTING_SECONDS  # neither progress.json nor the listing, however long it takes
        f.reconcile()
    assert +f.s3 == Counter()


def test_a_relaunch_does_not_wait_for_the_release_of_the_pod_it_replaces():
    """At a spot reclaim a hundred relaunches share the pod-event workers: the ended pod's release (a patch)
    and the Events go on the operator's pool once the status counts the end, and the worker moves on."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    f = Fleet()
    f.reconcile()
    f.deliver_pod("Running")
    f.reconcile()
    gate = threading.Event()
    pool = ThreadPoolExecutor(1)
    pool.submit(gate.wait, 30)  # the pool is busy
    f.cluster.reconciler.events = pool
    f.deliver_pod("Failed", reason="Evicted", message="evicted")
    f.reconcile()
    assert f.status["attempt"] == 2 and "bot-attempt-2" in f.cluster.core.pods
    assert f.cluster.core.pods["bot-attempt-1"]["metadata"]["finalizers"] == [ACCOUNTING_FINALIZER]  # not yet
    gate.set()
    pool.shutdown(wait=True)
    assert f.cluster.core.pods["bot-attempt-1"]["metadata"]["finalizers"] == []  # let go after


def test_an_ended_pod_is_decided_on_a_fresh_read():
    f = Fleet()
    f.reconcile()
    f.deliver_pod("Running")
    f.reconcile()
    f.s3.clear()
    f.t += 1
    f.deliver_pod("Failed", reason="Evicted", message="evicted")
    f.reconcile()
    assert f.s3["list"] >= 1 and f.s3["get progress.json"] == 1
    assert f.status["attempt"] == 2


def test_a_counted_pod_is_let_go_without_reading_it():
    f = Fleet()
    f.reconcile()
    assert f.cluster.core.pods["bot-attempt-1"]["metadata"]["finalizers"] == [ACCOUNTING_FINALIZER]
    f.deliver_pod("Running")
    f.reconcile()
    f.deliver_pod("Failed", reason="Evicted", message="evicted")
    f.reconcile()
    assert [name for name, _ in f.cluster.core.patches] == ["bot-attempt-1"]
    assert f.cluster.core.pods["bot-attempt-1"]["metadata"]["finalizers"] == []
    assert f.api["list_namespaced_pod"] == 0


def test_the_cache_keeps_the_newest_delivery():
    cache = WatchCache()
    body = resource(SPEC, name="bot", namespace=NS)
    body["metadata"]["resourceVersion"] = "12"
    cache.put_resource(body)
    older = copy.deepcopy(body)
    older["metadata"]["resourceVersion"] = "9"
    older["status"] = {"phase": "Pending"}
    cache.put_resource(older)  # a late event: the answer to a write was newer
    assert cache.resource(NS, "bot") == body
    cache.refresh_resource(resource(SPEC, name="other", namespace=NS))  # never delivered by a watch
    assert cache.resource(NS, "other") is None
    cache.drop_resource(NS, "bot")
    assert cache.resource(NS, "bot") is None


def test_a_seeded_entry_serves_until_the_watch_delivers_it_or_its_time_is_up():
    """Start-up: one list of each kind seeds the cache (handlers._seed) before kopf's watches start. A seeded
    entry is served until the watch delivers that object (then the watch's); one the watch never delivers
    (deleted between the list and kopf's listing) stops being served after SEED_SECONDS: a miss, read then."""
    t = [0.0]
    cache = WatchCache(monotonic=lambda: t[0])
    listed = resource(SPEC, name="bot", namespace=NS)
    listed["metadata"]["resourceVersion"] = "5"
    gone = resource(SPEC, name="gone", namespace=NS)
    pod = {
        "metadata": {"name": "bot-attempt-1", "namespace": NS, "resourceVersion": "6"},
        "status": {"phase": "Running"},
    }
    vanished = {"metadata": {"name": "gone-attempt-1", "namespace": NS}, "status": {"phase": "Running"}}
    delivered_first = resource(SPEC, name="early", namespace=NS)
    delivered_first["status"] = {"phase": "Running"}
    cache.put_resource(delivered_first)  # a watch delivery before the seed: never overwritten by it
    cache.seed([listed, gone, resource(SPEC, name="early", namespace=NS)], [pod, vanished])
    assert cache.resource(NS, "early")["status"] == {"phase": "Running"}
    assert cache.resource(NS, "bot") == listed and cache.pod(NS, "bot-attempt-1").phase == "Running"
    cache.put_resource(listed)
    cache.put_pod(NS, {**pod, "status": {"phase": "Succeeded"}})
    t[0] = SEED_SECONDS + 1
    assert cache.resource(NS, "bot") == listed  # delivered by the watch since: served
    assert cache.pod(NS, "bot-attempt-1").phase == "Succeeded"
    assert cache.resource(NS, "gone") is None and cache.pod(NS, "gone-attempt-1") is None  # never delivered


def test_a_pending_pod_costs_no_storage_read():
    f = Fleet()
    f.reconcile()
    f.deliver_pod("Pending")
    f.s3.clear()
    for _ in range(3):
        f.t += LISTING_SECONDS  # neither progress.json nor the listing, however long it takes
        f.reconcile()
    assert +f.s3 == Counter()


@pytest.mark.parametrize("phase", ["Pending", "Running"])
def test_a_restarted_operator_starts_from_what_the_status_says_is_durable(phase):
    f = Fleet()
    f.reconcile()  # launch
    f.deliver_pod(phase)
    f.reconcile()
    f.deliver()
    f.cluster.reconciler.views = StorageViews(progress_seconds=PROGRESS_SECONDS)  # a new process: nothing read yet
    f.s3.clear()
    f.t += 1
    f.reconcile()
    # no read at all: what the status says is durable serves, progress.json is read a round later
    assert +f.s3 == Counter()
    if phase == "Running":
        f.t += PROGRESS_SECONDS
        f.reconcile()
        assert +f.s3 == Counter({"get progress.json": 1})  # it names no newer durable checkpoint
    f.s3.clear()
    f.cluster.core.pods["bot-attempt-1"]["status"] = {"phase": "Failed", "reason": "Evicted"}
    f.cache.put_pod(NS, f.cluster.core.pods["bot-attempt-1"])
    f.t += 1
    f.reconcile()  # its end is counted on a fresh read
    assert f.s3["list"] >= 1 and f.status["attempt"] == 2


@pytest.mark.parametrize(
    ("event_type", "generation", "observed", "deleting", "guarded", "delete_checkpoints", "want"),
    [
        (None, 1, 1, False, True, False, True),  # listed at start-up: every resource once
        ("ADDED", 1, None, False, True, False, True),
        ("ADDED", 1, None, False, False, False, True),  # at once: kopf's finalizer patch is not waited for
        ("MODIFIED", 1, None, False, True, False, True),  # kopf's patch before the first status write
        ("MODIFIED", 1, 1, False, True, False, False),  # kopf's patch after it
        ("ADDED", 1, None, False, False, True, False),  # its checkpoints go with it: the finalizer first
        (None, 1, None, False, False, True, False),
        ("MODIFIED", 1, None, False, True, True, True),  # ... whose patch brings this event
        ("ADDED", 1, None, False, False, "yes", False),  # invalid: judged once the finalizer is on
        ("MODIFIED", 2, 1, False, False, False, True),  # a spec change
        ("MODIFIED", 2, 2, False, True, False, False),  # its own status write
        ("MODIFIED", 2, 1, True, True, False, False),  # being deleted: the delete handler's
        ("MODIFIED", 2, 1, True, False, False, False),  # deleted before kopf's finalizer: gone at once
        ("DELETED", 2, 2, False, True, False, False),
    ],
    ids=[
        "listed",
        "created",
        "created-unguarded",
        "guarded-first",
        "guarded-after",
        "deletes-checkpoints-unguarded",
        "deletes-checkpoints-listed-unguarded",
        "deletes-checkpoints-guarded",
        "deletes-checkpoints-invalid",
        "spec-changed",
        "own-write",
        "deleting",
        "deleting-unguarded",
        "deleted",
    ],
)
def test_which_resource_events_reconcile(event_type, generation, observed, deleting, guarded, delete_checkpoints, want):
    from loraresume_operator.handlers import FINALIZER, wants_reconcile

    body: dict[str, Any] = {"metadata": {"name": "bot", "generation": generation}, "status": {}, "spec": {}}
    if guarded:
        body["metadata"]["finalizers"] = [FINALIZER]
    if observed is not None:
        body["status"]["observedGeneration"] = observed
    if deleting:
        body["metadata"]["deletionTimestamp"] = "2026-12-05T00:00:00Z"
    if delete_checkpoints:
        body["spec"]["storage"] = {"uri": "s3://b/bot/", "deleteOnResourceDeletion": delete_checkpoints}
    assert wants_reconcile(event_type, body) is want


@pytest.mark.parametrize(
    ("event_type", "deleting", "finalizers", "initial", "want"),
    [
        ("ADDED", False, [], False, "noop"),  # a creation: no create handler, nothing stored
        ("MODIFIED", False, ["loraresume.dev/cleanup"], False, "noop"),  # a spec or status change alike
        (None, False, ["loraresume.dev/cleanup"], True, "resume"),  # listed at start-up
        ("MODIFIED", True, ["loraresume.dev/cleanup"], False, "delete"),  # the delete handler runs
        ("MODIFIED", True, [], False, "free"),
        ("DELETED", True, [], False, "gone"),
    ],
)
def test_kopf_sees_no_change_without_building_an_essence(event_type, deleting, finalizers, initial, want, monkeypatch):
    """NoDiffBase hands kopf a constant essence (no deep copy of every event's body); kopf's cause
    detection then tells deletions apart as before and finds nothing else to do."""
    import kopf
    from kopf._cogs.structs import diffs
    from kopf._core.intents import causes

    from loraresume_operator.handlers import NoDiffBase

    raw: Any = {"metadata": {"name": "bot", "namespace": NS, "finalizers": finalizers}, "spec": {"baseModel": "/m"}}
    if deleting:
        raw["metadata"]["deletionTimestamp"] = "2026-12-05T00:00:00Z"
    body = kopf.Body(raw)
    storage = NoDiffBase()
    monkeypatch.setattr(copy, "deepcopy", lambda *_a, **_k: pytest.fail("an essence was deep-copied"))
    old, new = storage.fetch(body=body), storage.build(body=body, extra_fields=None)
    monkeypatch.undo()
    cause = causes.detect_changing_cause(
        finalizer="loraresume.dev/cleanup",
        raw_event={"type": event_type, "object": raw},
        body=body,
        old=old,
        new=new,
        diff=diffs.diff(old, new),
        initial=initial,
        resource=None,
        indices=None,
        logger=None,
        patch=None,
        memo=None,
    )
    assert cause.reason.value == want


def test_many_threads_asking_for_one_new_s3_client_build_it_once(monkeypatch):
    """A restarted operator's reconcile threads all want the same client at once; building one parses
    botocore's S3 model (~0.1 s of CPU), so each building its own stalled the restart."""
    import threading

    import boto3

    from loraresume_operator import s3_view

    built: list[int] = []
    real = boto3.session.Session

    def counting(*args: Any, **kw: Any) -> Any:
        built.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(boto3.session, "Session", counting)
    start = threading.Barrier(8)

    def ask() -> None:
        start.wait()
        s3_view.s3_client("http://127.0.0.1:1", "us-east-1", {"AWS_ACCESS_KEY_ID": f"k-{id(start)}"})

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1


def test_a_deleted_resource_leaves_the_periodic_loop_and_what_the_process_kept_for_it_goes():
    """Deleted before kopf's finalizer landed, a resource goes without the delete handler: its DELETED
    event alone must stop its periodic reconciles (each a list of a resource that is gone: idle requests)
    and drop what the process kept for it."""
    import asyncio
    import time

    import kopf

    from loraresume_operator import handlers

    on_resource_event: Any = handlers.on_resource_event  # as kopf calls it (kopf types it for its callers)
    f = Fleet()
    rec = f.cluster.reconciler
    rt = handlers.Runtime(cluster_wide=False, interval=10.0, reconciler=rec, cache=f.cache)
    memo = kopf.Memo(runtime=rt)
    raw: Any = copy.deepcopy(f.cluster.custom.body)
    body = kopf.Body(raw)
    events_before = sample("loraresume_watch_events_total", kind="LoraResume")
    asyncio.run(on_resource_event(namespace=NS, name="bot", body=body, memo=memo, type="ADDED"))
    deadline = time.monotonic() + 10
    while (rt.queue.pending() or "podName" not in f.status) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert (NS, "bot") in rt.known and rec._phases.get((NS, "bot")) == "Pending"
    asyncio.run(on_resource_event(namespace=NS, name="bot", body=body, memo=memo, type="DELETED"))
    rt.changes.shutdown(wait=True)
    rt.pod_events.shutdown(wait=True)
    rt.event_posts.shutdown(wait=True)
    assert (NS, "bot") not in rt.known and (NS, "bot") not in rec._phases
    assert f.cache.resource(NS, "bot") is None
    assert sample("loraresume_watch_events_total", kind="LoraResume") - events_before == 2


@pytest.mark.parametrize(
    ("phase", "generation", "observed", "want"),
    [
        ("Succeeded", 3, 3, "Succeeded"),
        ("Failed", 1, 1, "Failed"),
        ("Succeeded", 4, 3, None),  # its spec changed since: decided again
        ("Succeeded", None, 1, "Succeeded"),  # no generation: 1, as the reconcile reads it
        ("Running", 2, 2, None),
        ("Resuming", 2, 2, None),
        (None, 1, 1, None),
        ("Succeeded", 1, None, None),  # never judged
        (["Succeeded"], 1, 1, None),  # not a phase
    ],
)
def test_which_resources_are_finished(phase, generation, observed, want):
    from loraresume_operator.reconcile import finished_phase

    body: dict[str, Any] = {"metadata": {"name": "bot"}, "status": {}}
    if generation is not None:
        body["metadata"]["generation"] = generation
    if phase is not None:
        body["status"]["phase"] = phase
    if observed is not None:
        body["status"]["observedGeneration"] = observed
    assert finished_phase(body) == want


@pytest.mark.parametrize(("generation", "reconciled"), [(1, False), (2, True)], ids=["judged", "edited-while-down"])
def test_a_restart_counts_a_finished_resource_from_its_listing_without_a_reconcile(generation, reconciled):
    """A restarted operator lists every resource; a finished one judged at its generation is counted by
    phase from the listing, with no reconcile queued and no periodic one (at 500 resources, half a loaded
    restart was spent reconciling finished ones only to count them). One whose spec changed is decided."""
    import asyncio

    import kopf

    from loraresume_operator import handlers

    on_resource_event: Any = handlers.on_resource_event
    f = Fleet()
    rec = f.cluster.reconciler
    rt = handlers.Runtime(cluster_wide=False, interval=10.0, reconciler=rec, cache=f.cache)
    submitted: list[Any] = []
    rt.queue.submit = lambda key, *a, **kw: submitted.append(key)  # type: ignore[method-assign]
    raw: Any = copy.deepcopy(f.cluster.custom.body)
    raw["metadata"]["generation"] = generation
    raw["status"] = {"phase": "Succeeded", "observedGeneration": 1}
    asyncio.run(on_resource_event(namespace=NS, name="bot", body=kopf.Body(raw), memo=kopf.Memo(runtime=rt), type=None))
    for pool in (rt.changes, rt.pod_events, rt.event_posts):
        pool.shutdown(wait=True)
    if reconciled:
        assert submitted == [(NS, "bot")] and (NS, "bot") in rt.known
    else:
        assert submitted == [] and (NS, "bot") not in rt.known
        assert rec._phases.get((NS, "bot")) == "Succeeded" and rec.is_terminal(NS, "bot")


class Listed:
    """The start-up lists (handlers._seed's two calls), as the API server would answer them."""

    def __init__(self, resources: list[dict[str, Any]], pods: list[dict[str, Any]]) -> None:
        self.resources, self.pods = resources, pods

    def list_namespaced_custom_object(self, *_: Any) -> dict[str, Any]:
        return {"items": copy.deepcopy(self.resources)}

    def list_pods(self, *_: Any, **__: Any) -> list[dict[str, Any]]:
        return copy.deepcopy(self.pods)


def test_a_restart_acts_on_its_start_up_lists_and_not_again_on_kopfs_listing_of_the_same_versions():
    """A restarted operator reconciles what it listed at start-up at once (kopf hands each listed object
    to its handler only after its own per-object processing: ~10 s at 500 resources under load); kopf's
    listing events of the same versions are then only kept, and a newer version is acted on."""
    import asyncio

    import kopf

    from loraresume_operator import handlers
    from loraresume_operator.pods import LABEL_RESOURCE

    f = Fleet()
    rt = handlers.Runtime(cluster_wide=False, interval=10.0, namespaces=(NS,), reconciler=f.cluster.reconciler)
    submitted: list[tuple[Any, str | None]] = []
    rt.queue.submit = lambda key, pod=None, **kw: submitted.append((key, pod.name if pod else None))  # type: ignore[method-assign]
    running: Any = copy.deepcopy(f.cluster.custom.body)
    running["metadata"].update(resourceVersion="11", generation=1)
    running["status"] = {"phase": "Running", "observedGeneration": 1, "podName": "bot-attempt-1"}
    done: Any = copy.deepcopy(running)
    done["metadata"].update(name="done", resourceVersion="12")
    done["status"] = {"phase": "Succeeded", "observedGeneration": 1}
    pod = {
        "metadata": {
            "name": "bot-attempt-1",
            "namespace": NS,
            "resourceVersion": "13",
            "labels": {LABEL_RESOURCE: "bot"},
            "finalizers": [ACCOUNTING_FINALIZER],
        },
        "status": {"phase": "Running"},
    }
    handlers._seed(rt, Listed([running, done], [pod]), Listed([running, done], [pod]))  # type: ignore[arg-type]
    assert submitted == [((NS, "bot"), None), ((NS, "bot"), "bot-attempt-1")]
    assert (NS, "bot") in rt.known and (NS, "done") not in rt.known
    assert f.cluster.reconciler._phases.get((NS, "done")) == "Succeeded"

    memo = kopf.Memo(runtime=rt)
    on_resource_event: Any = handlers.on_resource_event
    on_pod_event: Any = handlers.on_pod_event
    labels = pod["metadata"]["labels"]
    for body in (running, done):
        asyncio.run(
            on_resource_event(namespace=NS, name=body["metadata"]["name"], body=kopf.Body(body), memo=memo, type=None)
        )
    asyncio.run(
        on_pod_event(namespace=NS, name="bot-attempt-1", labels=labels, body=kopf.Body(pod), memo=memo, type=None)
    )
    assert len(submitted) == 2, "kopf's listing of the versions acted on at start-up acted on again"

    newer: Any = copy.deepcopy(pod)
    newer["metadata"]["resourceVersion"] = "14"
    newer["status"] = {"phase": "Failed"}
    asyncio.run(
        on_pod_event(
            namespace=NS, name="bot-attempt-1", labels=labels, body=kopf.Body(newer), memo=memo, type="MODIFIED"
        )
    )
    assert submitted[2:] == [((NS, "bot"), "bot-attempt-1")]
    for pool in (rt.changes, rt.pod_events, rt.event_posts):
        pool.shutdown(wait=True)


SCHEDULED = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-06T10:00:00Z"}
READY = {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-06T10:00:05Z"}
DISRUPTED = {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}


# One pod's events in order, each with whether it asks for a reconcile of its resource.
POD_EVENTS_IN_ORDER: list[tuple[str, str, dict[str, Any], bool]] = [
    # the watch's ADDED of the pod this process created (held since the creation's answer)
    ("ADDED", "20", {"phase": "Pending"}, False),
    ("MODIFIED", "21", {"phase": "Pending", "podIP": "10.0.0.7"}, False),  # nothing observed changed
    ("MODIFIED", "22", {"phase": "Pending", "conditions": [SCHEDULED]}, True),  # scheduled: its wait is judged
    ("MODIFIED", "23", {"phase": "Running", "conditions": [SCHEDULED]}, True),
    ("MODIFIED", "24", {"phase": "Running", "conditions": [SCHEDULED, READY], "podIP": "10.0.0.7"}, False),
    ("MODIFIED", "25", {"phase": "Running", "conditions": [SCHEDULED, DISRUPTED]}, True),  # going
    ("DELETED", "26", {"phase": "Running", "conditions": [SCHEDULED, DISRUPTED]}, True),
]


@pytest.mark.parametrize("at", range(len(POD_EVENTS_IN_ORDER)), ids=lambda i: POD_EVENTS_IN_ORDER[i][1])
def test_a_pod_event_asks_for_a_reconcile_only_when_it_changes_what_the_operator_observes(at: int):
    """Each row of POD_EVENTS_IN_ORDER: the pod as the rows before it left it (the creation's answer
    first), then its event."""
    import asyncio

    import kopf

    from loraresume_operator import handlers
    from loraresume_operator.pods import LABEL_RESOURCE

    f = Fleet()
    rt = handlers.Runtime(cluster_wide=False, interval=10.0, namespaces=(NS,), reconciler=f.cluster.reconciler)
    submitted: list[Any] = []
    rt.queue.submit = lambda key, pod=None, **kw: submitted.append(key)  # type: ignore[method-assign]
    rt.cache.put_resource(copy.deepcopy(f.cluster.custom.body))
    meta: dict[str, Any] = {
        "name": "bot-attempt-1",
        "namespace": NS,
        "labels": {LABEL_RESOURCE: "bot"},
        "finalizers": [ACCOUNTING_FINALIZER],
    }
    rt.cache.refresh_pod(NS, "bot", {"metadata": {**meta, "resourceVersion": "20"}, "status": {"phase": "Pending"}})
    event, version, status, reconciled = POD_EVENTS_IN_ORDER[at]
    for before in POD_EVENTS_IN_ORDER[:at]:  # what the earlier rows left in the cache
        rt.cache.put_pod(NS, {"metadata": {**meta, "resourceVersion": before[1]}, "status": before[2]})
    body = {"metadata": {**meta, "resourceVersion": version}, "status": status}
    on_pod_event: Any = handlers.on_pod_event
    asyncio.run(
        on_pod_event(
            namespace=NS,
            name="bot-attempt-1",
            labels=meta["labels"],
            body=kopf.Body(body),
            memo=kopf.Memo(runtime=rt),
            type=event,
        )
    )
    assert submitted == ([(NS, "bot")] if reconciled else [])
    for pool in (rt.changes, rt.pod_events, rt.event_posts):
        pool.shutdown(wait=True)


def test_every_reconcile_is_counted_with_the_cpu_its_thread_spent():
    """loraresume_reconciles_total and loraresume_reconcile_cpu_seconds_total: what one reconcile costs."""
    f = Fleet()
    runs, cpu = sample("loraresume_reconciles_total"), sample("loraresume_reconcile_cpu_seconds_total")
    for _ in range(3):
        f.reconcile()
    assert sample("loraresume_reconciles_total") - runs == 3
    assert 0 < sample("loraresume_reconcile_cpu_seconds_total") - cpu < 5


def sample(name: str, **labels: str) -> float:
    """A metric's value in the operator's registry (prometheus_client's default one)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0

"""kopf handlers: thin. Each turns an event into `Reconciler.reconcile(namespace, name)`.

Every LoraResume and trainer pod the watches deliver is kept in the run's WatchCache first, so
that reconciles read them from there instead of GETting them (watch_cache.py); at start-up, before
kopf's watches begin, one list of each kind seeds it (`startup`), and what those lists hold is acted
on at once, as their listing events would be (`_reconcile_seeded`).

Level-based: one background loop reconciles every known resource periodically (progress,
backoff expiry), pod events reconcile the owner at once, and a LoraResume event reconciles it
when it is new to this process (created, or listed at start-up) or its spec changed (its
generation is not the one its status last judged): from the event itself, on the first event
kopf delivers, not after kopf's finalizer patch as its create handler would (a resource whose
checkpoints go with it waits for that patch: wants_reconcile). The loop is the
standing retry. (Per-object kopf timers were dropped: kopf holds an object's finalizer until its
timers stop, which left deletions hanging, and one loop scales better than a timer per resource.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client import ApiException

from . import metrics
from .defaults import OperatorDefaults
from .lean_api import LeanCoreV1Api
from .observed import ObservedPod
from .pods import LABEL_RESOURCE
from .reconcile import Reconciler, finished_phase
from .s3_view import StorageViews
from .spec import GROUP, PLURAL, VERSION
from .watch_cache import WatchCache
from .work_queue import CHANGES, PODS, WorkQueue

log = logging.getLogger(__name__)


# A reconcile mostly waits on the API server and S3, so its threads outnumber the cores. Resource
# events (creations, spec changes) and pod events (an ended pod means a relaunch) have a pool each,
# so a burst of creations cannot queue relaunches behind it; both are fed by one WorkQueue, which
# gives a worker only a resource nobody else works on (whichever watch asked) and serves relaunches
# first. kopf's own executor runs only the delete handler. A per-resource lock keeps one reconcile
# per resource at a time either way (the periodic loop reconciles beside the queue).
CHANGE_WORKERS = 48
POD_EVENT_WORKERS = 32
EVENT_POSTERS = 4  # Events posted and counted pods let go off the reconcile threads (Reconciler.events)
# The Kubernetes client's connections kept open: the workers of the pools and the periodic loop (its
# default, 5 per core, made most requests under load open a new TLS connection and drop it).
API_CONNECTIONS = CHANGE_WORKERS + POD_EVENT_WORKERS + EVENT_POSTERS + 8
KOPF_WORKERS = 4
FINALIZER = f"{GROUP}/cleanup"  # kopf's, for the delete handler
RESOURCE_EVENTS = metrics.WATCH_EVENTS.labels(kind="LoraResume")
POD_EVENTS = metrics.WATCH_EVENTS.labels(kind="Pod")


@dataclass
class Runtime:
    """What the handlers share, for one operator run: handed over by cli.py in kopf's memo (no
    module state, no environment back-channel). `reconciler` is made at start-up."""

    cluster_wide: bool
    interval: float  # seconds between periodic reconciles
    namespaces: tuple[str, ...] = ()  # served when not cluster-wide
    reconciler: Reconciler | None = None
    cache: WatchCache = field(default_factory=WatchCache)
    known: set[tuple[str, str]] = field(default_factory=set)  # reconciled by the periodic loop
    known_lock: threading.Lock = field(default_factory=threading.Lock)
    # (kind, namespace, name) -> resourceVersion of what start-up acted on from its own lists: kopf's
    # listing event of that same version is not acted on again (_reconcile_seeded)
    seeded: dict[tuple[str, str, str], str | None] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    pod_events: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(POD_EVENT_WORKERS, thread_name_prefix="pod-events")
    )
    changes: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(CHANGE_WORKERS, thread_name_prefix="changes")
    )
    event_posts: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(EVENT_POSTERS, thread_name_prefix="events")
    )

    queue: WorkQueue = field(init=False)

    def __post_init__(self) -> None:
        self.queue = WorkQueue({CHANGES: self.changes, PODS: self.pod_events}, self._after_event)

    def _after_event(self, key: tuple[str, str], pod: ObservedPod | None) -> None:
        try:
            self.rec().reconcile(*key, event_pod=pod)
        except ApiException as exc:
            metrics.RECONCILE_ERRORS.labels("api").inc()
            log.warning("reconcile of %s/%s after an event failed (%s); the periodic loop retries", *key, exc.status)

    def rec(self) -> Reconciler:
        if self.reconciler is None:
            raise kopf.TemporaryError("the operator is still starting", delay=1)
        return self.reconciler


def runtime(memo: Any) -> Runtime:
    """The run's Runtime (kopf copies the operator's memo into each resource's, shallowly: one object)."""
    found = getattr(memo, "runtime", None)
    if not isinstance(found, Runtime):
        raise kopf.PermanentError("the operator was started without its Runtime (use loraresume-operator)")
    return found


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf keeps the last handled spec (its "diff-base") to tell creations, updates and resumes apart
    for their handlers; this operator has none (a LoraResume's own events trigger its reconcile,
    wants_reconcile), so none is kept: an object always matches its stored essence. Saves a patch of
    every new resource, and that patch's conflicts with the status writes (its resourceVersion test).

    The essence is a constant, not built: kopf builds one (a deep copy of the body) for every event of
    every watched object, LoraResumes and pods alike, only to compare it with the stored one (9 % of the
    operator's CPU at 200 resources). Equal and empty, kopf sees no change: only the delete handler
    runs (deletion is told by the deletionTimestamp, not by the essence)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def _namespaced(namespace: str | None) -> str:
    """kopf types `namespace` for cluster-scoped resources too; ours (and their pods) are namespaced."""
    if namespace is None:
        raise kopf.PermanentError("a LoraResume or trainer pod without a namespace")
    return namespace


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Namespaced mode serves fixed namespaces, so kopf's runtime scanning of namespaces and CRDs
    (cluster-scoped list/watch, which a namespaced Role cannot grant) is off."""
    rt = runtime(memo)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = API_CONNECTIONS
    api = client.ApiClient(configuration)
    core, custom = LeanCoreV1Api(client.CoreV1Api(api)), client.CustomObjectsApi(api)
    rt.reconciler = Reconciler(
        core,
        custom,
        OperatorDefaults.from_env(),
        cache=rt.cache,
        # progress.json once per round of the periodic loop at most: pod events in between reuse it
        views=StorageViews(progress_seconds=rt.interval),
        events=rt.event_posts,
    )
    _seed(rt, custom, core)
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.level = logging.INFO
    settings.scanning.disabled = not rt.cluster_wide
    settings.watching.server_timeout = 300
    # Only trainer pods, by the API server's label selector: kopf's `labels=` filter alone is applied after
    # every pod of the namespace (or, cluster-wide, of the cluster) has been sent and decoded.
    settings.watching.label_selectors["", "v1", "pods"] = LABEL_RESOURCE
    settings.execution.max_workers = KOPF_WORKERS
    threading.Thread(target=_periodic, args=(rt,), name="reconcile-loop", daemon=True).start()


def _seed(rt: Runtime, custom: client.CustomObjectsApi, core: LeanCoreV1Api) -> None:
    """Every LoraResume and trainer pod served, by one list each (per namespace when namespaced), into the
    WatchCache before kopf's watches start: a restarted operator decides nothing without knowing a
    resource's pods, and asks for none of them one by one (watch_cache.py says why not kopf's indexer).
    A list that fails only costs the requests it would have saved: each miss is read when needed."""
    resources: list[dict[str, Any]] = []
    pods: list[dict[str, Any]] = []
    try:
        for namespace in (None,) if rt.cluster_wide else rt.namespaces:
            if namespace is None:
                listed = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
            else:
                listed = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
            resources += listed.get("items") or []
            pods += core.list_pods(namespace, label_selector=LABEL_RESOURCE)
    except ApiException as exc:
        log.warning("start-up: LoraResumes and trainer pods not listed (%s); each is read when needed", exc.status)
        return
    rt.cache.seed(resources, pods)
    log.info("start-up: %d LoraResumes and %d trainer pods known before the watches start", len(resources), len(pods))
    _reconcile_seeded(rt, resources, pods)


def _reconcile_seeded(rt: Runtime, resources: list[dict[str, Any]], pods: list[dict[str, Any]]) -> None:
    """A restart acts on its start-up lists at once, as on kopf's listing events (each LoraResume
    reconciled or, finished, counted; each held pod's owner reconciled), instead of waiting for those
    events: kopf delivers a listed object only after its own per-object processing, which held half of
    a loaded restart at 500 resources (~10 s). The listing event of a version acted on here is then
    only kept in the cache (`seeded`); a newer version is acted on as any event."""
    for body in resources:
        meta = body.get("metadata") or {}
        key = (_namespaced(meta.get("namespace")), str(meta.get("name")))
        rt.seeded[("resource", *key)] = meta.get("resourceVersion")
        _resource_changed(rt, key, None, body)
    for body in pods:
        meta = body.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(LABEL_RESOURCE)
        pod = ObservedPod.from_api(body)
        if owner is None or not pod.held:  # its listing event does nothing either
            continue
        namespace = _namespaced(meta.get("namespace"))
        rt.seeded[("pod", namespace, pod.name)] = meta.get("resourceVersion")
        rt.queue.submit((namespace, owner), pod, lane=PODS)


def _acted_on_at_start(
    rt: Runtime, kind: str, key: tuple[str, str], event_type: str | None, body: Mapping[str, Any]
) -> bool:
    """Whether this is kopf's listing event of a version start-up acted on already (_reconcile_seeded)."""
    if event_type is not None or not rt.seeded:
        return False
    version = rt.seeded.pop((kind, *key), "")
    return version == (body.get("metadata") or {}).get("resourceVersion")


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    rt = runtime(memo)
    rt.stop.set()
    rt.pod_events.shutdown(wait=False, cancel_futures=True)
    rt.changes.shutdown(wait=False, cancel_futures=True)
    rt.event_posts.shutdown(wait=True)  # what was decided is said before the process goes


def _periodic(rt: Runtime) -> None:
    while not rt.stop.wait(rt.interval):
        with rt.known_lock:
            keys = sorted(rt.known)
        rec = rt.rec()
        for namespace, name in keys:
            try:
                rec.reconcile(namespace, name)
            except Exception:
                metrics.RECONCILE_ERRORS.labels("loop").inc()
                log.exception("periodic reconcile of %s/%s failed; next round retries", namespace, name)
                continue
            if rec.is_terminal(namespace, name):  # done: only a spec change brings it back
                with rt.known_lock:
                    rt.known.discard((namespace, name))


def wants_reconcile(event_type: str | None, body: Mapping[str, Any]) -> bool:
    """Whether a LoraResume event asks for a reconcile: listed at start-up (None) or created, or its
    spec changed since its status was last decided (generation ahead of status.observedGeneration).
    Not its own status writes, nor a deletion (the delete handler's, or on_resource_event's).

    A new resource is reconciled at once, on its first event, unless its checkpoints are to be
    deleted with it (`checkpoints_go_with_it`): such a resource alone carries kopf's finalizer (the
    delete handler must run before it goes), and it is first reconciled once that finalizer is on."""
    meta = body.get("metadata") or {}
    if event_type == "DELETED" or meta.get("deletionTimestamp"):
        return False
    if FINALIZER not in (meta.get("finalizers") or ()) and checkpoints_go_with_it(body):
        return False
    if event_type in (None, "ADDED"):
        return True
    observed = (body.get("status") or {}).get("observedGeneration")
    return observed != meta.get("generation")


def checkpoints_go_with_it(body: Mapping[str, Any], **_: Any) -> bool:
    """Whether deleting the resource deletes what its trainer wrote (spec.storage.deleteOnResourceDeletion):
    only then does its deletion need the delete handler, so only then does kopf put its finalizer on it
    (on_delete's `when`). Every other LoraResume has no finalizer of the operator's: deleting it is never
    held up by the operator (nor stuck while the operator is down), nothing of its creation races a
    metadata patch (kopf's finalizer patch refused one status write in two of a burst, and was itself
    refused and sent again), and its pods go when it goes (on_resource_event, and the garbage collector
    by their ownerReference). Read from the raw spec: an invalid spec that asks for it waits too (it is
    judged once the finalizer lands)."""
    spec = body.get("spec")
    storage = spec.get("storage") if isinstance(spec, Mapping) else None
    flag = storage.get("deleteOnResourceDeletion", False) if isinstance(storage, Mapping) else False
    return flag is not False


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_resource_event(namespace: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **kw: Any) -> None:
    """Keep the LoraResume as delivered; reconcile it when wants_reconcile says so, on the changes pool
    (errors are retried by the periodic loop, which knows it from here on), unless it has finished
    (finished_phase): then it is only counted."""
    RESOURCE_EVENTS.inc()
    rt, key = runtime(memo), (_namespaced(namespace), name)
    if kw.get("type") == "DELETED":
        rt.cache.drop_resource(*key)
        # Gone, with or without the delete handler (only a resource whose checkpoints go with it has one):
        # the periodic loop stops, its pods go and are let go, and what this process kept for it goes (off
        # the event loop: forget waits for a reconcile of it in flight).
        with rt.known_lock:
            rt.known.discard(key)
        if rt.reconciler is not None:
            rt.changes.submit(_gone, rt.reconciler, key)
        return
    rt.cache.put_resource(body)
    if not _acted_on_at_start(rt, "resource", key, kw.get("type"), body):
        _resource_changed(rt, key, kw.get("type"), body)


def _resource_changed(rt: Runtime, key: tuple[str, str], event_type: str | None, body: Mapping[str, Any]) -> None:
    """A LoraResume listed, created or changed: reconciled when wants_reconcile says so, on the changes
    pool, or counted only when it has finished."""
    if not wants_reconcile(event_type, body):
        return
    finished = finished_phase(body)
    if finished is not None:
        # Listed at start-up, finished and judged at its generation: counted by phase here, without a
        # reconcile (half of a restart's work at 500 resources was reconciling finished ones only to
        # count them). A pod of it still held is let go by that pod's own event.
        rt.rec().record_phase(*key, finished)
        return
    with rt.known_lock:
        rt.known.add(key)
    rt.rec()  # kopf retries the event while the operator is still starting
    rt.queue.submit(key, lane=CHANGES)


def _gone(rec: Reconciler, key: tuple[str, str]) -> None:
    """A LoraResume is gone: what this process kept for it goes (its metric series at once, not after the
    pods' requests), and its pods are deleted and let go (the garbage collector would delete them by their
    ownerReference, but only once it knows the CRD, and never lets go of the accounting finalizer)."""
    rec.forget(*key)
    try:
        rec.delete_pods(*key)
    except ApiException as exc:  # a pod left behind is let go on its next event (resource gone)
        log.warning("pods of deleted %s/%s not deleted (%s); their events retry", *key, exc.status)


@kopf.on.event("", "v1", "pods", labels={LABEL_RESOURCE: kopf.PRESENT})
async def on_pod_event(
    namespace: str | None, name: str, labels: Mapping[str, str], body: kopf.Body, memo: kopf.Memo, **kw: Any
) -> None:
    """A trainer pod changed: kept in the WatchCache, and its LoraResume reconciled now, on the pod-event
    pool (errors wait for the timer). At start-up kopf lists every trainer pod here, so a pod left held by
    a crash is let go then.

    Only pods that carry the accounting finalizer: one without it was let go (its end is counted; its
    release and removal would each cost a reconcile for nothing) or comes from an operator version
    before the finalizer, whose end the periodic reconcile notices. And only an event that changes what
    the operator observes of the pod (WatchCache.put_pod): the watch's ADDED of a pod this process
    created, and the kubelet's updates of what no decision reads, cost no reconcile (a launch's ADDED
    was one reconcile in ten at 200 resources)."""
    POD_EVENTS.inc()
    rt, ns = runtime(memo), _namespaced(namespace)
    if kw.get("type") == "DELETED":
        rt.cache.drop_pod(ns, name)
        pod = ObservedPod.from_api(dict(body))
    else:
        pod, changed = rt.cache.put_pod(ns, body)
        if _acted_on_at_start(rt, "pod", (ns, name), kw.get("type"), body) or not changed:
            return
    if not pod.held:
        return
    key = (ns, labels[LABEL_RESOURCE])
    rt.rec()
    rt.queue.submit(key, pod, lane=PODS)


@kopf.on.delete(GROUP, VERSION, PLURAL, retries=5, backoff=5, when=checkpoints_go_with_it)
def on_delete(
    namespace: str | None, name: str, spec: kopf.Spec, status: kopf.Status, memo: kopf.Memo, **_: Any
) -> None:
    """A resource whose checkpoints go with it (the only ones kopf's finalizer holds): its pods go first
    (SIGTERM: a last checkpoint), then what decide.deletion_actions says."""
    namespace, rt = _namespaced(namespace), runtime(memo)
    with rt.known_lock:
        rt.known.discard((namespace, name))
    rt.rec().delete_resource(namespace, name, dict(spec), dict(status or {}))

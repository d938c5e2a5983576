"""kopf handlers: thin. Each turns an event into `Reconciler.reconcile(namespace, name)`.

Level-based: one background loop reconciles every known resource periodically (progress,
backoff expiry), pod events reconcile the owner at once, create/update/resume reconcile
immediately. Retries are bounded here; the loop is the standing retry. (Per-object kopf
timers were dropped: kopf holds an object's finalizer until its timers stop, which left
deletions hanging, and one loop scales better than a timer per resource.)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client import ApiException

from loraresume_trainer.checkpoint_store import CheckpointStore
from loraresume_trainer.s3uri import S3Uri

from . import metrics
from .defaults import OperatorDefaults
from .observed import ObservedPod
from .pods import LABEL_RESOURCE
from .reconcile import Reconciler
from .spec import GROUP, PLURAL, VERSION, LoraResumeSpec, LoraResumeStatus

log = logging.getLogger(__name__)

RECONCILE_INTERVAL = float(os.environ.get("LORARESUME_RECONCILE_INTERVAL", "10"))
_state: dict[str, Any] = {}
_known: set[tuple[str, str]] = set()
_known_lock = threading.Lock()


def reconciler() -> Reconciler:
    return _state["reconciler"]


def _namespaced(namespace: str | None) -> str:
    """kopf types `namespace` for cluster-scoped resources too; ours (and their pods) are namespaced."""
    if namespace is None:
        raise kopf.PermanentError("a LoraResume or trainer pod without a namespace")
    return namespace


def configure(*, cluster_wide: bool) -> None:
    """Before kopf starts: namespaced mode serves fixed namespaces, so kopf's runtime scanning of
    namespaces and CRDs (cluster-scoped list/watch, which a namespaced Role cannot grant) is off."""
    _state["cluster_wide"] = cluster_wide


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.ApiClient()
    _state["reconciler"] = Reconciler(client.CoreV1Api(api), client.CustomObjectsApi(api), OperatorDefaults.from_env())
    settings.persistence.finalizer = f"{GROUP}/cleanup"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.INFO
    settings.scanning.disabled = not _state.get("cluster_wide", True)
    settings.watching.server_timeout = 300
    stop = threading.Event()
    _state["stop"] = stop
    threading.Thread(target=_periodic, args=(stop,), name="reconcile-loop", daemon=True).start()


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    if "stop" in _state:
        _state["stop"].set()


def _periodic(stop: threading.Event) -> None:
    while not stop.wait(RECONCILE_INTERVAL):
        with _known_lock:
            keys = sorted(_known)
        for namespace, name in keys:
            try:
                reconciler().reconcile(namespace, name)
            except Exception:
                metrics.RECONCILE_ERRORS.labels("loop").inc()
                log.exception("periodic reconcile of %s/%s failed; next round retries", namespace, name)
                continue
            if reconciler().is_terminal(namespace, name):  # done: only a spec change brings it back
                with _known_lock:
                    _known.discard((namespace, name))


def _reconcile(namespace: str, name: str) -> float | None:
    try:
        return reconciler().reconcile(namespace, name)
    except ApiException as exc:
        metrics.RECONCILE_ERRORS.labels("api").inc()
        raise kopf.TemporaryError(f"Kubernetes API error {exc.status} {exc.reason}", delay=5) from None


@kopf.on.create(GROUP, VERSION, PLURAL, retries=5, backoff=5)
@kopf.on.resume(GROUP, VERSION, PLURAL, retries=5, backoff=5)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", retries=5, backoff=5)
def on_change(namespace: str | None, name: str, **_: Any) -> None:
    key = (_namespaced(namespace), name)
    with _known_lock:
        _known.add(key)
    _reconcile(*key)


@kopf.on.event("", "v1", "pods", labels={LABEL_RESOURCE: kopf.PRESENT})
def on_pod_event(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> None:
    """A trainer pod changed: reconcile its LoraResume now (errors wait for the timer). At start-up
    kopf lists every trainer pod here, so a pod left held by a crash is let go then."""
    pod = ObservedPod.from_api(dict(body))
    try:
        reconciler().reconcile(_namespaced(namespace), labels[LABEL_RESOURCE], event_pod=pod)
    except ApiException as exc:
        metrics.RECONCILE_ERRORS.labels("api").inc()
        log.warning("reconcile after pod event failed (%s); the timer retries", exc.status)


@kopf.on.delete(GROUP, VERSION, PLURAL, retries=5, backoff=5)
def on_delete(namespace: str | None, name: str, spec: kopf.Spec, status: kopf.Status, **_: Any) -> None:
    """Pods go with the resource; checkpoints in S3 stay unless the spec asks otherwise."""
    namespace = _namespaced(namespace)
    with _known_lock:
        _known.discard((namespace, name))
    rec = reconciler()
    rec.delete_pods(namespace, name)
    rec.forget(namespace, name)
    try:
        parsed = LoraResumeSpec.model_validate(dict(spec))
        parsed = rec.effective(namespace, name, parsed, LoraResumeStatus.model_validate(dict(status or {})))
    except ValueError:
        return
    if parsed.storage.delete_on_resource_deletion and parsed.storage.uri:
        store = CheckpointStore(rec.storage_client(namespace, parsed), S3Uri.parse(parsed.storage.uri))
        for listing in store.list_checkpoints():
            store.delete_checkpoint(listing.step)
        log.info("%s/%s: deleted checkpoints under %s (adapter kept)", namespace, name, parsed.storage.uri)

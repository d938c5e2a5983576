"""One reconcile: observe (watch cache, S3), decide (pure), write status once, then act.

Observed from what the watches delivered (watch_cache.py), not by GETs: the resource, its pods
and the LoraResumes it starts from; a miss falls back to a GET. The status is written first,
conditionally on the resourceVersion read (optimistic concurrency), so two reconciles racing for
one resource, or one that read a stale body, cannot both count a pod's end: a 409 makes the
reconcile GET the resource (the one GET of it in the normal run) and decide again. Only then are
pods created (AlreadyExists is success: names are per attempt).

S3 is read at a bounded rate while the attempt's pod is alive (s3_view.StorageViews), and fresh
when the decision needs it: nothing in flight (a launch starts from the newest checkpoint), or
the pod ended or is gone (its end is counted against what is durable), unless its trainer said
what is durable as it stopped on a SIGTERM, or that it stopped before it trained (a preemption:
decide.counted_on_its_word). The credentials Secret is
cached for SECRET_TTL_SECONDS and read again after any storage error (a rotated key that S3
refuses is picked up at once).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import ApiException, CoreV1Api, CustomObjectsApi
from pydantic import ValidationError

from loraresume_trainer.checkpoint_store import CheckpointStore
from loraresume_trainer.config import format_validation_error
from loraresume_trainer.errors import ConfigError, StorageAuthError, TrainerError
from loraresume_trainer.redact import SECRET_ENV_VARS as SECRET_KEYS
from loraresume_trainer.redact import remember_secret
from loraresume_trainer.s3uri import S3Uri

from . import conditions as c
from . import metrics
from .decide import (
    POD_FORBIDDEN,
    CreatePod,
    DeleteCheckpoints,
    DeletePod,
    EmitEvent,
    Observation,
    Plan,
    Problem,
    ReleasePod,
    Resource,
    SourceState,
    accounted,
    counted_on_its_word,
    decide,
    decide_problem,
    deletion_actions,
    parse_iso,
    reads_storage_fresh,
    said_durable,
    storage_needed,
)
from .defaults import OperatorDefaults, effective_spec
from .k8s_names import MAX_LABEL_VALUE
from .observed import ObservedPod
from .pods import ACCOUNTING_FINALIZER, LABEL_RESOURCE, build_trainer_pod
from .policy import credentials_problem, spec_problems
from .s3_view import DownloadSizes, StorageView, StorageViews, s3_client, warm_s3
from .spec import API_VERSION, GROUP, KIND, PLURAL, VERSION, LoraResumeSpec, LoraResumeStatus, Phase
from .startup import to_observe as startup_to_observe
from .watch_cache import WatchCache

log = logging.getLogger(__name__)

CONFLICT_RETRY_SECONDS = 1.0
# How long a credentials Secret read is used before it is read again (any storage error reads it again
# at once). One GET per Secret per minute, not one per reconcile; a rotation takes effect within it.
SECRET_TTL_SECONDS = 60.0


class StatusConflict(Exception):
    """The status write was refused (409): the resource changed since it was read (`version`)."""

    def __init__(self, where: str, version: str | None = None) -> None:
        super().__init__(where)
        self.version = version


def utcnow() -> datetime:
    return datetime.now(UTC)


def _api_message(exc: ApiException) -> str:
    """The Status message of an API error (it names the fields), else the reason."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        return str(exc.reason)
    return str(body.get("message") or exc.reason)[:2000] if isinstance(body, dict) else str(exc.reason)


def _newer_version(body: Mapping[str, Any] | None, than: str | None) -> bool:
    """Whether `body` is a later version of its resource than resourceVersion `than` (the API server's
    are etcd revisions: digits compare as numbers; anything else is not known to be newer)."""
    version = str(((body or {}).get("metadata") or {}).get("resourceVersion") or "")
    return bool(than) and version.isdigit() and str(than).isdigit() and int(version) > int(str(than))


def finished_phase(body: Mapping[str, Any]) -> str | None:
    """Succeeded or Failed for a resource that has finished and whose status judged its current spec
    (status.observedGeneration == metadata.generation): nothing is left to decide until its spec
    changes. None for any other. Read from the raw body: a restarted operator counts its finished
    resources from their listing without a reconcile (handlers.on_resource_event)."""
    status = body.get("status")
    if not isinstance(status, Mapping):
        return None
    phase = status.get("phase")
    if phase not in (Phase.SUCCEEDED.value, Phase.FAILED.value):
        return None
    generation = (body.get("metadata") or {}).get("generation") or 1
    return phase if status.get("observedGeneration") == generation else None


class Reconciler:
    def __init__(
        self,
        core: CoreV1Api,
        custom: CustomObjectsApi,
        defaults: OperatorDefaults,
        clock: Callable[[], datetime] = utcnow,
        s3_factory: Callable[..., Any] = s3_client,
        cache: WatchCache | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        views: StorageViews | None = None,
        events: Executor | None = None,
    ) -> None:
        self.core, self.custom, self.defaults, self.clock, self.s3_factory = core, custom, defaults, clock, s3_factory
        self.cache = cache if cache is not None else WatchCache()  # empty: every read is a GET
        self.monotonic = monotonic
        self.download_sizes = DownloadSizes()
        self.views = views if views is not None else StorageViews()
        # Where Events are posted and counted pods let go from: off the reconcile thread (a relaunch's worker
        # takes the next resource instead of waiting on the API server for its AttemptStarted, or for the
        # release of the pod it replaced: at a spot reclaim, a hundred relaunches wait for 32 workers), or
        # inline when None (tests).
        self.events = events
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._phases: dict[tuple[str, str], str] = {}
        self._phase_counts: defaultdict[str, int] = defaultdict(int)  # of _phases' values, kept as they change
        self._phases_lock = threading.Lock()
        self._counted = False  # every phase's gauge set once (to 0 where none is in it)
        self._secrets: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}
        self._secrets_lock = threading.Lock()
        # one read of a Secret at a time: a restarted operator's reconcile threads all want it at once
        self._secret_reads: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        if s3_factory is s3_client:  # botocore's data files loaded beside kopf's start-up, not by the first reconcile
            threading.Thread(target=warm_s3, name="s3-warm", daemon=True).start()

    # ---- observe ----------------------------------------------------------------------------
    def _get(self, namespace: str, name: str, *, fresh: bool = False) -> dict[str, Any] | None:
        """The resource as the watch delivered it; read from the API server if it has not (or `fresh`: after
        a 409), by a list of that one name (what the watch is allowed: the operator needs no `get`)."""
        if not fresh:
            cached = self.cache.resource(namespace, name)
            if cached is not None:
                return cached
        found = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, field_selector=f"metadata.name={name}"
        )
        items = found.get("items") or []
        if not items:
            return None
        body: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND, **items[0]}
        self.cache.refresh_resource(body)
        return body

    def _pod(self, namespace: str, name: str | None) -> ObservedPod | None:
        """The pod as the watch delivered it; a GET if it has not (the operator is starting, or the pod
        was created a moment ago): a pod the cache lacks is never taken for gone."""
        if not name:
            return None
        cached = self.cache.pod(namespace, name)
        if cached is not None:
            return cached
        found = self._list_pods(namespace, field_selector=f"metadata.name={name}")
        return ObservedPod.from_api(found[0]) if found else None

    def _list_pods(self, namespace: str, **selector: str) -> list[dict[str, Any]]:
        """Trainer pods as dicts, by a list (the operator needs no `get` of pods: its watch lists too)."""
        items = self.core.list_namespaced_pod(namespace, **selector).items
        return [self.core.api_client.sanitize_for_serialization(pod) for pod in items]

    def _credentials(self, namespace: str, spec: LoraResumeSpec) -> dict[str, str] | None:
        name = spec.storage.credentials_secret
        if not name:
            return None
        cached = self._cached_secret(namespace, name)
        if cached is not None:  # the usual case: no lock but the dict's
            return cached
        with self._secrets_lock:
            reading = self._secret_reads[(namespace, name)]
        with reading:  # the threads that wait for a read in flight take its answer
            return self._cached_secret(namespace, name) or self._read_secret(namespace, name)

    def _cached_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        with self._secrets_lock:
            known = self._secrets.get((namespace, name))
        return known[1] if known is not None and self.monotonic() - known[0] < SECRET_TTL_SECONDS else None

    def _read_secret(self, namespace: str, name: str) -> dict[str, str]:
        now = self.monotonic()
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise StorageAuthError(f"storage.credentialsSecret: Secret {namespace}/{name} not found") from None
            raise
        problem = credentials_problem(
            namespace, name, secret.metadata.labels, self.defaults.policy, self.defaults.credentials_secret
        )
        if problem:
            raise StorageAuthError(problem)
        values = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        for key in SECRET_KEYS:
            remember_secret(values.get(key, ""))
        with self._secrets_lock:
            self._secrets[(namespace, name)] = (now, values)
        return values

    def forget_credentials(self, namespace: str, spec: LoraResumeSpec) -> None:
        """Read the Secret again next time (storage refused it, or could not be read with it)."""
        with self._secrets_lock:
            self._secrets.pop((namespace, spec.storage.credentials_secret or ""), None)

    def storage_client(self, namespace: str, spec: LoraResumeSpec) -> Any:
        """For an effective spec (defaults applied): its endpoint, region and credentials."""
        return self.s3_factory(spec.storage.endpoint, spec.storage.region, self._credentials(namespace, spec))

    def storage_uri(self, namespace: str, name: str, spec: LoraResumeSpec, status: LoraResumeStatus) -> str | None:
        """The run's S3 prefix: as recorded in status, else the spec's, else the operator's default."""
        return status.storage_uri or spec.storage.uri or self.defaults.storage_uri_for(namespace, name)

    def effective(self, namespace: str, name: str, spec: LoraResumeSpec, status: LoraResumeStatus) -> LoraResumeSpec:
        return effective_spec(spec, self.defaults, self.storage_uri(namespace, name, spec, status))

    def _source(self, namespace: str, name: str | None) -> SourceState | None:
        """Another LoraResume this one starts from, by its status (None: it names none)."""
        if not name:
            return None
        body = self._get(namespace, name)
        if body is None:
            return SourceState(exists=False)
        try:
            status = LoraResumeStatus.model_validate(body.get("status") or {})
        except ValidationError:
            return SourceState(True)
        return SourceState(
            True,
            status.phase.value,
            status.output_adapter,
            status.storage_uri,
            status.latest_checkpoint,
            status.max_steps,
        )

    # ---- act ----------------------------------------------------------------------------------
    def _write_status(self, body: Mapping[str, Any], status: LoraResumeStatus) -> None:
        """Raises StatusConflict when the resource changed since `body` was read: without a request when
        the watch has delivered a newer version meanwhile (the write would be refused: e.g. kopf's
        finalizer patch during a new resource's first storage read), else on the API server's 409, or its
        404 (the resource is gone: the cached body is dropped, and the fresh read finds it gone)."""
        meta = body["metadata"]
        if _newer_version(self.cache.resource(meta["namespace"], meta["name"]), meta.get("resourceVersion")):
            raise StatusConflict(f"{meta['namespace']}/{meta['name']}", meta.get("resourceVersion"))
        new = {
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "resourceVersion": meta["resourceVersion"],
            },
            "status": status.model_dump(by_alias=True, mode="json", exclude_none=True),
        }
        try:
            written = self.custom.replace_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], new
            )
        except ApiException as exc:
            if exc.status == 404:  # gone since the body was delivered (or seeded): the fresh read says so
                self.cache.drop_resource(meta["namespace"], meta["name"])
            if exc.status in (404, 409):
                raise StatusConflict(f"{meta['namespace']}/{meta['name']}", meta.get("resourceVersion")) from None
            raise
        if isinstance(written, Mapping):
            self.cache.refresh_resource(written)

    def _create_pod(
        self, resource: Resource, spec: LoraResumeSpec, action: CreatePod, view: StorageView, client: Any
    ) -> None:
        inputs = self.download_sizes.inputs(client, spec, action.adapter_uri, view, time.monotonic())
        pod = build_trainer_pod(resource, spec, action, self.defaults, inputs)
        try:
            created = self.core.create_namespaced_pod(resource.namespace, pod)
        except ApiException as exc:
            if exc.status != 409:  # AlreadyExists: this attempt's pod was created before a restart
                raise
            return
        answer = self.core.api_client.sanitize_for_serialization(created)
        if isinstance(answer, Mapping) and isinstance(answer.get("metadata"), Mapping):
            self.cache.refresh_pod(resource.namespace, resource.name, answer)

    # ---- the loop -------------------------------------------------------------------------------
    def reconcile(self, namespace: str, name: str, event_pod: ObservedPod | None = None) -> float | None:
        """Returns seconds until the next reconcile is wanted (None: only on change).

        `event_pod`: the trainer pod whose event asked for this reconcile; if it is not the
        attempt's current pod, it is let go once the status has counted it."""
        with self._locks[(namespace, name)]:
            metrics.RECONCILES.inc()
            cpu = time.thread_time()
            try:
                return self._reconcile_once_more_on_conflict(namespace, name, event_pod)
            finally:
                metrics.RECONCILE_CPU_SECONDS.inc(time.thread_time() - cpu)

    def _reconcile_once_more_on_conflict(
        self, namespace: str, name: str, event_pod: ObservedPod | None
    ) -> float | None:
        started = self.monotonic()
        try:
            return self._reconcile_body(namespace, self._get(namespace, name), event_pod)
        except StatusConflict as conflict:
            log.info("status of %s/%s changed meanwhile; reading it again", namespace, name)
            body = self._newer(namespace, name, conflict.version)
        try:
            return self._reconcile_body(namespace, body, event_pod, read_since=started)
        except StatusConflict:
            log.info("status of %s/%s changed meanwhile again; a later reconcile decides", namespace, name)
            return CONFLICT_RETRY_SECONDS

    def _newer(self, namespace: str, name: str, refused: str | None) -> dict[str, Any] | None:
        """The resource after a refused status write: as the watch delivered it if that is newer than the
        version refused (a new resource's first status write races kopf's finalizer patch, whose event
        is usually in by then), else read from the API server."""
        cached = self.cache.resource(namespace, name)
        if cached is not None and _newer_version(cached, refused):
            return cached
        return self._get(namespace, name, fresh=True)

    def _reconcile_body(
        self,
        namespace: str,
        body: Mapping[str, Any] | None,
        event_pod: ObservedPod | None,
        read_since: float | None = None,
    ) -> float | None:
        """`read_since`: a storage read made since then (by this reconcile's first pass) serves again."""
        if body is None or body["metadata"].get("deletionTimestamp"):
            if event_pod is not None and event_pod.held:  # nothing left to count it in
                if body is None and not (event_pod.terminating or event_pod.ended):
                    # Its resource is gone without the delete handler (only one whose checkpoints go with
                    # it has one: handlers.checkpoints_go_with_it) and the pod outlived the DELETED event's
                    # deletion (created meanwhile, or the operator was down): the pod goes, as the garbage
                    # collector would have it go (which may not know the CRD yet on a new cluster).
                    log.info("pod %s/%s: its LoraResume is gone; deleting the pod", namespace, event_pod.name)
                    self._delete_pod(namespace, event_pod.name)
                self.release_pod(namespace, event_pod.name, event_pod.finalizers)
            return None
        return self._reconcile(body, event_pod, read_since)

    def _reconcile(
        self, body: Mapping[str, Any], event_pod: ObservedPod | None = None, read_since: float | None = None
    ) -> float | None:
        meta = body["metadata"]
        resource = Resource(meta["name"], meta["namespace"], meta["uid"], int(meta.get("generation") or 1))
        status = LoraResumeStatus.model_validate(body.get("status") or {})
        try:
            spec = LoraResumeSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            # only a change of the resource can make it valid
            return self._problem(body, resource, status, Problem(c.INVALID_SPEC, format_validation_error(exc)))
        if len(resource.name) > MAX_LABEL_VALUE:  # the CRD says so too; an older CRD may have let it in
            too_long = (
                f"metadata.name: at most {MAX_LABEL_VALUE} characters (the trainer pods carry it as a label "
                f"value), got {len(resource.name)}"
            )
            return self._problem(body, resource, status, Problem(c.INVALID_SPEC, too_long))
        if finished_phase(body) is not None:
            self.record_phase(resource.namespace, resource.name, status.phase.value)
            if event_pod is not None and event_pod.held and accounted(event_pod, status):
                self.release_pod(resource.namespace, event_pod.name, event_pod.finalizers)
            return None
        written = status
        storage_uri = self.storage_uri(resource.namespace, resource.name, spec, status)
        if storage_uri is None:
            return self._storage_unavailable(
                body,
                resource,
                status,
                ConfigError(
                    "not set, and the operator has no default storage prefix: set it, or install the operator "
                    "with the Helm value storage.uriPrefix",
                    field="spec.storage.uri",
                ),
            )
        spec = effective_spec(spec, self.defaults, storage_uri)
        status = status.model_copy(update={"storage_uri": storage_uri})
        refused = spec_problems(spec, self.defaults.policy, self.defaults.trainer_image)
        # The pod before S3: the trainer makes its last checkpoint durable before it exits, so a pod
        # seen ended has that checkpoint in the listing that follows (read the other way round, a
        # relaunch could resume from the one before).
        pod = self._pod(resource.namespace, status.pod_name)
        if refused and (pod is None or pod.ended):  # a pod admitted under an older policy may finish
            return self._problem(body, resource, status, Problem(c.POLICY_VIOLATION, "; ".join(refused)))
        key = (resource.namespace, resource.name)
        try:
            client = self.storage_client(resource.namespace, spec)
            # No attempt in flight (a launch, e.g. a new resource's first status write refused because kopf's
            # finalizer patch came first): the read this reconcile's first pass made serves again. Not with a
            # pod: one seen ended now must be counted against a read made after it ended.
            idle = status.pod_name is None and read_since is not None
            recent = self.views.read_since(key, read_since) if idle and read_since is not None else None
            if recent is not None:
                view, fresh = recent, True
            elif storage_needed(status, pod):
                step, said = said_durable(status, pod), None
                if counted_on_its_word(status, pod):  # a preemption: no read at all
                    said = self.views.said(key, spec, client, self.monotonic(), step, status.latest_checkpoint)
                elif step is not None and pod is not None:  # an end its trainer reported: no listing
                    said = self.views.read_said(
                        key, spec, client, self.monotonic(), step, adapter_needed=pod.exit_code == 0
                    )
                never_launched = status.attempt == 0 and status.latest_checkpoint is None
                view = said or self.views.read(key, spec, client, self.monotonic(), maybe_empty=never_launched)
                fresh = True
            else:
                # a pod going (deleted, DisruptionTarget) is not read for: its end is, once it has saved, and a
                # read in flight would hold that end's reconcile (a spot reclaim is when S3 is busiest)
                running, pending = (pod.phase == "Running", pod.phase == "Pending") if pod else (False, False)
                recorded = StorageView(status.latest_checkpoint, None, False)  # what the status says is durable
                view, fresh = self.views.view(
                    key,
                    spec,
                    client,
                    self.monotonic(),
                    running=running,
                    pending=pending,
                    going=pod is not None and pod.going,
                    seed=recorded,
                )
        except TrainerError as exc:
            return self._storage_refused(body, resource, written, spec, exc)
        now = self.clock()
        observation = Observation(
            resource=resource,
            spec=spec,
            status=status,
            pod=pod,
            checkpoint=view.checkpoint,
            progress=view.progress,
            adapter_complete=view.adapter_complete,
            now=now,
            source=self._source(resource.namespace, spec.adapter.from_resource if spec.adapter else None),
            # only until the job has checkpoints of its own: then the run it extended is not needed
            predecessor=None if view.checkpoint else self._source(resource.namespace, spec.resume.extend_from),
            other_pod=event_pod if event_pod is not None and event_pod.name != status.pod_name else None,
        )
        plan = decide(observation)
        if not fresh and reads_storage_fresh(status, plan):  # it launches or counts an end: read S3 now
            try:
                view = self.views.read(key, spec, client, self.monotonic())
            except TrainerError as exc:
                return self._storage_refused(body, resource, written, spec, exc)
            observation = dataclasses.replace(
                observation,
                checkpoint=view.checkpoint,
                progress=view.progress,
                adapter_complete=view.adapter_complete,
                predecessor=None if view.checkpoint else self._source(resource.namespace, spec.resume.extend_from),
            )
            plan = decide(observation)
        if plan.status != written:
            self._write_status(body, plan.status)
        self.record_phase(resource.namespace, resource.name, plan.status.phase.value)
        known = {p.name: p for p in (pod, event_pod) if p is not None}
        self._execute(body, resource, spec, written, plan, view, client, known)
        self._observe_metrics(resource, written, plan, view, now)
        return plan.requeue.after_seconds if plan.requeue else None

    def _execute(
        self,
        body: Mapping[str, Any],
        resource: Resource,
        spec: LoraResumeSpec,
        before: LoraResumeStatus,
        plan: Plan,
        view: StorageView,
        client: Any,
        pods: Mapping[str, ObservedPod],
    ) -> None:
        for action in plan.actions:
            if isinstance(action, CreatePod):
                started = self.clock()
                try:
                    self._create_pod(resource, spec, action, view, client)
                except ApiException as exc:
                    if exc.status not in (400, 403, 422):
                        raise
                    self._pod_refused(resource, action, exc)
                    return
                if before.last_attempt_ended != plan.status.last_attempt_ended or before.next_attempt_after:
                    ended = parse_iso(plan.status.last_attempt_ended or before.last_attempt_ended)
                    if ended:
                        metrics.RELAUNCH_SECONDS.observe(max(0.0, (self.clock() - ended).total_seconds()))
                log.info(
                    "%s/%s: created pod %s (%.2f s)",
                    resource.namespace,
                    resource.name,
                    action.name,
                    (self.clock() - started).total_seconds(),
                )
            elif isinstance(action, DeletePod):
                self._delete_pod(resource.namespace, action.name)
            elif isinstance(action, ReleasePod):
                known = pods.get(action.name)
                self._release_after(resource.namespace, action.name, known.finalizers if known else None)
            elif isinstance(action, EmitEvent):
                self.post_event(body, type_=action.type, reason=action.reason, message=action.message)

    def _observe_metrics(
        self, resource: Resource, before: LoraResumeStatus, plan: Plan, view: StorageView, now: datetime
    ) -> None:
        after = plan.status
        ns = resource.namespace
        if after.preemptions > before.preemptions:
            metrics.PREEMPTIONS.labels(ns).inc(after.preemptions - before.preemptions)
        if after.failures > before.failures:
            metrics.FAILURES.labels(ns).inc(after.failures - before.failures)
        if after.disk_evictions > before.disk_evictions:
            metrics.DISK_EVICTIONS.labels(ns).inc(after.disk_evictions - before.disk_evictions)
        if after.lost_steps > before.lost_steps:
            metrics.LOST_STEPS.labels(ns).inc(after.lost_steps - before.lost_steps)
        for phase, seconds in startup_to_observe(before.last_startup, after.last_startup):
            metrics.STARTUP_SECONDS.labels(phase).observe(seconds)
        if view.checkpoint_created_at:
            try:
                created = datetime.fromisoformat(view.checkpoint_created_at.replace("Z", "+00:00"))
                metrics.CHECKPOINT_AGE.labels(ns, resource.name).set(max(0.0, (now - created).total_seconds()))
            except ValueError:
                pass

    def _problem(
        self, body: Mapping[str, Any], resource: Resource, status: LoraResumeStatus, problem: Problem
    ) -> float | None:
        """No attempt decided: the plan for the problem (decide.decide_problem), its status written once."""
        plan = decide_problem(resource, status, problem, self.clock())
        if plan.status != status:
            self._write_status(body, plan.status)
        for action in plan.actions:
            if isinstance(action, EmitEvent):
                self.post_event(body, type_=action.type, reason=action.reason, message=action.message)
        self.record_phase(resource.namespace, resource.name, plan.status.phase.value)
        return plan.requeue.after_seconds if plan.requeue else None

    def _storage_refused(
        self,
        body: Mapping[str, Any],
        resource: Resource,
        status: LoraResumeStatus,
        spec: LoraResumeSpec,
        exc: TrainerError,
    ) -> float | None:
        """S3 could not be read with the credentials in hand: read the Secret again next time (a rotated
        key is picked up at once), and wait, saying why."""
        self.forget_credentials(resource.namespace, spec)
        return self._storage_unavailable(body, resource, status, exc)

    def _storage_unavailable(
        self, body: Mapping[str, Any], resource: Resource, status: LoraResumeStatus, exc: TrainerError
    ) -> float | None:
        """No decision without S3 (checkpoints, progress): say why, keep the budgets, retry later.

        A missing credentials Secret lands here too: with GitOps it often arrives a moment
        after the resource, so this waits instead of failing.
        """
        metrics.RECONCILE_ERRORS.labels("storage").inc()
        log.warning("%s/%s: cannot read storage: %s", resource.namespace, resource.name, exc)
        return self._problem(body, resource, status, Problem(c.STORAGE_UNAVAILABLE, str(exc)))

    def _pod_refused(self, resource: Resource, action: CreatePod, exc: ApiException) -> None:
        """The API server refused the attempt's pod. Invalid (400/422): the spec feeds it something
        a pod cannot carry; Failed, with the server's field-level message. Forbidden (403, e.g. a
        ResourceQuota): said in the status; the pod is created again on later reconciles."""
        message = f"the API server refused pod {action.name} ({exc.status} {exc.reason}): {_api_message(exc)}"
        body = self._get(resource.namespace, resource.name)  # its status was written just now
        if body is None:
            return
        status = LoraResumeStatus.model_validate(body.get("status") or {})
        if exc.status == 403:
            metrics.RECONCILE_ERRORS.labels("api").inc()
            log.warning("%s/%s: %s", resource.namespace, resource.name, message)
        kind = POD_FORBIDDEN if exc.status == 403 else c.INVALID_SPEC
        self._problem(body, resource, status, Problem(kind, message))

    def _delete_pod(self, namespace: str, name: str) -> None:
        """An attempt's pod that never started (no spot capacity, an image that cannot be pulled)."""
        try:
            self.core.delete_namespaced_pod(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_resource(self, namespace: str, name: str, spec: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        """The resource is being deleted: its pods go and are let go, what this process kept for it is
        dropped, and what decide.deletion_actions says goes with it goes (its checkpoints, if asked)."""
        self.delete_pods(namespace, name)
        self.forget(namespace, name)
        try:
            parsed = self.effective(
                namespace, name, LoraResumeSpec.model_validate(spec), LoraResumeStatus.model_validate(status)
            )
        except ValueError:  # an invalid spec never stored anything
            return
        for action in deletion_actions(parsed):
            if isinstance(action, DeleteCheckpoints):
                store = CheckpointStore(self.storage_client(namespace, parsed), S3Uri.parse(action.uri))
                for listing in store.list_checkpoints():
                    store.delete_checkpoint(listing.step)
                store.delete_compile_caches()
                log.info(
                    "%s/%s: deleted checkpoints and compile caches under %s (adapter kept)", namespace, name, action.uri
                )

    def delete_pods(self, namespace: str, name: str) -> None:
        """The resource is going: its pods go (SIGTERM, the trainer checkpoints) and are let go."""
        selector = f"{LABEL_RESOURCE}={name}"
        self.core.delete_collection_namespaced_pod(namespace, label_selector=selector)
        for pod in self._list_pods(namespace, label_selector=selector):
            finalizers = tuple(pod["metadata"].get("finalizers") or ())
            if ACCOUNTING_FINALIZER in finalizers:
                self.release_pod(namespace, pod["metadata"]["name"], finalizers)

    def release_pod(self, namespace: str, name: str, finalizers: tuple[str, ...] | None = None) -> None:
        """Remove the accounting finalizer (a JSON patch guarded by a test of the entry, so another
        controller's finalizers are never touched); a pod already gone is released. `finalizers`: as
        the watch delivered them (no GET; if they changed since, the test refuses the patch and the
        pod's next event retries)."""
        if finalizers is None:
            found = self._pod(namespace, name)
            if found is None:
                return
            finalizers = found.finalizers
        if ACCOUNTING_FINALIZER not in finalizers:
            return
        at = f"/metadata/finalizers/{finalizers.index(ACCOUNTING_FINALIZER)}"
        patch = [{"op": "test", "path": at, "value": ACCOUNTING_FINALIZER}, {"op": "remove", "path": at}]
        try:
            self.core.patch_namespaced_pod(name, namespace, patch)
        except ApiException as exc:
            if exc.status == 404:
                return
            if exc.status == 422:  # its finalizers changed meanwhile: the pod's next event retries
                log.info("pod %s/%s: finalizers changed meanwhile; releasing it later", namespace, name)
                return
            raise
        log.info("pod %s/%s: counted, accounting finalizer removed", namespace, name)

    def _release_after(self, namespace: str, name: str, finalizers: tuple[str, ...] | None) -> None:
        """release_pod, for a pod the status written has counted: on `self.events` when the operator gave one
        (nothing waits on it; one that fails is let go on the pod's next event, as a refused patch is)."""
        if self.events is None:
            self.release_pod(namespace, name, finalizers)
        else:
            self.events.submit(self._release_logged, namespace, name, finalizers)

    def _release_logged(self, namespace: str, name: str, finalizers: tuple[str, ...] | None) -> None:
        try:
            self.release_pod(namespace, name, finalizers)
        except ApiException as exc:
            log.warning("pod %s/%s not let go (%s); its next event retries", namespace, name, exc.status)
        except Exception:  # on the pool nobody else would see it
            log.exception("pod %s/%s not let go; its next event retries", namespace, name)

    def post_event(self, body: Mapping[str, Any], *, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the resource, through the API client: works from any thread (kopf's
        own poster needs its context variables), and a failure to post never stops a reconcile. Posted
        on `self.events` when the operator gave one (the status already says what happened; the Event
        follows it by at most the pool's queue)."""
        meta = body["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": body["apiVersion"],
                "kind": body["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "loraresume-operator"},
            "reportingComponent": "loraresume-operator",
            "reportingInstance": "loraresume-operator",
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "count": 1,
        }
        if self.events is None:
            self._create_event(event)
        else:
            self.events.submit(self._create_event, event)

    def _create_event(self, event: dict[str, Any]) -> None:
        where = event["involvedObject"]
        try:
            self.core.create_namespaced_event(where["namespace"], event)
        except ApiException as exc:
            log.warning(
                "could not post event %s on %s/%s: %s", event["reason"], where["namespace"], where["name"], exc.status
            )
        except Exception:  # on the events pool nobody else would see it
            log.exception("could not post event %s on %s/%s", event["reason"], where["namespace"], where["name"])

    def is_terminal(self, namespace: str, name: str) -> bool:
        return self._phases.get((namespace, name)) in (Phase.SUCCEEDED.value, Phase.FAILED.value)

    def forget(self, namespace: str, name: str) -> None:
        """The resource is gone: drop what this process kept for it (phase count, metrics, lock).

        Under the resource's lock: a reconcile in flight finishes first, so it cannot count the
        resource again afterwards (a later one finds it gone and records nothing)."""
        with self._locks[(namespace, name)]:
            self.record_phase(namespace, name, None)
            try:
                metrics.CHECKPOINT_AGE.remove(namespace, name)
            except KeyError:
                pass
            self.views.forget((namespace, name))
        self._locks.pop((namespace, name), None)

    def record_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Resources by phase, from what this process reconciled (no cluster-wide list needed). Counted as
        phases change (every reconcile records one: recounting all resources each time was O(N))."""
        key = (namespace, name)
        with self._phases_lock:
            before = self._phases.pop(key, None) if phase is None else self._phases.get(key)
            if phase is not None:
                self._phases[key] = phase
            if before == phase and self._counted:
                return
            if before is not None:
                self._phase_counts[before] -= 1
            if phase is not None:
                self._phase_counts[phase] += 1
            changed = {p.value for p in Phase} if not self._counted else {v for v in (before, phase) if v is not None}
            self._counted = True
            for value in changed:  # under the lock: two threads' sets cannot land out of order
                metrics.RESOURCES_BY_PHASE.labels(value).set(self._phase_counts[value])

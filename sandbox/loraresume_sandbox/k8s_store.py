"""The emulated cluster's state: objects, resourceVersions, watches, deletion and garbage collection.

Everything that makes an operator behave as on a real cluster lives here: a global
resourceVersion counter (on objects, lists and watch events, with a bounded history so
a watch can resume from a version or be told 410 Gone), uids, generation bumped only by
spec changes, the status subresource split, finalizers and deletionTimestamp, graceful
deletion of scheduled pods (the kubelet confirms with a zero-grace delete), and
ownerReference garbage collection. It is thread-safe: the HTTP server, tests and the
simulated kubelet call it from different threads.
"""

from __future__ import annotations

import base64
import copy
import datetime
import random
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import k8s_patch
from .k8s_errors import ApiError, already_exists, bad_request, conflict, invalid, not_found, unsupported_media_type
from .k8s_resources import CRDS_PLURAL, Registry, ResourceType, types_from_crd
from .k8s_selectors import Matcher

Object = dict[str, Any]
# (event type, object as stored) -> None; called with the store lock held: must not block.
Deliver = Callable[[str, Object], None]
# (event type, group_resource such as "pods" or "loraresumes.loraresume.dev", object copy) -> None
Listener = Callable[[str, str, Object], None]

_USER_META = ("labels", "annotations", "ownerReferences", "finalizers")
_KEPT_META = ("name", "generateName", "namespace", "uid", "creationTimestamp", "generation",
              "deletionTimestamp", "deletionGracePeriodSeconds")  # fmt: skip
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_PROTECTED_NAMESPACES = ("default", "kube-system", "kube-public")


def timestamp(offset_seconds: float = 0) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset_seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Change:
    rv: int
    type: str  # ADDED, MODIFIED or DELETED
    group_resource: str
    namespace: str | None
    obj: Object  # never mutated after the change is recorded
    old: Object | None


@dataclass
class _Watch:
    group_resource: str
    namespace: str | None
    match: Matcher
    deliver: Deliver

    def route(self, change: Change) -> tuple[str, Object] | None:
        """The event this watcher sees, selector transitions included (MODIFIED out of scope: DELETED)."""
        if change.group_resource != self.group_resource:
            return None
        if self.namespace is not None and change.namespace != self.namespace:
            return None
        now = self.match(change.obj)
        before = change.old is not None and self.match(change.old)
        if change.type == "MODIFIED":
            if now and before:
                return "MODIFIED", change.obj
            if now:
                return "ADDED", change.obj
            if before:
                return "DELETED", change.obj
            return None
        return (change.type, change.obj) if now else None


def _meta(obj: Object) -> dict[str, Any]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = obj["metadata"] = {}
    return meta


def _content(rt: ResourceType, obj: Object) -> Object:
    """What `generation` tracks: everything but metadata (and status, when it is a subresource)."""
    skipped = {"metadata", "apiVersion", "kind"} | ({"status"} if rt.has_status else set())
    return {k: v for k, v in obj.items() if k not in skipped}


def _without_rv(obj: Object) -> Object:
    out = dict(obj)
    out["metadata"] = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "resourceVersion"}
    return out


class Store:
    """In-memory objects of every resource type, with watch history; see the module doc."""

    def __init__(self, registry: Registry, history_size: int = 10_000) -> None:
        self.registry = registry
        self._lock = threading.RLock()
        self._rv = 0
        self._floor = 0  # watches from versions below this get 410 Gone
        self._objects: dict[str, dict[tuple[str | None, str], Object]] = {}
        self._uids: dict[str, tuple[str, str | None, str]] = {}
        self._history: deque[Change] = deque(maxlen=history_size)
        self._watches: list[_Watch] = []
        self._listeners: list[Listener] = []
        self._orphaning: set[str] = set()
        namespaces = self.registry.lookup("", "v1", "namespaces")
        assert namespaces is not None
        for name in _PROTECTED_NAMESPACES:
            self.create(namespaces, None, {"metadata": {"name": name}})

    # -- reading ------------------------------------------------------------------------
    @property
    def resource_version(self) -> str:
        with self._lock:
            return str(self._rv)

    @staticmethod
    def present(rt: ResourceType, obj: Object) -> Object:
        """A copy of a stored object as served in rt's version."""
        out = copy.deepcopy(obj)
        out["apiVersion"] = rt.api_version
        out["kind"] = rt.kind
        return out

    def _stored(self, rt: ResourceType, namespace: str | None, name: str) -> Object:
        found = self._objects.get(rt.group_resource, {}).get((namespace if rt.namespaced else None, name))
        if found is None:
            raise not_found(rt.plural, rt.group, name)
        return found

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> Object:
        with self._lock:
            return self.present(rt, self._stored(rt, namespace, name))

    def list_objects(self, rt: ResourceType, namespace: str | None, match: Matcher) -> tuple[list[Object], str]:
        with self._lock:
            items = [
                self.present(rt, obj)
                for (ns, _), obj in sorted(
                    self._objects.get(rt.group_resource, {}).items(), key=lambda kv: (kv[0][0] or "", kv[0][1])
                )
                if (namespace is None or ns == namespace) and match(obj)
            ]
            return items, str(self._rv)

    # -- change recording -----------------------------------------------------------------
    def _commit(self, rt: ResourceType, kind: str, obj: Object, old: Object | None) -> Object:
        self._rv += 1
        _meta(obj)["resourceVersion"] = str(self._rv)
        meta = obj["metadata"]
        key = (meta.get("namespace") if rt.namespaced else None, meta["name"])
        bucket = self._objects.setdefault(rt.group_resource, {})
        if kind == "DELETED":
            bucket.pop(key, None)
            self._uids.pop(meta["uid"], None)
        else:
            bucket[key] = obj
            self._uids[meta["uid"]] = (rt.group_resource, key[0], key[1])
        change = Change(self._rv, kind, rt.group_resource, key[0], obj, old)
        if len(self._history) == self._history.maxlen:
            self._floor = self._history[0].rv
        self._history.append(change)
        for watch in list(self._watches):
            routed = watch.route(change)
            if routed is not None:
                watch.deliver(*routed)
        for listener in list(self._listeners):
            listener(kind, rt.group_resource, copy.deepcopy(obj))
        return obj

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call listener on every change (under the store lock: queue work, do not block)."""
        with self._lock:
            self._listeners.append(listener)
        return lambda: self._unsubscribe_listener(listener)

    def _unsubscribe_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def watch(
        self,
        rt: ResourceType,
        namespace: str | None,
        match: Matcher,
        since: str | None,
        deliver: Deliver,
        *,
        send_initial: bool = False,
    ) -> Callable[[], None]:
        """Replay (existing objects, or history after `since`), then stream changes to deliver."""
        watch = _Watch(rt.group_resource, namespace if rt.namespaced else None, match, deliver)
        with self._lock:
            if since in (None, "", "0") or send_initial:
                for (ns, _), obj in sorted(
                    self._objects.get(rt.group_resource, {}).items(), key=lambda kv: (kv[0][0] or "", kv[0][1])
                ):
                    if (watch.namespace is None or ns == watch.namespace) and match(obj):
                        deliver("ADDED", obj)
                if send_initial:
                    deliver(
                        "BOOKMARK",
                        {
                            "apiVersion": rt.api_version,
                            "kind": rt.kind,
                            "metadata": {
                                "resourceVersion": str(self._rv),
                                "annotations": {"k8s.io/initial-events-end": "true"},
                            },
                        },
                    )
            else:
                try:
                    start = int(since)
                except ValueError as exc:
                    raise bad_request(f"invalid resource version: {since!r}") from exc
                if start < self._floor:
                    deliver(
                        "ERROR", ApiError(410, "Expired", f"too old resource version: {start} ({self._floor})").status()
                    )
                    return lambda: None
                for change in self._history:
                    if change.rv > start:
                        routed = watch.route(change)
                        if routed is not None:
                            deliver(*routed)
            self._watches.append(watch)
        return lambda: self._unwatch(watch)

    def _unwatch(self, watch: _Watch) -> None:
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)

    # -- creation -------------------------------------------------------------------------
    def _check_name(self, rt: ResourceType, name: str) -> None:
        if rt.plural == "namespaces" and not rt.group:
            ok, what, rx = (len(name) <= 63 and bool(_LABEL.match(name)), "RFC 1123 label", _LABEL.pattern)
        else:
            ok, what, rx = (len(name) <= 253 and bool(_SUBDOMAIN.match(name)), "RFC 1123 subdomain", _SUBDOMAIN.pattern)
        if not ok:
            detail = (
                f'Invalid value: "{name}": a lowercase {what} must consist of lower case alphanumeric characters, '
                f"'-'{' or ' + repr('.') if 'subdomain' in what else ''}, and must start and end with an alphanumeric "
                f"character (regex used for validation is '{rx.strip('^$')}')"
            )
            raise invalid(rt.kind, rt.group, name, [("FieldValueInvalid", "metadata.name", detail)])

    def _ensure_namespace(self, namespace: str, rt: ResourceType, name: str) -> None:
        namespaces = self.registry.lookup("", "v1", "namespaces")
        assert namespaces is not None
        found = self._objects.get("namespaces", {}).get((None, namespace))
        if found is None:
            self.create(namespaces, None, {"metadata": {"name": namespace}})
        elif _meta(found).get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f'{rt.plural} "{name}" is forbidden: unable to create new content in namespace {namespace} '
                "because it is being terminated",
            )

    def create(
        self,
        rt: ResourceType,
        namespace: str | None,
        body: Object,
        *,
        field_validation: str = "Warn",
        dry_run: bool = False,
    ) -> tuple[Object, list[str]]:
        """POST: a new object with uid, creationTimestamp, generation 1 and the next resourceVersion."""
        if not isinstance(body, dict):
            raise bad_request("the body of a create must be a JSON object")
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        given = _meta(obj)
        meta: dict[str, Any] = {k: given[k] for k in (*_USER_META, "name", "generateName") if given.get(k) is not None}
        if rt.namespaced:
            body_ns = given.get("namespace")
            if namespace and body_ns and body_ns != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace or body_ns or "default"
        obj["metadata"] = meta
        with self._lock:
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise invalid(
                        rt.kind,
                        rt.group,
                        "",
                        [("FieldValueRequired", "metadata.name", "Required value: name or generateName is required")],
                    )
                while True:
                    meta["name"] = meta["generateName"] + "".join(random.choice(_NAME_CHARS) for _ in range(5))
                    if (meta.get("namespace"), meta["name"]) not in self._objects.get(rt.group_resource, {}):
                        break
            name = meta["name"]
            self._check_name(rt, name)
            if (meta.get("namespace"), name) in self._objects.get(rt.group_resource, {}):
                raise already_exists(rt.plural, rt.group, name)
            if rt.has_status and rt.crd_name:
                obj.pop("status", None)  # the status subresource owns it
            self._prepare(rt, obj, None)
            warnings = (
                rt.schema.admit(obj, None, name=name, field_validation=field_validation, version=rt.version)
                if rt.schema
                else []
            )
            if rt.namespaced and not dry_run:
                self._ensure_namespace(meta["namespace"], rt, name)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = timestamp()
            meta["generation"] = 1
            if dry_run:
                meta["resourceVersion"] = str(self._rv)
                return self.present(rt, obj), warnings
            self._commit(rt, "ADDED", obj, None)
            if rt.plural == CRDS_PLURAL and not rt.crd_name:
                self.registry.register_crd(obj)
            return self.present(rt, obj), warnings

    def _prepare(self, rt: ResourceType, obj: Object, old: Object | None) -> None:
        """Kind-specific server-side behaviour of built-in kinds (defaults, derived fields, checks)."""
        if rt.crd_name or rt.group not in ("", "apiextensions.k8s.io"):
            return
        name = obj["metadata"].get("name", "")
        if rt.plural == "secrets":
            string_data = obj.pop("stringData", None) or {}
            data = obj.setdefault("data", {}) or {}
            for key, value in string_data.items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data
            obj.setdefault("type", "Opaque")
        elif rt.plural == "namespaces" and old is None:
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
        elif rt.plural == "pods" and old is None:
            spec = obj.get("spec")
            if not isinstance(spec, dict) or not spec.get("containers"):
                raise invalid("Pod", "", name, [("FieldValueRequired", "spec.containers", "Required value")])
            causes = []
            for i, container in enumerate(spec["containers"]):
                for field in ("name", "image"):
                    if not container.get(field):
                        causes.append(("FieldValueRequired", f"spec.containers[{i}].{field}", "Required value"))
                image = str(container.get("image", ""))
                pull = "Always" if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1] else "IfNotPresent"
                container.setdefault("imagePullPolicy", pull)
                container.setdefault("terminationMessagePath", "/dev/termination-log")
                container.setdefault("terminationMessagePolicy", "File")
            if causes:
                raise invalid("Pod", "", name, causes)
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            spec.setdefault("dnsPolicy", "ClusterFirst")
            spec.setdefault("schedulerName", "default-scheduler")
            spec.setdefault("enableServiceLinks", True)
            spec.setdefault("priority", 0)
            obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        elif rt.plural == CRDS_PLURAL:
            types_from_crd(obj)  # raises ApiError when the sandbox cannot serve it
            names = obj["spec"]["names"]
            if old is not None:
                obj["status"] = {**copy.deepcopy(old.get("status") or {}), "acceptedNames": copy.deepcopy(names)}
                return
            obj["status"] = {
                "acceptedNames": copy.deepcopy(names),
                "conditions": [
                    {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": timestamp()}
                    for t, r, m in (
                        ("NamesAccepted", "NoConflicts", "no conflicts found"),
                        ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                    )
                ],
                "storedVersions": [v["name"] for v in obj["spec"].get("versions", []) if v.get("storage")],
            }

    # -- updates --------------------------------------------------------------------------
    def _update(
        self,
        rt: ResourceType,
        current: Object,
        new: Object,
        *,
        subresource: str | None,
        field_validation: str,
        dry_run: bool,
    ) -> tuple[Object, list[str]]:
        if subresource == "status":
            result = copy.deepcopy(current)
            if new.get("status") is not None:
                result["status"] = copy.deepcopy(new["status"])
            else:
                result.pop("status", None)
        else:
            result = copy.deepcopy(new)
            given: dict[str, Any] = result["metadata"] if isinstance(result.get("metadata"), dict) else {}
            meta = {k: given[k] for k in _USER_META if given.get(k) is not None}
            for key in _KEPT_META:
                if key in current["metadata"]:
                    meta[key] = current["metadata"][key]
            result["metadata"] = meta
            if rt.has_status:
                if "status" in current:
                    result["status"] = copy.deepcopy(current["status"])
                else:
                    result.pop("status", None)
            self._prepare(rt, result, current)
        result["apiVersion"], result["kind"] = rt.api_version, rt.kind
        name = current["metadata"]["name"]
        warnings: list[str] = []
        if rt.schema is not None:
            warnings = rt.schema.admit(
                result, current, name=name, field_validation=field_validation, version=rt.version
            )
        if rt.plural == CRDS_PLURAL and not rt.crd_name and subresource is None:
            types_from_crd(result)
        if _without_rv(result) == _without_rv({**current, "apiVersion": rt.api_version, "kind": rt.kind}):
            return self.present(rt, current), warnings  # a no-op write changes nothing, not even the version
        if _content(rt, result) != _content(rt, current):
            result["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
        if dry_run:
            return self.present(rt, result), warnings
        self._commit(rt, "MODIFIED", result, current)
        if rt.plural == CRDS_PLURAL and not rt.crd_name:
            self.registry.register_crd(result)
        meta = result["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not self._awaiting_kubelet(rt, result):
            self._finalize(rt, result)
        return self.present(rt, result), warnings

    def replace(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        body: Object,
        *,
        subresource: str | None = None,
        field_validation: str = "Warn",
        dry_run: bool = False,
    ) -> tuple[Object, list[str]]:
        """PUT: the whole object; 409 Conflict when metadata.resourceVersion is stale."""
        if not isinstance(body, dict):
            raise bad_request("the body of an update must be a JSON object")
        given = body.get("metadata") or {}
        if given.get("name") and given["name"] != name:
            raise bad_request(f"the name of the object ({given['name']}) does not match the name on the URL ({name})")
        with self._lock:
            current = self._stored(rt, namespace, name)
            wanted_rv = given.get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                raise conflict(rt.plural, rt.group, name)
            return self._update(
                rt, current, body, subresource=subresource, field_validation=field_validation, dry_run=dry_run
            )

    def patch(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        patch_type: str,
        body: Any,
        *,
        subresource: str | None = None,
        field_validation: str = "Warn",
        dry_run: bool = False,
    ) -> tuple[Object, list[str]]:
        """PATCH with patch_type 'merge', 'strategic', 'json' or 'apply' (apply approximated by merge)."""
        with self._lock:
            if patch_type == "apply" and (namespace if rt.namespaced else None, name) not in self._objects.get(
                rt.group_resource, {}
            ):
                body = dict(body or {})
                body.setdefault("metadata", {})["name"] = name
                return self.create(rt, namespace, body, field_validation=field_validation, dry_run=dry_run)
            current = self._stored(rt, namespace, name)
            base = self.present(rt, current)
            if patch_type == "json":
                patched = k8s_patch.json_patch(base, body)
            elif patch_type == "strategic":
                if rt.crd_name:
                    raise unsupported_media_type(
                        ["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"]
                    )
                patched = k8s_patch.strategic_merge_patch(base, body)
            elif patch_type in ("merge", "apply"):
                if not isinstance(body, dict):
                    raise bad_request("a merge patch must be a JSON object")
                patched = k8s_patch.merge_patch(base, body)
            else:
                raise bad_request(f"unknown patch type {patch_type!r}")
            if not isinstance(patched, dict):
                raise bad_request("the patched object is not a JSON object")
            patched_rv = (patched.get("metadata") or {}).get("resourceVersion")
            if patched_rv and patched_rv != current["metadata"]["resourceVersion"]:
                raise conflict(rt.plural, rt.group, name)
            return self._update(
                rt, current, patched, subresource=subresource, field_validation=field_validation, dry_run=dry_run
            )

    # -- deletion -------------------------------------------------------------------------
    def _awaiting_kubelet(self, rt: ResourceType, obj: Object) -> bool:
        """A scheduled, running pod in graceful deletion stays until the kubelet confirms."""
        if rt.group_resource != "pods":
            return False
        meta = obj["metadata"]
        return bool(meta.get("deletionTimestamp")) and int(meta.get("deletionGracePeriodSeconds") or 0) > 0

    def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        *,
        grace_period: int | None = None,
        propagation: str | None = None,
        preconditions: dict[str, Any] | None = None,
        dry_run: bool = False,
    ) -> Object:
        """DELETE: finalizers hold the object (deletionTimestamp set); otherwise it goes, with its dependents."""
        with self._lock:
            current = self._stored(rt, namespace, name)
            meta = current["metadata"]
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != meta["uid"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {meta['uid']}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
                raise conflict(rt.plural, rt.group, name)
            if dry_run:
                return self.present(rt, current)
            if propagation == "Orphan":
                self._orphaning.add(meta["uid"])
            if rt.group_resource == "namespaces":
                return self._delete_namespace(rt, current)
            if rt.group_resource == "pods":
                graceful = self._graceful_pod_delete(rt, current, grace_period)
                if graceful is not None:
                    return graceful
            if meta.get("finalizers"):
                if meta.get("deletionTimestamp") and not int(meta.get("deletionGracePeriodSeconds") or 0):
                    return self.present(rt, current)
                marked = copy.deepcopy(current)
                marked["metadata"].setdefault("deletionTimestamp", timestamp())
                marked["metadata"]["deletionGracePeriodSeconds"] = 0
                self._commit(rt, "MODIFIED", marked, current)
                return self.present(rt, marked)
            return self.present(rt, self._finalize(rt, current))

    def _graceful_pod_delete(self, rt: ResourceType, pod: Object, grace_period: int | None) -> Object | None:
        spec, status = pod.get("spec") or {}, pod.get("status") or {}
        if not spec.get("nodeName") or status.get("phase") in ("Succeeded", "Failed"):
            return None  # unscheduled or finished pods go at once, as on the API server
        grace = int(grace_period if grace_period is not None else spec.get("terminationGracePeriodSeconds", 30))
        if grace <= 0:
            return None
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") and int(meta.get("deletionGracePeriodSeconds") or 0) <= grace:
            return self.present(rt, pod)
        marked = copy.deepcopy(pod)
        marked["metadata"]["deletionTimestamp"] = timestamp(grace)
        marked["metadata"]["deletionGracePeriodSeconds"] = grace
        self._commit(rt, "MODIFIED", marked, pod)
        return self.present(rt, marked)

    def _delete_namespace(self, rt: ResourceType, namespace: Object) -> Object:
        name = namespace["metadata"]["name"]
        if name in _PROTECTED_NAMESPACES:
            raise ApiError(403, "Forbidden", f'namespaces "{name}" is forbidden: this namespace may not be deleted')
        if not namespace["metadata"].get("deletionTimestamp"):
            marked = copy.deepcopy(namespace)
            marked["metadata"]["deletionTimestamp"] = timestamp()
            marked["metadata"]["deletionGracePeriodSeconds"] = 0
            marked["status"] = {"phase": "Terminating"}
            namespace = self._commit(rt, "MODIFIED", marked, namespace)
        for group_resource, bucket in list(self._objects.items()):
            member_rt = self.registry.preferred(group_resource)
            for ns, obj_name in list(bucket):
                if ns == name and member_rt is not None and (ns, obj_name) in bucket:
                    self.delete(member_rt, ns, obj_name)
        self._finish_namespace(name)
        return self.present(rt, namespace)

    def _finish_namespace(self, name: str | None) -> None:
        if name is None:
            return
        namespace = self._objects.get("namespaces", {}).get((None, name))
        if namespace is None or not namespace["metadata"].get("deletionTimestamp"):
            return
        if any(ns == name for bucket in self._objects.values() for (ns, _) in bucket):
            return
        rt = self.registry.lookup("", "v1", "namespaces")
        assert rt is not None
        self._commit(rt, "DELETED", copy.deepcopy(namespace), namespace)

    def _finalize(self, rt: ResourceType, obj: Object) -> Object:
        """Remove the object for good, then collect what it owned."""
        gone = copy.deepcopy(obj)
        self._commit(rt, "DELETED", gone, obj)
        uid = gone["metadata"]["uid"]
        if rt.plural == CRDS_PLURAL and not rt.crd_name:
            served = self.registry.preferred(f"{gone['spec']['names']['plural']}.{gone['spec']['group']}")
            if served is not None:
                for key, member in list(self._objects.get(served.group_resource, {}).items()):
                    self._commit(served, "DELETED", copy.deepcopy(member), member)
            self.registry.unregister_crd(gone["metadata"]["name"])
        self._collect_garbage(uid)
        if rt.namespaced:
            self._finish_namespace(gone["metadata"].get("namespace"))
        return gone

    def _collect_garbage(self, owner_uid: str) -> None:
        orphan = owner_uid in self._orphaning
        self._orphaning.discard(owner_uid)
        for group_resource, bucket in list(self._objects.items()):
            dependent_rt = self.registry.preferred(group_resource)
            if dependent_rt is None:
                continue
            for key in list(bucket):
                obj = bucket.get(key)
                if obj is None:
                    continue
                refs = obj["metadata"].get("ownerReferences") or []
                if not any(ref.get("uid") == owner_uid for ref in refs):
                    continue
                if orphan:
                    kept = copy.deepcopy(obj)
                    kept["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != owner_uid]
                    if not kept["metadata"]["ownerReferences"]:
                        del kept["metadata"]["ownerReferences"]
                    self._commit(dependent_rt, "MODIFIED", kept, obj)
                elif not any(ref.get("uid") in self._uids for ref in refs):
                    self.delete(dependent_rt, key[0], key[1], propagation="Background")

    def delete_collection(
        self, rt: ResourceType, namespace: str | None, match: Matcher, **options: Any
    ) -> list[Object]:
        with self._lock:
            names = [
                (ns, name)
                for (ns, name), obj in self._objects.get(rt.group_resource, {}).items()
                if (namespace is None or ns == namespace) and match(obj)
            ]
            return [self.delete(rt, ns, name, **options) for ns, name in names]

"""A small REST client for the sandbox and the tests: plain HTTPS calls to a real kube-apiserver.

The operator uses the official client through kopf; the tools around it (node agent, sandbox,
tests, benchmarks) need only CRUD, status, eviction, server-side apply and watch, with the
API server's own error messages, so they call the REST API directly: nothing is interpreted
or emulated here. Thread-safe (one urllib3 pool).

    kube = KubeClient.from_kubeconfig(path)
    kube.create("secrets", {"metadata": {"name": "s3"}, "stringData": {...}}, "default")
    kube.get("pods", "default", "bot-attempt-1")          # None when absent
    for event in kube.watch("pods", "default", timeout_seconds=30): ...
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import urllib3
import yaml

Object = dict[str, Any]
RETRIES_429 = 10
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


_TYPES = [
    ResourceType("", "v1", "pods", "Pod", True),
    ResourceType("", "v1", "secrets", "Secret", True),
    ResourceType("", "v1", "configmaps", "ConfigMap", True),
    ResourceType("", "v1", "events", "Event", True),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True),
    ResourceType("", "v1", "services", "Service", True),
    ResourceType("", "v1", "namespaces", "Namespace", False),
    ResourceType("", "v1", "nodes", "Node", False),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True),
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    ResourceType("apps", "v1", "deployments", "Deployment", True),
    ResourceType("loraresume.dev", "v1alpha1", "loraresumes", "LoraResume", True),
]
RESOURCES: dict[str, ResourceType] = {t.plural: t for t in _TYPES}
KINDS: dict[tuple[str, str], ResourceType] = {(t.api_version, t.kind): t for t in _TYPES}


class ApiError(Exception):
    """A failed request, with the API server's status code, reason and message."""

    def __init__(self, code: int, reason: str, message: str, body: Object | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message, self.body = code, reason, message, body or {}

    @property
    def details(self) -> Object:
        return dict(self.body.get("details") or {})


class KubeClient:
    """HTTPS to one API server, as one user (client certificate or bearer token)."""

    def __init__(
        self,
        server: str,
        ca_file: str | Path,
        *,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.server = server.rstrip("/")
        context = ssl.create_default_context(cafile=str(ca_file))
        if cert_file:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = timeout
        self._pool = urllib3.PoolManager(ssl_context=context, maxsize=16, retries=False)
        self.last_warnings: list[str] = []  # Warning headers of the latest request (not thread-safe)
        self._streams: set[urllib3.BaseHTTPResponse] = set()  # open watches, ended by close()
        self._streams_lock = threading.Lock()

    @classmethod
    def from_kubeconfig(cls, path: str | Path) -> KubeClient:
        """The current context of a kubeconfig with file references or embedded data."""
        config = yaml.safe_load(Path(path).read_text())
        context_name = config.get("current-context") or config["contexts"][0]["name"]
        context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        holder = Path(tempfile.mkdtemp(prefix="kubeclient-"))

        def file_of(entry: dict[str, Any], key: str) -> str | None:
            if entry.get(key):
                return str(entry[key])
            if entry.get(f"{key}-data"):
                out = holder / key
                out.write_bytes(base64.b64decode(entry[f"{key}-data"]))
                return str(out)
            return None

        return cls(
            cluster["server"],
            file_of(cluster, "certificate-authority") or "",
            cert_file=file_of(user, "client-certificate"),
            key_file=file_of(user, "client-key"),
            token=user.get("token"),
        )

    # -- raw requests ---------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Object:
        url = self.server + path + (f"?{urlencode(params)}" if params else "")
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        for attempt in range(RETRIES_429):
            response = self._pool.request(method, url, body=data, headers=headers, timeout=self._timeout)
            if response.status != 429 or attempt == RETRIES_429 - 1:
                break
            # As client-go does: the server asks to come back (a CRD's storage starting, API priority
            # and fairness queues full), after Retry-After seconds.
            time.sleep(min(float(response.headers.get("Retry-After") or 1), 5))
        self.last_warnings = list(response.headers.getlist("Warning"))
        return self._decode(response)

    @staticmethod
    def _decode(response: urllib3.BaseHTTPResponse) -> Object:
        raw = response.data or b""
        try:
            payload = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            payload = {"message": raw.decode(errors="replace")}
        if response.status >= 400:
            if not isinstance(payload, dict):
                payload = {"message": str(payload)}
            raise ApiError(
                response.status,
                str(payload.get("reason") or response.reason or ""),
                str(payload.get("message") or raw[:500]),
                payload,
            )
        return payload if isinstance(payload, dict) else {"items": payload}

    def text(self, path: str, params: dict[str, Any] | None = None) -> str:
        url = self.server + path + (f"?{urlencode(params)}" if params else "")
        response = self._pool.request("GET", url, headers={**self._headers, "Accept": "*/*"}, timeout=self._timeout)
        if response.status >= 400:
            self._decode(response)
        return response.data.decode(errors="replace")

    # -- typed helpers --------------------------------------------------------------------
    @staticmethod
    def type_of(resource: str) -> ResourceType:
        try:
            return RESOURCES[resource]
        except KeyError:
            raise ValueError(f"unknown resource {resource!r}; known: {sorted(RESOURCES)}") from None

    def create(self, resource: str, body: Object, namespace: str | None = None) -> Object:
        rt = self.type_of(resource)
        body = {"apiVersion": rt.api_version, "kind": rt.kind, **body}
        return self.request("POST", rt.path(namespace), body)

    def get(self, resource: str, namespace: str | None, name: str, subresource: str | None = None) -> Object | None:
        try:
            return self.request("GET", self.type_of(resource).path(namespace, name, subresource))
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def list(
        self,
        resource: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[Object]:
        return list(
            self.list_raw(resource, namespace, label_selector=label_selector, field_selector=field_selector).get(
                "items"
            )
            or []
        )

    def list_raw(
        self,
        resource: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> Object:
        params = {k: v for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if v}
        return self.request("GET", self.type_of(resource).path(namespace), params=params or None)

    def patch(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        body: Object,
        *,
        subresource: str | None = None,
        patch_type: str = "merge",
    ) -> Object:
        content = {
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
            "strategic": "application/strategic-merge-patch+json",
        }[patch_type]
        return self.request(
            "PATCH", self.type_of(resource).path(namespace, name, subresource), body, content_type=content
        )

    def replace(
        self, resource: str, namespace: str | None, name: str, body: Object, subresource: str | None = None
    ) -> Object:
        return self.request("PUT", self.type_of(resource).path(namespace, name, subresource), body)

    def update_status(self, resource: str, namespace: str | None, name: str, status: Object) -> Object:
        """Replace `.status` (read, then PUT with that resourceVersion; retried on a conflict)."""
        for _ in range(10):
            current = self.get(resource, namespace, name)
            if current is None:
                raise ApiError(404, "NotFound", f'{resource} "{name}" not found')
            current["status"] = status
            try:
                return self.replace(resource, namespace, name, current, "status")
            except ApiError as exc:
                if exc.code != 409:
                    raise
        raise ApiError(409, "Conflict", f"{resource} {name}: status kept changing")

    def apply(self, body: Object, *, field_manager: str = "loraresume-sandbox", force: bool = True) -> Object:
        """Server-side apply of a whole manifest (apiVersion/kind pick the resource)."""
        rt = KINDS[(body["apiVersion"], body["kind"])]
        meta = body["metadata"]
        params = {"fieldManager": field_manager, "force": "true" if force else "false"}
        return self.request(
            "PATCH",
            rt.path(meta.get("namespace"), meta["name"]),
            body,
            params=params,
            content_type="application/apply-patch+yaml",
        )

    def delete(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        *,
        grace_period_seconds: int | None = None,
        uid: str | None = None,
        propagation: str | None = None,
    ) -> Object | None:
        """Delete; the object as the server returned it (now terminating), or None when absent."""
        options: Object = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        if uid:
            options["preconditions"] = {"uid": uid}
        if propagation:
            options["propagationPolicy"] = propagation
        try:
            return self.request("DELETE", self.type_of(resource).path(namespace, name), options)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def evict(self, namespace: str, pod: str) -> Object:
        """The Eviction API (what `kubectl drain` uses): PDBs apply, DisruptionTarget is set."""
        body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}}
        return self.request("POST", RESOURCES["pods"].path(namespace, pod, "eviction"), body)

    def pod_log(self, namespace: str, pod: str, container: str | None = None) -> str:
        params = {"container": container} if container else None
        return self.text(RESOURCES["pods"].path(namespace, pod, "log"), params)

    def watch(
        self,
        resource: str,
        namespace: str | None = None,
        *,
        resource_version: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int = 60,
        bookmarks: bool = True,
    ) -> Iterator[Object]:
        """Watch events ({type, object}) until the server ends the stream or `timeout_seconds`."""
        params: dict[str, Any] = {
            "watch": "true",
            "timeoutSeconds": timeout_seconds,
            "allowWatchBookmarks": "true" if bookmarks else "false",
        }
        for key, value in (
            ("resourceVersion", resource_version),
            ("labelSelector", label_selector),
            ("fieldSelector", field_selector),
        ):
            if value:
                params[key] = value
        url = self.server + self.type_of(resource).path(namespace) + f"?{urlencode(params)}"
        response = self._pool.request(
            "GET",
            url,
            headers=self._headers,
            preload_content=False,
            timeout=urllib3.Timeout(connect=self._timeout, read=timeout_seconds + 30),
        )
        with self._streams_lock:
            self._streams.add(response)
        try:
            if response.status >= 400:
                response.read()
                self._decode(response)
            buffer = b""
            for chunk in response.stream(65536):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            with self._streams_lock:
                self._streams.discard(response)
            response.release_conn()

    def close(self) -> None:
        """End open watch streams (their readers see the stream close) and drop the connections,
        so that an API server being stopped has no long-running request left to wait for."""
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream.shutdown()
        self._pool.clear()


def follow(
    kube: KubeClient,
    resource: str,
    handle: Callable[[str, Object], None],
    stop: threading.Event,
    *,
    namespace: str | None = None,
    field_selector: str | None = None,
    relisted: Callable[[set[str]], None] | None = None,
    window_seconds: int = 30,
) -> None:
    """List `resource`, then watch it from that resourceVersion, until `stop` is set (an informer
    without the cache): `handle(type, object)` for every listed object (as ADDED) and every
    change; after a 410 Gone (the version was compacted away) or a broken stream, list again.
    `relisted(uids)` is told which objects a fresh list holds, so a caller can drop the rest."""
    version: str | None = None
    while not stop.is_set():
        try:
            if version is None:
                listing = kube.list_raw(resource, namespace, field_selector=field_selector)
                version = listing["metadata"]["resourceVersion"]
                items = listing.get("items") or []
                for obj in items:
                    handle("ADDED", obj)
                if relisted is not None:
                    relisted({obj["metadata"]["uid"] for obj in items})
            for event in kube.watch(
                resource,
                namespace,
                resource_version=version,
                field_selector=field_selector,
                timeout_seconds=window_seconds,
            ):
                kind, obj = str(event.get("type")), event.get("object") or {}
                if kind == "ERROR":
                    version = None if obj.get("code") == 410 else version
                    break
                version = obj.get("metadata", {}).get("resourceVersion") or version
                if kind != "BOOKMARK":
                    handle(kind, obj)
                if stop.is_set():
                    return
        except ApiError as exc:
            if exc.code == 410:
                version = None
            else:
                log.warning("watch of %s: %s", resource, exc)
                stop.wait(1)
        except Exception as exc:
            if stop.is_set():
                return
            log.info("watch of %s restarted: %s", resource, exc)
            stop.wait(0.5)

"""A Kubernetes API server emulator on loopback, for kopf, the python client and kubectl.

No real cluster can run on the development machines, so the sandbox serves the API
itself: discovery, OpenAPI v3 for kubectl, CRUD + watch over HTTP with the API server's
semantics (see `k8s_store`), CRD schemas enforced (`k8s_schema`), server-side tables for
`kubectl get`, and pod logs from a hook the simulated kubelet sets.

Why not kmock's KubernetesEmulator: its request pipeline mutates state (plain dict
merges, no uid/resourceVersion/status split) before subclasses or reactions can step in,
its path parser fails on /api/v1/namespaces and does not know PUT, and it has no watch
resumption, selectors, subresources or tables. Extending it would mean replacing every
handler it has; a focused aiohttp server is smaller and testable on its own.

    with KubernetesEmulator() as k8s:          # or: await k8s.start_async()
        k8s.load_crds(["crds/"])
        kubeconfig = k8s.write_kubeconfig(tmp / "kubeconfig")
        k8s.set_log_source(lambda namespace, pod, container: "...")
        k8s.update_status("pods", "default", "p", {"phase": "Running"})
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

import yaml
from aiohttp import web

from .k8s_errors import ApiError
from .k8s_http import ApiHttpHandler, ApiRequest, LogSource
from .k8s_resources import Registry, ResourceType
from .k8s_selectors import matcher
from .k8s_store import Listener, Object, Store

log = logging.getLogger(__name__)


class KubernetesEmulator:
    """The sandbox's API server: an aiohttp app over a `Store`, run in a thread or a task."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, history_size: int = 10_000) -> None:
        self.host = host
        self.port = port
        self.registry = Registry()
        self.store = Store(self.registry, history_size=history_size)
        self.http = ApiHttpHandler(self.registry, self.store)
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start_async(self) -> KubernetesEmulator:
        """Serve from the running event loop (e.g. inside an async test or the sandbox CLI)."""
        self.http.closing = False
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.http.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("Kubernetes API emulator listening on %s", self.url)
        return self

    async def stop_async(self) -> None:
        self.http.closing = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> KubernetesEmulator:
        """Serve from a background thread with its own event loop; returns once the port is bound."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start_async())
                self._stopped = loop.create_future()
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_until_complete(self._stopped)
            loop.run_until_complete(self.stop_async())
            loop.close()

        self._thread = threading.Thread(target=run, name="k8s-api-emulator", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the Kubernetes API emulator did not start within 30 s")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None or self._stopped is None:
            return
        self.http.closing = True
        stopped = self._stopped

        def finish() -> None:
            if not stopped.done():
                stopped.set_result(None)

        self._loop.call_soon_threadsafe(finish)
        self._thread.join(30)
        self._thread = None

    def __enter__(self) -> KubernetesEmulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> KubernetesEmulator:
        return await self.start_async()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_async()

    # -- configuration ----------------------------------------------------------------------
    def load_crds(self, paths: Iterable[str | Path]) -> list[str]:
        """Register CRDs from YAML files or directories of them; returns the CRD names."""
        crds = self.registry.lookup("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        assert crds is not None
        files: list[Path] = []
        for path in map(Path, paths):
            files.extend(
                sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
            )
        names = []
        for file in files:
            for doc in yaml.safe_load_all(file.read_text()):
                if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                    continue
                name = doc["metadata"]["name"]
                try:
                    current = self.store.get(crds, None, name)
                    doc = {
                        **doc,
                        "metadata": {**doc["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]},
                    }
                    self.store.replace(crds, None, name, doc)
                except ApiError as exc:
                    if exc.code != 404:
                        raise
                    self.store.create(crds, None, doc)
                names.append(name)
        return names

    def set_log_source(self, source: LogSource | None) -> None:
        """Where `GET .../pods/NAME/log` (kubectl logs) reads from: source(namespace, pod, container)."""
        self.http.log_source = source

    def write_kubeconfig(
        self, path: str | Path, namespace: str = "default", context: str = "loraresume-sandbox"
    ) -> Path:
        """A kubeconfig for kubectl, kopf and the python client: plain HTTP, a dummy token."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": f"{context}-user", "user": {"token": "sandbox-token"}}],
            "contexts": [
                {"name": context, "context": {"cluster": context, "user": f"{context}-user", "namespace": namespace}}
            ],
            "current-context": context,
            "preferences": {},
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # -- direct access (tests, the simulated kubelet) -------------------------------------------
    def resource(self, name: str) -> ResourceType:
        """A served type by plural, short name, kind or 'plural.group' ('pods', 'lr', 'LoraResume')."""
        return self.registry.resolve(name)

    def get(self, resource: str, namespace: str | None, name: str) -> Object | None:
        try:
            return self.store.get(self.resource(resource), namespace, name)
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
        items, _ = self.store.list_objects(self.resource(resource), namespace, matcher(label_selector, field_selector))
        return items

    def create(self, resource: str, body: Object, namespace: str | None = None) -> Object:
        return self.store.create(self.resource(resource), namespace, body)[0]

    def patch(
        self, resource: str, namespace: str | None, name: str, patch: Object, *, subresource: str | None = None
    ) -> Object:
        """A JSON merge patch (of status too when subresource='status')."""
        return self.store.patch(self.resource(resource), namespace, name, "merge", patch, subresource=subresource)[0]

    def update_status(self, resource: str, namespace: str | None, name: str, status: Object) -> Object:
        """Replace the whole status (PUT .../status), as the kubelet does for pods."""
        rt = self.resource(resource)
        current = self.store.get(rt, namespace, name)
        current["metadata"].pop("resourceVersion", None)  # unconditional, like a kubelet's last word
        return self.store.replace(rt, namespace, name, {**current, "status": status}, subresource="status")[0]

    def patch_status(self, resource: str, namespace: str | None, name: str, status: Object) -> Object:
        """Merge into status (PATCH .../status)."""
        return self.patch(resource, namespace, name, {"status": status}, subresource="status")

    def delete(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        *,
        grace_period_seconds: int | None = None,
        propagation_policy: str | None = None,
    ) -> Object | None:
        """DELETE; the kubelet confirms a pod's graceful deletion with grace_period_seconds=0."""
        try:
            return self.store.delete(
                self.resource(resource),
                namespace,
                name,
                grace_period=grace_period_seconds,
                propagation=propagation_policy,
            )
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def api_requests(self) -> Counter[ApiRequest]:
        """A snapshot of the resource requests served over HTTP so far, by (verb, group, resource,
        namespace, user agent): what an RBAC audit compares with the granted rules."""
        while True:
            try:
                return Counter(self.http.requests)
            except RuntimeError:  # the serving thread added a key while copying; copy again
                continue

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """listener(event_type, group_resource, object) on every change; returns an unsubscribe function.

        It runs with the store lock held, in whichever thread made the change: hand work off
        (e.g. to a queue), do not block or call back into the emulator from it.
        """
        return self.store.subscribe(listener)

"""The HTTP face of the emulated API server: routing, verbs, watch streams, tables, logs.

It maps Kubernetes REST paths (`/api/v1/namespaces/NS/pods/NAME/status`, `/apis/G/V/...`)
onto the `Store`, answers discovery and OpenAPI from the `Registry`, and renders what
each client asks for: JSON objects and lists, `Table`s for kubectl, JSON-lines watch
streams, plain-text pod logs (from the kubelet's log source), `Status` objects on errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import yaml
from aiohttp import web
from multidict import CIMultiDict

from . import k8s_openapi, k8s_protobuf, k8s_tables
from .k8s_errors import ApiError, bad_request, method_not_allowed, no_resource, unsupported_media_type
from .k8s_resources import Registry, ResourceType
from .k8s_selectors import matcher
from .k8s_store import Object, Store

log = logging.getLogger(__name__)

LogSource = Callable[[str, str, str], str]  # (namespace, pod name, container name) -> log text

_PATCH_TYPES = {
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/json-patch+json": "json",
    "application/apply-patch+yaml": "apply",
}
_SERVER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-loraresume-sandbox",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def _json(body: Any, status: int = 200, warnings: Iterable[str] = ()) -> web.Response:
    headers: CIMultiDict[str] = CIMultiDict()
    for warning in warnings:
        headers.add("Warning", f"299 - {json.dumps(warning)}")
    return web.Response(text=json.dumps(body), status=status, content_type="application/json", headers=headers)


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


@dataclass(frozen=True)
class ApiRequest:
    """One resource request as RBAC sees it (the audit log's key): verb, group, resource[/sub]."""

    verb: str
    group: str
    resource: str
    namespace: str | None
    user_agent: str


def rbac_verb(method: str, name: str | None, query: Any) -> str:
    """The authorizer's verb for a request: list/watch/get, create, update, patch, delete(collection)."""
    if method in ("GET", "HEAD"):
        if name is None:
            return "watch" if _flag(query.get("watch")) else "list"
        return "watch" if _flag(query.get("watch")) else "get"
    if method == "DELETE":
        return "delete" if name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


class ApiHttpHandler:
    """An aiohttp request handler serving one Registry + Store as the Kubernetes API."""

    def __init__(self, registry: Registry, store: Store) -> None:
        self.registry = registry
        self.store = store
        self.log_source: LogSource | None = None
        self.closing = False  # set on shutdown: open watch and log streams end
        self.requests: Counter[ApiRequest] = Counter()  # every resource request served, for RBAC audits

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._route(request)
        except ApiError as exc:
            return _json(exc.status(), exc.code)
        except Exception as exc:  # an emulator bug: answer like the API server, keep serving
            log.exception("emulator failure on %s %s", request.method, request.path_qs)
            return _json(ApiError(500, "InternalError", f"Internal error occurred: {exc!r}").status(), 500)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if not parts:
            paths = ["/api", "/api/v1", "/apis", "/openapi/v3", "/version", "/healthz", "/livez", "/readyz"]
            paths += [f"/{k8s_openapi.gv_path(g, v)}" for g, vs in self.registry.versions().items() if g for v in vs]
            return _json({"paths": sorted(set(paths))})
        head = parts[0]
        if parts == ["version"]:
            return _json(_SERVER_VERSION)
        if head in ("healthz", "livez", "readyz"):
            return web.Response(text="ok")
        if head == "openapi":
            return self._openapi(parts)
        if head == "api":
            if len(parts) == 1:
                return _json(
                    {
                        "kind": "APIVersions",
                        "versions": ["v1"],
                        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}],
                    }
                )
            group, version, rest = "", parts[1], parts[2:]
        elif head == "apis":
            if len(parts) == 1:
                return _json(self.registry.api_group_list())
            if len(parts) == 2:
                group_doc = self.registry.api_group(parts[1])
                if group_doc is None:
                    raise no_resource(request.path)
                return _json({"kind": "APIGroup", "apiVersion": "v1", **group_doc})
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise no_resource(request.path)
        if not rest:
            listing = self.registry.resource_list(group, version)
            if listing is None:
                raise no_resource(request.path)
            return _json(listing)
        rt, namespace, name, sub = self._target(group, version, rest, request.path)
        resource = f"{rt.plural}/{sub}" if sub else rt.plural
        self.requests[ApiRequest(rbac_verb(request.method, name, request.query), group, resource, namespace,
                                 request.headers.get("User-Agent", ""))] += 1
        return await self._dispatch(request, rt, namespace, name, sub)

    def _openapi(self, parts: list[str]) -> web.Response:
        if parts == ["openapi", "v3"]:
            return _json(k8s_openapi.index(self.registry))
        if len(parts) >= 4 and parts[1] == "v3":
            rest = parts[2:]
            if rest[0] == "api" and len(rest) == 2:
                doc = k8s_openapi.gv_document(self.registry, "", rest[1])
            elif rest[0] == "apis" and len(rest) == 3:
                doc = k8s_openapi.gv_document(self.registry, rest[1], rest[2])
            else:
                doc = None
            if doc is not None:
                return _json(doc)
        raise no_resource("/" + "/".join(parts))

    def _target(
        self, group: str, version: str, rest: list[str], path: str
    ) -> tuple[ResourceType, str | None, str | None, str | None]:
        if len(rest) >= 3 and rest[0] == "namespaces":
            scoped = self.registry.lookup(group, version, rest[2])
            if scoped is not None and scoped.namespaced:
                name = rest[3] if len(rest) > 3 else None
                sub = "/".join(rest[4:]) or None
                return self._checked(scoped, rest[1], name, sub, path)
        rt = self.registry.lookup(group, version, rest[0])
        if rt is None:
            raise no_resource(path)
        name = rest[1] if len(rest) > 1 else None
        if rt.namespaced and name is not None:
            raise no_resource(path)
        return self._checked(rt, None, name, "/".join(rest[2:]) or None, path)

    @staticmethod
    def _checked(
        rt: ResourceType, namespace: str | None, name: str | None, sub: str | None, path: str
    ) -> tuple[ResourceType, str | None, str | None, str | None]:
        if sub is not None and sub not in rt.subresources:
            raise no_resource(path)
        return rt, namespace, name, sub

    async def _body(self, request: web.Request, *, yaml_ok: bool = False) -> Any:
        raw = await request.read()
        if not raw.strip():
            return None
        if request.headers.get("Content-Type", "").startswith(k8s_protobuf.CONTENT_TYPE):
            if request.method == "DELETE":
                return k8s_protobuf.decode_delete_options(raw)
            return k8s_protobuf.decode(raw)
        try:
            if yaml_ok:
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise bad_request(f"the request body could not be decoded: {exc}") from exc

    async def _dispatch(
        self, request: web.Request, rt: ResourceType, namespace: str | None, name: str | None, sub: str | None
    ) -> web.StreamResponse:
        query = request.query
        method = request.method
        dry_run = query.get("dryRun") == "All"
        validation = query.get("fieldValidation", "Warn")
        if method == "GET":
            if name is None:
                match = matcher(query.get("labelSelector"), query.get("fieldSelector"))
                if _flag(query.get("watch")):
                    return await self._watch(request, rt, namespace, match)
                items, rv = self.store.list_objects(rt, namespace, match)
                if "as=Table" in request.headers.get("Accept", ""):
                    return _json(k8s_tables.table(rt, items, rv, query.get("includeObject", "Metadata")))
                return _json(
                    {
                        "kind": rt.list_kind,
                        "apiVersion": rt.api_version,
                        "metadata": {"resourceVersion": rv},
                        "items": items,
                    }
                )
            if sub == "log":
                return await self._logs(request, rt, namespace, name)
            obj = self.store.get(rt, namespace, name)
            if "as=Table" in request.headers.get("Accept", ""):
                return _json(
                    k8s_tables.table(
                        rt, [obj], obj["metadata"]["resourceVersion"], query.get("includeObject", "Metadata")
                    )
                )
            return _json(obj)
        if method == "POST" and name is None:
            created, warnings = self.store.create(
                rt, namespace, await self._body(request), field_validation=validation, dry_run=dry_run
            )
            return _json(created, 201, warnings)
        if method == "PUT" and name is not None and sub != "log":
            updated, warnings = self.store.replace(
                rt,
                namespace,
                name,
                await self._body(request),
                subresource=sub,
                field_validation=validation,
                dry_run=dry_run,
            )
            return _json(updated, 200, warnings)
        if method == "PATCH" and name is not None and sub != "log":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            patch_type = _PATCH_TYPES.get(content_type)
            if patch_type is None:
                raise unsupported_media_type(list(_PATCH_TYPES))
            body = await self._body(request, yaml_ok=patch_type == "apply")
            patched, warnings = self.store.patch(
                rt, namespace, name, patch_type, body, subresource=sub, field_validation=validation, dry_run=dry_run
            )
            return _json(patched, 200, warnings)
        if method == "DELETE" and sub is None:
            options = await self._body(request) or {}
            grace = query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
            grace_period = int(grace) if grace is not None else None
            propagation = query.get("propagationPolicy", options.get("propagationPolicy"))
            dry_run = dry_run or "All" in (options.get("dryRun") or [])
            if name is None:
                match = matcher(query.get("labelSelector"), query.get("fieldSelector"))
                items = self.store.delete_collection(
                    rt, namespace, match, grace_period=grace_period, propagation=propagation, dry_run=dry_run
                )
                return _json(
                    {
                        "kind": rt.list_kind,
                        "apiVersion": rt.api_version,
                        "metadata": {"resourceVersion": self.store.resource_version},
                        "items": items,
                    }
                )
            deleted = self.store.delete(
                rt,
                namespace,
                name,
                grace_period=grace_period,
                propagation=propagation,
                preconditions=options.get("preconditions"),
                dry_run=dry_run,
            )
            return _json(deleted)
        raise method_not_allowed()

    async def _watch(
        self, request: web.Request, rt: ResourceType, namespace: str | None, match: Callable[[Object], bool]
    ) -> web.StreamResponse:
        """A watch stream: JSON lines of {type, object} until timeoutSeconds, the client or the server goes."""
        query = request.query
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Object]] = asyncio.Queue()
        table = "as=Table" in request.headers.get("Accept", "")
        include = query.get("includeObject", "Metadata")

        def deliver(kind: str, obj: Object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, obj))
            except RuntimeError:
                pass  # the server's loop is gone

        unwatch = self.store.watch(
            rt,
            namespace,
            match,
            query.get("resourceVersion"),
            deliver,
            send_initial=_flag(query.get("sendInitialEvents")),
        )
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            deadline = loop.time() + float(query.get("timeoutSeconds") or 1800)
            while not self.closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    kind, obj = await asyncio.wait_for(queue.get(), timeout=min(remaining, 0.5))
                except TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        break
                    continue
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    shown = Store.present(rt, obj)
                    if table:
                        shown = k8s_tables.table(rt, [shown], shown["metadata"]["resourceVersion"], include)
                else:
                    shown = obj
                await response.write(json.dumps({"type": kind, "object": shown}).encode() + b"\n")
                if kind == "ERROR":
                    break
            await response.write_eof()
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            unwatch()
        return response

    def _read_log(self, namespace: str, name: str, container: str) -> str:
        if self.log_source is None:
            return ""
        try:
            return self.log_source(namespace, name, container) or ""
        except Exception:  # a kubelet bug must not take the API down
            log.exception("log source failed for %s/%s[%s]", namespace, name, container)
            return ""

    async def _logs(
        self, request: web.Request, rt: ResourceType, namespace: str | None, name: str
    ) -> web.StreamResponse:
        """GET pods/NAME/log: text from the log source; follow=true streams until the pod ends."""
        pod = self.store.get(rt, namespace, name)
        namespace = pod["metadata"]["namespace"]
        spec = pod.get("spec") or {}
        containers = [c["name"] for c in spec.get("containers") or []]
        valid = containers + [c["name"] for c in spec.get("initContainers") or []]
        container = request.query.get("container")
        if not container:
            if len(containers) != 1:
                raise bad_request(
                    f"a container name must be specified for pod {name}, choose one of: [{' '.join(containers)}]"
                )
            container = containers[0]
        elif container not in valid:
            raise bad_request(f"container {container} is not valid for pod {name}")
        text = self._read_log(namespace, name, container)
        tail = request.query.get("tailLines")
        if tail is not None:
            text = "".join(text.splitlines(keepends=True)[-int(tail) :]) if int(tail) > 0 else ""
        if not _flag(request.query.get("follow")):
            return web.Response(text=text, content_type="text/plain")
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        sent = self._read_log(namespace, name, container)
        try:
            await response.write(text.encode())
            while not self.closing and request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.25)
                current = self._read_log(namespace, name, container)
                if current.startswith(sent) and len(current) > len(sent):
                    await response.write(current[len(sent) :].encode())
                sent = current
                try:
                    phase = (self.store.get(rt, namespace, name).get("status") or {}).get("phase")
                except ApiError:
                    break
                if phase in ("Succeeded", "Failed"):
                    final = self._read_log(namespace, name, container)
                    if final.startswith(sent) and len(final) > len(sent):
                        await response.write(final[len(sent) :].encode())
                    break
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        return response

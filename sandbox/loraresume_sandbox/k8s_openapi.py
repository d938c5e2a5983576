"""Just enough OpenAPI v3 for kubectl: `apply` without `--validate=false`, and `explain`.

kubectl validates by asking the server to (`fieldValidation=Strict`), but only after it
has found, in /openapi/v3, a PATCH operation for the kind that declares the
`fieldValidation` parameter; without /openapi/v3 it falls back to /openapi/v2 and
fails. So each group/version document lists every resource's paths with that
parameter, and custom resources' schemas go into components (for `kubectl explain`).
Strategic merge patch is not offered, so kubectl apply sends JSON merge patches for
custom resources (as with a real API server) and uses its built-in strategy for pods.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from .k8s_resources import Registry, ResourceType


def gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _schema_name(rt: ResourceType) -> str:
    group = ".".join(reversed(rt.group.split("."))) if rt.group else "io.k8s.api.core"
    return f"{group}.{rt.version}.{rt.kind}"


def _gvk(rt: ResourceType) -> dict[str, str]:
    return {"group": rt.group, "version": rt.version, "kind": rt.kind}


_PARAM_NAMES = ("dryRun", "fieldManager", "fieldValidation", "pretty", "force")


def _operation(rt: ResourceType, action: str, with_body: bool, patch: bool = False) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{_schema_name(rt)}"}
    op: dict[str, Any] = {
        "operationId": f"{action}{rt.kind}",
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(rt),
        "parameters": [
            {"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": True}} for name in _PARAM_NAMES
        ],
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}}},
    }
    if with_body:
        types = (
            ["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"]
            if patch
            else ["application/json"]
        )
        op["requestBody"] = {
            "content": {t: {"schema": {"type": "object"} if patch else ref} for t in types},
            "required": True,
        }
    return op


def _paths(rt: ResourceType) -> dict[str, Any]:
    base = f"/{gv_path(rt.group, rt.version)}"
    collection = f"{base}/namespaces/{{namespace}}/{rt.plural}" if rt.namespaced else f"{base}/{rt.plural}"
    item = f"{collection}/{{name}}"
    paths = {
        collection: {"get": _operation(rt, "list", False), "post": _operation(rt, "post", True)},
        item: {
            "get": _operation(rt, "get", False),
            "put": _operation(rt, "put", True),
            "patch": _operation(rt, "patch", True, patch=True),
            "delete": _operation(rt, "delete", False),
        },
    }
    if rt.has_status:
        paths[f"{item}/status"] = {
            "get": _operation(rt, "get", False),
            "put": _operation(rt, "put", True),
            "patch": _operation(rt, "patch", True, patch=True),
        }
    return paths


def _component(rt: ResourceType) -> dict[str, Any]:
    if rt.schema is not None:
        schema = copy.deepcopy(rt.schema.schema)
    else:
        schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    schema["x-kubernetes-group-version-kind"] = [_gvk(rt)]
    return schema


def gv_document(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    types = [rt for rt in registry.all() if rt.group == group and rt.version == version]
    if not types:
        return None
    paths: dict[str, Any] = {}
    for rt in sorted(types, key=lambda r: r.plural):
        paths.update(_paths(rt))
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (loraresume sandbox)", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {_schema_name(rt): _component(rt) for rt in types}},
    }


def _hash(doc: dict[str, Any]) -> str:
    return hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:64].upper()


def index(registry: Registry) -> dict[str, Any]:
    """/openapi/v3: one entry per group/version, with a content hash kubectl caches by."""
    paths: dict[str, Any] = {}
    for group, versions in registry.versions().items():
        for version in versions:
            doc = gv_document(registry, group, version)
            if doc is not None:
                path = gv_path(group, version)
                paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={_hash(doc)}"}
    return {"paths": paths}

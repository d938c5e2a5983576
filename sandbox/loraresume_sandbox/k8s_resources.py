"""What the emulated API serves: built-in kinds, kinds from CRDs, and their discovery documents.

Clients resolve everything through discovery (kopf scans /api and /apis to learn plurals,
scopes and the status subresource; kubectl maps `lr` to loraresumes.loraresume.dev), so
the registry is the one place that knows names, scopes, verbs, subresources and schemas.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .k8s_errors import ApiError
from .k8s_schema import StructuralSchema, validate_crd_schema

VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass
class ResourceType:
    """One resource in one served group/version."""

    group: str
    version: str
    plural: str
    kind: str
    singular: str
    namespaced: bool
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    subresources: tuple[str, ...] = ()
    schema: StructuralSchema | None = None
    printer_columns: list[dict[str, Any]] | None = None
    crd_name: str | None = None  # set for custom resources
    list_kind: str = ""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        """Storage key: versions of one resource share objects (no conversion in the sandbox)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    def discovery_entries(self) -> list[dict[str, Any]]:
        main = {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(VERBS),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        entries = [main]
        for sub in self.subresources:
            verbs = ["get"] if sub == "log" else ["get", "patch", "update"]
            entries.append(
                {
                    "name": f"{self.plural}/{sub}",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": verbs,
                }
            )
        return entries


def _core(
    plural: str,
    kind: str,
    *,
    namespaced: bool = True,
    short: tuple[str, ...] = (),
    categories: tuple[str, ...] = (),
    subresources: tuple[str, ...] = (),
) -> ResourceType:
    return ResourceType(
        group="",
        version="v1",
        plural=plural,
        kind=kind,
        singular=kind.lower(),
        namespaced=namespaced,
        short_names=list(short),
        categories=list(categories),
        subresources=subresources,
        list_kind=f"{kind}List",
    )


CRDS_PLURAL = "customresourcedefinitions"
CRD_GROUP = "apiextensions.k8s.io"


def builtin_types() -> list[ResourceType]:
    return [
        _core("pods", "Pod", short=("po",), categories=("all",), subresources=("status", "log")),
        _core("namespaces", "Namespace", namespaced=False, short=("ns",), subresources=("status",)),
        _core("secrets", "Secret"),
        _core("configmaps", "ConfigMap", short=("cm",)),
        _core("events", "Event", short=("ev",)),
        _core("serviceaccounts", "ServiceAccount", short=("sa",)),
        _core("services", "Service", short=("svc",), categories=("all",), subresources=("status",)),
        ResourceType(
            group=CRD_GROUP,
            version="v1",
            plural=CRDS_PLURAL,
            kind="CustomResourceDefinition",
            singular="customresourcedefinition",
            namespaced=False,
            short_names=["crd", "crds"],
            categories=["api-extensions"],
            subresources=("status",),
            list_kind="CustomResourceDefinitionList",
        ),
    ]


def types_from_crd(crd: dict[str, Any]) -> list[ResourceType]:
    """One ResourceType per served version of an apiextensions.k8s.io/v1 CRD; raises ApiError."""
    name = (crd.get("metadata") or {}).get("name", "")
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
    if not group or not plural or not kind:
        raise ApiError(
            422,
            "Invalid",
            f'CustomResourceDefinition.apiextensions.k8s.io "{name}" is invalid: '
            "spec.group, spec.names.plural and spec.names.kind are required",
        )
    if name != f"{plural}.{group}":
        raise ApiError(
            422,
            "Invalid",
            f'CustomResourceDefinition.apiextensions.k8s.io "{name}" is invalid: '
            f'metadata.name: Invalid value: "{name}": must be spec.names.plural+"."+spec.group',
        )
    result = []
    for version in spec.get("versions") or []:
        if not version.get("served", True):
            continue
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        validate_crd_schema(schema, name)
        assert isinstance(schema, dict)  # validate_crd_schema refuses anything else
        subresources = tuple(sorted((version.get("subresources") or {}).keys()))
        result.append(
            ResourceType(
                group=group,
                version=version["name"],
                plural=plural,
                kind=kind,
                singular=names.get("singular") or kind.lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                short_names=list(names.get("shortNames") or []),
                categories=list(names.get("categories") or []),
                subresources=tuple(s for s in subresources if s == "status"),
                schema=StructuralSchema(schema, kind=kind, group=group),
                printer_columns=list(version.get("additionalPrinterColumns") or []),
                crd_name=name,
                list_kind=names.get("listKind") or f"{kind}List",
            )
        )
    if not result:
        raise ApiError(
            422,
            "Invalid",
            f'CustomResourceDefinition.apiextensions.k8s.io "{name}" is invalid: '
            "spec.versions: Required value: must have at least one served version",
        )
    return result


class Registry:
    """The served resource types, by group/version/plural; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        self._preferred: dict[str, str] = {}  # group -> preferred version
        for rt in builtin_types():
            self.add(rt)

    def add(self, rt: ResourceType, preferred: bool = True) -> None:
        with self._lock:
            self._types[(rt.group, rt.version, rt.plural)] = rt
            if preferred or rt.group not in self._preferred:
                self._preferred[rt.group] = rt.version

    def register_crd(self, crd: dict[str, Any]) -> list[ResourceType]:
        types = types_from_crd(crd)
        storage = next((v["name"] for v in crd["spec"]["versions"] if v.get("storage")), types[0].version)
        with self._lock:
            self.unregister_crd(crd["metadata"]["name"])
            for rt in types:
                self.add(rt, preferred=rt.version == storage)
        return types

    def unregister_crd(self, crd_name: str) -> None:
        with self._lock:
            for key, rt in list(self._types.items()):
                if rt.crd_name == crd_name:
                    del self._types[key]
            groups = {rt.group for rt in self._types.values()}
            for group in list(self._preferred):
                if group not in groups:
                    del self._preferred[group]

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        with self._lock:
            return self._types.get((group, version, plural))

    def all(self) -> list[ResourceType]:
        with self._lock:
            return list(self._types.values())

    def preferred(self, group_resource: str) -> ResourceType | None:
        """The preferred-version type of a storage key such as 'loraresumes.loraresume.dev'."""
        candidates = [rt for rt in self.all() if rt.group_resource == group_resource]
        for rt in candidates:
            if self._preferred.get(rt.group) == rt.version:
                return rt
        return candidates[0] if candidates else None

    def resolve(self, name: str) -> ResourceType:
        """Find a type by plural, short name, kind or 'plural.group' (preferred version), like kubectl."""
        wanted = name.lower()
        matches = [
            rt
            for rt in self.all()
            if wanted in {rt.plural, rt.singular, rt.kind.lower(), rt.group_resource, *rt.short_names}
        ]
        preferred = [rt for rt in matches if self._preferred.get(rt.group) == rt.version]
        if preferred or matches:
            return (preferred or matches)[0]
        raise KeyError(f"the server doesn't have a resource type {name!r}")

    # -- discovery documents -------------------------------------------------------------
    def versions(self) -> dict[str, list[str]]:
        with self._lock:
            out: dict[str, list[str]] = {}
            for group, version, _ in self._types:
                out.setdefault(group, [])
                if version not in out[group]:
                    out[group].append(version)
            for group, versions in out.items():
                versions.sort(key=lambda v: v != self._preferred.get(group))
            return out

    def api_group(self, group: str) -> dict[str, Any] | None:
        versions = self.versions().get(group)
        if not versions:
            return None
        return {
            "name": group,
            "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
            "preferredVersion": {"groupVersion": f"{group}/{versions[0]}", "version": versions[0]},
        }

    def api_group_list(self) -> dict[str, Any]:
        groups = [self.api_group(g) for g in sorted(self.versions()) if g]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [g for g in groups if g]}

    def resource_list(self, group: str, version: str) -> dict[str, Any] | None:
        types = sorted((rt for rt in self.all() if rt.group == group and rt.version == version), key=lambda r: r.plural)
        if not types:
            return None
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [entry for rt in types for entry in rt.discovery_entries()],
        }

"""Server-side printing: `meta.k8s.io/v1 Table` responses, which `kubectl get` asks for.

kubectl prints whatever columns the server sends, so a CRD's additionalPrinterColumns
(phase, progress, loss, ...) only appear if the server evaluates them; built-in kinds get
the familiar columns (pods: READY STATUS RESTARTS AGE). JSONPath here is the subset
printer columns use: `.a.b`, `.a[0]`, `.a['k.x']`, `.a[?(@.type=="Ready")].status`.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable
from typing import Any

from .k8s_resources import ResourceType

Object = dict[str, Any]

_STEP = re.compile(
    r"""\.([A-Za-z0-9_\-]+)|\[(\d+)\]|\['([^']*)'\]|\[\?\(@\.([A-Za-z0-9_.\-]+)\s*==\s*["']([^"']*)["']\)\]"""
)


def jsonpath(obj: Any, path: str) -> Any:
    """First value at a printer-column JSONPath, or None."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    if path.startswith("$"):
        path = path[1:]
    node: Any = obj
    pos = 0
    while pos < len(path):
        step = _STEP.match(path, pos)
        if not step:
            return None
        pos = step.end()
        key, index, quoted, filter_path, filter_value = step.groups()
        if key is not None or quoted is not None:
            node = node.get(key if key is not None else quoted) if isinstance(node, dict) else None
        elif index is not None:
            node = node[int(index)] if isinstance(node, list) and int(index) < len(node) else None
        else:
            if not isinstance(node, list):
                return None
            node = next((item for item in node if str(jsonpath(item, "." + filter_path)) == filter_value), None)
        if node is None:
            return None
    return node


def human_duration(seconds: float) -> str:
    """kubectl's AGE format (apimachinery's HumanDuration)."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    years, days = hours // (24 * 365), (hours // 24) % 365
    if years < 8:
        return f"{years}y{days}d" if days else f"{years}y"
    return f"{years}y"


def age(stamp: Any) -> str:
    if not isinstance(stamp, str) or not stamp:
        return "<unknown>"
    try:
        moment = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return "<unknown>"
    return human_duration((datetime.datetime.now(datetime.UTC) - moment).total_seconds())


Column = tuple[str, str, int, Callable[[Object], Any]]  # name, type, priority, cell


def _name(obj: Object) -> Any:
    return obj["metadata"]["name"]


def _age(obj: Object) -> Any:
    return age(obj["metadata"].get("creationTimestamp"))


def _pod_status(pod: Object) -> str:
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    status = pod.get("status") or {}
    reason = status.get("reason") or status.get("phase") or "Unknown"
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state:
            terminated = state["terminated"]
            reason = terminated.get("reason") or (
                f"Signal:{terminated['signal']}"
                if terminated.get("signal")
                else f"ExitCode:{terminated.get('exitCode')}"
            )
    return reason


def _pod_ready(pod: Object) -> str:
    containers = (pod.get("spec") or {}).get("containers") or []
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return f"{sum(1 for s in statuses if s.get('ready'))}/{len(containers)}"


def _pod_restarts(pod: Object) -> int:
    return sum(int(s.get("restartCount") or 0) for s in (pod.get("status") or {}).get("containerStatuses") or [])


def _event_object(event: Object) -> str:
    ref = event.get("involvedObject") or {}
    return f"{str(ref.get('kind', '')).lower()}/{ref.get('name', '')}"


def _event_last_seen(event: Object) -> str:
    return age(event.get("lastTimestamp") or event.get("eventTime") or event["metadata"].get("creationTimestamp"))


_BUILTIN: dict[str, list[Column]] = {
    "pods": [
        ("Name", "string", 0, _name),
        ("Ready", "string", 0, _pod_ready),
        ("Status", "string", 0, _pod_status),
        ("Restarts", "string", 0, lambda p: str(_pod_restarts(p))),
        ("Age", "string", 0, _age),
        ("IP", "string", 1, lambda p: (p.get("status") or {}).get("podIP") or "<none>"),
        ("Node", "string", 1, lambda p: (p.get("spec") or {}).get("nodeName") or "<none>"),
    ],
    "events": [
        ("Last Seen", "string", 0, _event_last_seen),
        ("Type", "string", 0, lambda e: e.get("type", "")),
        ("Reason", "string", 0, lambda e: e.get("reason", "")),
        ("Object", "string", 0, _event_object),
        ("Message", "string", 0, lambda e: e.get("message", "")),
    ],
    "namespaces": [
        ("Name", "string", 0, _name),
        ("Status", "string", 0, lambda n: (n.get("status") or {}).get("phase", "")),
        ("Age", "string", 0, _age),
    ],
    "secrets": [
        ("Name", "string", 0, _name),
        ("Type", "string", 0, lambda s: s.get("type", "")),
        ("Data", "integer", 0, lambda s: len(s.get("data") or {})),
        ("Age", "string", 0, _age),
    ],
    "configmaps": [
        ("Name", "string", 0, _name),
        ("Data", "integer", 0, lambda c: len(c.get("data") or {}) + len(c.get("binaryData") or {})),
        ("Age", "string", 0, _age),
    ],
    "customresourcedefinitions.apiextensions.k8s.io": [
        ("Name", "string", 0, _name),
        ("Created At", "date", 0, lambda c: c["metadata"].get("creationTimestamp")),
    ],
}


def _printer_cell(kind: str, path: str) -> Callable[[Object], Any]:
    def cell(obj: Object) -> Any:
        value = jsonpath(obj, path)
        if value is None:
            return None
        if kind == "date":
            return age(value)
        if kind == "integer" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
        if kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if kind == "boolean" and isinstance(value, bool):
            return value
        return value if isinstance(value, str) else json.dumps(value)

    return cell


def columns(rt: ResourceType) -> list[Column]:
    if rt.crd_name is not None:
        cols: list[Column] = [("Name", "string", 0, _name)]
        printer = rt.printer_columns or [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        for col in printer:
            kind = col.get("type", "string")
            cols.append((col["name"], kind, int(col.get("priority", 0)), _printer_cell(kind, col["jsonPath"])))
        return cols
    return _BUILTIN.get(rt.group_resource, [("Name", "string", 0, _name), ("Age", "string", 0, _age)])


def _row_object(obj: Object, include: str) -> Object | None:
    if include == "None":
        return None
    if include == "Object":
        return obj
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})}


def table(rt: ResourceType, objects: list[Object], resource_version: str, include: str = "Metadata") -> Object:
    """A Table of objects (already presented in rt's version)."""
    cols = columns(rt)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": [
            {
                "name": name,
                "type": "string" if kind == "date" and rt.crd_name is not None else kind,
                "format": "name" if name == "Name" else "",
                "description": name,
                "priority": priority,
            }
            for name, kind, priority, _ in cols
        ],
        "rows": [
            {"cells": [cell(obj) for _, _, _, cell in cols], "object": _row_object(obj, include)} for obj in objects
        ],
    }

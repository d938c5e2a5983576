"""Label and field selectors, as lists and watches filter with them.

kubectl wait/delete watch one object through `fieldSelector=metadata.name=X`, kubectl
describe finds events through `involvedObject.*` fields, operators narrow pods by labels.
Field selectors here accept any dotted path (the real server allows a per-kind subset);
a missing field compares as the empty string, as `spec.nodeName=` does on the server.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .k8s_errors import bad_request

Matcher = Callable[[dict[str, Any]], bool]

_SET_REQ = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\((.*)\)\s*$")


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses (`env in (a,b),tier=x`)."""
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _one_label_requirement(req: str) -> Callable[[dict[str, str]], bool]:
    found = _SET_REQ.match(req)
    if found:
        key, op, values_text = found.groups()
        values = {v.strip() for v in values_text.split(",") if v.strip()}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    for op in ("!=", "==", "="):
        if op in req:
            key, value = (s.strip() for s in req.split(op, 1))
            if not key:
                raise bad_request(f"unable to parse requirement: {req!r}")
            if op == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
    if req.startswith("!"):
        key = req[1:].strip()
        return lambda labels: key not in labels
    key = req.strip()
    if not key or " " in key:
        raise bad_request(f"unable to parse requirement: {req!r}")
    return lambda labels: key in labels


def label_matcher(selector: str | None) -> Matcher:
    """A predicate over whole objects for a labelSelector string (empty: everything)."""
    if not selector:
        return lambda obj: True
    reqs = [_one_label_requirement(r) for r in _split_top(selector)]

    def match(obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(req(labels) for req in reqs)

    return match


def field_value(obj: dict[str, Any], path: str) -> str:
    """The string form a field selector compares against ('' when absent)."""
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def field_matcher(selector: str | None) -> Matcher:
    """A predicate over whole objects for a fieldSelector string (empty: everything)."""
    if not selector:
        return lambda obj: True
    reqs: list[tuple[str, bool, str]] = []
    for req in _split_top(selector):
        for op in ("!=", "==", "="):
            if op in req:
                path, value = (s.strip() for s in req.split(op, 1))
                reqs.append((path, op != "!=", value))
                break
        else:
            raise bad_request(f"invalid selector: '{selector}'; can't understand '{req}'")

    def match(obj: dict[str, Any]) -> bool:
        return all((field_value(obj, path) == value) == equal for path, equal, value in reqs)

    return match


def matcher(label_selector: str | None, field_selector: str | None) -> Matcher:
    labels, fields = label_matcher(label_selector), field_matcher(field_selector)
    return lambda obj: labels(obj) and fields(obj)

"""The three PATCH dialects of the API server: JSON merge, strategic merge, JSON patch.

kopf sends merge patches; kubectl apply sends merge patches for custom resources and
strategic merge patches for built-in kinds; the python client sends strategic merge
patches for built-in kinds by default. Strategic merge is approximated: dicts merge,
`null` deletes, lists of well-known kinds merge by their merge key (containers by name,
conditions by type, ...), every other list is replaced, and `$`-directives are honoured
or dropped (`$patch: replace|delete`, `$retainKeys`, `$deleteFromPrimitiveList/…`).
"""

from __future__ import annotations

import copy
from typing import Any

from .k8s_errors import ApiError

# Merge keys of the lists the sandbox's pods and objects use (from the built-in types' patch tags).
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "conditions": "type",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
    "ownerReferences": "uid",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
}
# Primitive lists the built-in types merge as sets rather than replace.
MERGED_PRIMITIVE_LISTS = {"finalizers"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def _merge_list(key: str, target: Any, patch: list[Any]) -> list[Any]:
    merge_key = MERGE_KEYS.get(key)
    current = list(target) if isinstance(target, list) else []
    if key in MERGED_PRIMITIVE_LISTS and all(not isinstance(v, (dict, list)) for v in patch):
        return current + [v for v in patch if v not in current]
    if merge_key is None or not all(isinstance(v, dict) for v in patch):
        return _strip_directives(patch)
    for item in patch:
        directive = item.get("$patch")
        ident = item.get(merge_key)
        index = next(
            (i for i, old in enumerate(current) if isinstance(old, dict) and old.get(merge_key) == ident), None
        )
        if directive == "delete":
            if index is not None:
                current.pop(index)
        elif directive == "replace":
            return _strip_directives([v for v in patch if v.get("$patch") != "replace"])
        elif index is None:
            current.append(_strip_directives(item))
        else:
            current[index] = strategic_merge_patch(current[index], item)
    return current


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch, approximated with merge keys for well-known lists (see module doc)."""
    if not isinstance(patch, dict):
        return _strip_directives(patch)
    if patch.get("$patch") == "replace":
        return _strip_directives(patch)
    if patch.get("$patch") == "delete":
        return None
    result = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list):
                result[field] = [v for v in result[field] if v not in value]
            continue
        if key.startswith("$"):
            continue  # $setElementOrder/…, $retainKeys, $patch: order and bookkeeping only
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list):
            result[key] = _merge_list(key, result.get(key), value)
        else:
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _invalid_patch(message: str) -> ApiError:
    return ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {message}")


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _invalid_patch(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for part in parts[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise _invalid_patch(f"doc is missing path: {path!r}")
    return node


def _get(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        return doc
    node = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(node, dict) and last in node:
        return node[last]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        return node[int(last)]
    raise _invalid_patch(f"doc is missing path: {path!r}")


def _remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    node = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(node, dict) and last in node:
        return node.pop(last)
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        return node.pop(int(last))
    raise _invalid_patch(f"unable to remove nonexistent key: {path!r}")


def _add(doc: Any, path: str, value: Any, replace: bool) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    node = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(node, dict):
        if replace and last not in node:
            raise _invalid_patch(f"replace operation does not apply: doc is missing key: {path!r}")
        node[last] = value
    elif isinstance(node, list):
        if last == "-" and not replace:
            node.append(value)
        elif last.isdigit() and int(last) <= len(node) - (1 if replace else 0):
            if replace:
                node[int(last)] = value
            else:
                node.insert(int(last), value)
        else:
            raise _invalid_patch(f"index out of range in {path!r}")
    else:
        raise _invalid_patch(f"doc is missing path: {path!r}")
    return doc


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902 operations (add, remove, replace, move, copy, test) on a copy of target."""
    if not isinstance(operations, list):
        raise _invalid_patch("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise _invalid_patch(f"invalid operation {op!r}")
        kind, path = op["op"], op["path"]
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op.get("value")), replace=False)
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "replace":
            doc = _add(doc, path, copy.deepcopy(op.get("value")), replace=True)
        elif kind == "move":
            value = _remove(doc, op["from"])
            doc = _add(doc, path, value, replace=False)
        elif kind == "copy":
            doc = _add(doc, path, copy.deepcopy(_get(doc, op["from"])), replace=False)
        elif kind == "test":
            if _get(doc, path) != op.get("value"):
                raise _invalid_patch(f"testing value {path!r} failed")
        else:
            raise _invalid_patch(f"unexpected kind of operation {kind!r}")
    return doc

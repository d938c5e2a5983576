"""A few of kube-apiserver's pod validations (pkg/apis/core/validation), the ones a LoraResume
spec feeds into: the sandbox emulator does not check pod specs, a real cluster does (422).

Rules encoded (with the API server's field paths):
- metadata.labels: keys are qualified names, values at most 63 chars of [A-Za-z0-9-_.];
- spec.serviceAccountName, spec.priorityClassName: DNS-1123 subdomains;
- spec.nodeSelector: label keys and values as above;
- spec.tolerations[i]: empty key needs operator Exists; Exists needs an empty value;
  tolerationSeconds needs effect NoExecute; keys are qualified names, values label values;
- spec.containers[i].resources: quantities parse and are not negative;
- spec.containers[i].image: no leading or trailing whitespace.
"""

from __future__ import annotations

import re
from typing import Any

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# resource.ParseQuantity: a signed decimal number, then a suffix (binary SI, decimal SI, or decimal exponent).
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")


def dns_subdomain(value: str) -> bool:
    return len(value) <= 253 and bool(_DNS_SUBDOMAIN.match(value))


def qualified_name(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and not (prefix and dns_subdomain(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_NAME_PART.match(name))


def label_value(value: str) -> bool:
    return len(value) <= 63 and bool(_LABEL_VALUE.match(value))


def quantity(value: str) -> bool:
    return bool(_QUANTITY.match(value)) and not value.startswith("-")


def _labels(labels: dict[str, str], where: str) -> list[tuple[str, str]]:
    out = []
    for key, value in labels.items():
        if not qualified_name(key):
            out.append((f"{where}", f"Invalid value: {key!r}: name part must consist of alphanumeric characters, "
                                    "'-', '_' or '.', and must start and end with an alphanumeric character"))
        if not label_value(value):
            out.append((f"{where}", f"Invalid value: {value!r}: a valid label must be an empty string or consist of "
                                    "alphanumeric characters, '-', '_' or '.' (at most 63)"))
    return out


def api_server_pod_problems(pod: dict[str, Any]) -> list[tuple[str, str]]:
    """(field path, detail) for each rule above that `pod` breaks."""
    problems = _labels(pod["metadata"].get("labels") or {}, "metadata.labels")
    spec = pod["spec"]
    for key in ("serviceAccountName", "priorityClassName"):
        if spec.get(key) and not dns_subdomain(spec[key]):
            problems.append((f"spec.{key}", f"Invalid value: {spec[key]!r}: a lowercase RFC 1123 subdomain must "
                                            "consist of lower case alphanumeric characters, '-' or '.'"))
    problems += _labels(spec.get("nodeSelector") or {}, "spec.nodeSelector")
    for i, tol in enumerate(spec.get("tolerations") or []):
        where = f"spec.tolerations[{i}]"
        key, op, value = tol.get("key", ""), tol.get("operator", ""), tol.get("value", "")
        if key and not qualified_name(key):
            problems.append((f"{where}.key", f"Invalid value: {key!r}: not a qualified name"))
        if not key and op != "Exists":
            problems.append((f"{where}.operator", "operator must be Exists when `key` is empty"))
        if op == "Exists" and value:
            problems.append((f"{where}.operator", "value must be empty when `operator` is 'Exists'"))
        if op in ("", "Equal") and not label_value(value):
            problems.append((f"{where}.value", f"Invalid value: {value!r}: not a valid label value"))
        if "tolerationSeconds" in tol and tol.get("effect") != "NoExecute":
            problems.append((f"{where}.effect", "effect must be 'NoExecute' when `tolerationSeconds` is set"))
    for i, container in enumerate(spec.get("containers") or []):
        image = container.get("image") or ""
        if image != image.strip():
            problems.append((f"spec.containers[{i}].image",
                             f"Invalid value: {image!r}: must not have leading or trailing whitespace"))
        for kind in ("requests", "limits"):
            for name, amount in ((container.get("resources") or {}).get(kind) or {}).items():
                if not quantity(str(amount)):
                    problems.append((f"spec.containers[{i}].resources.{kind}[{name}]",
                                     f"Invalid value: {amount!r}: must be a non-negative quantity"))
    return problems

"""The API server's rules for names, labels and quantities that a LoraResume passes into its pods.

A value the pod would be refused for (422) is refused in the spec instead, naming the spec's
field: the user sees `spec.scheduling.nodeSelector` at apply or in status, not a pod that
never appears. Rules as in Kubernetes' apimachinery validation (IsQualifiedName,
IsValidLabelValue, IsDNS1123Subdomain, resource.ParseQuantity).
"""

from __future__ import annotations

import re

MAX_LABEL_VALUE = 63
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Non-negative quantities only: a request or limit below zero is refused by the API server.
QUANTITY_PATTERN = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
DNS_SUBDOMAIN_PATTERN = _DNS_SUBDOMAIN.pattern


def dns_subdomain_problem(value: str) -> str | None:
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        return (
            f"{value!r} is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253 characters)"
        )
    return None


def label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or dns_subdomain_problem(prefix)):
        return f"label key {key!r}: the prefix before '/' must be a DNS-1123 subdomain"
    if not 0 < len(name) <= 63 or not _NAME_PART.match(name):
        return (
            f"label key {key!r}: the name must be 1-63 characters of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def label_value_problem(value: str) -> str | None:
    if len(value) > MAX_LABEL_VALUE or not _LABEL_VALUE.match(value):
        return (
            f"label value {value!r}: at most 63 characters of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit (or empty)"
        )
    return None


def labels_problem(labels: dict[str, str]) -> str | None:
    for key, value in labels.items():
        problem = label_key_problem(key) or label_value_problem(value)
        if problem:
            return problem
    return None

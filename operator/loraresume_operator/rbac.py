"""The Kubernetes API rights the operator needs: the single list the Helm chart's RBAC renders.

Kept next to the code that makes the calls; `tests/operator/test_rbac_audit.py` runs the
operator on a real kube-apiserver as the chart's ServiceAccount, reads every (verb, group,
resource) it used from the API server's audit log and compares them with these rules (and
that RBAC refused none), and the chart tests compare the rendered Role/ClusterRole.
Each rule says why it is needed; nothing here is "just in case".
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import GROUP, PLURAL


@dataclass(frozen=True)
class Rule:
    api_group: str
    resource: str
    verbs: tuple[str, ...]
    why: str

    def as_policy_rule(self) -> dict[str, list[str]]:
        return {"apiGroups": [self.api_group], "resources": [self.resource], "verbs": list(self.verbs)}


# Rules granted in every watched namespace (Role) or cluster-wide (ClusterRole).
NAMESPACED_RULES: tuple[Rule, ...] = (
    Rule(
        GROUP,
        PLURAL,
        ("list", "watch", "patch"),
        "kopf watches LoraResumes and patches their finalizer and diff-base annotations; reconciles read "
        "them from the watch, and list one by name after a conflicting status write",
    ),
    Rule(
        GROUP,
        f"{PLURAL}/status",
        ("update",),
        "the status is replaced with a resourceVersion precondition (optimistic concurrency), "
        "so two reconciles cannot both count an attempt's end",
    ),
    Rule(
        "",
        "pods",
        ("list", "watch", "create", "delete", "deletecollection", "patch"),
        "trainer pods: one created per attempt, watched for their end (one the watch has not delivered yet is "
        "listed by name), removed with their LoraResume; "
        "one that never started (no spot capacity, an image that cannot be pulled) deleted; their accounting "
        "finalizer removed (patch) once the status counts their end",
    ),
    Rule(
        "",
        "events",
        ("create",),
        "Relaunching, Preempted, Succeeded... events on the LoraResume (kopf posts its own too)",
    ),
    Rule(
        "",
        "secrets",
        ("get",),
        "the S3 credentials Secret named in spec.storage.credentialsSecret, to read progress and "
        "checkpoints from S3 (kept in memory for a minute, never copied, logged or written anywhere)",
    ),
)

# Extra rules for cluster-wide mode only (ClusterRole): kopf's runtime scanning of CRDs. (It
# would watch namespaces only for namespace patterns, which the operator does not use; in
# namespaced mode scanning is off, see handlers.configure.)
CLUSTER_RULES: tuple[Rule, ...] = (
    Rule(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        ("list", "watch"),
        "kopf notices the LoraResume CRD being installed or removed while it runs",
    ),
)


def policy_rules(cluster_wide: bool) -> list[dict[str, list[str]]]:
    """PolicyRules as the chart renders them (one resource per rule)."""
    rules = NAMESPACED_RULES + (CLUSTER_RULES if cluster_wide else ())
    return [rule.as_policy_rule() for rule in rules]


def grants(cluster_wide: bool) -> set[tuple[str, str, str]]:
    """(verb, apiGroup, resource) triples, for comparing with what the operator was seen doing."""
    rules = NAMESPACED_RULES + (CLUSTER_RULES if cluster_wide else ())
    return {(verb, rule.api_group, rule.resource) for rule in rules for verb in rule.verbs}

"""Every trainer pod is hardened, whatever the spec asks for: no API token (also with a service
account of its own), non-root, no privilege escalation, all capabilities dropped, read-only root
filesystem, seccomp, only emptyDir volumes, credentials only as secretKeyRefs.

tests/operator/test_pods.py checks one spec's pod field by field; this walks a table of specs
through the same policy (tests/support/pod_policy.py, also applied to every hypothesis-drawn
spec in tests/operator/test_spec_judges.py) and the official pod schema.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from loraresume_operator.decide import CreatePod, Resource
from loraresume_operator.pods import build_trainer_pod
from loraresume_operator.spec import LoraResumeSpec
from tests.support.pod_policy import SECRET_ENV, hardening_problems
from tests.support.reconciler_harness import OperatorDefaults

RES = Resource("bot", "ml", "0b0e7c9e-6f55-4c1e-9d55-1b0a4f1e2c3d", 1)
BASE: dict[str, Any] = {
    "baseModel": "unsloth/llama-3-8b-bnb-4bit",
    "dataset": {"source": "s3://data/d.jsonl"},
    "storage": {"uri": "s3://ckpt/bot/"},
}
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

SPECS: dict[str, tuple[dict[str, Any], OperatorDefaults, bool]] = {
    # name: (spec edits, operator defaults, on-demand attempt)
    "minimal": ({}, OperatorDefaults(), False),
    "credentials-secret": (
        {"storage": {"uri": "s3://ckpt/bot/", "credentialsSecret": "s3-creds"}},
        OperatorDefaults(),
        False,
    ),
    "service-account-irsa": ({"serviceAccountName": "trainer-irsa"}, OperatorDefaults(), False),
    "service-account-and-secret": (
        {"serviceAccountName": "default", "storage": {"uri": "s3://ckpt/bot/", "credentialsSecret": "s3-creds"}},
        OperatorDefaults(),
        False,
    ),
    "platform-default-secret": ({}, OperatorDefaults(credentials_secret="platform-s3"), False),
    "image-override": (
        {"image": "registry.example/custom-trainer:2", "imagePullPolicy": "Always"},
        OperatorDefaults(),
        False,
    ),
    "spot": (
        {
            "scheduling": {
                "spot": {
                    "enabled": True,
                    "nodeSelector": {"spot": "true"},
                    "tolerations": [TOLERATION],
                    "fallbackToOnDemandAfter": 2,
                }
            }
        },
        OperatorDefaults(),
        False,
    ),
    "spot-fallen-back": (
        {
            "scheduling": {
                "spot": {"enabled": True, "fallbackToOnDemandAfter": 2, "onDemandNodeSelector": {"pool": "on-demand"}}
            }
        },
        OperatorDefaults(),
        True,
    ),
    "placement": (
        {
            "scheduling": {
                "nodeSelector": {"pool": "gpu"},
                "tolerations": [TOLERATION],
                "priorityClassName": "training",
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h200"]}]}
                            ]
                        }
                    }
                },
            }
        },
        OperatorDefaults(),
        False,
    ),
    "cpu-only": (
        {"resources": {"gpus": 0, "cpu": "4", "memory": "16Gi", "ephemeralStorage": "50Gi"}},
        OperatorDefaults(),
        False,
    ),
    "long-grace": ({"terminationGracePeriodSeconds": 3600}, OperatorDefaults(), False),
}


def pod_for(
    edits: dict[str, Any], defaults: OperatorDefaults, on_demand: bool
) -> tuple[dict[str, Any], LoraResumeSpec]:
    spec = LoraResumeSpec.model_validate({**BASE, **edits})
    try:
        from loraresume_operator.defaults import effective_spec

        spec = effective_spec(spec, defaults, spec.storage.uri)
    except ImportError:  # pragma: no cover - before operator defaults existed
        pass
    create = CreatePod("bot-attempt-2", 2, "s3://ckpt/bot/checkpoints/checkpoint-10/", on_demand, None)
    return build_trainer_pod(RES, spec, create, defaults), spec


@pytest.mark.parametrize("name", list(SPECS))
def test_every_trainer_pod_meets_the_policy(name: str) -> None:
    edits, defaults, on_demand = SPECS[name]
    pod, spec = pod_for(edits, defaults, on_demand)
    assert hardening_problems(pod) == []
    ps = pod["spec"]
    assert ps["automountServiceAccountToken"] is False  # also with a service account of its own
    assert ps.get("serviceAccountName") == (spec.service_account_name or None)
    assert ps["securityContext"]["runAsUser"] != 0 and ps["securityContext"]["runAsNonRoot"] is True
    assert all(set(v) == {"name", "emptyDir"} for v in ps["volumes"])
    env = {e["name"]: e for e in ps["containers"][0]["env"]}
    secret_name = spec.storage.credentials_secret
    for key in SECRET_ENV:
        if secret_name:
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == secret_name and "value" not in env[key]
        else:
            assert key not in env  # the pod's identity (IRSA, workload identity) instead
    kubernetes_validate.validate(pod, "1.33.0", strict=True)


def test_the_policy_checker_catches_each_weakening() -> None:
    """Not vacuous: every rule of pod_policy fires on a pod weakened in that one way."""
    import copy

    good, _ = pod_for(
        {"storage": {"uri": "s3://ckpt/bot/", "credentialsSecret": "s3-creds"}}, OperatorDefaults(), False
    )
    weakenings = {
        "token": lambda p: p["spec"].update(automountServiceAccountToken=True),
        "token-default": lambda p: p["spec"].pop("automountServiceAccountToken"),
        "host-network": lambda p: p["spec"].update(hostNetwork=True),
        "root-uid": lambda p: p["spec"]["securityContext"].update(runAsUser=0),
        "no-seccomp": lambda p: p["spec"]["securityContext"].pop("seccompProfile"),
        "host-path": lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "secret-volume": lambda p: p["spec"]["volumes"].append({"name": "s", "secret": {"secretName": "s3-creds"}}),
        "privileged": lambda p: p["spec"]["containers"][0]["securityContext"].update(privileged=True),
        "escalation": lambda p: p["spec"]["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        "writable-root": lambda p: p["spec"]["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"),
        "caps-kept": lambda p: p["spec"]["containers"][0]["securityContext"].pop("capabilities"),
        "caps-added": lambda p: p["spec"]["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
        "root-container": lambda p: p["spec"]["containers"][0]["securityContext"].update(runAsNonRoot=False),
        "literal-secret": lambda p: p["spec"]["containers"][0]["env"].append(
            {"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}
        ),
        "env-from-secret": lambda p: p["spec"]["containers"][0].update(envFrom=[{"secretRef": {"name": "s3-creds"}}]),
    }
    assert hardening_problems(good) == []
    for name, weaken in weakenings.items():
        pod = copy.deepcopy(good)
        weaken(pod)
        assert hardening_problems(pod), name

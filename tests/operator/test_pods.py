"""The trainer pod and job config builders, as data."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from loraresume_operator.decide import CreatePod, Resource
from loraresume_operator.defaults import OperatorDefaults
from loraresume_operator.pods import build_trainer_pod, job_config
from loraresume_operator.spec import LoraResumeSpec
from loraresume_trainer.config import parse_job
from tests.support.specs import build_spec

RES = Resource("bot", "ml", "0b0e7c9e-6f55-4c1e-9d55-1b0a4f1e2c3d", 1)
DEFAULTS = OperatorDefaults(trainer_image="registry.example/trainer:1", storage_endpoint="http://minio:9000")
CREATE = CreatePod("bot-attempt-3", 3, "s3://ckpt/bot/checkpoints/checkpoint-20/", False, "s3://adapters/v1/")


BASE: dict[str, Any] = {
    "baseModel": "unsloth/llama-3-8b-bnb-4bit",
    "dataset": {"source": "s3://data/d.jsonl", "template": "alpaca"},
    "storage": {"uri": "s3://ckpt/bot/", "credentialsSecret": "s3-creds"},
    "training": {"maxSteps": 100, "extra": {"max_grad_norm": 0.3}},
    "resources": {"gpus": 1, "memory": "48Gi", "cpu": "8"},
    "scheduling": {
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "spot": {
            "enabled": True,
            "nodeSelector": {"cloud.google.com/gke-spot": "true"},
            "tolerations": [
                {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
            ],
            "fallbackToOnDemandAfter": 3,
            "onDemandNodeSelector": {"pool": "gpu-on-demand"},
        },
    },
    "terminationGracePeriodSeconds": 90,
}


def spec(**over: Any) -> LoraResumeSpec:
    return build_spec(BASE, **over)


def env_of(pod) -> dict:
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


def test_job_config_is_a_valid_trainer_job():
    job = parse_job(job_config(spec(), CREATE, DEFAULTS))
    assert job.attempt == 3 and job.adapter == "s3://adapters/v1/"
    assert job.resume.from_checkpoint == "s3://ckpt/bot/checkpoints/checkpoint-20/"
    assert job.storage.endpoint == "http://minio:9000"
    assert job.training["max_steps"] == 100 and job.training["max_grad_norm"] == 0.3
    assert job.training["per_device_train_batch_size"] == 2


def test_pod_is_hardened_and_owned():
    pod = build_trainer_pod(RES, spec(), CREATE, DEFAULTS)
    ps, container = pod["spec"], pod["spec"]["containers"][0]
    assert ps["automountServiceAccountToken"] is False and ps["restartPolicy"] == "Never"
    assert ps["securityContext"]["runAsNonRoot"] and ps["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"
    }
    sc = container["securityContext"]
    assert sc == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert ps["terminationGracePeriodSeconds"] == 90
    (owner,) = pod["metadata"]["ownerReferences"]
    assert owner["uid"] == RES.uid and owner["controller"] and owner["kind"] == "LoraResume"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == "registry.example/trainer:1"


def test_credentials_only_by_secret_reference():
    pod = build_trainer_pod(RES, spec(), CREATE, DEFAULTS)
    env = env_of(pod)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": key, "optional": False}},
        }
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert json.loads(env["LORARESUME_JOB"]["value"])["attempt"] == 3


def test_no_secret_means_the_pods_identity():
    pod = build_trainer_pod(
        RES, spec(storage={"uri": "s3://ckpt/bot/"}, serviceAccountName="trainer-irsa"), CREATE, DEFAULTS
    )
    assert "AWS_SECRET_ACCESS_KEY" not in env_of(pod)
    assert pod["spec"]["serviceAccountName"] == "trainer-irsa"


@pytest.mark.parametrize(
    ("on_demand", "selector", "toleration_keys"),
    [
        (False, {"pool": "gpu", "cloud.google.com/gke-spot": "true"}, ["nvidia.com/gpu", "cloud.google.com/gke-spot"]),
        (True, {"pool": "gpu-on-demand"}, ["nvidia.com/gpu"]),
    ],
    ids=["spot", "on-demand-fallback"],
)
def test_spot_and_on_demand_placement(on_demand, selector, toleration_keys):
    create = CreatePod("bot-attempt-4", 4, None, on_demand, None)
    pod = build_trainer_pod(RES, spec(), create, DEFAULTS)
    assert pod["spec"]["nodeSelector"] == selector
    assert [t["key"] for t in pod["spec"]["tolerations"]] == toleration_keys


@pytest.mark.parametrize("version", ["1.33.0", "1.37.0"])
def test_pod_passes_the_official_schema(version):
    pod = build_trainer_pod(RES, spec(), CREATE, DEFAULTS)
    kubernetes_validate.validate(pod, version, strict=True)


@pytest.mark.parametrize(
    ("over", "warm", "extend"),
    [
        ({}, False, None),
        ({"resume": {"warmStart": True}}, True, None),
        ({"warmStart": True}, True, None),  # the deprecated spelling still works
        ({"resume": {"extendFrom": "stage-1"}, "adapter": None}, False, True),
    ],
    ids=["plain", "warm", "deprecated-warm", "extend"],
)
def test_the_trainers_resume_settings(over, warm, extend):
    resume = job_config(spec(**over), CREATE, DEFAULTS)["resume"]
    assert resume["fromCheckpoint"] == CREATE.resume_from and resume["warmStart"] is warm
    assert resume.get("extend") is extend

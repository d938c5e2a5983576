"""Operator defaults from the environment: parsed strictly, applied only where a spec is silent."""

from __future__ import annotations

import json
from typing import Any

import pytest

from loraresume_operator.decide import CreatePod, Resource
from loraresume_operator.defaults import ENV, OperatorDefaults, OperatorSettingsError, effective_spec
from loraresume_operator.pods import build_trainer_pod, job_config
from loraresume_operator.policy import Policy
from loraresume_operator.spec import LoraResumeSpec, Toleration
from tests.support.specs import build_spec

SPOT_TAINT = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
FULL_ENV = {
    "LORARESUME_TRAINER_IMAGE": "registry.example/trainer:2",
    "LORARESUME_IMAGE_PULL_POLICY": "Always",
    "LORARESUME_GRACE_PERIOD_SECONDS": "25",
    "LORARESUME_STORAGE_URI_PREFIX": "s3://team-bucket/loraresume",
    "LORARESUME_S3_ENDPOINT": "http://minio.storage:9000",
    "LORARESUME_S3_REGION": "eu-west-1",
    "LORARESUME_CREDENTIALS_SECRET": "s3-creds",
    "LORARESUME_SPOT_NODE_SELECTOR": json.dumps({"cloud.google.com/gke-spot": "true"}),
    "LORARESUME_SPOT_TOLERATIONS": json.dumps([SPOT_TAINT]),
    "LORARESUME_ON_DEMAND_NODE_SELECTOR": json.dumps({"pool": "on-demand"}),
    "LORARESUME_ALLOWED_IMAGES": json.dumps(["registry.example/ml/"]),
    "LORARESUME_ALLOWED_SERVICE_ACCOUNTS": json.dumps(["trainer-irsa"]),
    "LORARESUME_REQUIRE_CREDENTIALS_LABEL": "false",
}


BASE: dict[str, Any] = {"baseModel": "unsloth/llama-3-8b-bnb-4bit", "dataset": {"source": "s3://data/rows.jsonl"}}


def spec(**over: Any) -> LoraResumeSpec:
    return build_spec(BASE, **over)


def test_empty_environment_gives_the_built_in_defaults() -> None:
    assert OperatorDefaults.from_env({}) == OperatorDefaults()
    assert OperatorDefaults().storage_uri_for("ns", "job") is None


def test_every_setting_is_read() -> None:
    d = OperatorDefaults.from_env(FULL_ENV)
    assert (d.trainer_image, d.image_pull_policy, d.grace_period_seconds) == (
        "registry.example/trainer:2",
        "Always",
        25,
    )
    assert (d.storage_endpoint, d.storage_region, d.credentials_secret) == (
        "http://minio.storage:9000",
        "eu-west-1",
        "s3-creds",
    )
    assert d.storage_uri_for("team-a", "llama-run") == "s3://team-bucket/loraresume/team-a/llama-run/"
    assert dict(d.spot_node_selector) == {"cloud.google.com/gke-spot": "true"}
    assert d.spot_tolerations == (Toleration.model_validate(SPOT_TAINT),)
    assert dict(d.on_demand_node_selector) == {"pool": "on-demand"}
    assert d.policy == Policy(("registry.example/ml/",), ("trainer-irsa",), require_credentials_label=False)
    assert set(FULL_ENV) == set(ENV)  # every documented variable is exercised


BAD_SETTINGS = [
    ("LORARESUME_ALLOWED_IMAGES", "ghcr.io/org/", "expected a JSON list of non-empty strings"),
    ("LORARESUME_ALLOWED_SERVICE_ACCOUNTS", '[""]', "expected a JSON list of non-empty strings"),
    ("LORARESUME_REQUIRE_CREDENTIALS_LABEL", "yes", "expected one of true, false"),
    ("LORARESUME_IMAGE_PULL_POLICY", "sometimes", "expected one of Always, IfNotPresent, Never"),
    ("LORARESUME_GRACE_PERIOD_SECONDS", "two minutes", "expected whole seconds"),
    ("LORARESUME_GRACE_PERIOD_SECONDS", "3", "expected 5 to 3600 seconds, got 3"),
    ("LORARESUME_STORAGE_URI_PREFIX", "gs://bucket/x", "is not an S3 URI"),
    ("LORARESUME_STORAGE_URI_PREFIX", "s3://Bad_Bucket/x", "invalid bucket name"),
    ("LORARESUME_SPOT_NODE_SELECTOR", "pool=spot", "expected a JSON object of node labels"),
    ("LORARESUME_SPOT_NODE_SELECTOR", '{"pool": 1}', "pool: Input should be a valid string"),
    ("LORARESUME_SPOT_TOLERATIONS", '{"key": "spot"}', "expected a JSON list of core/v1 tolerations"),
    ("LORARESUME_SPOT_TOLERATIONS", '[{"effect": "Sometimes"}]', "0.effect"),
    ("LORARESUME_SPOT_TOLERATIONS", '[{"keey": "spot"}]', "0.keey: Extra inputs are not permitted"),
]


@pytest.mark.parametrize("name,value,expected", BAD_SETTINGS)
def test_a_malformed_setting_names_the_variable_and_the_helm_value(name: str, value: str, expected: str) -> None:
    with pytest.raises(OperatorSettingsError) as info:
        OperatorDefaults.from_env({name: value})
    message = str(info.value)
    assert message.startswith(f"operator setting {name} (Helm value {ENV[name]}): ")
    assert expected in message


def test_the_operator_refuses_to_start_with_a_malformed_setting(monkeypatch, capsys) -> None:
    from loraresume_operator import cli

    monkeypatch.setenv("LORARESUME_GRACE_PERIOD_SECONDS", "0")
    assert cli.main(["-n", "default", "--metrics-port", "0"]) == 2
    assert (
        "LORARESUME_GRACE_PERIOD_SECONDS (Helm value trainer.terminationGracePeriodSeconds)" in capsys.readouterr().err
    )


def test_defaults_fill_only_what_the_spec_leaves_empty() -> None:
    defaults = OperatorDefaults.from_env(FULL_ENV)
    silent = effective_spec(spec(scheduling={"spot": {"enabled": True}}), defaults, "s3://team-bucket/p/ns/a/")
    assert silent.storage.uri == "s3://team-bucket/p/ns/a/"
    assert (silent.storage.endpoint, silent.storage.region, silent.storage.credentials_secret) == (
        "http://minio.storage:9000",
        "eu-west-1",
        "s3-creds",
    )
    assert silent.termination_grace_period_seconds == 25
    assert silent.scheduling.spot.node_selector == {"cloud.google.com/gke-spot": "true"}
    assert silent.scheduling.spot.tolerations == [Toleration.model_validate(SPOT_TAINT)]
    assert silent.scheduling.spot.on_demand_node_selector == {"pool": "on-demand"}

    own = spec(
        storage={
            "uri": "s3://mine/run/",
            "endpoint": "http://other:9000",
            "region": "us-east-2",
            "credentialsSecret": "mine",
        },
        terminationGracePeriodSeconds=90,
        scheduling={
            "spot": {
                "enabled": True,
                "tolerations": [{"key": "spot", "operator": "Exists"}],
                "onDemandNodeSelector": {"pool": "mine"},
            }
        },
    )
    kept = effective_spec(own, defaults, "s3://mine/run/")
    assert kept.storage == own.storage and kept.termination_grace_period_seconds == 90
    assert kept.scheduling.spot == own.scheduling.spot  # own tolerations: no default selector mixed in


def test_spot_defaults_do_not_apply_to_jobs_off_spot() -> None:
    defaults = OperatorDefaults.from_env(FULL_ENV)
    off = effective_spec(spec(), defaults, "s3://b/p/")
    assert off.scheduling.spot.node_selector == {} and off.scheduling.spot.tolerations == []


def test_the_pod_carries_the_defaults() -> None:
    defaults = OperatorDefaults.from_env(FULL_ENV)
    resource = Resource("llama-run", "team-a", "uid-1", 1)
    effective = effective_spec(
        spec(scheduling={"spot": {"enabled": True}}), defaults, defaults.storage_uri_for("team-a", "llama-run")
    )
    create = CreatePod(name="llama-run-attempt-1", attempt=1, resume_from=None, adapter_uri=None, on_demand=False)
    pod = build_trainer_pod(resource, effective, create, defaults)
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert container["image"] == "registry.example/trainer:2" and container["imagePullPolicy"] == "Always"
    assert pod["spec"]["terminationGracePeriodSeconds"] == 25
    assert pod["spec"]["tolerations"] == [SPOT_TAINT]
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    storage = job_config(effective, create, defaults)["storage"]
    assert storage["uri"] == "s3://team-bucket/loraresume/team-a/llama-run/"
    assert storage["endpoint"] == "http://minio.storage:9000"
    on_demand = build_trainer_pod(
        resource,
        effective,
        CreatePod(name="llama-run-attempt-4", attempt=4, resume_from=None, adapter_uri=None, on_demand=True),
        defaults,
    )
    assert on_demand["spec"]["nodeSelector"] == {"pool": "on-demand"} and "tolerations" not in on_demand["spec"]

"""The operator's policy on images, ServiceAccounts and credential Secrets (pure decisions)."""

from __future__ import annotations

import pytest

from loraresume_operator.policy import CREDENTIALS_LABEL, Policy, credentials_problem, image_allowed, spec_problems
from loraresume_operator.spec import LoraResumeSpec
from tests.support.specs import MINIMAL

TRAINER = "ghcr.io/loraresume/trainer:0.1.0"


@pytest.mark.parametrize(
    "image, entry, allowed",
    [
        ("ghcr.io/org/trainer:2", "ghcr.io/org/trainer", True),  # a repository: any tag
        ("ghcr.io/org/trainer@sha256:abc", "ghcr.io/org/trainer", True),  # or digest
        ("ghcr.io/org/trainer-evil:2", "ghcr.io/org/trainer", False),  # not a prefix of the name
        ("ghcr.io/org/trainer", "ghcr.io/org/trainer", True),
        ("registry.example.com/ml/anything:1", "registry.example.com/ml/", True),  # a prefix ending in /
        ("registry.example.com/mlx/anything:1", "registry.example.com/ml/", False),
        ("evil.example/miner:1", "*", True),
    ],
)
def test_image_entries(image: str, entry: str, allowed: bool) -> None:
    assert image_allowed(image, entry) is allowed


def _spec(**over: object) -> LoraResumeSpec:
    return LoraResumeSpec.model_validate({**MINIMAL, **over})


@pytest.mark.parametrize(
    "over, policy, fields",
    [
        ({}, Policy(), []),
        ({"image": TRAINER}, Policy(), []),  # the operator's own image is always allowed
        ({"image": "evil.example/miner:1"}, Policy(), ["spec.image"]),
        ({"image": "registry.example.com/ml/t:1"}, Policy(allowed_images=("registry.example.com/ml/",)), []),
        ({"serviceAccountName": "default"}, Policy(), []),
        ({"serviceAccountName": "cluster-admin-sa"}, Policy(), ["spec.serviceAccountName"]),
        ({"serviceAccountName": "trainer-irsa"}, Policy(allowed_service_accounts=("trainer-irsa",)), []),
        ({"serviceAccountName": "x", "image": "y:1"}, Policy(), ["spec.image", "spec.serviceAccountName"]),
        ({"serviceAccountName": "x", "image": "y:1"}, Policy(("*",), ("*",)), []),
    ],
)
def test_spec_problems_name_the_field_and_the_helm_value(over: dict, policy: Policy, fields: list[str]) -> None:
    problems = spec_problems(_spec(**over), policy, TRAINER)
    assert [p.split(":")[0] for p in problems] == fields
    for problem in problems:
        assert "policy.allowedImages" in problem or "policy.allowedServiceAccounts" in problem


@pytest.mark.parametrize(
    "name, labels, policy, default, refused",
    [
        ("team-s3", CREDENTIALS_LABEL, Policy(), None, False),
        ("team-s3", None, Policy(), None, True),
        ("team-s3", {"loraresume.dev/credentials": "yes"}, Policy(), None, True),
        ("team-s3", {}, Policy(require_credentials_label=False), None, False),
        ("platform-s3", {}, Policy(), "platform-s3", False),  # the operator's own default is exempt
    ],
)
def test_credentials_secrets_must_be_labelled(name, labels, policy, default, refused) -> None:
    problem = credentials_problem("ns", name, labels, policy, default)
    assert (problem is not None) is refused
    if problem:
        assert problem.startswith("spec.storage.credentialsSecret: Secret ns/team-s3")
        assert 'loraresume.dev/credentials="true"' in problem and "policy.requireCredentialsLabel" in problem

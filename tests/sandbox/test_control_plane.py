"""The sandbox's control plane is the real thing: version, admission (PodSecurity `restricted`), the
chart's RBAC as the operator's ServiceAccount, CRD schema and CEL validation by the API server."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from loraresume_operator.decide import CreatePod, Resource
from loraresume_operator.defaults import OperatorDefaults
from loraresume_operator.pods import build_trainer_pod
from loraresume_operator.spec import LoraResumeSpec
from loraresume_sandbox.cluster import Installation, install_chart, sandbox_values
from loraresume_sandbox.control_plane import RESTRICTED, ControlPlane
from loraresume_sandbox.kube_client import ApiError, KubeClient

NS = "team-a"
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with ControlPlane(tmp_path_factory.mktemp("kube"), quiet=True) as plane:
        plane.create_namespace(NS, RESTRICTED)
        yield plane


@pytest.fixture(scope="module")
def installed(cp: ControlPlane) -> Installation:
    return install_chart(cp.admin, sandbox_values(namespaces=[NS]))


@pytest.fixture(scope="module")
def operator_client(cp: ControlPlane, installed: Installation) -> KubeClient:
    """A client with a token of the chart's ServiceAccount: what the operator runs as."""
    token = cp.service_account_token(installed.namespace, installed.service_account)
    return KubeClient(cp.url, cp.ca_file, token=token)


def trainer_pod() -> dict[str, Any]:
    spec = LoraResumeSpec.model_validate(
        {
            "baseModel": "unsloth/llama-3-8b-bnb-4bit",
            "dataset": {"source": "s3://data/d.jsonl"},
            "storage": {"uri": "s3://ckpt/bot/", "credentialsSecret": "s3-creds"},
            "resources": {"gpus": 1},
        }
    )
    create = CreatePod("bot-attempt-1", 1, None, False, None)
    return build_trainer_pod(
        Resource("bot", NS, "0b0e7c9e-6f55-4c1e-9d55-1b0a4f1e2c3d", 1),
        spec,
        create,
        OperatorDefaults(trainer_image="ghcr.io/loraresume/trainer:0.1.0"),
    )


def test_kubectl_reports_the_real_server_version(cp: ControlPlane) -> None:
    assert cp.admin.request("GET", "/version")["gitVersion"] == "v1.37.2"
    if shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "--kubeconfig", str(cp.admin_kubeconfig), "version", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["serverVersion"]["gitVersion"] == "v1.37.2"


def test_trainer_pod_is_admitted_under_restricted(cp: ControlPlane) -> None:
    pod = trainer_pod()
    pod["metadata"].pop("ownerReferences")  # no owner object exists in this test
    created = cp.admin.request("POST", f"/api/v1/namespaces/{NS}/pods", pod, params={"dryRun": "All"})
    assert created["metadata"]["name"] == "bot-attempt-1"


@pytest.mark.parametrize(
    ("path", "violation"),
    [
        (("spec", "containers", 0, "securityContext", "allowPrivilegeEscalation"), "allowPrivilegeEscalation != false"),
        (("spec", "containers", 0, "securityContext", "capabilities"), "unrestricted capabilities"),
        (("spec", "securityContext", "seccompProfile"), "seccompProfile"),
        (("spec", "securityContext", "runAsNonRoot"), "runAsNonRoot != true"),
    ],
)
def test_pod_security_refuses_a_trainer_pod_without_a_hardening_field(
    cp: ControlPlane, path: tuple[Any, ...], violation: str
) -> None:
    pod = trainer_pod()
    pod["metadata"].pop("ownerReferences")
    if path[-1] == "runAsNonRoot":
        pod["spec"]["containers"][0]["securityContext"].pop("runAsNonRoot")
    node: Any = pod
    for key in path[:-1]:
        node = node[key]
    node.pop(path[-1])
    with pytest.raises(ApiError) as refused:
        cp.admin.request("POST", f"/api/v1/namespaces/{NS}/pods", copy.deepcopy(pod), params={"dryRun": "All"})
    assert refused.value.code == 403
    assert 'violates PodSecurity "restricted:latest"' in refused.value.message
    assert violation in refused.value.message, refused.value.message


def test_chart_rbac_lets_the_operator_do_its_work_in_its_namespace(operator_client: KubeClient) -> None:
    assert operator_client.list("loraresumes", NS) == []
    assert operator_client.list("pods", NS) == []


@pytest.mark.parametrize(
    ("method", "path", "what"),
    [
        ("GET", f"/api/v1/namespaces/{NS}/secrets", "list secrets"),  # get by name only
        ("GET", "/api/v1/namespaces/default/pods", "pods outside the watched namespace"),
        ("PUT", f"/api/v1/namespaces/{NS}/pods/x/status", "write a pod's status"),
        ("GET", "/api/v1/nodes", "nodes"),
        ("POST", f"/api/v1/namespaces/{NS}/configmaps", "create configmaps"),
    ],
)
def test_a_request_outside_the_charts_rbac_is_refused_with_403(
    operator_client: KubeClient, installed: Installation, method: str, path: str, what: str
) -> None:
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}} if method == "POST" else None
    with pytest.raises(ApiError) as refused:
        operator_client.request(method, path, body)
    assert refused.value.code == 403, what
    assert f"system:serviceaccount:{installed.namespace}:{installed.service_account}" in refused.value.message


def test_the_api_server_validates_loraresumes_with_the_crd_schema_and_cel(
    cp: ControlPlane, installed: Installation
) -> None:
    body = {
        "apiVersion": "loraresume.dev/v1alpha1",
        "kind": "LoraResume",
        "metadata": {"name": "bad"},
        "spec": {
            "baseModel": "m",
            "dataset": {"source": "s3://d/x.jsonl"},
            "storage": {"uri": "s3://c/p/"},
            "training": {"maxSteps": -1},
        },
    }
    with pytest.raises(ApiError) as refused:
        cp.admin.create("loraresumes", body, NS)
    assert refused.value.code == 422 and "spec.training.maxSteps" in refused.value.message


@pytest.mark.parametrize(
    ("mode", "code", "says"),
    [
        ("Strict", 400, 'unknown field "spec.baseModel.a"'),  # strict decoding looks inside the object first
        ("Warn", 422, "spec.baseModel: Invalid value"),  # pruned, then a type error at the field
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_the_field(
    cp: ControlPlane, installed: Installation, mode: str, code: int, says: str
) -> None:
    body = {
        "apiVersion": "loraresume.dev/v1alpha1",
        "kind": "LoraResume",
        "metadata": {"name": "typed"},
        "spec": {"baseModel": {"a": 1}, "dataset": {"source": "s3://d/x.jsonl"}, "storage": {"uri": "s3://c/p/"}},
    }
    with pytest.raises(ApiError) as refused:
        cp.admin.request(
            "POST",
            f"/apis/loraresume.dev/v1alpha1/namespaces/{NS}/loraresumes",
            body,
            params={"dryRun": "All", "fieldValidation": mode},
        )
    assert refused.value.code == code and says in refused.value.message, refused.value.message


def test_a_pod_whose_owner_does_not_exist_is_garbage_collected(cp: ControlPlane) -> None:
    from loraresume_sandbox.waiting import wait_for

    pod = trainer_pod()
    pod["metadata"]["name"] = "orphan"
    pod["metadata"]["ownerReferences"][0]["uid"] = "00000000-0000-0000-0000-000000000000"
    cp.admin.create("pods", pod, NS)
    # Deleted by the garbage collector; the accounting finalizer keeps it until an operator (none
    # runs here) lets it go.
    wait_for(
        lambda: (cp.admin.get("pods", NS, "orphan") or {}).get("metadata", {}).get("deletionTimestamp"),
        60,
        "the garbage collector deleting the orphan",
    )
    cp.admin.request(
        "PATCH",
        f"/api/v1/namespaces/{NS}/pods/orphan",
        [{"op": "remove", "path": "/metadata/finalizers"}],
        content_type="application/json-patch+json",
    )
    wait_for(lambda: cp.admin.get("pods", NS, "orphan") is None, 30, "the orphan gone once let go")


def test_a_pod_naming_a_missing_service_account_is_refused_by_admission(cp: ControlPlane) -> None:
    pod = trainer_pod()
    pod["metadata"].pop("ownerReferences")
    pod["spec"]["serviceAccountName"] = "no-such-account"
    with pytest.raises(ApiError) as refused:
        cp.admin.request("POST", f"/api/v1/namespaces/{NS}/pods", pod, params={"dryRun": "All"})
    assert refused.value.code == 403 and 'serviceaccount "no-such-account" not found' in refused.value.message

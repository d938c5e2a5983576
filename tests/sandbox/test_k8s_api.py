"""Fidelity of the sandbox's Kubernetes API emulator, through the clients that will use it.

Every behaviour is checked through the official python client, kubectl (subprocesses
with a generated kubeconfig) or kopf itself, over HTTP on loopback, so the tests show
that the sandbox behaves like an API server to them, not merely like its own model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from tests.support.waiting import wait_for
import yaml
from kubernetes.client.rest import ApiException

from loraresume_sandbox import KubernetesEmulator
from loraresume_sandbox.k8s_schema import StructuralSchema

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "loraresume.dev", "v1alpha1", "loraresumes"

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")

IMMUTABLE = {"rule": "self == oldSelf", "message": "model is immutable: create a new LoraResume instead"}
TEST_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "names": {"kind": "LoraResume", "listKind": "LoraResumeList", "plural": PLURAL, "singular": "loraresume",
                  "shortNames": ["lr"], "categories": ["all", "ml"]},
        "scope": "Namespaced",
        "versions": [{
            "name": VERSION,
            "served": True,
            "storage": True,
            "subresources": {"status": {}},
            "additionalPrinterColumns": [
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Steps", "type": "integer", "jsonPath": ".spec.training.maxSteps"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ],
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "required": ["spec"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "spec": {
                        "type": "object",
                        "required": ["model"],
                        "x-kubernetes-validations": [
                            {"rule": "has(self.datasetName) != has(self.datasetUri)",
                             "message": "set exactly one of datasetName or datasetUri"},
                        ],
                        "properties": {
                            "model": {"type": "string", "minLength": 1, "x-kubernetes-validations": [IMMUTABLE]},
                            "datasetName": {"type": "string"},
                            "datasetUri": {"type": "string", "pattern": "^s3://"},
                            "mode": {"type": "string", "enum": ["lora", "qlora"], "default": "lora"},
                            "note": {"type": "string", "nullable": True},
                            "priority": {"type": "integer", "default": 5},
                            "training": {
                                "type": "object",
                                "default": {},
                                "properties": {
                                    "maxSteps": {"type": "integer", "minimum": 1, "default": 10},
                                    "learningRate": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                                    "schedule": {"type": "object", "properties": {
                                        "warmup": {"type": "integer", "default": 3}}},
                                },
                            },
                            "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                        },
                    },
                    "status": {
                        "type": "object",
                        "properties": {
                            "phase": {"type": "string", "enum": ["Pending", "Running", "Succeeded", "Failed"]},
                            "podName": {"type": "string"},
                            "observedGeneration": {"type": "integer"},
                            "conditions": {"type": "array", "items": {
                                "type": "object",
                                "required": ["type", "status"],
                                "properties": {"type": {"type": "string"}, "status": {"type": "string"},
                                               "reason": {"type": "string"}, "message": {"type": "string"}},
                            }},
                        },
                    },
                },
            }},
        }],
    },
}  # fmt: skip


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("k8s-api")


@pytest.fixture(scope="module")
def emulator(workdir: Path) -> Iterator[KubernetesEmulator]:
    crd_file = workdir / "crd.yaml"
    crd_file.write_text(yaml.safe_dump(TEST_CRD))
    with KubernetesEmulator() as k8s:
        assert k8s.load_crds([crd_file]) == [f"{PLURAL}.{GROUP}"]
        yield k8s


@pytest.fixture(scope="module")
def kubeconfig(emulator: KubernetesEmulator, workdir: Path) -> Path:
    return emulator.write_kubeconfig(workdir / "kubeconfig")


@pytest.fixture(scope="module")
def api(kubeconfig: Path) -> Iterator[kubernetes.client.ApiClient]:
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    yield client
    client.close()


@pytest.fixture
def core(api: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api)


@pytest.fixture
def custom(api: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api)


@pytest.fixture
def kubectl(kubeconfig: Path, workdir: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(
        *args: str, stdin: str | None = None, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["kubectl", f"--kubeconfig={kubeconfig}", f"--cache-dir={workdir / 'kube-cache'}", *args],
            input=stdin, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    return run


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def lr_body(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoraResume",
        "metadata": {"name": name},
        "spec": {"model": "tiny-llama", "datasetName": "alpaca", **spec},
    }


def pod_body(name: str, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **metadata},
        "spec": {"containers": [{"name": "main", "image": "busybox:1.36", "command": ["true"]}]},
    }


def http_json(emulator: KubernetesEmulator, path: str) -> Any:
    with urllib.request.urlopen(emulator.url + path, timeout=10) as response:
        return json.loads(response.read())


def error_of(excinfo: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    return json.loads(excinfo.value.body)




# -- 1. discovery ----------------------------------------------------------------------------


def test_core_discovery_has_v1_group_version_and_resources(emulator: KubernetesEmulator) -> None:
    assert http_json(emulator, "/api")["versions"] == ["v1"]
    core_list = http_json(emulator, "/api/v1")
    assert core_list["groupVersion"] == "v1"
    names = {r["name"]: r for r in core_list["resources"]}
    for wanted in (
        "pods",
        "pods/log",
        "pods/status",
        "namespaces",
        "secrets",
        "configmaps",
        "events",
        "serviceaccounts",
    ):
        assert wanted in names, wanted
    assert names["pods"]["kind"] == "Pod" and names["pods"]["namespaced"] is True and "watch" in names["pods"]["verbs"]
    assert names["namespaces"]["namespaced"] is False
    assert http_json(emulator, "/version")["major"] == "1"


def test_crd_discovery_and_crd_listing(emulator: KubernetesEmulator, api: kubernetes.client.ApiClient) -> None:
    groups = {g["name"]: g for g in http_json(emulator, "/apis")["groups"]}
    assert groups[GROUP]["preferredVersion"]["version"] == VERSION
    assert "apiextensions.k8s.io" in groups
    resources = {r["name"]: r for r in http_json(emulator, f"/apis/{GROUP}/{VERSION}")["resources"]}
    main = resources[PLURAL]
    assert (main["kind"], main["singularName"], main["shortNames"], main["categories"], main["namespaced"]) == (
        "LoraResume",
        "loraresume",
        ["lr"],
        ["all", "ml"],
        True,
    )
    assert set(main["verbs"]) >= {"create", "get", "list", "watch", "patch", "update", "delete"}
    assert resources[f"{PLURAL}/status"]["verbs"] == ["get", "patch", "update"]
    crds = kubernetes.client.ApiextensionsV1Api(api).list_custom_resource_definition()
    crd = next(c for c in crds.items if c.metadata.name == f"{PLURAL}.{GROUP}")
    assert crd.spec.names.short_names == ["lr"]
    assert any(c.type == "Established" and c.status == "True" for c in crd.status.conditions)


def test_openapi_v3_declares_field_validation_for_patch(emulator: KubernetesEmulator) -> None:
    index = http_json(emulator, "/openapi/v3")["paths"]
    doc = http_json(emulator, index[f"apis/{GROUP}/{VERSION}"]["serverRelativeURL"])
    item = doc["paths"][f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}/{{name}}"]
    assert item["patch"]["x-kubernetes-group-version-kind"] == {
        "group": GROUP,
        "version": VERSION,
        "kind": "LoraResume",
    }
    assert "fieldValidation" in {p["name"] for p in item["patch"]["parameters"]}
    assert "api/v1" in index


# -- 2. object metadata, namespaces, selectors ----------------------------------------------------


def test_metadata_uid_timestamps_versions_and_list_kinds(core: kubernetes.client.CoreV1Api) -> None:
    first = core.create_namespaced_config_map("default", {"metadata": {"name": unique("cm")}, "data": {"a": "1"}})
    second = core.create_namespaced_config_map("default", {"metadata": {"name": unique("cm")}, "data": {"a": "2"}})
    assert uuid.UUID(first.metadata.uid).version == 4 and first.metadata.uid != second.metadata.uid
    assert first.metadata.creation_timestamp is not None
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    raw = json.loads(core.list_namespaced_config_map("default", _preload_content=False).data)
    assert (raw["kind"], raw["apiVersion"]) == ("ConfigMapList", "v1")
    assert int(raw["metadata"]["resourceVersion"]) >= int(second.metadata.resource_version)
    assert all((item["kind"], item["apiVersion"]) == ("ConfigMap", "v1") for item in raw["items"])


def test_generation_counts_spec_changes_only(custom: kubernetes.client.CustomObjectsApi) -> None:
    name = unique("gen")
    args = (GROUP, VERSION, "default", PLURAL, name)
    assert (
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, lr_body(name))["metadata"][
            "generation"
        ]
        == 1
    )
    assert (
        custom.patch_namespaced_custom_object(*args, {"metadata": {"labels": {"a": "b"}}})["metadata"]["generation"]
        == 1
    )
    assert (
        custom.patch_namespaced_custom_object_status(*args, {"status": {"phase": "Running"}})["metadata"]["generation"]
        == 1
    )
    changed = custom.patch_namespaced_custom_object(*args, {"spec": {"priority": 7}})
    assert changed["metadata"]["generation"] == 2
    same = custom.patch_namespaced_custom_object(*args, {"spec": {"priority": 7}})
    assert same["metadata"]["resourceVersion"] == changed["metadata"]["resourceVersion"]  # no-op write


def test_namespaces_listed_created_on_demand_and_by_post(core: kubernetes.client.CoreV1Api) -> None:
    assert "default" in {ns.metadata.name for ns in core.list_namespace().items}
    on_demand = unique("ns")
    core.create_namespaced_config_map(on_demand, {"metadata": {"name": "x"}})
    assert core.read_namespace(on_demand).status.phase == "Active"
    posted = unique("ns")
    core.create_namespace({"metadata": {"name": posted}})
    core.create_namespaced_pod(posted, pod_body("p"))
    core.delete_namespace(posted)
    with pytest.raises(ApiException) as excinfo:
        core.read_namespaced_pod("p", posted)
    assert excinfo.value.status == 404
    with pytest.raises(ApiException) as excinfo:
        core.read_namespace(posted)
    assert excinfo.value.status == 404


def test_label_and_field_selectors_on_lists(core: kubernetes.client.CoreV1Api) -> None:
    ns = unique("sel")
    core.create_namespaced_pod(ns, pod_body("a", labels={"app": "x", "tier": "web"}))
    core.create_namespaced_pod(ns, pod_body("b", labels={"app": "x", "tier": "db", "skip": "1"}))
    core.create_namespaced_pod(ns, pod_body("c", labels={"app": "y"}))

    def names(**kw: Any) -> list[str]:
        return sorted(p.metadata.name for p in core.list_namespaced_pod(ns, **kw).items)

    assert names(label_selector="app=x") == ["a", "b"]
    assert names(label_selector="app=x,!skip") == ["a"]
    assert names(label_selector="tier in (web,db),app!=y") == ["a", "b"]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector="metadata.name!=c,status.phase=Pending") == ["a", "b"]


# -- 3. verbs -------------------------------------------------------------------------------


def test_create_conflict_generate_name_and_not_found_status(core: kubernetes.client.CoreV1Api) -> None:
    name = unique("dup")
    core.create_namespaced_secret("default", {"metadata": {"name": name}, "stringData": {"k": "v"}})
    assert core.read_namespaced_secret(name, "default").data == {"k": "dg=="}  # stringData is stored as data
    with pytest.raises(ApiException) as excinfo:
        core.create_namespaced_secret("default", {"metadata": {"name": name}})
    assert excinfo.value.status == 409 and error_of(excinfo)["reason"] == "AlreadyExists"
    core.delete_namespaced_secret(name, "default")
    assert name not in {s.metadata.name for s in core.list_namespaced_secret("default").items}
    generated = core.create_namespaced_config_map("default", {"metadata": {"generateName": "gen-"}})
    assert generated.metadata.name.startswith("gen-") and len(generated.metadata.name) == len("gen-") + 5
    with pytest.raises(ApiException) as excinfo:
        core.read_namespaced_pod("missing", "default")
    status = error_of(excinfo)
    assert excinfo.value.status == 404
    assert (status["kind"], status["reason"], status["code"], status["message"]) == (
        "Status",
        "NotFound",
        404,
        'pods "missing" not found',
    )


def test_watch_streams_events_resumes_and_times_out(
    core: kubernetes.client.CoreV1Api, emulator: KubernetesEmulator
) -> None:
    ns = unique("watch")
    core.create_namespaced_pod(ns, pod_body("ignored", labels={"w": "no"}))
    start_rv = core.list_namespaced_pod(ns).metadata.resource_version
    seen: list[tuple[str, str, int]] = []

    def consume() -> None:
        stream = kubernetes.watch.Watch().stream(
            core.list_namespaced_pod, ns, label_selector="w=yes", resource_version=start_rv, timeout_seconds=3
        )
        for event in stream:
            obj = event["object"]
            seen.append((event["type"], obj.metadata.name, int(obj.metadata.resource_version)))

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.3)
    core.create_namespaced_pod(ns, pod_body("p", labels={"w": "yes"}))
    core.patch_namespaced_pod("p", ns, {"metadata": {"annotations": {"touched": "1"}}})
    core.patch_namespaced_pod("ignored", ns, {"metadata": {"annotations": {"touched": "1"}}})
    core.delete_namespaced_pod("p", ns)
    began = time.monotonic()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - began < 5  # timeoutSeconds ends the stream
    assert [(t, n) for t, n, _ in seen] == [("ADDED", "p"), ("MODIFIED", "p"), ("DELETED", "p")]
    versions = [rv for _, _, rv in seen]
    assert versions == sorted(versions) and len(set(versions)) == 3

    # Resuming from the ADDED event's version replays what followed, from history.
    resumed = kubernetes.watch.Watch().stream(
        core.list_namespaced_pod, ns, label_selector="w=yes", resource_version=str(versions[0]), timeout_seconds=1
    )
    assert [e["type"] for e in resumed] == ["MODIFIED", "DELETED"]


def test_watch_from_a_version_older_than_history_is_gone() -> None:
    with KubernetesEmulator(history_size=5) as small:
        for i in range(8):
            small.create("configmaps", {"metadata": {"name": f"c{i}"}}, "default")
        url = f"{small.url}/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=1&timeoutSeconds=2"
        with urllib.request.urlopen(url, timeout=10) as response:
            event = json.loads(response.readline())
    assert event["type"] == "ERROR" and event["object"]["code"] == 410


def test_replace_conflicts_on_stale_resource_version(core: kubernetes.client.CoreV1Api) -> None:
    name = unique("put")
    created = core.create_namespaced_config_map("default", {"metadata": {"name": name}, "data": {"v": "1"}})
    created.data = {"v": "2"}
    replaced = core.replace_namespaced_config_map(name, "default", created)
    assert replaced.data == {"v": "2"}
    created.data = {"v": "3"}  # still carries the first resourceVersion
    with pytest.raises(ApiException) as excinfo:
        core.replace_namespaced_config_map(name, "default", created)
    assert excinfo.value.status == 409 and error_of(excinfo)["reason"] == "Conflict"


def test_patch_dialects(core: kubernetes.client.CoreV1Api, custom: kubernetes.client.CustomObjectsApi) -> None:
    ns = unique("patch")
    pod = pod_body("two")
    pod["spec"]["containers"].append({"name": "side", "image": "busybox:1.36"})
    core.create_namespaced_pod(ns, pod)
    # The python client sends strategic merge patches for built-in kinds: containers merge by name.
    patched = core.patch_namespaced_pod(
        "two", ns, {"spec": {"containers": [{"name": "side", "image": "busybox:1.37"}]}}
    )
    assert [(c.name, c.image) for c in patched.spec.containers] == [("main", "busybox:1.36"), ("side", "busybox:1.37")]
    # A list body is a JSON patch.
    patched = core.patch_namespaced_pod("two", ns, [{"op": "add", "path": "/metadata/labels", "value": {"j": "p"}}])
    assert patched.metadata.labels == {"j": "p"}
    # Custom resources take JSON merge patches; null removes a field.
    name = unique("merge")
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, lr_body(name, note="hi"))
    merged = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, name, {"spec": {"note": None, "priority": 1}}
    )
    assert "note" not in merged["spec"] and merged["spec"]["priority"] == 1


def test_finalizers_hold_deletion_until_removed(core: kubernetes.client.CoreV1Api) -> None:
    name = unique("fin")
    core.create_namespaced_config_map("default", {"metadata": {"name": name, "finalizers": ["sandbox.test/hold"]}})
    core.delete_namespaced_config_map(name, "default", grace_period_seconds=0, propagation_policy="Foreground")
    held = core.read_namespaced_config_map(name, "default")
    assert held.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map(name, "default", [{"op": "remove", "path": "/metadata/finalizers"}])
    with pytest.raises(ApiException) as excinfo:
        core.read_namespaced_config_map(name, "default")
    assert excinfo.value.status == 404


def test_scheduled_pod_deletion_is_graceful_until_the_kubelet_confirms(
    core: kubernetes.client.CoreV1Api, emulator: KubernetesEmulator
) -> None:
    ns = unique("grace")
    core.create_namespaced_pod(ns, pod_body("p"))
    emulator.patch("pods", ns, "p", {"spec": {"nodeName": "sandbox-node"}})
    emulator.update_status("pods", ns, "p", {"phase": "Running"})
    core.delete_namespaced_pod("p", ns, grace_period_seconds=7)
    terminating = emulator.get("pods", ns, "p")
    assert terminating is not None and terminating["metadata"]["deletionGracePeriodSeconds"] == 7
    emulator.delete("pods", ns, "p", grace_period_seconds=0)  # what the kubelet does after the process exits
    assert emulator.get("pods", ns, "p") is None
    core.create_namespaced_pod(ns, pod_body("unscheduled"))
    core.delete_namespaced_pod("unscheduled", ns)
    assert emulator.get("pods", ns, "unscheduled") is None


def test_status_subresource_splits_writes(custom: kubernetes.client.CustomObjectsApi) -> None:
    name = unique("status")
    args = (GROUP, VERSION, "default", PLURAL, name)
    body = lr_body(name)
    body["status"] = {"phase": "Succeeded"}
    created = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, body)
    assert "status" not in created  # a create cannot set status
    custom.patch_namespaced_custom_object_status(*args, {"status": {"phase": "Running"}})
    main = custom.patch_namespaced_custom_object(*args, {"spec": {"priority": 9}, "status": {"phase": "Failed"}})
    assert main["status"] == {"phase": "Running"} and main["spec"]["priority"] == 9
    current = custom.get_namespaced_custom_object(*args)
    current["spec"]["priority"] = 1
    current["status"] = {"phase": "Succeeded"}
    via_status = custom.replace_namespaced_custom_object_status(*args, current)
    assert via_status["status"] == {"phase": "Succeeded"} and via_status["spec"]["priority"] == 9


# -- 4. schema ------------------------------------------------------------------------------


def test_schema_errors_in_the_api_servers_wording(custom: kubernetes.client.CustomObjectsApi) -> None:
    def refused(body: dict[str, Any]) -> dict[str, Any]:
        with pytest.raises(ApiException) as excinfo:
            custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, body)
        assert excinfo.value.status == 422
        return error_of(excinfo)

    status = refused(lr_body("bad", training={"maxSteps": -1}))
    assert status["reason"] == "Invalid"
    assert status["message"] == (
        'LoraResume.loraresume.dev "bad" is invalid: spec.training.maxSteps: Invalid value: -1: '
        "spec.training.maxSteps in body should be greater than or equal to 1"
    )
    assert status["details"]["causes"][0]["field"] == "spec.training.maxSteps"
    status = refused(
        {
            **lr_body("bad2", mode="full", priority="high", tags=["a", "b", "c"]),
            "spec": {"mode": "full", "priority": "high", "tags": ["a", "b", "c"], "datasetName": "d"},
        }
    )
    message = status["message"]
    assert message.startswith('LoraResume.loraresume.dev "bad2" is invalid: [')
    assert "spec.model: Required value" in message
    assert 'spec.mode: Unsupported value: "full": supported values: "lora", "qlora"' in message
    assert 'spec.priority: Invalid value: "string": spec.priority in body must be of type integer: "string"' in message
    assert "spec.tags: Too many: 3: must have at most 2 items" in message
    status = refused(lr_body("bad3", training={"learningRate": 0}))
    assert "spec.training.learningRate in body should be greater than 0" in status["message"]
    status = refused(lr_body("bad4", datasetUri="s3://x"))
    assert 'spec: Invalid value: "object": set exactly one of datasetName or datasetUri' in status["message"]


def test_defaults_pruning_nullable_and_preserved_fields(custom: kubernetes.client.CustomObjectsApi) -> None:
    name = unique("defaults")
    body = lr_body(name, note=None, priority=None, extra={"free": {"form": 1}}, unknownField=True)
    created = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, body)
    spec = created["spec"]
    assert spec["mode"] == "lora" and spec["priority"] == 5  # a null in a non-nullable field is defaulted
    assert spec["training"] == {"maxSteps": 10}  # parent defaulted to {} then its defaults; schedule stays absent
    assert spec["note"] is None  # nullable keeps null
    assert spec["extra"] == {"free": {"form": 1}}
    assert "unknownField" not in spec


def test_immutability_rule_self_equals_old_self(custom: kubernetes.client.CustomObjectsApi) -> None:
    name = unique("immutable")
    args = (GROUP, VERSION, "default", PLURAL, name)
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, lr_body(name))
    with pytest.raises(ApiException) as excinfo:
        custom.patch_namespaced_custom_object(*args, {"spec": {"model": "other"}})
    assert excinfo.value.status == 422
    assert error_of(excinfo)["message"] == (
        f'LoraResume.loraresume.dev "{name}" is invalid: spec.model: Invalid value: "string": '
        "model is immutable: create a new LoraResume instead"
    )
    assert custom.patch_namespaced_custom_object(*args, {"spec": {"priority": 2}})["spec"]["priority"] == 2


def test_rules_beyond_the_cel_subset_are_skipped_with_a_note(caplog: pytest.LogCaptureFixture) -> None:
    rule = f"self.all(t, t != '{uuid.uuid4().hex}')"
    schema = StructuralSchema(
        {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                   "x-kubernetes-validations": [{"rule": rule}]}}},
        kind="LoraResume", group=GROUP,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="loraresume_sandbox.k8s_schema"):
        assert schema.admit({"tags": [""]}, None, name="x") == []
    assert any("CEL rule not evaluated" in r.getMessage() and rule in r.getMessage() for r in caplog.records)


# -- 5. garbage collection --------------------------------------------------------------------------


def test_owned_objects_are_collected_or_orphaned(
    core: kubernetes.client.CoreV1Api, custom: kubernetes.client.CustomObjectsApi, emulator: KubernetesEmulator
) -> None:
    ns = unique("gc")

    def owned_by(owner: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraResume", "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}  # fmt: skip

    owner = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, lr_body("owner"))
    core.create_namespaced_pod(ns, pod_body("trainer", ownerReferences=[owned_by(owner)]))
    core.create_namespaced_config_map(ns, {"metadata": {"name": "job", "ownerReferences": [owned_by(owner)]}})
    core.create_namespaced_pod(ns, pod_body("bystander"))
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "owner")
    assert [p["metadata"]["name"] for p in emulator.list("pods", ns)] == ["bystander"]
    assert emulator.get("configmaps", ns, "job") is None

    keeper = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, lr_body("keeper"))
    core.create_namespaced_pod(ns, pod_body("kept", ownerReferences=[owned_by(keeper)]))
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "keeper", propagation_policy="Orphan")
    kept = emulator.get("pods", ns, "kept")
    assert kept is not None and "ownerReferences" not in kept["metadata"]


# -- 6. events, 7. logs ----------------------------------------------------------------------------


def test_events_listed_by_involved_object(core: kubernetes.client.CoreV1Api) -> None:
    ns = unique("events")
    for target in ("one", "two"):
        core.create_namespaced_event(ns, {
            "metadata": {"generateName": "ev-"},
            "involvedObject": {"kind": "LoraResume", "name": target, "namespace": ns, "uid": f"uid-{target}"},
            "reason": "Tested", "message": f"about {target}", "type": "Normal",
        })  # fmt: skip
    found = core.list_namespaced_event(ns, field_selector="involvedObject.name=one,involvedObject.kind=LoraResume")
    assert [e.message for e in found.items] == ["about one"]


def test_pod_logs_come_from_the_log_source(core: kubernetes.client.CoreV1Api, emulator: KubernetesEmulator) -> None:
    ns = unique("logs")
    core.create_namespaced_pod(ns, pod_body("p"))
    emulator.set_log_source(lambda namespace, pod, container: f"{namespace}/{pod}/{container}\nlast line\n")
    try:
        assert core.read_namespaced_pod_log("p", ns) == f"{ns}/p/main\nlast line\n"
        assert core.read_namespaced_pod_log("p", ns, tail_lines=1) == "last line\n"
    finally:
        emulator.set_log_source(None)


# -- 8. the python API ---------------------------------------------------------------------------


def test_programmatic_api(emulator: KubernetesEmulator, kubeconfig: Path) -> None:
    assert emulator.port > 0 and emulator.url == f"http://127.0.0.1:{emulator.port}"
    config = yaml.safe_load(kubeconfig.read_text())
    assert config["clusters"][0]["cluster"]["server"] == emulator.url
    seen: list[tuple[str, str, str]] = []
    unsubscribe = emulator.subscribe(lambda kind, resource, obj: seen.append((kind, resource, obj["metadata"]["name"])))
    ns = unique("direct")
    try:
        emulator.create("pods", pod_body("p"), ns)
        pod = emulator.update_status("po", ns, "p", {"phase": "Running", "podIP": "127.0.0.1"})
        assert pod["status"]["phase"] == "Running" and pod["spec"]["containers"][0]["name"] == "main"
        assert [p["metadata"]["name"] for p in emulator.list("pods", ns, field_selector="status.phase=Running")] == [
            "p"
        ]
        assert emulator.get("pods", ns, "nope") is None
        emulator.delete("pods", ns, "p")
    finally:
        unsubscribe()
    assert ("ADDED", "pods", "p") in seen and ("MODIFIED", "pods", "p") in seen and ("DELETED", "pods", "p") in seen


def test_runs_as_a_task_in_an_existing_event_loop() -> None:
    async def main() -> dict[str, Any]:
        async with KubernetesEmulator() as k8s:
            body = await asyncio.to_thread(http_json, k8s, "/api/v1/namespaces")
            return body

    assert "default" in {n["metadata"]["name"] for n in asyncio.run(main())["items"]}


# -- kubectl -------------------------------------------------------------------------------------


@needs_kubectl
def test_kubectl_apply_get_wait_describe_logs_delete(
    kubectl: Callable[..., subprocess.CompletedProcess[str]], emulator: KubernetesEmulator, workdir: Path
) -> None:
    name = unique("kc")
    manifest = workdir / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(lr_body(name, training={"maxSteps": 42})))
    assert f"loraresume.loraresume.dev/{name} created" in kubectl("apply", "-f", str(manifest)).stdout
    assert "unchanged" in kubectl("apply", "-f", str(manifest)).stdout
    table = kubectl("get", "loraresumes").stdout
    assert table.splitlines()[0].split() == ["NAME", "PHASE", "STEPS", "AGE"]
    assert any(line.split()[:2] == [name, "42"] for line in table.splitlines())
    shown = yaml.safe_load(kubectl("get", "lr", name, "-o", "yaml").stdout)
    assert shown["spec"]["training"]["maxSteps"] == 42 and shown["metadata"]["uid"]
    assert "kubectl.kubernetes.io/last-applied-configuration" in shown["metadata"]["annotations"]

    def finish() -> None:
        time.sleep(1.0)
        emulator.patch_status(PLURAL, "default", name, {
            "phase": "Succeeded", "observedGeneration": 1,
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "Done", "message": "ok"}],
        })  # fmt: skip

    threading.Thread(target=finish).start()
    assert "condition met" in kubectl("wait", "--for=condition=Succeeded", f"lr/{name}", "--timeout=20s").stdout

    emulator.create("events", {
        "metadata": {"generateName": f"{name}-"},
        "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraResume", "name": name,
                           "namespace": "default", "uid": shown["metadata"]["uid"]},
        "reason": "Relaunched", "message": "attempt 2 resumes from step 40", "type": "Normal",
        "source": {"component": "loraresume-operator"},
    }, "default")  # fmt: skip
    described = kubectl("describe", "lr", name).stdout
    assert "Relaunched" in described and "attempt 2 resumes from step 40" in described

    pod = unique("kc-pod")
    emulator.create("pods", pod_body(pod), "default")
    emulator.set_log_source(lambda namespace, pod_name, container: f"hello from {pod_name}/{container}\n")
    try:
        assert kubectl("logs", pod).stdout == f"hello from {pod}/main\n"
    finally:
        emulator.set_log_source(None)
    pods = kubectl("get", "pods").stdout.splitlines()
    assert pods[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert any(line.split()[:3] == [pod, "0/1", "Pending"] for line in pods)

    assert f'"{name}" deleted' in kubectl("delete", "lr", name, "--timeout=20s").stdout
    assert emulator.get(PLURAL, "default", name) is None


@needs_kubectl
def test_kubectl_apply_refuses_invalid_resources_with_the_field_named(
    kubectl: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    invalid = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(lr_body("neg", training={"maxSteps": -1})), check=False)
    assert invalid.returncode != 0
    assert (
        "spec.training.maxSteps: Invalid value: -1: spec.training.maxSteps in body should be greater than or equal to 1"
        in invalid.stderr
    )
    unknown = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(lr_body("unk", bogus=1)), check=False)
    assert unknown.returncode != 0 and 'unknown field "spec.bogus"' in unknown.stderr

    name = unique("edit")
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(lr_body(name)))
    changed = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(lr_body(name, model="another")), check=False)
    assert changed.returncode != 0 and "spec.model: Invalid value" in changed.stderr and "immutable" in changed.stderr
    assert "configured" in kubectl("apply", "-f", "-", stdin=yaml.safe_dump(lr_body(name, priority=3))).stdout


@needs_kubectl
def test_kubectl_imperative_create_of_secret_and_configmap(
    kubectl: Callable[..., subprocess.CompletedProcess[str]], emulator: KubernetesEmulator
) -> None:
    name = unique("creds")
    kubectl("create", "secret", "generic", name, "--from-literal=AWS_ACCESS_KEY_ID=abc")  # protobuf body
    secret = emulator.get("secrets", "default", name)
    assert secret is not None and secret["data"] == {"AWS_ACCESS_KEY_ID": "YWJj"} and secret["type"] == "Opaque"
    kubectl("create", "configmap", name, "--from-literal=a=1")
    configmap = emulator.get("configmaps", "default", name)
    assert configmap is not None and configmap["data"] == {"a": "1"}


# -- kopf --------------------------------------------------------------------------------------

OPERATOR = textwrap.dedent("""
    import kopf
    import kubernetes

    kubernetes.config.load_kube_config()

    @kopf.on.create("loraresume.dev", "v1alpha1", "loraresumes")
    def created(body, name, namespace, patch, **_):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-trainer"},
               "spec": {"containers": [{"name": "trainer", "image": "busybox:1.36", "command": ["true"]}]}}
        kopf.adopt(pod)
        kubernetes.client.CoreV1Api().create_namespaced_pod(namespace, pod)
        patch.status["phase"] = "Running"
        patch.status["podName"] = pod["metadata"]["name"]
        kopf.info(body, reason="PodCreated", message=f"created {pod['metadata']['name']}")

    @kopf.on.delete("loraresume.dev", "v1alpha1", "loraresumes")
    def deleted(**_):
        pass
    """)


@pytest.fixture
def run_kopf(kubeconfig: Path, workdir: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    operator = workdir / "tiny_operator.py"
    operator.write_text(OPERATOR)

    def start(*scope: str) -> subprocess.Popen[bytes]:
        log = open(workdir / f"kopf-{len(procs)}.log", "wb")
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "kopf"), "run", "--standalone", *scope, str(operator)],
            env={**os.environ, "KUBECONFIG": str(kubeconfig)}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kopf_round_trip(emulator: KubernetesEmulator, custom: kubernetes.client.CustomObjectsApi, ns: str) -> None:
    name = unique("op")
    owner = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, lr_body(name))
    pod = wait_for(lambda: emulator.get("pods", ns, f"{name}-trainer"), what="kopf to create the pod")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    wait_for(lambda: (emulator.get(PLURAL, ns, name) or {}).get("status", {}).get("phase") == "Running", what="status")
    events = wait_for(lambda: emulator.list("events", ns, field_selector=f"involvedObject.name={name}"), what="event")
    assert events[0]["reason"] == "PodCreated"
    assert emulator.get(PLURAL, ns, name)["metadata"]["finalizers"]  # kopf's, for its delete handler
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    wait_for(lambda: emulator.get(PLURAL, ns, name) is None, what="kopf to release its finalizer")
    assert emulator.get("pods", ns, f"{name}-trainer") is None  # collected with its owner


def test_kopf_cluster_wide(
    run_kopf: Callable[..., Any], emulator: KubernetesEmulator, custom: kubernetes.client.CustomObjectsApi
) -> None:
    run_kopf("-A")
    _kopf_round_trip(emulator, custom, unique("kopf-a"))


def test_kopf_namespaced(
    run_kopf: Callable[..., Any], emulator: KubernetesEmulator, custom: kubernetes.client.CustomObjectsApi
) -> None:
    outside = unique("outside")
    run_kopf("-n", "default")
    custom.create_namespaced_custom_object(GROUP, VERSION, outside, PLURAL, lr_body("ignored"))
    _kopf_round_trip(emulator, custom, "default")
    assert emulator.get("pods", outside, "ignored-trainer") is None  # not its namespace


# -- the project's CRD, once generated -----------------------------------------------------------------


def test_project_crd_and_examples_are_served(workdir: Path) -> None:
    crd_files = sorted((REPO / "crds").glob("*.yaml"))
    if not crd_files:
        pytest.skip("crds/ has no CRD yet")
    with KubernetesEmulator() as k8s:
        k8s.load_crds(crd_files)
        for example in sorted((REPO / "examples").glob("*.yaml")):
            for doc in yaml.safe_load_all(example.read_text()):
                if isinstance(doc, dict) and doc.get("kind") == "LoraResume":
                    created = k8s.create(PLURAL, doc, "default")
                    assert created["metadata"]["generation"] == 1, example

"""The operator's real Reconciler, in process, over stand-ins for the Kubernetes API and S3.

Fast enough to run per hypothesis example: the stand-ins record what the operator writes
(status, pods, events) and answer reads like an empty cluster and an empty bucket.
"""

from __future__ import annotations

import base64
import copy
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError
from kubernetes.client import ApiException

from loraresume_operator.defaults import OperatorDefaults
from loraresume_operator.policy import ANY, CREDENTIALS_LABEL, Policy
from loraresume_operator.reconcile import Reconciler

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
NS = "fuzz"
SOURCE_STORAGE = "s3://fuzz-source/"
SOURCE_ADAPTER = f"{SOURCE_STORAGE}adapter/"


def _not_found() -> ApiException:
    return ApiException(status=404, reason="Not Found")


class _ApiClient:
    @staticmethod
    def sanitize_for_serialization(obj: Any) -> Any:
        return obj


class _Refusal:
    """The HTTP response of a refused pod creation, as kubernetes.client.ApiException reads it."""

    def __init__(self, pod: dict[str, Any], problems: list[tuple[str, str]], code: int) -> None:
        import json

        name = pod["metadata"]["name"]
        texts = [f"{where}: {detail}" for where, detail in problems]
        self.status = code
        self.reason = {422: "Unprocessable Entity", 403: "Forbidden"}.get(code, "Error")
        message = (
            f'Pod "{name}" is invalid: [' + ", ".join(texts) + "]"
            if code == 422
            else f'pods "{name}" is forbidden: ' + "; ".join(texts)
        )
        self.data = json.dumps(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "code": code,
                "reason": {422: "Invalid", 403: "Forbidden"}.get(code, "Unknown"),
                "message": message,
                "details": {
                    "name": name,
                    "kind": "Pod",
                    "causes": [{"reason": "FieldValueInvalid", "field": w, "message": d} for w, d in problems],
                },
            }
        )

    def getheaders(self) -> dict[str, str]:
        return {"Content-Type": "application/json"}


@dataclass
class _Items:
    items: list[dict[str, Any]]


@dataclass
class _Meta:
    labels: dict[str, str] | None


@dataclass
class _Secret:
    data: dict[str, str]
    metadata: _Meta = field(default_factory=lambda: _Meta(dict(CREDENTIALS_LABEL)))


ANY_SECRET = {"AWS_ACCESS_KEY_ID": "fuzz-key-id", "AWS_SECRET_ACCESS_KEY": "fuzz-secret-key"}


@dataclass
class FakeCore:
    secrets: dict[str, dict[str, str]] | None = None  # None: every Secret exists (ANY_SECRET)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    created: list[dict[str, Any]] = field(default_factory=list)
    patches: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    api_client: _ApiClient = field(default_factory=_ApiClient)
    validate_pod: Any = None  # pod -> [(field, detail)]: what a real API server would refuse
    refusal_code: int = 422  # 422 Invalid; 403 as a ResourceQuota or admission webhook refuses

    def list_namespaced_pod(self, namespace: str, field_selector: str = "", label_selector: str = "") -> Any:
        """By `metadata.name=NAME` or by the resource label (the only selectors the operator uses)."""
        wanted = field_selector.removeprefix("metadata.name=") if field_selector else None
        label = dict([label_selector.split("=", 1)]) if label_selector else {}
        items = [
            copy.deepcopy(pod)
            for name, pod in self.pods.items()
            if (wanted is None or name == wanted)
            and all((pod["metadata"].get("labels") or {}).get(k) == v for k, v in label.items())
        ]
        return _Items(items)

    def read_namespaced_secret(self, name: str, namespace: str) -> Any:
        data = ANY_SECRET if self.secrets is None else self.secrets.get(name)
        if data is None:
            raise _not_found()
        return _Secret({k: base64.b64encode(v.encode()).decode() for k, v in data.items()})

    def create_namespaced_pod(self, namespace: str, pod: dict[str, Any]) -> Any:
        problems = self.validate_pod(pod) if self.validate_pod else []
        if problems:
            self.refused.append(copy.deepcopy(pod))
            raise ApiException(http_resp=_Refusal(pod, problems, self.refusal_code))
        self.created.append(copy.deepcopy(pod))
        name = pod["metadata"]["name"]
        if name in self.pods:
            raise ApiException(status=409, reason="AlreadyExists")
        self.pods[name] = {"metadata": pod["metadata"], "status": {"phase": "Pending"}}
        return pod

    def create_namespaced_event(self, namespace: str, event: dict[str, Any]) -> Any:
        self.events.append(event)
        return event

    def delete_collection_namespaced_pod(self, namespace: str, label_selector: str) -> None:
        self.pods.clear()

    def patch_namespaced_pod(self, name: str, namespace: str, patch: list[dict[str, Any]]) -> Any:
        """The JSON patch that lets a pod go: its `test` entry is checked, as the API server does."""
        if name not in self.pods:
            raise _not_found()
        self.patches.append((name, copy.deepcopy(patch)))
        finalizers = self.pods[name]["metadata"].setdefault("finalizers", [])
        for op in patch:
            index = int(op["path"].rsplit("/", 1)[1])
            if op["op"] == "test" and (index >= len(finalizers) or finalizers[index] != op["value"]):
                raise ApiException(status=422, reason="Unprocessable Entity")
            if op["op"] == "remove":
                del finalizers[index]
        return self.pods[name]


@dataclass
class FakeCustom:
    body: dict[str, Any]
    status_writes: list[dict[str, Any]] = field(default_factory=list)

    def list_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, field_selector: str = ""
    ) -> Any:
        """By `metadata.name=NAME`, the only list the operator makes (its watch is kopf's)."""
        return {
            "kind": "LoraResumeList",
            "items": [self._get(namespace, field_selector.removeprefix("metadata.name="))],
        }

    def _get(self, namespace: str, name: str) -> Any:
        if name != self.body["metadata"]["name"]:  # any other LoraResume: a finished run to start from
            return {
                "metadata": {"name": name, "namespace": namespace},
                "status": {
                    "phase": "Succeeded",
                    "outputAdapter": SOURCE_ADAPTER,
                    "storageUri": SOURCE_STORAGE,
                    "latestCheckpoint": {"uri": f"{SOURCE_STORAGE}checkpoints/checkpoint-60/", "step": 60},
                    "maxSteps": 60,
                },
            }
        return copy.deepcopy(self.body)

    def replace_namespaced_custom_object_status(
        self, group: str, version: str, namespace: str, plural: str, name: str, new: dict[str, Any]
    ) -> Any:
        if new["metadata"]["resourceVersion"] != self.body["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")
        self.status_writes.append(copy.deepcopy(new["status"]))
        self.body["status"] = copy.deepcopy(new["status"])
        self.body["metadata"]["resourceVersion"] = str(int(self.body["metadata"]["resourceVersion"]) + 1)
        return self.body


class _Pages:
    def paginate(self, **_: Any) -> list[dict[str, Any]]:
        return [{"CommonPrefixes": [], "Contents": []}]


class EmptyBucket:
    """An S3 client whose bucket is empty: no checkpoints, no progress, no adapter."""

    def get_paginator(self, name: str) -> _Pages:
        return _Pages()

    def _missing(self, operation: str) -> ClientError:
        return ClientError({"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, operation)

    def get_object(self, **_: Any) -> Any:
        raise self._missing("GetObject")

    def head_object(self, **_: Any) -> Any:
        raise ClientError({"Error": {"Code": "404"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "HeadObject")


@dataclass
class Cluster:
    """One LoraResume in a fake cluster, reconciled by the real Reconciler."""

    stored: dict[str, Any]  # the resource as the API server stored it (after pruning/defaulting)
    defaults: OperatorDefaults = field(
        # Any image and ServiceAccount (the fuzzed specs draw them); credentials Secrets must be labelled.
        default_factory=lambda: OperatorDefaults(
            storage_uri_prefix="s3://fuzz-default/runs/",
            policy=Policy(allowed_images=(ANY,), allowed_service_accounts=(ANY,)),
        )
    )
    secrets: dict[str, dict[str, str]] | None = None
    s3_calls: list[tuple[Any, ...]] = field(default_factory=list)
    validate_pod: Any = None
    refusal_code: int = 422

    def __post_init__(self) -> None:
        body = copy.deepcopy(self.stored)
        body.setdefault("metadata", {}).update(namespace=NS, uid=str(uuid.uuid4()), generation=1, resourceVersion="1")
        self.core = FakeCore(secrets=self.secrets, validate_pod=self.validate_pod, refusal_code=self.refusal_code)
        self.custom = FakeCustom(body)

        def s3_factory(*args: Any) -> EmptyBucket:
            self.s3_calls.append(args)
            return EmptyBucket()

        self.reconciler = Reconciler(self.core, self.custom, self.defaults, clock=lambda: NOW, s3_factory=s3_factory)

    def reconcile(self) -> float | None:
        return self.reconciler.reconcile(NS, self.custom.body["metadata"]["name"])

    @property
    def status(self) -> dict[str, Any]:
        return self.custom.body.get("status") or {}

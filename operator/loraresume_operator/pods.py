"""Pure builders: the trainer pod and the job config it receives, as plain API dicts."""

from __future__ import annotations

import json
from typing import Any

from loraresume_trainer.config import ENV_ATTEMPT, ENV_JOB

from .decide import CreatePod, Resource
from .defaults import OperatorDefaults
from .observed import ACCOUNTING_FINALIZER, LABEL_ATTEMPT, LABEL_RESOURCE, TRAINER_CONTAINER
from .scratch import ScratchInputs, ScratchSize, scratch_size
from .spec import API_VERSION, KIND, LoraResumeSpec

__all__ = ["ACCOUNTING_FINALIZER", "LABEL_ATTEMPT", "LABEL_RESOURCE", "build_trainer_pod", "job_config"]
WORK_DIR = "/work"
TERMINATION_LOG = "/dev/termination-log"
# Keys the credentials Secret holds (the AWS SDK's own environment names).
CREDENTIAL_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))
TRAINER_UID = 10001


def job_config(spec: LoraResumeSpec, create: CreatePod, defaults: OperatorDefaults) -> dict[str, Any]:
    """The trainer's job config (loraresume_trainer.config.JobConfig, camelCase), from an effective
    spec (`defaults.effective_spec`: storage resolved)."""
    storage = spec.storage
    return {
        "name": create.name,
        "baseModel": spec.base_model,
        "maxSeqLength": spec.max_seq_length,
        "loadIn4bit": spec.load_in_4bit,
        "dtype": spec.dtype,
        "gradientCheckpointing": spec.gradient_checkpointing,
        "adapter": create.adapter_uri,
        "lora": spec.lora.model_dump(by_alias=True, mode="json"),
        "dataset": spec.dataset.model_dump(by_alias=True, mode="json", exclude_none=True),
        "training": spec.training.sft_config(),
        "storage": {
            "uri": storage.uri,
            "endpoint": storage.endpoint or defaults.storage_endpoint,
            "region": storage.region,
            "keepCheckpoints": storage.keep_checkpoints,
        },
        "resume": _resume(spec, create),
        "tensorboard": spec.tensorboard,
        "attempt": create.attempt,
        "workDir": WORK_DIR,
        "terminationLog": TERMINATION_LOG,
    }


def _resume(spec: LoraResumeSpec, create: CreatePod) -> dict[str, Any]:
    """The trainer's `resume`: where this attempt starts (decide.start_checkpoint) and how."""
    resume: dict[str, Any] = {"fromCheckpoint": create.resume_from, "warmStart": spec.warm_starts}
    if spec.resume.extend_from:
        resume["extend"] = True  # the checkpoint may be of a shorter run: only the length may differ
    return resume


def _scheduling(spec: LoraResumeSpec, on_demand: bool) -> dict[str, Any]:
    sched, spot = spec.scheduling, spec.scheduling.spot
    selector = dict(sched.node_selector)
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations]
    if spot.enabled and not on_demand:
        selector.update(spot.node_selector)
        tolerations += [t.model_dump(by_alias=True, exclude_none=True) for t in spot.tolerations]
    elif spot.enabled:
        selector.update(spot.on_demand_node_selector)
    out: dict[str, Any] = {}
    if selector:
        out["nodeSelector"] = selector
    if tolerations:
        out["tolerations"] = tolerations
    if sched.affinity:
        out["affinity"] = sched.affinity
    if sched.priority_class_name:
        out["priorityClassName"] = sched.priority_class_name
    return out


def scratch_inputs_unmeasured(spec: LoraResumeSpec) -> ScratchInputs:
    """What is known of a job's downloads without reading S3 (sizes unknown)."""
    base = spec.base_model
    return ScratchInputs(None, base_model_downloaded=not base.startswith("/"))


def _resources(spec: LoraResumeSpec, scratch: ScratchSize) -> dict[str, Any]:
    res = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(res.gpus)
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    requests["ephemeral-storage"] = scratch.ephemeral_storage_request
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _env(spec: LoraResumeSpec, create: CreatePod, defaults: OperatorDefaults) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": ENV_JOB, "value": json.dumps(job_config(spec, create, defaults), separators=(",", ":"))},
        {"name": ENV_ATTEMPT, "value": str(create.attempt)},
        {"name": "HF_HOME", "value": f"{WORK_DIR}/hf"},
        {"name": "TRITON_CACHE_DIR", "value": f"{WORK_DIR}/triton"},
    ]
    if spec.storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": spec.storage.region})
    secret = spec.storage.credentials_secret
    if secret:  # only references: the operator never reads or copies the values
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}
            for key, optional in CREDENTIAL_KEYS
        ]
    return env


def build_trainer_pod(
    resource: Resource,
    spec: LoraResumeSpec,
    create: CreatePod,
    defaults: OperatorDefaults,
    inputs: ScratchInputs | None = None,
) -> dict[str, Any]:
    """A hardened pod for one attempt: owned by the resource, no API token, non-root, caps dropped.

    `inputs`: the measured sizes of what it downloads (scratch.py); None: not measured."""
    scratch = scratch_size(
        inputs or scratch_inputs_unmeasured(spec),
        scratch=spec.resources.scratch_size,
        ephemeral_storage=spec.resources.ephemeral_storage,
    )
    labels = {
        "app.kubernetes.io/name": "loraresume-trainer",
        "app.kubernetes.io/managed-by": "loraresume-operator",
        "app.kubernetes.io/instance": resource.name,
        LABEL_RESOURCE: resource.name,
        LABEL_ATTEMPT: str(create.attempt),
    }
    container = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or defaults.trainer_image,
        "imagePullPolicy": spec.image_pull_policy or defaults.image_pull_policy,
        "env": _env(spec, create, defaults),
        "resources": _resources(spec, scratch),
        "volumeMounts": [{"name": "work", "mountPath": WORK_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the operator relaunches, resuming from S3
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds or defaults.grace_period_seconds,
        "automountServiceAccountToken": False,  # the trainer needs no Kubernetes API rights
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "work", "emptyDir": {"sizeLimit": scratch.work_size_limit}},
            {"name": "tmp", "emptyDir": {"sizeLimit": scratch.tmp_size_limit}},
        ],
        **_scheduling(spec, create.on_demand),
    }
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": create.name,
            "namespace": resource.namespace,
            "labels": labels,
            "finalizers": [ACCOUNTING_FINALIZER],
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": resource.name,
                    "uid": resource.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pod_spec,
    }

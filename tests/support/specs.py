"""LoraResume specs and resources for tests: one place for the envelope and for merging overrides.

Each test states the base it needs (a decision table wants a restart policy, a pod test wants
scheduling) and builds from it with `build_spec` / `spec_doc`; `resource` wraps a spec in the
object the API server takes. The tiny trainable job (a real model in the run's bucket) is
`trainable_spec`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from loraresume_operator.spec import API_VERSION, KIND, LoraResumeSpec

# The fewest fields the model accepts (storage.uri may come from the operator's prefix).
MINIMAL: dict[str, Any] = {"baseModel": "unsloth/llama-3-8b-bnb-4bit", "dataset": {"source": "s3://data/d.jsonl"}}


def spec_doc(base: Mapping[str, Any] = MINIMAL, **over: Any) -> dict[str, Any]:
    """A spec document: a deep copy of `base` with top-level fields replaced by `over`."""
    return {**copy.deepcopy(dict(base)), **copy.deepcopy(over)}


def build_spec(base: Mapping[str, Any] = MINIMAL, **over: Any) -> LoraResumeSpec:
    """The parsed spec, as the operator's model reads `spec_doc(base, **over)`."""
    return LoraResumeSpec.model_validate(spec_doc(base, **over))


def resource(spec: Mapping[str, Any], name: str = "job", namespace: str | None = None) -> dict[str, Any]:
    """A LoraResume object around `spec` (namespace left to the request's URL when None)."""
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": copy.deepcopy(dict(spec))}


def s3_storage(bucket: str, name: str, endpoint: str, secret: str | None = None) -> dict[str, Any]:
    """`spec.storage` for a run under s3://bucket/name/ on a loopback S3 server."""
    storage: dict[str, Any] = {"uri": f"s3://{bucket}/{name}/", "endpoint": endpoint}
    if secret is not None:
        storage["credentialsSecret"] = secret
    return storage


def trainable_spec(bucket: str, name: str, endpoint: str, secret: str, **over: Any) -> dict[str, Any]:
    """A job the real trainer runs in seconds on a CPU: the tiny model and dataset seeded in `bucket`
    (loraresume_sandbox.seed_data's layout), a checkpoint every 5 of 40 steps."""
    base = {
        "baseModel": f"s3://{bucket}/models/tiny/",
        "maxSeqLength": 128,
        "loadIn4bit": False,
        "lora": {"r": 8, "alpha": 16},
        "dataset": {"source": f"s3://{bucket}/data/train.jsonl", "template": "alpaca"},
        "training": {
            "perDeviceTrainBatchSize": 2,
            "gradientAccumulationSteps": 1,
            "warmupSteps": 2,
            "maxSteps": 40,
            "learningRate": 1e-3,
            "optim": "adamw_torch",
            "saveSteps": 5,
            "seed": 1234,
        },
        "storage": s3_storage(bucket, name, endpoint, secret),
    }
    return spec_doc(base, **over)

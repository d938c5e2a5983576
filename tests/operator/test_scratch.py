"""The trainer pod's disk: scratch sizeLimit and ephemeral-storage request, derived from the job."""

from __future__ import annotations

import pytest

from loraresume_operator.decide import CreatePod, Resource
from loraresume_operator.defaults import OperatorDefaults
from loraresume_operator.pods import build_trainer_pod
from loraresume_operator.scratch import (
    CACHE_ALLOWANCE,
    FIRST_CHECKPOINT_ESTIMATE,
    GIB,
    HUB_MODEL_ALLOWANCE,
    ScratchInputs,
    quantity_bytes,
    scratch_size,
)
from loraresume_operator.spec import LoraResumeSpec
from tests.support.specs import MINIMAL

MODEL_7G = 7 * GIB


@pytest.mark.parametrize(
    "inputs, work_gib",
    [
        # S3 base model: measured; no checkpoint yet: the first one's estimate, three on disk
        (ScratchInputs(MODEL_7G, True), 7 + 3 * 1 + 8),
        # a hub id (or S3 could not say): the allowance
        (ScratchInputs(None, True), 64 + 3 + 8),
        # a path in the image: nothing downloaded
        (ScratchInputs(None, False), 3 + 8),
        # the newest checkpoint's size is known: three of it; the dataset twice (file + datasets cache)
        (
            ScratchInputs(MODEL_7G, True, adapter_bytes=GIB, dataset_bytes=2 * GIB, checkpoint_bytes=2 * GIB),
            7 + 1 + 4 + 6 + 8,
        ),
        # rounding up to whole GiB
        (ScratchInputs(MODEL_7G + 1, True), 7 + 3 + 8 + 1),
    ],
)
def test_derived_scratch(inputs: ScratchInputs, work_gib: int) -> None:
    size = scratch_size(inputs, scratch=None, ephemeral_storage=None)
    assert size.work_size_limit == f"{work_gib}Gi"
    assert size.ephemeral_storage_request == f"{work_gib + 4}Gi"  # plus /tmp's limit


def test_the_constants_are_what_the_table_assumes() -> None:
    assert (HUB_MODEL_ALLOWANCE, CACHE_ALLOWANCE, FIRST_CHECKPOINT_ESTIMATE) == (64 * GIB, 8 * GIB, GIB)


@pytest.mark.parametrize(
    "scratch, ephemeral, work, wanted",
    [
        ("100Gi", None, "100Gi", "104Gi"),
        (None, "500G", "18Gi", "500G"),
        ("50Gi", "60Gi", "50Gi", "60Gi"),
    ],
)
def test_overrides(scratch: str | None, ephemeral: str | None, work: str, wanted: str) -> None:
    size = scratch_size(ScratchInputs(MODEL_7G, True), scratch=scratch, ephemeral_storage=ephemeral)
    assert (size.work_size_limit, size.ephemeral_storage_request) == (work, wanted)


@pytest.mark.parametrize(
    "text, value",
    [("1Gi", GIB), ("1.5Gi", 1.5 * GIB), ("100G", 100e9), ("1e3", 1000), ("500m", 0.5), ("2", 2), ("+1Ki", 1024)],
)
def test_quantity_bytes(text: str, value: float) -> None:
    assert quantity_bytes(text) == value


@pytest.mark.parametrize("text", ["", "Gi", "1GB", "-1Gi", "1 Gi"])
def test_quantity_bytes_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity_bytes(text)


@pytest.mark.parametrize(
    "scratch, request_",
    [
        (".8e400", f"{8 * 10**399 // GIB + 4}Gi"),  # valid to the API server's pattern: no float overflow
        ("1e" + "9" * 30, "1e" + "9" * 30),  # past any arithmetic: the API server judges the pod asking for it
    ],
)
def test_a_scratch_size_too_large_for_a_float_still_builds_a_pod(scratch: str, request_: str) -> None:
    size = scratch_size(ScratchInputs(MODEL_7G, True), scratch=scratch, ephemeral_storage=None)
    assert (size.work_size_limit, size.ephemeral_storage_request) == (scratch, request_)
    with pytest.raises(ValueError, match="out of range"):
        quantity_bytes("1e" + "9" * 30)


def _pod(resources: dict, inputs: ScratchInputs | None) -> dict:
    spec = LoraResumeSpec.model_validate({**MINIMAL, "storage": {"uri": "s3://bkt/run/"}, "resources": resources})
    create = CreatePod("job-attempt-1", 1, None, False, None)
    return build_trainer_pod(Resource("job", "ns", "uid-1", 1), spec, create, OperatorDefaults(), inputs)


def test_the_pod_carries_the_limits_and_the_request() -> None:
    pod = _pod({}, ScratchInputs(MODEL_7G, True, checkpoint_bytes=GIB))
    volumes = {v["name"]: v["emptyDir"] for v in pod["spec"]["volumes"]}
    assert volumes == {"work": {"sizeLimit": "18Gi"}, "tmp": {"sizeLimit": "4Gi"}}
    assert pod["spec"]["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "22Gi"


def test_unmeasured_hub_model_gets_the_allowance_and_overrides_win() -> None:
    pod = _pod({}, None)  # MINIMAL's base model is a hub id
    assert {v["name"]: v["emptyDir"]["sizeLimit"] for v in pod["spec"]["volumes"]}["work"] == "75Gi"
    pod = _pod({"scratchSize": "200Gi", "ephemeralStorage": "250Gi"}, None)
    assert {v["name"]: v["emptyDir"]["sizeLimit"] for v in pod["spec"]["volumes"]}["work"] == "200Gi"
    assert pod["spec"]["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "250Gi"

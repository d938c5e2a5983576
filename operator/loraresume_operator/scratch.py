"""How much local disk a trainer pod needs: the scratch volume's sizeLimit and the pod's
ephemeral-storage request, derived from what the job downloads and writes (pure).

On the scratch volume (`/work`): the base model and the adapter it starts from (downloaded
from S3, or the Hugging Face cache for a hub id), the dataset file and its `datasets` cache,
the checkpoint it resumes from, the checkpoint being written while the previous one is
still uploading (the trainer keeps at most about two locally: local_checkpoints.py), and
the compile caches (Triton, Unsloth, inductor). `/tmp` has its own, fixed limit.

A scheduler that knows the request places the pod on a node with the disk; a kubelet that
knows the limit evicts the pod that outgrows it instead of the node filling up for everyone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from .k8s_names import QUANTITY_PATTERN

GIB = 1024**3
# A base model of unknown size (a hub id): an allowance a 4-bit 70B or a 16-bit 30B fits.
HUB_MODEL_ALLOWANCE = 64 * GIB
# Compile caches (Triton, unsloth_compiled_cache, inductor), tokenizer files, logs, TensorBoard events.
CACHE_ALLOWANCE = 8 * GIB
# Checkpoints on disk at once: the one resumed from, the one being written, the one uploading.
CHECKPOINTS_ON_DISK = 3
# Before the first checkpoint its size is unknown; a LoRA checkpoint (adapter, optimizer state,
# RNG) of an 8B model at r=16 on all projections is about 0.5 GiB.
FIRST_CHECKPOINT_ESTIMATE = 1 * GIB
# The dataset file, and the `datasets` cache of the rows made from it.
DATASET_COPIES = 2
TMP_SIZE_LIMIT = "4Gi"
# Quantities are computed exactly (fractions): `.8e400` is valid to the API server's pattern, and a float
# would overflow (the pod build with it). Exponents past this are refused as out of range.
MAX_EXPONENT = 1000


@dataclass(frozen=True)
class ScratchInputs:
    """Sizes in bytes of what a pod will download; None where it is not in S3."""

    base_model_bytes: int | None  # None: not known (a hub id, or S3 could not say)
    base_model_downloaded: bool  # False: a path in the image or a mounted volume
    adapter_bytes: int = 0
    dataset_bytes: int = 0
    checkpoint_bytes: int | None = None  # the newest complete checkpoint's manifest total


@dataclass(frozen=True)
class ScratchSize:
    work_size_limit: str  # the scratch emptyDir's sizeLimit
    tmp_size_limit: str
    ephemeral_storage_request: str


def _gib(n_bytes: int | Fraction) -> int:
    return max(1, math.ceil(Fraction(n_bytes) / GIB))


def derived_work_bytes(inputs: ScratchInputs) -> int:
    """What the job needs on `/work`, before rounding."""
    if inputs.base_model_bytes is not None:
        base = inputs.base_model_bytes
    else:
        base = HUB_MODEL_ALLOWANCE if inputs.base_model_downloaded else 0
    checkpoint = inputs.checkpoint_bytes if inputs.checkpoint_bytes else FIRST_CHECKPOINT_ESTIMATE
    return (
        base
        + inputs.adapter_bytes
        + DATASET_COPIES * inputs.dataset_bytes
        + CHECKPOINTS_ON_DISK * checkpoint
        + CACHE_ALLOWANCE
    )


_QUANTITY = re.compile(QUANTITY_PATTERN)  # groups: 1 the number, 3 the suffix
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def quantity_bytes(text: str) -> Fraction:
    """A Kubernetes quantity (`100Gi`, `50G`, `1e9`) in bytes, exactly; ValueError when it is not one."""
    match = _QUANTITY.match(text.strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    number, suffix = Fraction(match[1]), match[3] or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    exponent = _DECIMAL[suffix] if suffix in _DECIMAL else int(suffix[1:])
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"quantity out of range: {text!r}")
    return number * Fraction(10) ** exponent


def scratch_size(inputs: ScratchInputs, *, scratch: str | None, ephemeral_storage: str | None) -> ScratchSize:
    """The limits and request of one attempt: `resources.scratchSize` / `ephemeralStorage` win
    where set; otherwise derived (rounded up to whole GiB); the request covers both volumes."""
    work = scratch or f"{_gib(derived_work_bytes(inputs))}Gi"
    if ephemeral_storage:
        request = ephemeral_storage
    else:
        try:
            request = f"{_gib(quantity_bytes(work) + quantity_bytes(TMP_SIZE_LIMIT))}Gi"
        except ValueError:  # an exponent past any arithmetic: the API server judges the pod that asks for it
            request = work
    return ScratchSize(work, TMP_SIZE_LIMIT, request)

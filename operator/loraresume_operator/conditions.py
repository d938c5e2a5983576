"""Condition types and reasons (constants, so tests and `kubectl wait` agree on spelling)."""

from __future__ import annotations

from typing import Literal

from .spec import Condition

# Types. `kubectl wait --for=condition=Succeeded` / `=Failed` work on these.
SUCCEEDED = "Succeeded"
FAILED = "Failed"
RUNNING = "Running"  # a trainer pod is running now
STORAGE_READY = "StorageReady"  # the operator can read the job's S3 prefix

# Reasons.
ADAPTER_SAVED = "AdapterSaved"
CONFIG_ERROR = "ConfigError"
INVALID_SPEC = "InvalidSpec"
POLICY_VIOLATION = "PolicyViolation"  # an image, ServiceAccount or Secret the operator's policy does not allow
PREEMPTION_BUDGET_EXHAUSTED = "PreemptionBudgetExhausted"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
ADAPTER_SOURCE_FAILED = "AdapterSourceFailed"
WAITING_FOR_ADAPTER = "WaitingForAdapterSource"
WAITING_FOR_PREDECESSOR = "WaitingForPredecessor"  # resume.extendFrom: the run it extends has not finished
CANNOT_EXTEND = "CannotExtend"  # resume.extendFrom names a run that failed or cannot be extended
POD_RUNNING = "PodRunning"
POD_STARTING = "PodStarting"
RELAUNCHING = "Relaunching"
BACKING_OFF = "BackingOff"
FINISHED = "Finished"
STORAGE_UNAVAILABLE = "StorageUnavailable"
STORAGE_OK = "StorageReadable"
SPOT_CAPACITY_TIMEOUT = "SpotCapacityTimeout"  # unschedulable on spot too long: moved to on-demand
IMAGE_PULL_FAILED = "ImagePullFailed"
SUSPENDED = "Suspended"  # spec.suspend
RESUMED = "Resumed"
DISK_EVICTED = "EvictedForDisk"  # the node ran low on ephemeral-storage
SCRATCH_FULL = "ScratchVolumeFull"  # the pod outgrew its own scratch sizeLimit
DISK_EVICTION_BUDGET_EXHAUSTED = "DiskEvictionBudgetExhausted"
TRAINING_CHANGED = "TrainingChanged"  # spec.training.extra edited mid-run: the job is held
FOREIGN_CHECKPOINTS = "ForeignCheckpoints"  # another job's checkpoints under this storage prefix (kept)


def set_condition(
    conditions: list[Condition], type_: str, status: bool, reason: str, message: str, now: str, generation: int
) -> list[Condition]:
    """Replace one condition; lastTransitionTime changes only when the status flips."""
    value: Literal["True", "False"] = "True" if status else "False"
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == value else now
    new = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message[:1000],
        last_transition_time=since,
        observed_generation=generation,
    )
    return [c for c in conditions if c.type != type_] + [new]

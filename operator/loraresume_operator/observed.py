"""What the operator observes of a trainer pod, and how an ended pod is classified.

Pure: a pod as the API returns it (a dict) in, a small frozen record out. The table in
DESIGN.md ("Preemption versus failure") lives in `classify_end`.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from loraresume_trainer.outcome import Outcome

from .conditions import DISK_EVICTED, SCRATCH_FULL
from .spec import GROUP

TRAINER_CONTAINER = "trainer"
LABEL_RESOURCE = f"{GROUP}/resource"
LABEL_ATTEMPT = f"{GROUP}/attempt"
# On every trainer pod: the pod stays readable (however it ended, whoever deleted it) until the
# operator has counted its end in the status; then the operator removes it (decide.ReleasePod).
ACCOUNTING_FINALIZER = f"{GROUP}/attempt-accounting"

# Pod conditions/reasons the kubelet, scheduler and eviction API set when a pod is disrupted.
DISRUPTION_CONDITION = "DisruptionTarget"
PREEMPTION_REASONS = frozenset(
    {
        "Evicted",
        "Preempted",
        "PreemptionByScheduler",
        "DeletionByTaintManager",
        "TerminationByKubelet",
        "NodeLost",
        "Shutdown",
        "NodeShutdown",
        "Terminated",
    }
)


# A container stuck waiting for one of these will never start without a spec or Secret change.
PERMANENT_WAITING_REASONS = frozenset({"CreateContainerConfigError", "InvalidImageName"})
# The kubelet retries these with a backoff; past restartPolicy.imagePullTimeoutSeconds they are a config error.
IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff"})
SCHEDULED_CONDITION = "PodScheduled"
# What every pod waits for on its way to Running, for seconds: nothing a person acts on, so the status
# does not name them (decide._pending); Unschedulable, image pulls that fail and the like it does.
TRANSIENT_PENDING_REASONS = frozenset({"Scheduling", "ContainerCreating", "PodInitializing"})
UNSCHEDULABLE = "Unschedulable"


# The kubelet's eviction messages for disk (pkg/kubelet/eviction): the node under pressure, or a
# pod over its own limit (an emptyDir's sizeLimit, a container's or the pod's ephemeral-storage limit).
NODE_DISK_PRESSURE_MARKS = ("low on resource: ephemeral-storage", "low on resource: nodefs", "low on resource: imagefs")
OWN_DISK_LIMIT_MARKS = ("Usage of EmptyDir volume", "local ephemeral storage limit", "ephemeral local storage usage")


class EndKind(enum.Enum):
    SUCCEEDED = "Succeeded"
    PREEMPTED = "Preempted"  # relaunch at once; counts against maxPreemptions only
    DISK_EVICTED = "DiskEvicted"  # relaunch at once; counts against maxDiskEvictions only
    FAILED = "Failed"  # relaunch with backoff; counts against backoffLimit
    PERMANENT = "Permanent"  # a config error the trainer reported: no retry


@dataclass(frozen=True)
class ObservedPod:
    name: str
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    terminating: bool = False
    exit_code: int | None = None  # of the trainer container, once terminated
    container_reason: str | None = None  # Completed | Error | OOMKilled | ...
    pod_reason: str | None = None  # Evicted | NodeLost | ...
    disrupted: bool = False  # DisruptionTarget condition True
    disruption_reason: str | None = None
    termination: dict[str, Any] | None = None  # the trainer's JSON termination message
    message: str = ""
    waiting_reason: str | None = None  # the trainer container's waiting reason, if waiting
    waiting_message: str = ""
    unschedulable: bool = False  # PodScheduled False, reason Unschedulable: the scheduler found no node
    scheduling_message: str = ""  # the scheduler's, e.g. "0/12 nodes are available: 12 Insufficient nvidia.com/gpu"
    attempt: int | None = None  # its attempt label
    finalizers: tuple[str, ...] = ()
    deletion_deadline: datetime | None = None  # deletionTimestamp: when it should be gone
    node_name: str | None = None  # spec.nodeName: the node that runs it, once scheduled
    created: datetime | None = None  # metadata.creationTimestamp: since then it has waited to start
    scheduled_at: datetime | None = None  # PodScheduled True: when the scheduler bound it to a node

    @property
    def going(self) -> bool:
        """It is being ended by someone else: deleted, or its node reclaimed (DisruptionTarget); its trainer
        is saving its last checkpoint."""
        return self.terminating or self.disrupted

    @property
    def held(self) -> bool:
        """It carries the accounting finalizer: only the operator lets it go."""
        return ACCOUNTING_FINALIZER in self.finalizers

    @property
    def pulling_fails(self) -> bool:
        return self.waiting_reason in IMAGE_PULL_REASONS

    @property
    def pending_reason(self) -> tuple[str, str]:
        """(reason, message) of a pod that has not started: the scheduler's, else the kubelet's."""
        if self.unschedulable:
            return UNSCHEDULABLE, self.scheduling_message
        if self.waiting_reason:
            return self.waiting_reason, self.waiting_message
        return "Scheduling", ""

    @property
    def pending_transient(self) -> bool:
        """It waits only for what every pod waits for on its way to Running (TRANSIENT_PENDING_REASONS)."""
        return self.pending_reason[0] in TRANSIENT_PENDING_REASONS

    @property
    def stuck(self) -> bool:
        """Waiting for something only a person can fix (a missing Secret key, a bad image name)."""
        return self.waiting_reason in PERMANENT_WAITING_REASONS

    @property
    def ended(self) -> bool:
        return self.phase in ("Succeeded", "Failed") or self.exit_code is not None

    @classmethod
    def from_api(cls, pod: dict[str, Any]) -> ObservedPod:
        meta, status = pod.get("metadata", {}), pod.get("status", {}) or {}
        disrupted, disruption_reason = False, None
        unschedulable, scheduling_message, scheduled_at = False, "", None
        for cond in status.get("conditions") or []:
            if cond.get("type") == SCHEDULED_CONDITION and cond.get("status") == "True":
                scheduled_at = _timestamp(cond.get("lastTransitionTime"))
            if cond.get("type") == DISRUPTION_CONDITION and cond.get("status") == "True":
                disrupted, disruption_reason = True, cond.get("reason")
            if (
                cond.get("type") == SCHEDULED_CONDITION
                and cond.get("status") == "False"
                and cond.get("reason") == UNSCHEDULABLE
            ):
                unschedulable, scheduling_message = True, str(cond.get("message") or "")
        exit_code = container_reason = termination = waiting_reason = None
        waiting_message = ""
        for cs in status.get("containerStatuses") or []:
            if cs.get("name") != TRAINER_CONTAINER:
                continue
            waiting = (cs.get("state") or {}).get("waiting")
            if waiting:
                waiting_reason, waiting_message = waiting.get("reason"), waiting.get("message") or ""
            terminated = (cs.get("state") or {}).get("terminated")
            if terminated:
                exit_code = terminated.get("exitCode")
                container_reason = terminated.get("reason")
                termination = parse_termination_message(terminated.get("message"))
        attempt = str((meta.get("labels") or {}).get(LABEL_ATTEMPT, ""))
        return cls(
            name=meta.get("name", ""),
            phase=status.get("phase", "Pending"),
            terminating=bool(meta.get("deletionTimestamp")),
            attempt=int(attempt) if attempt.isdigit() else None,
            finalizers=tuple(str(f) for f in meta.get("finalizers") or ()),
            deletion_deadline=_timestamp(meta.get("deletionTimestamp")),
            node_name=(pod.get("spec") or {}).get("nodeName") or None,
            created=_timestamp(meta.get("creationTimestamp")),
            scheduled_at=scheduled_at,
            exit_code=exit_code,
            container_reason=container_reason,
            pod_reason=status.get("reason"),
            disrupted=disrupted,
            disruption_reason=disruption_reason,
            termination=termination,
            message=status.get("message", "") or "",
            waiting_reason=waiting_reason,
            waiting_message=waiting_message,
            unschedulable=unschedulable,
            scheduling_message=scheduling_message,
        )


def _timestamp(value: Any) -> datetime | None:
    """An API timestamp (RFC 3339; the client may already have parsed it)."""
    if isinstance(value, datetime) or not value:
        return value or None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def parse_termination_message(text: str | None) -> dict[str, Any] | None:
    """The trainer writes one JSON object; anything else (the log tail the kubelet keeps of a crash,
    FallbackToLogsOnError) gives its last line as the reason: the line that says what went wrong."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {"reason": one_line(text)}
    return data if isinstance(data, dict) else {"reason": one_line(str(data))}


MAX_REASON = 300


def one_line(text: str) -> str:
    """The last non-empty line, at most MAX_REASON characters: what an event or a status shows."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if len(last) <= MAX_REASON else last[: MAX_REASON - 3] + "..."


def disk_eviction(pod: ObservedPod) -> str | None:
    """The reason for an eviction for disk (SCRATCH_FULL: the pod's own limit; DISK_EVICTED: the
    node's pressure), or None. Not a preemption to relaunch blindly: it may be the job's own doing."""
    if pod.pod_reason != "Evicted" and pod.disruption_reason != "TerminationByKubelet":
        return None
    if any(mark in pod.message for mark in OWN_DISK_LIMIT_MARKS):
        return SCRATCH_FULL
    if any(mark in pod.message for mark in NODE_DISK_PRESSURE_MARKS):
        return DISK_EVICTED
    return None


@dataclass(frozen=True)
class PodEnd:
    kind: EndKind
    reason: str  # CamelCase, for events and conditions
    message: str


def classify_end(pod: ObservedPod | None, *, adapter_complete: bool) -> PodEnd:
    """DESIGN.md's table. `pod is None` means the pod vanished (deleted by someone, node lost)."""
    if pod is None:
        return PodEnd(EndKind.PREEMPTED, "PodDeleted", "the trainer pod was deleted or its node was lost")
    if pod.stuck and not pod.ended:
        return PodEnd(EndKind.PERMANENT, pod.waiting_reason or "", f"{pod.waiting_reason}: {pod.waiting_message}")
    term = pod.termination or {}
    trainer_says = term.get("reason", "")
    if pod.exit_code == Outcome.SUCCEEDED.code and adapter_complete:
        # Even in a pod marked Failed: a node shut down (or an eviction) as the trainer finished is
        # no preemption; relaunching would count one and start a pod for nothing.
        return PodEnd(EndKind.SUCCEEDED, "AdapterSaved", trainer_says or "adapter saved")
    if pod.exit_code == Outcome.SUCCEEDED.code and pod.phase != "Failed":
        return PodEnd(EndKind.FAILED, "NoAdapter", "the trainer exited 0 but no complete adapter is in S3")
    if pod.exit_code == Outcome.CONFIG_ERROR.code or term.get("outcome") == "config_error":
        return PodEnd(EndKind.PERMANENT, "ConfigError", trainer_says or "the trainer reported a configuration error")
    # What the trainer said as it stopped ("checkpoint-8 is durable") belongs in the preemption's message.
    said = f"; the trainer: {trainer_says}" if trainer_says else ""
    disk = disk_eviction(pod)
    if disk is not None:  # killed at once: the log tail's last line is not something the trainer said
        return PodEnd(EndKind.DISK_EVICTED, disk, pod.message.strip() or disk)
    if pod.disrupted:
        reason = pod.disruption_reason or DISRUPTION_CONDITION
        return PodEnd(EndKind.PREEMPTED, reason, (pod.message or "pod disrupted") + said)
    if pod.terminating:  # deleted by someone else (the operator deletes pods only with the resource)
        return PodEnd(EndKind.PREEMPTED, "PodDeleted", "the trainer pod was deleted while running" + said)
    if pod.pod_reason in PREEMPTION_REASONS:
        return PodEnd(EndKind.PREEMPTED, pod.pod_reason, (pod.message or f"pod {pod.pod_reason.lower()}") + said)
    if pod.exit_code == Outcome.PREEMPTED.code or term.get("outcome") == "preempted":
        return PodEnd(EndKind.PREEMPTED, "SigtermCheckpointSaved", trainer_says or "preempted; checkpoint saved")
    if pod.container_reason == "OOMKilled":
        return PodEnd(EndKind.FAILED, "OOMKilled", "the trainer ran out of memory")
    if pod.exit_code is not None:
        detail = f": {trainer_says}" if trainer_says else ""
        return PodEnd(EndKind.FAILED, "TrainerFailed", f"the trainer exited with code {pod.exit_code}{detail}")
    return PodEnd(EndKind.FAILED, "PodFailed", pod.message or f"pod ended in phase {pod.phase}")

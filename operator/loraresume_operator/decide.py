"""The reconcile decision: observed state in, actions and one new status out. No I/O.

`decide(observation)` is the whole policy of the operator: when to launch an attempt,
how an ended pod counts (DESIGN.md's preemption-versus-failure table), budgets and
backoff, the spot fallback, chained resources. The kopf layer gathers an `Observation`,
calls this, and executes the `Plan`.

Idempotence: the status names the attempt and its pod before the pod is created, and a
pod counts as "seen" only once phase is Running; so an operator restart between the
status patch and the pod creation re-creates the same pod name instead of counting a loss.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from loraresume_trainer.outcome import Outcome

from . import conditions as c
from .observed import (
    IMAGE_PULL_REASONS,
    TRANSIENT_PENDING_REASONS,
    UNSCHEDULABLE,
    EndKind,
    ObservedPod,
    PodEnd,
    classify_end,
)
from .spec import CheckpointRef, LoraResumeSpec, LoraResumeStatus, Phase
from .startup import last_startup

WAIT_FOR_SOURCE_SECONDS = 30.0
POD_APPEAR_SECONDS = 10.0
PENDING_RECHECK_SECONDS = 15.0
# A pod is said to be Unschedulable once it has waited this long for a node: a moment's wait (the
# scheduler's first pass before a node frees up, a reclaimed node's replacement registering) is what
# many launches on a busy or spot pool go through, nothing a person acts on.
UNSCHEDULABLE_REPORT_SECONDS = 10.0
# A pod deleted this long past its deletionTimestamp and still not ended has nobody to end it (a
# force delete on a node that is gone): it is counted as ended, as a vanished pod would be.
UNCONFIRMED_DELETION_SECONDS = 60.0
MAX_POD_NAME = 253


@dataclass(frozen=True)
class Resource:
    name: str
    namespace: str
    uid: str
    generation: int


@dataclass(frozen=True)
class SourceState:
    """Another LoraResume this one starts from (`spec.adapter.fromResource`, `spec.resume.extendFrom`),
    as observed: its status."""

    exists: bool
    phase: str | None = None
    output_adapter: str | None = None
    storage_uri: str | None = None
    checkpoint: CheckpointRef | None = None  # its newest complete checkpoint
    max_steps: int = 0


@dataclass(frozen=True)
class Observation:
    resource: Resource
    spec: LoraResumeSpec
    status: LoraResumeStatus
    pod: ObservedPod | None  # the pod named status.podName, if it exists
    checkpoint: CheckpointRef | None  # newest complete checkpoint in S3 (manifest present)
    progress: dict[str, Any] | None  # <storage>/progress.json
    adapter_complete: bool  # <storage>/adapter/_COMPLETE.json exists
    now: datetime
    source: SourceState | None = None
    other_pod: ObservedPod | None = None  # another of its trainer pods (a pod event was about it)
    predecessor: SourceState | None = None  # the LoraResume named by spec.resume.extendFrom


# Actions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CreatePod:
    name: str
    attempt: int
    resume_from: str | None  # checkpoint URI whose manifest the operator saw
    on_demand: bool
    adapter_uri: str | None


@dataclass(frozen=True)
class DeletePod:
    name: str


@dataclass(frozen=True)
class ReleasePod:
    """Remove the accounting finalizer: run only once the status that counts the pod's end is written."""

    name: str


@dataclass(frozen=True)
class EmitEvent:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Requeue:
    after_seconds: float


@dataclass(frozen=True)
class DeleteCheckpoints:
    """The resource is being deleted and its spec asks so: its complete checkpoints under `uri` go (the
    adapter stays)."""

    uri: str


Action = CreatePod | DeletePod | ReleasePod | EmitEvent | Requeue | DeleteCheckpoints


@dataclass(frozen=True)
class Plan:
    status: LoraResumeStatus
    actions: tuple[Action, ...] = field(default=())

    @property
    def requeue(self) -> Requeue | None:
        return next((a for a in self.actions if isinstance(a, Requeue)), None)


def pod_name(resource_name: str, attempt: int) -> str:
    """Deterministic per attempt: an operator restart can never create a second pod for one attempt."""
    name = f"{resource_name}-attempt-{attempt}"
    if len(name) <= MAX_POD_NAME:
        return name
    digest = hashlib.sha256(resource_name.encode()).hexdigest()[:8]
    return f"{resource_name[: MAX_POD_NAME - 20]}-{digest}-a{attempt}"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> datetime | None:
    """RFC 3339 in any spelling another writer may use (fractional seconds, +00:00); None if unreadable."""
    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def backoff_seconds(spec: LoraResumeSpec, failures: int) -> float:
    policy = spec.restart_policy
    doublings = min(max(0, failures - 1), 40)  # 2**40 s is beyond any cap; keeps the arithmetic small
    return float(min(policy.max_backoff_seconds, policy.backoff_seconds * 2**doublings))


MAX_STEP = 2**62  # status fields are int64 in the CRD


def _count(value: Any, default: int) -> int:
    """A non-negative step count from progress.json (written by the trainer, read as untrusted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return default
    if value in (float("inf"), float("-inf")):
        return default
    return min(MAX_STEP, max(0, int(value)))


def wants_on_demand(spec: LoraResumeSpec, preemptions: int, spot_timeouts: int = 0) -> bool:
    """Once spot capacity timed out, or after N preemptions, attempts stay on on-demand nodes."""
    spot = spec.scheduling.spot
    after = spot.fallback_to_on_demand_after
    return bool(spot.enabled and (spot_timeouts > 0 or (after and preemptions >= after)))


def duration(seconds: float) -> str:
    """45s, 3m20s, 2h05m: how long a pod has waited, for people."""
    total = int(max(0.0, seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


class _Builder:
    """Accumulates the new status and actions for one decision."""

    def __init__(self, obs: Observation) -> None:
        self.obs = obs
        self.now = iso(obs.now)
        self.values: dict[str, Any] = obs.status.model_dump()
        self.values["observed_generation"] = obs.resource.generation
        self.conditions = list(obs.status.conditions)
        self.actions: list[Action] = []

    def set(self, **values: Any) -> None:
        self.values.update(values)

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.conditions = c.set_condition(
            self.conditions, type_, status, reason, message, self.now, self.obs.resource.generation
        )

    def event(self, type_: str, reason: str, message: str) -> None:
        self.actions.append(EmitEvent(type_, reason, message))

    def requeue(self, seconds: float) -> None:
        self.actions.append(Requeue(max(1.0, seconds)))

    def plan(self) -> Plan:
        self.values["conditions"] = self.conditions
        return Plan(LoraResumeStatus(**self.values), tuple(self.actions))


def _report_progress(b: _Builder) -> None:
    obs = b.obs
    if obs.checkpoint is not None:
        b.set(latest_checkpoint=obs.checkpoint)
    progress = obs.progress if isinstance(obs.progress, dict) else {}
    # By epochs, the step count is known once the trainer has read the dataset (progress.json).
    # (by epochs and no progress.json read this time: the count the status has from an earlier read)
    max_steps = _count(progress.get("max_steps"), 0) or obs.spec.training.planned_steps() or b.values["max_steps"]
    step = _count(progress.get("step"), 0) or b.values["step"]
    b.set(step=step, max_steps=max_steps, progress=f"{step}/{max_steps or '?'}")
    loss = progress.get("loss")
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        b.set(loss=f"{float(loss):.4g}")
    _report_foreign(b, progress)
    startup = last_startup(progress)
    if startup is not None:
        b.set(last_startup=startup)


MAX_FOREIGN_LISTED = 20


def _report_foreign(b: _Builder, progress: dict[str, Any]) -> None:
    """Checkpoints of another job under this job's prefix (the trainer's ResumePlan.foreign): said
    once, when the trainer first reports them, and kept in the status."""
    raw = progress.get("foreign_checkpoints")
    if not isinstance(raw, list):
        return
    steps = sorted({_count(x, -1) for x in raw} - {-1})
    if steps == b.obs.status.foreign_checkpoints:
        return
    b.set(foreign_checkpoints=steps)
    if steps:
        shown = ", ".join(str(x) for x in steps[:MAX_FOREIGN_LISTED]) + (
            ", ..." if len(steps) > MAX_FOREIGN_LISTED else ""
        )
        b.event(
            "Warning",
            c.FOREIGN_CHECKPOINTS,
            f"{len(steps)} complete checkpoint(s) under {b.obs.spec.storage.uri} were made by another job "
            f"(steps {shown}): kept, never resumed from nor written over; remove them, or give this job its own "
            "storage.uri",
        )


def _fail(b: _Builder, reason: str, message: str) -> None:
    b.set(phase=Phase.FAILED, message=message, next_attempt_after=None)
    b.condition(c.FAILED, True, reason, message)
    b.condition(c.SUCCEEDED, False, reason, message)
    b.condition(c.RUNNING, False, reason, message)
    b.event("Warning", reason, message)


def _launch(b: _Builder, adapter_uri: str | None, why: str) -> None:
    obs = b.obs
    attempt = obs.status.attempt + 1
    name = pod_name(obs.resource.name, attempt)
    on_demand = wants_on_demand(obs.spec, b.values["preemptions"], b.values["spot_timeouts"])
    resume = start_checkpoint(obs)
    where = f"resuming from {resume}" if resume else "starting fresh"
    b.set(
        attempt=attempt,
        pod_name=name,
        phase=Phase.PENDING if attempt == 1 else Phase.RESUMING,
        next_attempt_after=None,
        on_demand=on_demand,
        message=f"attempt {attempt}: pod {name}, {where}",
        pending_since=None,
        pending_reason=None,
    )
    if b.values["training_extra_digest"] is None:
        b.set(training_extra_digest=obs.spec.training.extra_digest())
    b.actions.append(CreatePod(name, attempt, resume, on_demand, adapter_uri))
    b.condition(c.RUNNING, False, c.POD_STARTING, f"starting pod {name}")
    if on_demand and not obs.status.on_demand and not b.values["spot_timeouts"]:
        b.event(
            "Warning", "FallbackToOnDemand", f"{b.values['preemptions']} preemptions: next attempts use on-demand nodes"
        )
    b.event(
        "Normal", "AttemptStarted" if attempt == 1 else c.RELAUNCHING, f"attempt {attempt} ({why}): pod {name}, {where}"
    )
    b.requeue(POD_APPEAR_SECONDS)


def start_checkpoint(obs: Observation) -> str | None:
    """Where the next attempt starts: the job's own newest checkpoint, else the final checkpoint of the
    run it extends (resume.extendFrom), else none (resume.fromCheckpoint, if set, goes to the trainer
    as the job's: the trainer prefers the job's own newer checkpoints)."""
    if obs.checkpoint is not None:
        return obs.checkpoint.uri
    src = obs.predecessor
    if obs.spec.resume.extend_from and src is not None and src.checkpoint is not None:
        return src.checkpoint.uri
    return obs.spec.resume.from_checkpoint


def _extendable(b: _Builder) -> bool:
    """resume.extendFrom: waits until the run it extends has Succeeded; fails the job if that run failed
    or cannot be extended. True when nothing is awaited (or the job has checkpoints of its own)."""
    obs = b.obs
    name = obs.spec.resume.extend_from
    if not name or obs.checkpoint is not None:
        return True
    src = obs.predecessor
    problem = None
    if src is None or not src.exists:
        b.set(phase=Phase.PENDING, message=f"waiting for LoraResume {name} (resume.extendFrom) to exist")
    elif src.phase == Phase.FAILED.value:
        problem = f"resume.extendFrom: LoraResume {name} failed; there is no finished run to extend"
    elif src.phase != Phase.SUCCEEDED.value:
        b.set(phase=Phase.PENDING, message=f"waiting for LoraResume {name} (resume.extendFrom) to succeed")
    elif src.checkpoint is None:
        problem = (
            f"resume.extendFrom: LoraResume {name} succeeded but no complete checkpoint of it is in its storage "
            f"({src.storage_uri}): only a trainer checkpoint holds the optimizer and schedule to extend (to "
            "continue from its adapter weights instead, use spec.adapter.fromResource)"
        )
    elif src.storage_uri and src.storage_uri.rstrip("/") == str(obs.spec.storage_root).rstrip("/"):
        problem = (
            f"resume.extendFrom: LoraResume {name} stores under {src.storage_uri} too; this job needs its own "
            "spec.storage.uri (its checkpoints would mix with the finished run's)"
        )
    elif src.max_steps and src.checkpoint.step != src.max_steps:
        problem = (
            f"resume.extendFrom: the newest checkpoint of LoraResume {name} is step {src.checkpoint.step}, not "
            f"its final step {src.max_steps}: its final state is not in S3, so it cannot be extended exactly "
            "(continue from its adapter weights with spec.adapter.fromResource instead)"
        )
    else:
        return True
    if problem is not None:
        _fail(b, c.CANNOT_EXTEND, problem)
        return False
    b.condition(c.RUNNING, False, c.WAITING_FOR_PREDECESSOR, b.values["message"])
    b.requeue(WAIT_FOR_SOURCE_SECONDS)
    return False


def _adapter_uri(b: _Builder) -> tuple[bool, str | None]:
    """(ready, uri). Waits for a chained source (or the run it extends); fails the job if it failed."""
    if not _extendable(b):
        return False, None
    adapter = b.obs.spec.adapter
    if adapter is None:
        return True, None
    if adapter.uri:
        return True, adapter.uri
    src, name = b.obs.source, adapter.from_resource
    if src is None or not src.exists:
        b.set(phase=Phase.PENDING, message=f"waiting for LoraResume {name} (adapter source) to exist")
    elif src.phase == Phase.FAILED.value:
        _fail(b, c.ADAPTER_SOURCE_FAILED, f"adapter source LoraResume {name} failed")
        return False, None
    elif src.phase != Phase.SUCCEEDED.value or not src.output_adapter:
        b.set(phase=Phase.PENDING, message=f"waiting for LoraResume {name} (adapter source) to succeed")
    else:
        return True, src.output_adapter
    b.condition(c.RUNNING, False, c.WAITING_FOR_ADAPTER, b.values["message"])
    b.requeue(WAIT_FOR_SOURCE_SECONDS)
    return False, None


def _lost_steps(obs: Observation) -> int:
    """Steps trained after the newest durable checkpoint: as the ended attempt's trainer said them (the step
    it stopped at and the checkpoint it made durable), else progress.json against the newest checkpoint."""
    said = said_stop(obs.status, obs.pod)
    if said is not None:
        return said[0] - said[1]
    if said_untrained(obs.status, obs.pod):
        return 0
    progress = obs.progress if isinstance(obs.progress, dict) else {}
    if _count(progress.get("attempt"), 0) != obs.status.attempt:
        return 0  # the ended attempt never reported a step
    durable = obs.checkpoint.step if obs.checkpoint else 0
    return max(0, _count(progress.get("step"), 0) - durable)


def _ended(b: _Builder, end: PodEnd) -> None:
    obs, spec = b.obs, b.obs.spec
    b.set(last_attempt_ended=b.now)
    if end.kind is EndKind.SUCCEEDED:
        uri = str(spec.storage_root.child("adapter/"))
        message = f"adapter saved to {uri}"
        b.set(phase=Phase.SUCCEEDED, output_adapter=uri, message=message)
        b.condition(c.SUCCEEDED, True, c.ADAPTER_SAVED, message)
        b.condition(c.FAILED, False, c.ADAPTER_SAVED, message)
        b.condition(c.RUNNING, False, c.FINISHED, message)
        b.event("Normal", c.ADAPTER_SAVED, f"attempt {obs.status.attempt} succeeded: {message}")
        return
    if end.kind is EndKind.PERMANENT:
        _fail(b, c.CONFIG_ERROR, f"attempt {obs.status.attempt}: {end.message}")
        return
    b.set(pod_name=None)  # counted: whatever comes next (a relaunch, a wait, a backoff) is not this pod
    lost = _lost_steps(obs)
    b.set(lost_steps=obs.status.lost_steps + lost)
    lost_text = f", {lost} steps lost" if lost else ""
    if end.kind is EndKind.DISK_EVICTED:
        _disk_evicted(b, end, lost_text)
        return
    if end.kind is EndKind.PREEMPTED:
        preemptions = obs.status.preemptions + 1
        b.set(preemptions=preemptions)
        b.event("Warning", end.reason, f"attempt {obs.status.attempt} preempted: {end.message}{lost_text}")
        if preemptions > spec.restart_policy.max_preemptions:
            _fail(
                b,
                c.PREEMPTION_BUDGET_EXHAUSTED,
                f"{preemptions} preemptions exceed restartPolicy.maxPreemptions={spec.restart_policy.max_preemptions}",
            )
            return
        ready, adapter = _adapter_uri(b)
        if ready:
            _launch(b, adapter, f"after preemption: {end.reason}")
        return
    failures = obs.status.failures + 1
    b.set(failures=failures)
    if failures > spec.restart_policy.backoff_limit:
        b.event("Warning", end.reason, f"attempt {obs.status.attempt} failed: {end.message}{lost_text}")
        _fail(
            b,
            c.BACKOFF_LIMIT_EXCEEDED,
            f"{failures} failed attempts exceed restartPolicy.backoffLimit={spec.restart_policy.backoff_limit}; "
            f"last: {end.message}",
        )
        return
    delay = backoff_seconds(spec, failures)
    b.set(
        phase=Phase.RESUMING,
        pod_name=None,
        next_attempt_after=iso(obs.now + timedelta(seconds=delay)),
        message=f"attempt {obs.status.attempt} failed ({end.reason}); retrying in {delay:.0f} s",
    )
    b.condition(c.RUNNING, False, c.BACKING_OFF, b.values["message"])
    b.event(
        "Warning", end.reason, f"attempt {obs.status.attempt} failed: {end.message}{lost_text}; retry in {delay:.0f} s"
    )
    b.requeue(delay)


def _disk_evicted(b: _Builder, end: PodEnd, lost_text: str) -> None:
    """Evicted for disk: relaunched at once like a preemption (the checkpoint in S3 is intact), but
    counted apart, with its own budget: it can be the job's own doing, and then it repeats."""
    obs, spec = b.obs, b.obs.spec
    evictions = obs.status.disk_evictions + 1
    b.set(disk_evictions=evictions)
    if end.reason == c.SCRATCH_FULL:
        hint = "the job outgrew its scratch volume: set resources.scratchSize larger"
    else:
        hint = "the node ran low on disk: give the nodes more, or request more with resources.ephemeralStorage"
    b.event("Warning", end.reason, f"attempt {obs.status.attempt} evicted for disk: {end.message}{lost_text}; {hint}")
    limit = spec.restart_policy.max_disk_evictions
    if evictions > limit:
        _fail(
            b,
            c.DISK_EVICTION_BUDGET_EXHAUSTED,
            f"{evictions} evictions for disk exceed restartPolicy.maxDiskEvictions={limit}; last: {end.message}; "
            + hint,
        )
        return
    ready, adapter = _adapter_uri(b)
    if ready:
        _launch(b, adapter, f"after an eviction for disk: {end.reason}")


def _pending(b: _Builder, pod: ObservedPod) -> None:
    """A pod that has not started: past a timeout, act on it; else say why, when it is something a
    person would act on (no node for it for UNSCHEDULABLE_REPORT_SECONDS, an image that cannot be
    pulled), once per reason.

    What every pod waits for on its way to Running (Scheduling, ContainerCreating: observed.
    TRANSIENT_PENDING_REASONS) changes nothing: the launch's status already says the pod is starting,
    and a write per flap would double the status writes of a launch. A reason said before (the pod was
    Unschedulable, then bound) stays until the pod has been bound PENDING_RECHECK_SECONDS, so that a
    long image pull after it is not shown as a wait for a node. The wait is timed from the pod's
    creation (status.pendingSince when an earlier version recorded it)."""
    obs, spec, status = b.obs, b.obs.spec, b.obs.status
    known = parse_iso(status.pending_since) or pod.created
    since = known or obs.now
    waited = max(0.0, (obs.now - since).total_seconds())
    reason, detail = pod.pending_reason
    spot, policy = spec.scheduling.spot, spec.restart_policy
    if pod.unschedulable and spot.enabled and not status.on_demand and waited >= spot.pending_timeout_seconds:
        b.set(spot_timeouts=status.spot_timeouts + 1)
        b.actions.append(DeletePod(pod.name))
        b.event(
            "Warning",
            c.SPOT_CAPACITY_TIMEOUT,
            f"attempt {status.attempt}: no spot node for {duration(waited)} "
            f"(scheduling.spot.pendingTimeoutSeconds={spot.pending_timeout_seconds}): {detail}; "
            "this and later attempts use on-demand nodes",
        )
        ready, adapter = _adapter_uri(b)
        if ready:
            _launch(b, adapter, "no spot capacity")
        return
    if pod.pulling_fails and waited >= policy.image_pull_timeout_seconds:
        b.actions.append(DeletePod(pod.name))
        b.set(pending_since=iso(since), pending_reason=reason)
        _fail(
            b,
            c.IMAGE_PULL_FAILED,
            f"attempt {status.attempt}: the trainer image could not be pulled for {duration(waited)} "
            f"(restartPolicy.imagePullTimeoutSeconds={policy.image_pull_timeout_seconds}): {reason}: {detail}",
        )
        return
    deadlines = [PENDING_RECHECK_SECONDS]
    if pod.unschedulable and spot.enabled and not status.on_demand:
        deadlines.append(spot.pending_timeout_seconds - waited)
    if pod.pulling_fails:
        deadlines.append(policy.image_pull_timeout_seconds - waited)
    said = status.pending_reason
    moment = known is not None and waited < UNSCHEDULABLE_REPORT_SECONDS  # (unknown: said at once)
    if pod.unschedulable and (said is None or said in TRANSIENT_PENDING_REASONS) and moment:
        b.requeue(min([*deadlines, UNSCHEDULABLE_REPORT_SECONDS - waited]))
        return
    if pod.pending_transient:
        bound_for = (obs.now - pod.scheduled_at).total_seconds() if pod.scheduled_at else None
        if said != UNSCHEDULABLE or bound_for is None or bound_for < PENDING_RECHECK_SECONDS:
            if said == UNSCHEDULABLE and bound_for is not None:
                deadlines.append(PENDING_RECHECK_SECONDS - bound_for)
            b.requeue(min(deadlines))
            return
    elif _same_wait(said, reason):  # said already (its detail, e.g. the scheduler's node count, may tick)
        b.requeue(min(deadlines))
        return
    # "since", not "for 3m20s": a message that ticks would rewrite the status on every reconcile.
    message = f"attempt {status.attempt}: pod {pod.name} pending since {iso(since)}: {reason}"
    message += f": {detail}" if detail else ""
    if not pod.pending_transient and not pod.unschedulable:  # the scheduler's own event says Unschedulable
        b.event("Warning", reason, message)
    b.set(phase=Phase.PENDING, message=message, pending_since=iso(since), pending_reason=reason)
    b.condition(c.RUNNING, False, reason, message)
    b.requeue(min(deadlines))


def _same_wait(said: str | None, reason: str) -> bool:
    """Whether the status names this wait already (the kubelet's ErrImagePull and ImagePullBackOff take
    turns while it retries: one wait)."""
    return said == reason or (said in IMAGE_PULL_REASONS and reason in IMAGE_PULL_REASONS)


def _suspend(b: _Builder) -> bool:
    """spec.suspend: stop the attempt in flight the graceful way, then start none; neither a
    preemption nor a failure. False (not handled here) when the attempt succeeded meanwhile."""
    obs, status, pod = b.obs, b.obs.status, b.obs.pod
    if status.pod_name is not None and pod is not None:
        if pod.ended and classify_end(pod, adapter_complete=obs.adapter_complete).kind is EndKind.SUCCEEDED:
            return False
        if not pod.ended:
            # Deleting the pod is the graceful stop: the kubelet sends SIGTERM, the trainer checkpoints.
            if not pod.terminating:
                b.actions.append(DeletePod(pod.name))
                b.event(
                    "Normal", c.SUSPENDED, f"spec.suspend: stopping pod {pod.name} (SIGTERM: checkpoint, then exit)"
                )
            b.set(message=f"suspending: pod {pod.name} is stopping")
            b.condition(c.RUNNING, False, c.SUSPENDED, b.values["message"])
            b.requeue(POD_APPEAR_SECONDS)
            return True
    where = f"; the next attempt resumes from {obs.checkpoint.uri}" if obs.checkpoint else ""
    message = f"suspended (spec.suspend){where}"
    if status.phase is not Phase.SUSPENDED:
        b.event("Normal", c.SUSPENDED, message)
    b.set(phase=Phase.SUSPENDED, message=message, pod_name=None, next_attempt_after=None)
    b.condition(c.RUNNING, False, c.SUSPENDED, message)
    return True


EXTRA_CHANGED = (
    "spec.training.extra changed after the first attempt started; it defines the run, so no attempt "
    "starts until it is changed back (or create a new LoraResume with a new storage.uri)"
)


def _held_for_changed_extra(b: _Builder) -> bool:
    """The CRD's CEL cannot compare schemaless `extra` by value (see spec.training_immutable_rule):
    an edit to it is admitted, and held here: nothing launches with a changed run."""
    recorded = b.obs.status.training_extra_digest
    if recorded is None or recorded == b.obs.spec.training.extra_digest():
        return False
    if b.obs.status.message != EXTRA_CHANGED:
        b.event("Warning", c.TRAINING_CHANGED, EXTRA_CHANGED)
    b.set(message=EXTRA_CHANGED)
    b.requeue(WAIT_FOR_SOURCE_SECONDS)
    return True


def _deletion_unconfirmed(pod: ObservedPod, now: datetime) -> bool:
    """Deleted, and nobody will end it: no node ever ran it (the API server gives an unscheduled pod
    no grace period; only the finalizer keeps it), or its node has not confirmed for a long while."""
    if pod.terminating and pod.phase == "Pending" and not pod.node_name:
        return True
    deadline = pod.deletion_deadline
    return deadline is not None and (now - deadline).total_seconds() > UNCONFIRMED_DELETION_SECONDS


def accounted(pod: ObservedPod, status: LoraResumeStatus) -> bool:
    """Whether `status` has counted this pod's end, so its accounting finalizer may go.

    The status names an attempt's pod before the pod exists, and moves to another (or to none)
    only once the attempt's end is decided: a pod it no longer names is counted, whatever the
    pod does now. The pod it names is counted once the job is over and the pod has ended (or is
    going). A pod of a later attempt than the status knows is never let go."""
    if pod.attempt is not None and pod.attempt > status.attempt:
        return False
    if pod.name != status.pod_name:
        return True
    return status.phase.is_terminal and (pod.ended or pod.terminating)


# Problems found before a decision can be taken (reconcile.py finds them; what they mean is decided here).
STORAGE_RETRY_SECONDS = 30.0
PROBLEM_PREFIX = {c.INVALID_SPEC: "invalid spec", c.POLICY_VIOLATION: "refused by the operator's policy"}


@dataclass(frozen=True)
class Problem:
    """Why no attempt can be decided on. `kind`: c.INVALID_SPEC (the model or the API server refuses the
    spec, or a pod built from it: Failed), c.POLICY_VIOLATION (the operator's policy: Failed),
    c.STORAGE_UNAVAILABLE (S3 or its credentials cannot be read: said, retried, budgets kept) or
    POD_FORBIDDEN (the API server forbids the attempt's pod, e.g. a ResourceQuota: said, retried)."""

    kind: str
    message: str


POD_FORBIDDEN = "PodForbidden"


def decide_problem(resource: Resource, status: LoraResumeStatus, problem: Problem, now: datetime) -> Plan:
    """The status and events for a problem that stops the decision. Said once: the same problem found
    again changes nothing (no status write, no event)."""
    moment = iso(now)
    if problem.kind in PROBLEM_PREFIX:
        message = f"{PROBLEM_PREFIX[problem.kind]}: {problem.message}"
        if status.phase is Phase.FAILED and status.message == message:
            return Plan(status)
        conds = c.set_condition(
            list(status.conditions), c.FAILED, True, problem.kind, message, moment, resource.generation
        )
        failed = status.model_copy(
            update={
                "phase": Phase.FAILED,
                "message": message,
                "conditions": conds,
                "observed_generation": resource.generation,
            }
        )
        return Plan(failed, (EmitEvent("Warning", problem.kind, message),))
    if problem.kind == c.STORAGE_UNAVAILABLE:
        message = f"cannot read storage: {problem.message}"
        retry = Requeue(STORAGE_RETRY_SECONDS)
        if status.message == message:
            return Plan(status, (retry,))
        conds = c.set_condition(
            list(status.conditions), c.STORAGE_READY, False, c.STORAGE_UNAVAILABLE, message, moment, resource.generation
        )
        unavailable = status.model_copy(update={"message": message, "conditions": conds})
        return Plan(unavailable, (EmitEvent("Warning", c.STORAGE_UNAVAILABLE, message), retry))
    if problem.kind == POD_FORBIDDEN:
        if status.message == problem.message:
            return Plan(status)
        return Plan(
            status.model_copy(update={"message": problem.message}),
            (EmitEvent("Warning", POD_FORBIDDEN, problem.message),),
        )
    raise ValueError(f"unknown problem kind {problem.kind!r}")


def deletion_actions(spec: LoraResumeSpec) -> tuple[Action, ...]:
    """What goes with a deleted LoraResume besides its pods (always deleted and let go): its checkpoints,
    when spec.storage.deleteOnResourceDeletion asks (`spec`: the effective spec)."""
    if spec.storage.delete_on_resource_deletion and spec.storage.uri:
        return (DeleteCheckpoints(spec.storage.uri),)
    return ()


def storage_needed(status: LoraResumeStatus, pod: ObservedPod | None) -> bool:
    """Whether a reconcile must read the job's storage fresh before deciding: no attempt in flight (a
    launch starts from the newest checkpoint), or the attempt's pod has ended or is gone (its end is
    counted against what is durable). A pod alive does with a recent read, a pod that is going too (its
    trainer is still saving: a read now is out of date when it ends; a plan that counts its end anyway,
    an unconfirmed deletion, is decided again on a fresh read: reads_storage_fresh)."""
    return status.pod_name is None or pod is None or pod.ended or pod.stuck


def said_durable(status: LoraResumeStatus, pod: ObservedPod | None) -> int | None:
    """The checkpoint the attempt's trainer said was durable as it exited (its termination message's
    `durable_step`: after a success, or a SIGTERM with its checkpoint saved), or None. The trainer
    writes it once every upload has landed, so it is the newest: its end is decided on that
    checkpoint's manifest, the adapter manifest and progress.json, read side by side without the
    listing (s3_view.read_said; the full read when the manifest, or a success's adapter, is missing).
    The step comes from the pod and is checked against that manifest, never trusted alone."""
    step = _end_message(status, pod).get("durable_step")
    return step if isinstance(step, int) and not isinstance(step, bool) and 0 < step <= MAX_STEP else None


def _end_message(status: LoraResumeStatus, pod: ObservedPod | None) -> dict[str, Any]:
    """The termination message of the attempt's pod once it has ended with an exit code, else {}."""
    if pod is None or pod.name != status.pod_name or not pod.ended or pod.exit_code is None:
        return {}
    return pod.termination or {}


def said_stop(status: LoraResumeStatus, pod: ObservedPod | None) -> tuple[int, int] | None:
    """(the step it stopped at, the checkpoint it made durable), as the attempt's trainer said them in its
    termination message (read as untrusted: both steps, the first not below the second), or None."""
    durable = said_durable(status, pod)
    if durable is None or pod is None:
        return None
    stopped = (pod.termination or {}).get("step")
    if not isinstance(stopped, int) or isinstance(stopped, bool) or not durable <= stopped <= MAX_STEP:
        return None
    return stopped, durable


def said_untrained(status: LoraResumeStatus, pod: ObservedPod | None) -> bool:
    """Whether the attempt's trainer said it stopped before its first training step (its termination
    message's `trained: false`, written on a SIGTERM while it loaded): it wrote no checkpoint and lost no
    step, so what the job has durable is what it had before the attempt (the status's latestCheckpoint, or
    the checkpoint the trainer found durable as it started, `durable_step`, when it got that far)."""
    return _end_message(status, pod).get("trained") is False


def counted_on_its_word(status: LoraResumeStatus, pod: ObservedPod | None) -> bool:
    """Whether the end of the attempt's pod is counted, and the attempt relaunched, without reading S3: its
    trainer stopped on a SIGTERM (exit 75, a preemption by DESIGN.md's table whatever S3 holds) and said at
    which step it stopped and which checkpoint of the job's it made durable (said_stop), or that it stopped
    before it trained (said_untrained: a reclaim of trainers still loading, the slowest case to read). A spot reclaim
    ends a pool's trainers at once and each uploads its last checkpoint as it goes: the store is at its
    slowest just when the relaunches are wanted, and the relaunch waits on the API server only. The
    relaunch resumes from that checkpoint, which its trainer verifies as it downloads (one that is not
    complete after all: the job's newest complete checkpoint, pipeline.explicit_candidate); the steps lost
    are the trainer's; the listing that follows within StorageViews' bounds confirms latestCheckpoint."""
    if pod is None or pod.exit_code != Outcome.PREEMPTED.code:
        return False
    if said_stop(status, pod) is None and not said_untrained(status, pod):
        return False
    return classify_end(pod, adapter_complete=False).kind is EndKind.PREEMPTED


def reads_storage_fresh(before: LoraResumeStatus, plan: Plan) -> bool:
    """Whether `plan` rests on storage that must have been read just now: it launches a pod or counts
    an attempt's end (a decision taken on a recent read that does either is taken again on a fresh one)."""
    return (
        any(isinstance(a, CreatePod) for a in plan.actions)
        or plan.status.last_attempt_ended != before.last_attempt_ended
        or plan.status.attempt != before.attempt
        or (plan.status.phase.is_terminal and not before.phase.is_terminal)
    )


def releases(obs: Observation, plan: Plan) -> tuple[ReleasePod, ...]:
    """The pods whose accounting finalizer `plan` lets go (after its status is written)."""
    deleted = {a.name for a in plan.actions if isinstance(a, DeletePod)}
    out: list[ReleasePod] = []
    for pod in (obs.pod, obs.other_pod):
        if pod is None or not pod.held or any(r.name == pod.name for r in out):
            continue
        gone_now = pod.name in deleted and plan.status.phase.is_terminal
        if gone_now or accounted(pod, plan.status):
            out.append(ReleasePod(pod.name))
    return tuple(out)


def decide(obs: Observation) -> Plan:
    """The next status and actions for one LoraResume. Pure; see the module docstring."""
    plan = _decide(obs)
    return Plan(plan.status, plan.actions + releases(obs, plan))


def _decide(obs: Observation) -> Plan:
    b = _Builder(obs)
    # Observed at all means storage was read: a StorageReady=False from an earlier reconcile is over.
    if any(x.type == c.STORAGE_READY and x.status != "True" for x in obs.status.conditions):
        b.condition(c.STORAGE_READY, True, c.STORAGE_OK, "storage is readable")
    _report_progress(b)
    status = obs.status
    if status.phase.is_terminal or _held_for_changed_extra(b):
        return b.plan()
    if obs.spec.suspend and _suspend(b):
        return b.plan()

    if status.pod_name is None:
        if status.phase is Phase.SUSPENDED:  # spec.suspend is false again
            b.event("Normal", c.RESUMED, "spec.suspend is false: the next attempt resumes from the newest checkpoint")
            ready, adapter = _adapter_uri(b)
            if ready:
                _launch(b, adapter, "resumed after suspend")
            return b.plan()
        # No attempt in flight: the first one, or the next after a backoff.
        due = parse_iso(status.next_attempt_after) if status.next_attempt_after else None
        if due is not None:
            wait = (due - obs.now).total_seconds()
            # Beyond the (possibly lowered) cap, or unreadable: the backoff is over.
            if 0 < wait <= obs.spec.restart_policy.max_backoff_seconds:
                b.requeue(wait)
                return b.plan()
        ready, adapter = _adapter_uri(b)
        if ready:
            _launch(b, adapter, "first" if status.attempt == 0 else "after backoff")
        return b.plan()

    pod = obs.pod
    if pod is None:
        progress = obs.progress if isinstance(obs.progress, dict) else {}
        reported = _count(progress.get("attempt"), 0) == status.attempt  # its trainer wrote progress
        if status.phase == Phase.RUNNING or reported:  # it ran (seen, or by its progress), and now it is gone
            _ended(b, classify_end(None, adapter_complete=obs.adapter_complete))
        else:  # named but never seen: (re)create it under the same name
            ready, adapter = _adapter_uri(b)
            if ready:
                b.actions.append(
                    CreatePod(status.pod_name, status.attempt, start_checkpoint(obs), status.on_demand, adapter)
                )
                b.requeue(POD_APPEAR_SECONDS)
        return b.plan()

    if pod.stuck:  # e.g. the credentials Secret is missing: no retry loop, say what to fix
        _ended(b, classify_end(pod, adapter_complete=obs.adapter_complete))
        return b.plan()
    if not pod.ended and _deletion_unconfirmed(pod, obs.now):
        _ended(b, classify_end(pod, adapter_complete=obs.adapter_complete))
        return b.plan()
    if not pod.ended and pod.phase == "Pending":
        _pending(b, pod)
        return b.plan()
    if not pod.ended:
        # No event: the status says it (phase Running, condition Running=True); the launch had its event.
        b.set(pending_since=None, pending_reason=None)
        b.set(phase=Phase.RUNNING, message=f"attempt {status.attempt}: pod {pod.name} {pod.phase.lower()}")
        b.condition(c.RUNNING, True, c.POD_RUNNING, b.values["message"])
        return b.plan()

    _ended(b, classify_end(pod, adapter_complete=obs.adapter_complete))
    return b.plan()

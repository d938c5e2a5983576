"""Every lost trainer pod is counted exactly once, whatever the timing (issue 15).

A table of orderings played against the real `decide` with a small model of what the API holds:
trainer pods carry the accounting finalizer (a deleted pod stays readable until it is let go), the
status is written back under optimistic concurrency (a reconcile that read an older status than the
one stored writes nothing and acts on nothing: reconcile.py's conditional status write), a
`CreatePod` of an existing name changes nothing (AlreadyExists), and `ReleasePod` lets a pod go.
Each row is what the kubelet, the cloud and the operator did, in order; the operator's
reconciles happen only where the row says (a busy or stopped operator sees nothing in between).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from loraresume_operator.decide import (
    UNCONFIRMED_DELETION_SECONDS,
    CreatePod,
    DeletePod,
    Observation,
    Plan,
    ReleasePod,
    Resource,
    decide,
)
from loraresume_operator.observed import ACCOUNTING_FINALIZER, ObservedPod
from loraresume_operator.spec import CheckpointRef, LoraResumeStatus, Phase
from loraresume_trainer.outcome import Outcome
from tests.support.specs import build_spec

START = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
RES = Resource("bot", "ml", "uid-1", 1)
CKPT = CheckpointRef(uri="s3://ckpt/bot/checkpoints/checkpoint-10/", step=10)
SPEC = build_spec(
    {
        "baseModel": "unsloth/llama-3-8b-bnb-4bit",
        "dataset": {"source": "s3://data/d.jsonl"},
        "storage": {"uri": "s3://ckpt/bot/"},
        "training": {"maxSteps": 100},
        "restartPolicy": {"maxPreemptions": 10, "backoffLimit": 3},
    }
)
RECLAIM = {
    "type": "DisruptionTarget",
    "reason": "TerminationByKubelet",
    "message": "Pod was terminated in response to imminent node shutdown.",
}


@dataclass
class World:
    """One LoraResume, its trainer pods as the API holds them, and the operator's view of both."""

    status: LoraResumeStatus = field(default_factory=LoraResumeStatus)
    version: int = 1  # the resource's resourceVersion: a status write bumps it
    pods: dict[str, ObservedPod] = field(default_factory=dict)
    now: datetime = START
    progress: dict[str, Any] | None = None  # progress.json: the attempt whose trainer last wrote it
    adapter_complete: bool = False
    created: list[str] = field(default_factory=list)  # every pod creation that made a pod
    recreated: list[str] = field(default_factory=list)  # a name created again after it was lost
    lost: set[str] = field(default_factory=set)
    snapshot: tuple[LoraResumeStatus, int] | None = None  # a reconcile that read the resource earlier

    # ---- the operator --------------------------------------------------------------------------
    def observe(self, event: str | None) -> Observation:
        named = self.status.pod_name
        event_pod = self.pods.get(event) if event else None
        return Observation(
            resource=RES,
            spec=SPEC,
            status=self.status,
            pod=self.pods.get(named) if named else None,
            checkpoint=CKPT,
            progress=self.progress,
            adapter_complete=self.adapter_complete,
            now=self.now,
            other_pod=event_pod if event_pod is not None and event != named else None,
        )

    def reconcile(self, event: str | None = None, *, read: tuple[LoraResumeStatus, int] | None = None) -> Plan:
        """One reconcile; `read`: the (status, resourceVersion) it read, if older than the stored one."""
        status, version = read or (self.status, self.version)
        current, self.status = self.status, status
        plan = decide(self.observe(event))
        self.status = current
        if plan.status != status:
            if version != self.version:  # 409 Conflict: nothing of this plan happens
                return plan
            self.status, self.version = plan.status, self.version + 1
        for action in plan.actions:
            self.act(action)
        return plan

    def act(self, action: Any) -> None:
        if isinstance(action, CreatePod) and action.name not in self.pods:
            if action.name in self.lost:
                self.recreated.append(action.name)
            self.created.append(action.name)
            self.pods[action.name] = ObservedPod(
                action.name, "Pending", attempt=action.attempt, finalizers=(ACCOUNTING_FINALIZER,)
            )
        elif isinstance(action, DeletePod) and action.name in self.pods:
            self.delete(action.name, lost=False)
        elif isinstance(action, ReleasePod) and action.name in self.pods:
            pod = replace(self.pods[action.name], finalizers=())
            if pod.terminating:  # its deletion was waiting for the finalizer
                del self.pods[action.name]
            else:
                self.pods[action.name] = pod

    # ---- the kubelet, the scheduler, the cloud ---------------------------------------------------
    def pod(self, attempt: int) -> str:
        return f"bot-attempt-{attempt}"

    def schedule(self, name: str) -> None:
        self.pods[name] = replace(self.pods[name], node_name="spot-1")

    def run(self, name: str) -> None:
        self.schedule(name)
        self.pods[name] = replace(self.pods[name], phase="Running")
        self.progress = {"step": 12, "max_steps": 100, "attempt": self.pods[name].attempt}

    def reclaim(self, name: str) -> None:
        """Graceful node shutdown: DisruptionTarget, SIGTERM, the trainer saves and exits 75; then
        the Node object goes and pod GC deletes its pods (held by the finalizer)."""
        pod = self.pods[name]
        exit_code = pod.exit_code  # a trainer that had exited keeps its exit code
        if exit_code is None:
            self.lost.add(name)
            exit_code = Outcome.PREEMPTED.code if pod.phase == "Running" else None
        self.pods[name] = replace(
            pod,
            phase="Failed",
            exit_code=exit_code,
            disrupted=True,
            disruption_reason=RECLAIM["reason"],
            pod_reason="Terminated",
            message=RECLAIM["message"],
        )

    def gc(self, name: str) -> None:
        if not self.pods[name].held:  # nothing holds it: deleted at once
            del self.pods[name]
            return
        self.pods[name] = replace(self.pods[name], terminating=True, deletion_deadline=self.now)

    def delete(self, name: str, *, lost: bool = True) -> None:
        """`kubectl delete pod` (or the operator's own DeletePod): the kubelet of its node stops it;
        one that has no node has nothing to stop it and stays until it is let go."""
        if lost:
            self.lost.add(name)
        pod = replace(self.pods[name], terminating=True, deletion_deadline=self.now)
        if pod.node_name:
            running = pod.phase == "Running"
            pod = replace(pod, phase="Failed", exit_code=Outcome.PREEMPTED.code if running else None)
        self.pods[name] = pod

    def silent(self, name: str) -> None:
        """The node went silent: the pod is deleted and nobody confirms it (its phase stays)."""
        self.lost.add(name)
        self.pods[name] = replace(self.pods[name], terminating=True, deletion_deadline=self.now)

    def vanish(self, name: str) -> None:
        """Gone without a trace: a pod of an operator version before the finalizer, or one whose
        finalizer a person removed."""
        self.lost.add(name)
        self.pods.pop(name, None)

    def succeed(self, name: str) -> None:
        self.adapter_complete = True
        self.pods[name] = replace(self.pods[name], phase="Succeeded", exit_code=0)

    def later(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def play(script: str) -> World:
    """`script`: steps separated by spaces. `R` reconciles (on the current pod's event), `R2` on the
    event of attempt 2's pod, `Rall` on every pod's event (kopf's listing at start-up), `read`
    remembers what a reconcile reads now and `stale` runs that reconcile later; `run1`, `reclaim1`,
    `gc1`, `delete1`, `silent1`, `vanish1`, `succeed1` act on attempt 1's pod; `wait61` moves the clock."""
    w = World()
    for step in script.split():
        if step == "R":
            w.reconcile(w.status.pod_name)
        elif step == "Rall":
            for name in list(w.pods):
                w.reconcile(name)
            w.reconcile()
        elif step.startswith("R"):
            w.reconcile(w.pod(int(step[1:])))
        elif step == "read":
            w.snapshot = (w.status, w.version)
        elif step == "stale":
            w.reconcile(w.status.pod_name, read=w.snapshot)
        elif step.startswith("wait"):
            w.later(float(step[4:]))
        else:
            verb = step.rstrip("0123456789")
            getattr(w, verb)(w.pod(int(step[len(verb) :])))
    return w


# (script, preemptions, attempt the job is on at the end)
ORDERINGS = {
    "seen running, then reclaimed": ("R run1 R reclaim1 R gc1 R1 R", 1, 2),
    "reclaimed before it was seen running": ("R run1 reclaim1 gc1 R R1 R", 1, 2),
    "reclaimed before it ran": ("R schedule1 reclaim1 gc1 R R1", 1, 2),
    "deleted while it ran, never seen running": ("R run1 delete1 R R1", 1, 2),
    "deleted while pending on a node": ("R schedule1 delete1 R", 1, 2),
    "deleted before it was scheduled": ("R delete1 R R1", 1, 2),
    "reclaimed while the operator was down": ("R run1 R reclaim1 gc1 Rall Rall", 1, 2),
    "lost while down, before it was seen": ("R run1 reclaim1 gc1 Rall", 1, 2),
    "vanished after it was seen running": ("R run1 R vanish1 R R", 1, 2),
    "vanished unseen, its trainer had reported": ("R run1 vanish1 R R", 1, 2),
    "burst: the same end delivered again and again": ("R run1 reclaim1 R1 R1 gc1 R1 R1 R R", 1, 2),
    "two reconciles raced on one end": ("R run1 R reclaim1 read R stale R1", 1, 2),
    "a reconcile that read before the loss": ("R run1 read reclaim1 R stale", 1, 2),
    "the replacement's event before the old pod's": ("R run1 R reclaim1 R run2 R2 gc1 R1 R2", 1, 2),
    "node lost: counted once nobody confirms the deletion": ("R run1 R silent1 R wait61 R R1 R", 1, 2),
    "lost twice: the replacement too, before it was seen": ("R run1 R reclaim1 R run2 delete2 gc1 R R1 R2", 2, 3),
    "no loss: the first attempt runs": ("R run1 R", 0, 1),
    "no loss: finished as its node shut down": ("R run1 R succeed1 reclaim1 gc1 R R1", 0, 1),
}


@pytest.mark.parametrize(("script", "preemptions", "attempt"), ORDERINGS.values(), ids=ORDERINGS.keys())
def test_every_lost_pod_is_counted_exactly_once(script, preemptions, attempt):
    w = play(script)
    w.reconcile(w.status.pod_name)  # and whatever comes after changes nothing
    st = w.status
    assert (st.preemptions, st.failures, st.attempt) == (preemptions, 0, attempt), script
    assert w.recreated == [], "a lost pod was created again under its own name (its loss went uncounted)"
    assert len(w.created) == len(set(w.created)) == attempt
    ended = {n for n in w.lost if n in w.pods} - {st.pod_name}
    assert not [n for n in ended if w.pods[n].held], "a counted pod is still held by the accounting finalizer"


def test_a_restart_between_the_status_write_and_the_pod_creation_creates_the_same_pod_once():
    """The status names attempt 1's pod before it exists: the pod is created, nothing counted."""
    w = World(status=LoraResumeStatus(phase=Phase.PENDING, attempt=1, pod_name="bot-attempt-1"))
    w.reconcile()
    w.reconcile("bot-attempt-1")
    assert w.created == ["bot-attempt-1"] and w.status.preemptions == 0 and w.status.attempt == 1


def test_the_node_lost_window_counts_nothing_early():
    w = play("R run1 R silent1 R")
    w.later(UNCONFIRMED_DELETION_SECONDS - 1)
    w.reconcile("bot-attempt-1")
    assert w.status.preemptions == 0 and w.status.pod_name == "bot-attempt-1"

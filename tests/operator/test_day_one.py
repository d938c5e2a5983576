"""Day one on a real control plane: pods that never start (the scheduler's Unschedulable, the node
agent's image pulls), disks that fill up, suspended jobs, and the operator's policy on what a
LoraResume may name, as the operator reports and resolves them.

One cluster for the module: a spot pool with no nodes (spot capacity that never comes), one
on-demand GPU node, and the node agent running the stand-in trainer for the sandbox's trainer
image only (any other image cannot be "pulled").
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from loraresume_operator import conditions as c
from loraresume_operator.decide import UNSCHEDULABLE_REPORT_SECONDS
from loraresume_operator.observed import ACCOUNTING_FINALIZER
from loraresume_operator.policy import CREDENTIALS_LABEL
from loraresume_sandbox.cluster import SANDBOX_TRAINER_IMAGE, SandboxCluster, sandbox_values
from loraresume_sandbox.kube_client import KubeClient
from loraresume_sandbox.node_agent import default_pools
from loraresume_sandbox.stand_in_trainer import ENV_STEP_SECONDS
from tests.support import specs
from tests.support.operator_stack import job_env
from tests.support.waiting import wait_for

NS = "default"
LABEL = "=".join(next(iter(CREDENTIALS_LABEL.items())))  # for kubectl label
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxCluster]:
    with SandboxCluster(
        tmp_path_factory.mktemp("pending"),
        namespaces=(NS,),
        pools=default_pools(spot=0, on_demand=1),
        # an image that cannot be pulled must first be one the policy allows
        values=sandbox_values(namespaces=[NS], extra={"policy": {"allowedImages": ["registry.invalid/"]}}),
        entrypoints={SANDBOX_TRAINER_IMAGE: [sys.executable, "-m", "loraresume_sandbox.stand_in_trainer"]},
        extra_env={ENV_STEP_SECONDS: "0.05", "AWS_DEFAULT_REGION": "us-east-1"},
        quiet=True,
    ) as stack:
        stack.kube.create(
            "secrets",
            {
                "metadata": {"name": "s3", "labels": CREDENTIALS_LABEL},
                "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
            },
            NS,
        )
        yield stack


def _apply(kube: KubeClient, s3_bucket: tuple[str, str], **over: Any) -> str:
    endpoint, bucket = s3_bucket
    name = f"lr-{uuid.uuid4().hex[:6]}"
    base = specs.spec_doc(
        baseModel="s3://models/tiny/",
        dataset={"source": f"s3://{bucket}/data.jsonl"},
        storage=specs.s3_storage(bucket, name, endpoint, "s3"),
        training={"maxSteps": 6, "saveSteps": 3},
        resources={"gpus": 1},
    )
    spec = specs.spec_doc(base, **over)
    kube.create("loraresumes", specs.resource(spec, name), NS)
    return name


def _status(kube: KubeClient, name: str) -> dict[str, Any]:
    return (kube.get("loraresumes", NS, name) or {}).get("status") or {}


def _events(kube: KubeClient, name: str) -> list[str]:
    return [e.get("reason", "") for e in kube.list("events", NS) if e["involvedObject"].get("name") == name]


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((x for x in status.get("conditions") or [] if x["type"] == type_), {})


def test_spot_capacity_that_never_comes_moves_the_attempt_to_on_demand(cluster, s3_bucket):
    kube = cluster.kube
    # past UNSCHEDULABLE_REPORT_SECONDS (said in the status), then past the spot timeout
    timeout = int(UNSCHEDULABLE_REPORT_SECONDS) + 5
    name = _apply(kube, s3_bucket, scheduling={"spot": {"enabled": True, "pendingTimeoutSeconds": timeout}})
    # First: Pending, with the scheduler's own words and the time waited.
    pending = wait_for(
        lambda: (s := _status(kube, name)).get("pendingReason") == "Unschedulable" and s,
        60,
        "status pendingReason Unschedulable",
    )
    assert pending["phase"] == "Pending" and "nodes are available" in pending["message"], pending["message"]
    assert f"pending since {pending['pendingSince']}" in pending["message"]
    running = _condition(pending, c.RUNNING)
    assert (running["status"], running["reason"]) == ("False", "Unschedulable")
    # Then: the attempt moves to on-demand nodes, and the job trains there to the end.
    done = wait_for(lambda: (s := _status(kube, name)).get("phase") == "Succeeded" and s, 120, "Succeeded")
    assert (done["spotTimeouts"], done["preemptions"], done["failures"], done["attempt"]) == (1, 0, 0, 2)
    assert done["onDemand"] is True
    assert kube.get("pods", NS, f"{name}-attempt-1") is None  # the unschedulable pod was removed
    second = kube.get("pods", NS, f"{name}-attempt-2")
    assert second is not None and second["spec"]["nodeName"].startswith("on-demand")
    reasons = _events(kube, name)
    # the operator's event is for what it did; the wait itself is in the status (and in the scheduler's
    # FailedScheduling event on the pod)
    assert c.SPOT_CAPACITY_TIMEOUT in reasons and "Unschedulable" not in reasons


def test_an_image_that_cannot_be_pulled_fails_the_job_after_the_timeout(cluster, s3_bucket):
    kube = cluster.kube
    name = _apply(kube, s3_bucket, image="registry.invalid/nope:1", restartPolicy={"imagePullTimeoutSeconds": 4})
    pending = wait_for(
        lambda: (s := _status(kube, name)).get("pendingReason") in ("ErrImagePull", "ImagePullBackOff") and s,
        60,
        "status pendingReason ErrImagePull",
    )
    assert pending["phase"] == "Pending" and "registry.invalid/nope:1" in pending["message"], pending["message"]
    failed = wait_for(lambda: (s := _status(kube, name)).get("phase") == "Failed" and s, 60, "Failed")
    assert _condition(failed, c.FAILED)["reason"] == c.IMAGE_PULL_FAILED
    assert "imagePullTimeoutSeconds=4" in failed["message"] and "registry.invalid/nope:1" in failed["message"]
    assert (failed["failures"], failed["preemptions"], failed["attempt"]) == (0, 0, 1)
    wait_for(lambda: kube.get("pods", NS, f"{name}-attempt-1") is None, 30, "the pod that never started deleted")
    # the event follows the status write (reconcile writes status, then posts events)
    wait_for(lambda: c.IMAGE_PULL_FAILED in _events(kube, name), 30, "event ImagePullFailed")


def _kubectl_patch(cluster: SandboxCluster, name: str, patch: str) -> None:
    subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "-n",
            NS,
            "patch",
            "lr",
            name,
            "--type",
            "merge",
            "-p",
            patch,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_suspend_stops_gracefully_and_unsuspend_resumes_from_that_checkpoint(cluster, s3_bucket):
    kube = cluster.kube
    name = _apply(kube, s3_bucket, training={"maxSteps": 400, "saveSteps": 50})  # about 20 s of steps
    wait_for(lambda: _status(kube, name).get("step", 0) >= 60, 90, "training under way")
    _kubectl_patch(cluster, name, '{"spec":{"suspend":true}}')
    suspended = wait_for(lambda: (s := _status(kube, name)).get("phase") == "Suspended" and s, 60, "Suspended")
    assert (suspended["preemptions"], suspended["failures"], suspended["attempt"]) == (0, 0, 1)
    stopped_at = suspended["latestCheckpoint"]["step"]
    assert 60 <= stopped_at < 400, suspended  # the SIGTERM checkpoint: no step reported before it is lost
    assert suspended["latestCheckpoint"]["uri"] in suspended["message"]
    wait_for(lambda: kube.get("pods", NS, f"{name}-attempt-1") is None, 30, "the suspended pod gone")
    _kubectl_patch(cluster, name, '{"spec":{"suspend":false}}')
    second = wait_for(lambda: kube.get("pods", NS, f"{name}-attempt-2"), 60, "attempt 2")
    assert job_env(second)["resume"]["fromCheckpoint"] == suspended["latestCheckpoint"]["uri"]
    done = wait_for(lambda: (s := _status(kube, name)).get("phase") == "Succeeded" and s, 120, "Succeeded")
    assert (done["preemptions"], done["failures"], done["attempt"]) == (0, 0, 2)
    reasons = _events(kube, name)
    assert c.SUSPENDED in reasons and c.RESUMED in reasons


def _event_messages(kube: KubeClient, name: str, reason: str) -> list[str]:
    return [
        e.get("message", "")
        for e in kube.list("events", NS)
        if e["involvedObject"].get("name") == name and e.get("reason") == reason
    ]


def test_a_spot_reclaim_while_the_operator_is_down_is_counted_once_as_what_it_was(cluster, s3_bucket):
    """The pod ended and was deleted (as pod GC does after the node goes) before the operator saw
    it: the accounting finalizer keeps it readable, so its DisruptionTarget and the trainer's last
    words reach the event, it counts as one preemption, and then it goes."""
    kube, agent, operator = cluster.kube, cluster.agent, cluster.operator
    assert agent is not None and operator is not None
    spot_pool = default_pools(spot=1, on_demand=0)[0]
    node = agent.add_node(spot_pool)
    name = _apply(
        kube,
        s3_bucket,
        training={"maxSteps": 400, "saveSteps": 50},
        scheduling={"spot": {"enabled": True, "pendingTimeoutSeconds": 3}},
    )
    first = f"{name}-attempt-1"
    pod = wait_for(lambda: kube.get("pods", NS, first), 30, "attempt 1")
    assert ACCOUNTING_FINALIZER in pod["metadata"]["finalizers"]
    wait_for(lambda: _status(kube, name).get("step", 0) >= 60, 90, "training under way on the spot node")
    assert agent.node_of(NS, first) == node
    operator.stop()
    try:
        agent.reclaim_spot(node, grace_seconds=10, replace=False)  # the spot pool is empty again after this
        kube.delete("pods", NS, first, grace_period_seconds=0)
        held = kube.get("pods", NS, first)
        assert held is not None and held["metadata"].get("deletionTimestamp"), "the finalizer keeps it"
        assert held["status"]["phase"] == "Failed"
    finally:
        operator.start()
        operator.wait_ready()
    done = wait_for(lambda: (s := _status(kube, name)).get("phase") == "Succeeded" and s, 180, "Succeeded")
    # attempt 2 waited on the empty spot pool, attempt 3 trained on on-demand
    assert (done["preemptions"], done["failures"], done["spotTimeouts"], done["attempt"]) == (1, 0, 1, 3), done
    [told] = _event_messages(kube, name, "TerminationByKubelet")
    assert "shutdown" in told and "is durable" in told, told
    assert not _event_messages(kube, name, "PodDeleted")
    wait_for(lambda: kube.get("pods", NS, first) is None, 30, "the counted pod let go")
    kube.delete("loraresumes", NS, name)
    wait_for(lambda: not [p for p in kube.list("pods", NS) if p["metadata"]["name"].startswith(name)], 60, "pods gone")


def test_extending_a_finished_run_continues_from_its_final_checkpoint(cluster, s3_bucket):
    """resume.extendFrom on the real control plane with the stand-in trainer (the trainer's own
    resume rules): the extending job waits for the first to succeed, starts from its final checkpoint,
    and saves only the steps after it."""
    import boto3

    kube = cluster.kube
    endpoint, bucket = s3_bucket
    first = _apply(kube, s3_bucket, training={"maxSteps": 6, "saveSteps": 3})
    second = _apply(kube, s3_bucket, training={"maxSteps": 12, "saveSteps": 3}, resume={"extendFrom": first})
    done = wait_for(lambda: (s := _status(kube, second)).get("phase") == "Succeeded" and s, 120, "Succeeded")
    assert _status(kube, first)["phase"] == "Succeeded"
    assert (done["attempt"], done["preemptions"], done["failures"], done["step"]) == (1, 0, 0, 12), done
    resume = job_env(kube.get("pods", NS, f"{second}-attempt-1"))["resume"]
    assert resume["extend"] is True
    assert resume["fromCheckpoint"] == f"s3://{bucket}/{first}/checkpoints/checkpoint-6/"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{second}/checkpoints/").get("Contents", [])]
    saved = sorted({int(k.split("checkpoint-")[1].split("/")[0]) for k in keys})
    assert saved and min(saved) > 6, saved  # nothing trained again before the final checkpoint it extends


def _volumes(pod: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["emptyDir"].get("sizeLimit", "") for v in pod["spec"]["volumes"] if "emptyDir" in v}


def test_a_job_that_outgrows_its_scratch_volume_is_evicted_and_counted_as_such(cluster, s3_bucket):
    """The node agent enforces the emptyDir sizeLimit as the kubelet's eviction manager does."""
    kube = cluster.kube
    name = _apply(
        kube,
        s3_bucket,
        resources={"gpus": 1, "scratchSize": "1Ki"},
        training={"maxSteps": 400, "saveSteps": 2},
        restartPolicy={"maxDiskEvictions": 1},
    )
    first = wait_for(lambda: kube.get("pods", NS, f"{name}-attempt-1"), 30, "attempt 1's pod")
    assert _volumes(first) == {"work": "1Ki", "tmp": "4Gi"}
    assert first["spec"]["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "5Gi"
    failed = wait_for(lambda: (s := _status(kube, name)).get("phase") == "Failed" and s, 120, "Failed")
    assert (failed["diskEvictions"], failed["preemptions"], failed["failures"], failed["attempt"]) == (2, 0, 0, 2)
    assert _condition(failed, c.FAILED)["reason"] == c.DISK_EVICTION_BUDGET_EXHAUSTED
    assert 'Usage of EmptyDir volume "work" exceeds the limit "1Ki"' in failed["message"]
    assert "resources.scratchSize" in failed["message"]
    wait_for(lambda: _events(kube, name).count(c.SCRATCH_FULL) == 2, 30, "two ScratchVolumeFull events")


def test_a_node_low_on_disk_evicts_the_pod_which_is_relaunched_and_counted_apart(cluster, s3_bucket):
    kube = cluster.kube
    name = _apply(kube, s3_bucket, training={"maxSteps": 80, "saveSteps": 4})
    wait_for(lambda: ((_status(kube, name).get("latestCheckpoint") or {}).get("step") or 0) >= 4, 60, "a checkpoint")
    assert cluster.agent is not None
    cluster.agent.evict_for_disk_pressure(cluster.agent.node_of(NS, f"{name}-attempt-1"))
    done = wait_for(lambda: (s := _status(kube, name)).get("phase") == "Succeeded" and s, 120, "Succeeded")
    assert (done["diskEvictions"], done["preemptions"], done["failures"], done["attempt"]) == (1, 0, 0, 2)
    evicted = kube.get("pods", NS, f"{name}-attempt-1")
    assert evicted is not None and evicted["status"]["reason"] == "Evicted"  # the kubelet leaves the pod
    reasons = _events(kube, name)
    assert c.DISK_EVICTED in reasons and "Preempted" not in reasons


def test_an_image_or_service_account_outside_the_policy_is_refused_naming_the_field(cluster, s3_bucket):
    kube = cluster.kube
    name = _apply(kube, s3_bucket, image="evil.example/miner:1", serviceAccountName="cluster-admin-sa")
    failed = wait_for(lambda: (s := _status(kube, name)).get("phase") == "Failed" and s, 60, "Failed")
    assert _condition(failed, c.FAILED)["reason"] == c.POLICY_VIOLATION
    message = failed["message"]
    assert message.startswith("refused by the operator's policy: spec.image: 'evil.example/miner:1'"), message
    assert "policy.allowedImages (registry.invalid/)" in message
    assert "spec.serviceAccountName: 'cluster-admin-sa'" in message and "policy.allowedServiceAccounts" in message
    assert failed.get("attempt", 0) == 0 and kube.get("pods", NS, f"{name}-attempt-1") is None
    wait_for(lambda: c.POLICY_VIOLATION in _events(kube, name), 30, "event PolicyViolation")


def test_a_credentials_secret_must_be_labelled_for_it(cluster, s3_bucket):
    """Any Secret of the namespace could be named (and put into the trainer's environment) before."""
    kube = cluster.kube
    secret = f"plain-{uuid.uuid4().hex[:6]}"
    kube.create(
        "secrets",
        {"metadata": {"name": secret}, "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}},
        NS,
    )
    endpoint, bucket = s3_bucket
    name = f"lr-{uuid.uuid4().hex[:6]}"
    spec = specs.spec_doc(
        baseModel="s3://models/tiny/",
        dataset={"source": f"s3://{bucket}/data.jsonl"},
        storage=specs.s3_storage(bucket, name, endpoint, secret),
        training={"maxSteps": 6, "saveSteps": 3},
        resources={"gpus": 1},
    )
    kube.create("loraresumes", specs.resource(spec, name), NS)
    waiting = wait_for(
        lambda: (s := _status(kube, name)).get("message", "").startswith("cannot read storage") and s, 60, "refused"
    )
    assert f"spec.storage.credentialsSecret: Secret {NS}/{secret} is not labelled" in waiting["message"]
    assert _condition(waiting, c.STORAGE_READY)["status"] == "False"
    assert kube.get("pods", NS, f"{name}-attempt-1") is None  # no pod gets that Secret's keys
    subprocess.run(
        ["kubectl", "--kubeconfig", str(cluster.kubeconfig), "-n", NS, "label", "secret", secret, LABEL],
        check=True,
        capture_output=True,
        timeout=60,
    )
    done = wait_for(lambda: (s := _status(kube, name)).get("phase") == "Succeeded" and s, 120, "Succeeded")
    assert (done["attempt"], done["failures"]) == (1, 0)

"""A new resource's first reconcile does not wait for kopf's finalizer patch (issue 15, the burst target),
on the real API server.

kopf puts its finalizer on every LoraResume (for the delete handler) with a JSON patch that tests the
resourceVersion: a status write in between makes the API server refuse it, and kopf sends it again on
the next event. A resource that keeps its checkpoints is reconciled at once (handlers.wants_reconcile);
one deleted before the finalizer lands goes at once, and what its reconcile made goes with it (the
pods' ownerReference for the garbage collector, the pod-event path for the accounting finalizer). One
whose checkpoints go with it waits for the finalizer.
"""

from __future__ import annotations

import functools
import time
import uuid
from typing import Any

import boto3
import pytest

from loraresume_operator.handlers import FINALIZER
from loraresume_operator.observed import ACCOUNTING_FINALIZER
from loraresume_operator.policy import CREDENTIALS_LABEL
from loraresume_sandbox.cluster import SandboxCluster
from loraresume_trainer.checkpoint_store import CheckpointStore
from loraresume_trainer.s3uri import S3Uri
from tests.support.operator_stack import NS, Job, wait_for

pytestmark = pytest.mark.usefixtures("operator")


def new_jobs(stack: SandboxCluster, s3_bucket: tuple[str, str], count: int) -> list[Job]:
    endpoint, bucket = s3_bucket
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    jobs = []
    for _ in range(count):
        name = f"first-{uuid.uuid4().hex[:6]}"
        stack.kube.create(
            "secrets",
            {
                "metadata": {"name": f"{name}-s3", "labels": CREDENTIALS_LABEL},
                "stringData": {"AWS_ACCESS_KEY_ID": "operator-test", "AWS_SECRET_ACCESS_KEY": "first-secret"},
            },
            NS,
        )
        store = CheckpointStore(client, S3Uri(bucket, f"{name}/"))
        jobs.append(Job(stack.kube, stack.kubeconfig, name, endpoint, bucket, store))
    return jobs


def launched(job: Job) -> bool:
    return bool(job.status().get("podName") == job.pod_name(1))


def guarded(job: Job) -> bool:
    return FINALIZER in finalizers(job)


def gone(job: Job) -> bool:
    return job.resource() is None


def no_pods(job: Job) -> bool:
    return not job.pods()


def finalizers(job: Job) -> list[str]:
    return list(((job.resource() or {}).get("metadata") or {}).get("finalizers") or [])


def operator_requests(stack: SandboxCluster, resource: str, name: str) -> list[dict[str, Any]]:
    """The operator's requests on one object, in the order the API server received them."""
    out = []
    for event in stack.control_plane.audit_events(user=stack.operator_user):
        ref = event.get("objectRef") or {}
        if ref.get("resource") == resource and ref.get("name") == name:
            out.append(
                {
                    "verb": event["verb"],
                    "sub": ref.get("subresource"),
                    "code": event.get("responseStatus", {}).get("code"),
                    "at": event.get("requestReceivedTimestamp", ""),
                }
            )
    return sorted(out, key=lambda r: r["at"])


def test_new_resources_get_their_pod_and_kopfs_finalizer_lands_after_the_status_writes(stack, s3_bucket):
    """A burst: each resource is launched (status written, pod created) and kopf's finalizer lands on
    each, whichever of kopf's patch and the operator's first status write the API server took first."""
    jobs = new_jobs(stack, s3_bucket, 8)
    for i, job in enumerate(jobs):
        job.apply()
        if i % 2:  # a status write at once (as the operator's own may be): kopf's patch races it
            job.k8s.update_status("loraresumes", NS, job.name, {})
    for job in jobs:
        job.pod(1)
        wait_for(f"{job.name}: status names its pod", functools.partial(launched, job))
        wait_for(f"{job.name}: kopf's finalizer", functools.partial(guarded, job))
    refused = conflicts = 0
    for job in jobs:
        writes = operator_requests(stack, "loraresumes", job.name)
        patches = [r for r in writes if r["verb"] == "patch" and r["sub"] is None]
        assert patches and patches[-1]["code"] == 200, writes  # the finalizer's patch was taken in the end
        refused += sum(1 for r in patches if r["code"] == 422)
        statuses = [r for r in writes if r["sub"] == "status" and r["code"] == 200]
        assert statuses, writes
        conflicts += sum(1 for r in writes if r["sub"] == "status" and r["code"] == 409)
    print(
        f"kopf's finalizer patches refused and sent again: {refused}; the operator's status writes refused: {conflicts}"
    )
    for job in jobs:  # and the delete handler runs as before
        job.k8s.delete("loraresumes", NS, job.name)
    for job in jobs:
        wait_for(f"{job.name} gone", functools.partial(gone, job))
        wait_for(f"{job.name}: pods gone", functools.partial(no_pods, job))


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_a_resource_deleted_right_after_creation_leaves_no_pod_and_no_held_finalizer(stack, s3_bucket, delay):
    jobs = new_jobs(stack, s3_bucket, 4)
    for job in jobs:
        job.apply()
    time.sleep(delay)
    for job in jobs:
        job.k8s.delete("loraresumes", NS, job.name)
    for job in jobs:
        wait_for(f"{job.name} gone", functools.partial(gone, job))
        # the garbage collector (ownerReference) or the pod's own event deletes it; the operator lets it go
        wait_for(f"{job.name}: no pod left", functools.partial(no_pods, job), 60)


def test_a_resource_whose_checkpoints_go_with_it_waits_for_kopfs_finalizer(stack, s3_bucket, tmp_path):
    (job,) = new_jobs(stack, s3_bucket, 1)
    job.apply(
        storage={
            "uri": f"s3://{job.bucket}/{job.name}/",
            "endpoint": job.endpoint,
            "credentialsSecret": f"{job.name}-s3",
            "deleteOnResourceDeletion": True,
        }
    )
    pod = job.pod(1)
    assert ACCOUNTING_FINALIZER in pod["metadata"]["finalizers"]
    writes = operator_requests(stack, "loraresumes", job.name)
    taken = [r for r in writes if r["verb"] == "patch" and r["sub"] is None and r["code"] == 200]
    first_status = next(r for r in writes if r["sub"] == "status")
    assert taken and taken[0]["at"] <= first_status["at"], writes  # the finalizer first, then the launch
    job.checkpoint(tmp_path, 10)
    job.k8s.delete("loraresumes", NS, job.name)
    wait_for("resource gone", lambda: job.resource() is None)
    wait_for("pods gone", lambda: not job.pods())
    wait_for("checkpoints deleted with it", lambda: not job.store.complete_checkpoints())

"""A new resource's first reconcile does not wait for kopf's finalizer patch (issue 15, the burst target),
on the real API server.

kopf's finalizer (for the delete handler) goes only on a LoraResume whose checkpoints go with it
(`storage.deleteOnResourceDeletion`): that one is first reconciled once the finalizer is on. Every other
one is reconciled on its first event, no metadata patch races its status writes, and deleting it is
never held up: its pods go with it (the operator's DELETED path, the pods' ownerReference for the
garbage collector, the pod-event path for the accounting finalizer).
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


def test_a_burst_is_launched_without_a_finalizer_or_a_refused_write_and_deleted_with_its_pods(stack, s3_bucket):
    """Each resource of a burst is launched (status written, pod created) with no metadata patch of the
    operator's to race its status writes: no write refused, no finalizer; deleted, it goes at once and
    its running pods go (and are let go) with it."""
    jobs = new_jobs(stack, s3_bucket, 8)
    for job in jobs:
        job.apply()
    for job in jobs:
        job.pod(1)
        wait_for(f"{job.name}: status names its pod", functools.partial(launched, job))
    for job in jobs:
        writes = operator_requests(stack, "loraresumes", job.name)
        assert not [r for r in writes if r["verb"] == "patch" and r["sub"] is None], writes  # no finalizer patch
        codes = [r["code"] for r in writes if r["sub"] == "status"]
        assert codes and set(codes) == {200}, writes  # every status write taken
        assert finalizers(job) == []
    for job in jobs:
        job.k8s.delete("loraresumes", NS, job.name)
    for job in jobs:
        wait_for(f"{job.name} gone", functools.partial(gone, job), 10)
        wait_for(f"{job.name}: pods gone", functools.partial(no_pods, job))


def test_the_finalizer_follows_delete_on_resource_deletion_when_the_spec_is_edited(stack, s3_bucket):
    (job,) = new_jobs(stack, s3_bucket, 1)
    job.apply()
    job.pod(1)
    assert finalizers(job) == []
    job.k8s.patch("loraresumes", NS, job.name, {"spec": {"storage": {"deleteOnResourceDeletion": True}}})
    wait_for("kopf's finalizer put on", functools.partial(guarded, job))
    job.k8s.patch("loraresumes", NS, job.name, {"spec": {"storage": {"deleteOnResourceDeletion": False}}})
    wait_for("kopf's finalizer taken off", lambda: not guarded(job))


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

"""The RBAC rules are exactly what the operator uses: an audit of a real operator process.

The operator runs on the real control plane as the chart's ServiceAccount, in namespaced and
in cluster-wide mode, through a whole lifecycle: create, pod start, progress from S3 through
the credentials Secret, preemption, failure, success, deletion with checkpoint cleanup. The
API server's audit log records every request it made; the test compares the set of (verb,
group, resource) with `loraresume_operator.rbac` (which the Helm chart renders), and asserts
that RBAC refused none of them. A call the rules do not grant fails here (403 in the log);
so does a granted verb the operator never needs.

The namespaced run also leaves storage to the operator's defaults (no storage.uri, a
default credentials Secret, set as Helm values), so the defaults' path is exercised end to end.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import unquote

import boto3
import pytest

from loraresume_operator import rbac
from loraresume_operator.policy import CREDENTIALS_LABEL
from loraresume_sandbox.cluster import SandboxCluster, sandbox_values
from loraresume_trainer.checkpoint_store import CheckpointStore
from loraresume_trainer.s3uri import S3Uri
from tests.support import specs
from tests.support.operator_stack import NS, Job, job_env, wait_for

pytestmark = pytest.mark.slow


def audited(cluster: SandboxCluster) -> list[dict[str, Any]]:
    """The operator's resource requests: (verb, group, resource[/subresource], namespace, code, uri)."""
    out = []
    for event in cluster.control_plane.audit_events(user=cluster.operator_user):
        ref = event.get("objectRef")
        if not ref:
            continue  # discovery (/api, /apis, /version): system:discovery, every user has it
        resource = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        out.append(
            {
                "verb": event["verb"],
                "group": ref.get("apiGroup", ""),
                "resource": resource,
                "namespace": ref.get("namespace"),
                "code": event.get("responseStatus", {}).get("code"),
                "uri": event.get("requestURI", ""),
            }
        )
    return out


def observed(requests: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(r["verb"], r["group"], r["resource"]) for r in requests}


def assert_never_refused(requests: list[dict[str, Any]]) -> None:
    refused = sorted({(r["verb"], r["group"], r["resource"], r["namespace"]) for r in requests if r["code"] == 403})
    assert refused == [], f"the chart's RBAC refused the operator: {refused}"


def assert_only_trainer_pods_read(requests: list[dict[str, Any]]) -> None:
    """Every list and watch of pods asks the API server for trainer pods only (its label selector), or for one
    pod by name: never every pod of a namespace, or of the cluster, filtered by the operator after decoding."""
    reads = [unquote(r["uri"]) for r in requests if r["resource"] == "pods" and r["verb"] in ("list", "watch")]
    assert any("watch=true" in uri for uri in reads), reads
    unselected = sorted({uri for uri in reads if "labelSelector=loraresume.dev/resource" not in uri})
    assert all("fieldSelector=metadata.name" in uri for uri in unselected), unselected


def lifecycle(job: Job, tmp_path, *, delete_checkpoints: bool) -> None:
    """Preempted, then failed, then succeeded; then the resource is deleted."""
    job.run_pod(1)
    wait_for("Running", lambda: job.status().get("phase") == "Running")
    job.checkpoint(tmp_path, 10)
    job.progress(12, attempt=1)
    wait_for("progress from S3", lambda: job.status().get("progress") == "12/30")
    job.end_pod(1, 75, {"outcome": "preempted", "reason": "SIGTERM: checkpoint-10 is durable"})
    job.run_pod(2)
    job.end_pod(2, 1, {"outcome": "failed", "reason": "RuntimeError: CUDA error"})
    job.run_pod(3)
    job.succeed(tmp_path, 3)
    wait_for("Succeeded", lambda: job.status().get("phase") == "Succeeded")
    wait_for("events", lambda: {"Relaunching", "TrainerFailed", "AdapterSaved"} <= {e["reason"] for e in job.events()})
    job.k8s.delete("loraresumes", NS, job.name)
    wait_for("resource gone", lambda: job.resource() is None)
    wait_for("pods gone", lambda: not job.pods())
    if delete_checkpoints:
        wait_for("checkpoints deleted", lambda: not job.store.complete_checkpoints())


def spot_capacity_timeout(job: Job, storage: dict[str, Any]) -> None:
    """A spot attempt the scheduler cannot place (no nodes) is deleted and replaced on on-demand."""
    job.apply(scheduling={"spot": {"enabled": True, "pendingTimeoutSeconds": 2}}, storage=storage)
    wait_for("spot timeout", lambda: (job.status().get("spotTimeouts"), job.status().get("attempt")) == (1, 2), 60)
    wait_for("the unschedulable pod deleted", lambda: job.k8s.get("pods", NS, job.pod_name(1)) is None)
    job.k8s.delete("loraresumes", NS, job.name)
    wait_for("resource gone", lambda: job.resource() is None)


def test_namespaced_mode_uses_exactly_the_namespaced_rules(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    name = f"audit-{uuid.uuid4().hex[:6]}"
    values = sandbox_values(
        namespaces=[NS],
        grace_period=25,
        extra={"storage": {"uriPrefix": f"s3://{bucket}/runs/", "endpoint": endpoint, "credentialsSecret": "team-s3"}},
    )
    with SandboxCluster(tmp_path / "stack", namespaces=(NS,), pools=[], values=values, quiet=True) as cluster:
        cluster.kube.create(
            "secrets",
            {
                "metadata": {"name": "team-s3", "labels": CREDENTIALS_LABEL},
                "stringData": {"AWS_ACCESS_KEY_ID": "audit", "AWS_SECRET_ACCESS_KEY": "audit-secret"},
            },
            NS,
        )
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        store = CheckpointStore(client, S3Uri(bucket, f"runs/{NS}/{name}/"))
        job = Job(cluster.kube, cluster.kubeconfig, name, endpoint, bucket, store)
        job.apply(storage={"deleteOnResourceDeletion": True})  # no uri, endpoint or Secret: the defaults
        pod = job.pod(1)
        config = job_env(pod)
        assert config["storage"]["uri"] == f"s3://{bucket}/runs/{NS}/{name}/"
        assert config["storage"]["endpoint"] == endpoint
        assert pod["spec"]["terminationGracePeriodSeconds"] == 25
        secret_refs = {
            e["valueFrom"]["secretKeyRef"]["name"] for e in pod["spec"]["containers"][0]["env"] if "valueFrom" in e
        }
        assert secret_refs == {"team-s3"}
        wait_for("status.storageUri", lambda: job.status().get("storageUri") == config["storage"]["uri"])
        lifecycle(job, tmp_path, delete_checkpoints=True)
        other = Job(cluster.kube, cluster.kubeconfig, f"{name}-spot", endpoint, bucket, store)
        spot_capacity_timeout(other, {})  # the operator's storage defaults again
        requests = audited(cluster)
    assert requests, "the audit log holds the operator's requests"
    assert_never_refused(requests)
    assert_only_trainer_pods_read(requests)
    outside = sorted({(r["verb"], r["resource"], r["namespace"]) for r in requests if r["namespace"] != NS})
    assert outside == [], f"namespaced mode must stay inside its namespace: {outside}"
    used = observed(requests)
    granted = rbac.grants(cluster_wide=False)
    assert used - granted == set(), f"used but not granted (the chart's Role would refuse): {sorted(used - granted)}"
    assert granted - used == set(), f"granted but never used (not least privilege): {sorted(granted - used)}"


def test_cluster_wide_mode_stays_within_the_cluster_rules(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    name = f"audit-{uuid.uuid4().hex[:6]}"
    with SandboxCluster(tmp_path / "stack", namespaces=(NS,), cluster_wide=True, pools=[], quiet=True) as cluster:
        cluster.kube.create(
            "secrets",
            {
                "metadata": {"name": f"{name}-s3", "labels": CREDENTIALS_LABEL},
                "stringData": {"AWS_ACCESS_KEY_ID": "audit", "AWS_SECRET_ACCESS_KEY": "audit-secret"},
            },
            NS,
        )
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        job = Job(
            cluster.kube, cluster.kubeconfig, name, endpoint, bucket, CheckpointStore(client, S3Uri(bucket, f"{name}/"))
        )
        job.apply()
        job.pod(1)
        lifecycle(job, tmp_path, delete_checkpoints=False)
        other = Job(cluster.kube, cluster.kubeconfig, f"{name}-spot", endpoint, bucket, job.store)
        # checkpoints deleted with it: kopf's finalizer (a patch of the LoraResume) goes on this one only
        storage = specs.s3_storage(bucket, other.name, endpoint, f"{name}-s3")
        spot_capacity_timeout(other, {**storage, "deleteOnResourceDeletion": True})
        requests = audited(cluster)
    assert_never_refused(requests)
    assert_only_trainer_pods_read(requests)
    used = observed(requests)
    granted = rbac.grants(cluster_wide=True)
    assert used - granted == set(), (
        f"used but not granted (the chart's ClusterRole would refuse): {sorted(used - granted)}"
    )
    assert granted - used == set(), f"granted but never used (not least privilege): {sorted(granted - used)}"
    # kopf's runtime scanning of CRDs is the only cluster-scoped traffic besides the watched resources.
    cluster_scoped = {(r["verb"], r["group"], r["resource"]) for r in requests if r["namespace"] is None}
    assert cluster_scoped - rbac.grants(cluster_wide=False) == rbac.grants(cluster_wide=True) - rbac.grants(
        cluster_wide=False
    )

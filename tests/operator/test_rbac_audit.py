"""The RBAC rules are exactly what the operator uses: an audit of a real operator process.

The operator runs (kopf over HTTP) against the sandbox API emulator, in namespaced and in
cluster-wide mode, through a whole lifecycle: create, pod start, progress from S3 through
the credentials Secret, preemption, failure, success, deletion with checkpoint cleanup.
The emulator counts every resource request by RBAC verb; the test compares the set with
`loraresume_operator.rbac` (which the Helm chart renders). A call the rules do not grant
fails here; so does a granted verb the operator never needs.

The namespaced run also leaves storage to the operator's defaults (no storage.uri, a
default credentials Secret), so the defaults' path is exercised end to end.
"""

from __future__ import annotations

import uuid

import boto3
import pytest

from loraresume_operator import rbac
from loraresume_sandbox.k8s_api import KubernetesEmulator
from loraresume_trainer.checkpoint_store import CheckpointStore
from loraresume_trainer.s3uri import S3Uri
from tests.operator.test_operator_integration import NS, ROOT, Job, Operator, job_env, wait_for

pytestmark = pytest.mark.slow

DISCOVERY_ONLY = {"get", "list", "watch"}


def observed(k8s: KubernetesEmulator) -> set[tuple[str, str, str]]:
    return {(r.verb, r.group, r.resource) for r in k8s.api_requests()}


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


@pytest.fixture
def emulator(tmp_path):
    with KubernetesEmulator() as k8s:
        k8s.load_crds([ROOT / "crds"])
        k8s.kubeconfig = k8s.write_kubeconfig(tmp_path / "kubeconfig")
        yield k8s


def test_namespaced_mode_uses_exactly_the_namespaced_rules(emulator, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    name = f"audit-{uuid.uuid4().hex[:6]}"
    emulator.create("secrets", {"metadata": {"name": "team-s3"}, "stringData": {
        "AWS_ACCESS_KEY_ID": "audit", "AWS_SECRET_ACCESS_KEY": "audit-secret"}}, NS)
    defaults = {
        "LORARESUME_STORAGE_URI_PREFIX": f"s3://{bucket}/runs/",
        "LORARESUME_S3_ENDPOINT": endpoint,
        "LORARESUME_CREDENTIALS_SECRET": "team-s3",
        "LORARESUME_GRACE_PERIOD_SECONDS": "25",
    }
    op = Operator(emulator.kubeconfig, tmp_path / "operator.log", scope=("-n", NS), env=defaults)
    op.start()
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        store = CheckpointStore(client, S3Uri(bucket, f"runs/{NS}/{name}/"))
        job = Job(emulator, name, endpoint, bucket, store)
        job.apply(storage={"deleteOnResourceDeletion": True})  # no uri, endpoint or Secret: the defaults
        pod = job.pod(1)
        config = job_env(pod)
        assert config["storage"]["uri"] == f"s3://{bucket}/runs/{NS}/{name}/"
        assert config["storage"]["endpoint"] == endpoint
        assert pod["spec"]["terminationGracePeriodSeconds"] == 25
        secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in pod["spec"]["containers"][0]["env"]
                       if "valueFrom" in e}
        assert secret_refs == {"team-s3"}
        wait_for("status.storageUri", lambda: job.status().get("storageUri") == config["storage"]["uri"])
        lifecycle(job, tmp_path, delete_checkpoints=True)
    finally:
        op.stop()
    requests = emulator.api_requests()
    outside = sorted({(r.verb, r.resource, r.namespace, r.user_agent) for r in requests if r.namespace != NS})
    assert outside == [], f"namespaced mode must stay inside its namespace: {outside}"
    used = observed(emulator)
    granted = rbac.grants(cluster_wide=False)
    assert used - granted == set(), f"used but not granted (the chart's Role would refuse): {sorted(used - granted)}"
    assert granted - used == set(), f"granted but never used (not least privilege): {sorted(granted - used)}"


def test_cluster_wide_mode_stays_within_the_cluster_rules(emulator, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    name = f"audit-{uuid.uuid4().hex[:6]}"
    emulator.create("secrets", {"metadata": {"name": f"{name}-s3"}, "stringData": {
        "AWS_ACCESS_KEY_ID": "audit", "AWS_SECRET_ACCESS_KEY": "audit-secret"}}, NS)
    op = Operator(emulator.kubeconfig, tmp_path / "operator.log", scope=("-A",))
    op.start()
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        job = Job(emulator, name, endpoint, bucket, CheckpointStore(client, S3Uri(bucket, f"{name}/")))
        job.apply()
        job.pod(1)
        lifecycle(job, tmp_path, delete_checkpoints=False)
    finally:
        op.stop()
    used = observed(emulator)
    granted = rbac.grants(cluster_wide=True)
    assert used - granted == set(), f"used but not granted (the chart's ClusterRole would refuse): {sorted(used - granted)}"
    assert granted - used == set(), f"granted but never used (not least privilege): {sorted(granted - used)}"
    # kopf's runtime scanning of namespaces and CRDs is the only cluster-scoped traffic.
    cluster_scoped = {(r.verb, r.group, r.resource) for r in emulator.api_requests() if r.namespace is None}
    assert cluster_scoped - rbac.grants(cluster_wide=False) == rbac.grants(cluster_wide=True) - rbac.grants(cluster_wide=False)

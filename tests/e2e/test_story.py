"""End to end, with real processes: kubectl apply -> trainer pod (real training) -> preempted twice
(`kubectl delete pod`; a spot reclaim of its node) -> resumed -> Succeeded, and the adapter is
bitwise equal to an uninterrupted run of the same spec.

Control plane: real etcd, kube-apiserver, controller-manager and scheduler (built from Go
modules); the chart's CRD and RBAC installed, the operator running as its ServiceAccount;
nodes: the sandbox's node agent running `loraresume-train` as local processes; S3: moto.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid

import boto3
import pytest
import yaml

from loraresume_operator.policy import CREDENTIALS_LABEL
from loraresume_sandbox.cli import OFFLINE
from loraresume_sandbox.cluster import SandboxCluster, sandbox_values
from tests.support import specs
from tests.support.specs import trainable_spec
from tests.support.tiny_model import alpaca_rows, build_tiny_llama, write_jsonl
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

NS = "default"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("e2e")
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    base = build_tiny_llama(root / "tiny")
    for path in base.iterdir():
        s3.upload_file(str(path), bucket, f"models/tiny/{path.name}")
    s3.upload_file(str(write_jsonl(root / "train.jsonl", alpaca_rows(40))), bucket, "data/train.jsonl")
    extra = {
        **OFFLINE,
        "HF_HOME": str(root / "hf"),
        "TRITON_CACHE_DIR": str(root / "triton"),
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    entrypoints = {
        "*": [sys.executable, "-m", "loraresume_trainer.cli"],
        "sandbox/crash": [sys.executable, "-c", "import sys; print('boom'); sys.exit(1)"],
    }
    values = sandbox_values(namespaces=[NS], extra={"policy": {"allowedImages": ["sandbox/crash"]}})
    with SandboxCluster(
        root / "cluster", namespaces=(NS,), extra_env=extra, entrypoints=entrypoints, values=values, quiet=True
    ) as stack:
        stack.kube.create(
            "secrets",
            {
                "metadata": {"name": "s3-creds", "labels": CREDENTIALS_LABEL},
                "stringData": {"AWS_ACCESS_KEY_ID": "sandbox", "AWS_SECRET_ACCESS_KEY": "sandbox-secret"},
            },
            NS,
        )
        yield {
            "k8s": stack.kube,
            "agent": stack.agent,
            "kubeconfig": stack.kubeconfig,
            "s3": s3,
            "bucket": bucket,
            "endpoint": s3_server.endpoint,
            "root": root,
            "operator": stack.operator,
        }


def resource(cluster, name: str, **spec_over) -> dict:
    spec = trainable_spec(
        cluster["bucket"],
        name,
        cluster["endpoint"],
        "s3-creds",
        resources={"gpus": 0},
        terminationGracePeriodSeconds=30,
        restartPolicy={"backoffSeconds": 1},
    )
    return specs.resource({**spec, **spec_over}, name)


def kubectl(cluster, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["kubectl", "--kubeconfig", str(cluster["kubeconfig"]), "-n", NS, *args],
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 60),
        **kw,
    )


def apply(cluster, name: str, *, expect_ok: bool = True, **spec_over) -> subprocess.CompletedProcess:
    path = cluster["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(resource(cluster, name, **spec_over)))
    result = kubectl(cluster, "apply", "-f", str(path))
    if expect_ok:
        assert result.returncode == 0, result.stderr
    return result


def pods_of(cluster, name):
    return sorted(
        p["metadata"]["name"]
        for p in cluster["k8s"].list("pods", NS)
        if p["metadata"].get("labels", {}).get("loraresume.dev/resource") == name
    )


def wait_phase(cluster, name, phase, timeout=300):
    return wait_for(
        lambda: status(cluster, name).get("phase") == phase and status(cluster, name), timeout, f"{name} {phase}"
    )


def status(cluster, name):
    return (cluster["k8s"].get("loraresumes", NS, name) or {}).get("status") or {}


def adapter_bytes(cluster, name) -> bytes:
    key = f"{name}/adapter/adapter_model.safetensors"
    return cluster["s3"].get_object(Bucket=cluster["bucket"], Key=key)["Body"].read()


def wait_succeeded(cluster, name, timeout=600):
    result = kubectl(
        cluster, "wait", "--for=condition=Succeeded", f"lr/{name}", f"--timeout={timeout}s", timeout=timeout + 30
    )
    assert result.returncode == 0, (result.stderr, status(cluster, name))


def progress_step(cluster, name) -> int:
    try:
        body = cluster["s3"].get_object(Bucket=cluster["bucket"], Key=f"{name}/progress.json")["Body"].read()
    except cluster["s3"].exceptions.NoSuchKey:
        return 0
    return int(json.loads(body).get("durable_step") or 0)


def test_apply_train_preempt_twice_resume_succeed_bitwise(cluster):
    # 120 steps, not 40: the tiny model trains a step in well under 0.1 s, and attempt 1 may be durable at
    # step 20 before its deletion lands; attempt 2 must still have steps to go when its node is reclaimed
    training = {**resource(cluster, "baseline")["spec"]["training"], "maxSteps": 120}
    apply(cluster, "baseline", training=training)
    wait_succeeded(cluster, "baseline")

    apply(cluster, "story", scheduling={"spot": {"enabled": True}}, training=training)
    # Preemption 1: `kubectl delete pod` while training, once a checkpoint is durable.
    wait_for(lambda: progress_step(cluster, "story") >= 5, 300, "a durable checkpoint in attempt 1")
    deleted = kubectl(cluster, "delete", "pod", "story-attempt-1", "--wait=false")
    assert deleted.returncode == 0, deleted.stderr
    # Preemption 2: a spot reclaim of attempt 2's node, after it made progress of its own.
    wait_for(lambda: cluster["k8s"].get("pods", NS, "story-attempt-2"), 60, "attempt 2")
    first_durable = progress_step(cluster, "story")
    wait_for(lambda: progress_step(cluster, "story") > first_durable, 300, "progress in attempt 2")
    node = cluster["agent"].node_of(NS, "story-attempt-2")
    assert node.startswith("spot-"), node
    cluster["agent"].reclaim_spot(node)
    wait_succeeded(cluster, "story")

    st = status(cluster, "story")
    # The scheduler put the relaunch on the spot pool again (a replacement node).
    assert cluster["k8s"].get("pods", NS, "story-attempt-3")["spec"]["nodeName"].startswith("spot-")
    assert st["preemptions"] == 2 and st["failures"] == 0 and st["attempt"] == 3
    assert adapter_bytes(cluster, "story") == adapter_bytes(cluster, "baseline")
    table = kubectl(cluster, "get", "lr").stdout
    header = table.splitlines()[0].split()
    [row] = [line.split() for line in table.splitlines() if line.startswith("story ")]
    shown = dict(zip(header, row, strict=False))  # every column before AGE is set once it succeeded
    assert shown["PHASE"] == "Succeeded" and shown["ATTEMPT"] == "3" and shown["PREEMPTIONS"] == "2"
    assert shown["CHECKPOINT"] == str(st["latestCheckpoint"]["step"]), table
    described = kubectl(cluster, "describe", "lr", "story").stdout
    assert "Relaunching" in described


def test_schema_violation_is_refused_at_apply_naming_the_field(cluster):
    result = apply(cluster, "bad-steps", expect_ok=False, training={"maxSteps": -1, "saveSteps": 5})
    assert result.returncode != 0
    assert "spec.training.maxSteps" in result.stderr
    assert cluster["k8s"].get("loraresumes", NS, "bad-steps") is None


def test_permanent_config_error_fails_with_the_trainers_message_and_no_retry(cluster):
    rows = "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(8))
    cluster["s3"].put_object(Bucket=cluster["bucket"], Key="data/qa.jsonl", Body=rows.encode())
    apply(cluster, "bad-data", dataset={"source": f"s3://{cluster['bucket']}/data/qa.jsonl", "template": "alpaca"})
    st = wait_phase(cluster, "bad-data", "Failed")
    assert "needs column(s) instruction, output" in st["message"] and "question, answer" in st["message"]
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ConfigError"
    assert st["attempt"] == 1 and pods_of(cluster, "bad-data") == ["bad-data-attempt-1"]


def test_exhausted_failure_budget_ends_failed(cluster):
    apply(cluster, "crashy", image="sandbox/crash", restartPolicy={"backoffLimit": 1, "backoffSeconds": 1})
    st = wait_phase(cluster, "crashy", "Failed", timeout=120)
    assert st["failures"] == 2 and st["preemptions"] == 0
    assert next(c for c in st["conditions"] if c["type"] == "Failed")["reason"] == "BackoffLimitExceeded"


def test_chained_resource_starts_from_the_first_adapter(cluster):
    apply(cluster, "stage-2", adapter={"fromResource": "stage-1"}, training={"maxSteps": 6, "saveSteps": 3})
    wait_for(
        lambda: "waiting for LoraResume stage-1" in status(cluster, "stage-2").get("message", ""), 30, "stage 2 waiting"
    )
    apply(cluster, "stage-1", training={"maxSteps": 6, "saveSteps": 3})
    wait_succeeded(cluster, "stage-2", timeout=300)
    pod = cluster["k8s"].get("pods", NS, "stage-2-attempt-1")
    job = json.loads(next(e["value"] for e in pod["spec"]["containers"][0]["env"] if e["name"] == "LORARESUME_JOB"))
    assert job["adapter"] == f"s3://{cluster['bucket']}/stage-1/adapter/"
    assert status(cluster, "stage-1")["phase"] == "Succeeded"


def test_deleting_a_resource_removes_its_pods_and_keeps_checkpoints(cluster):
    apply(cluster, "doomed")
    wait_for(lambda: progress_step(cluster, "doomed") >= 5, 300, "a durable checkpoint")
    deleted = kubectl(cluster, "delete", "lr", "doomed", "--timeout=120s", timeout=150)
    assert deleted.returncode == 0, deleted.stderr
    wait_for(lambda: not pods_of(cluster, "doomed"), 60, "pods gone")
    listing = cluster["s3"].list_objects_v2(Bucket=cluster["bucket"], Prefix="doomed/checkpoints/")
    assert any(o["Key"].endswith("_COMPLETE.json") for o in listing.get("Contents", []))


def test_operator_killed_and_restarted_mid_run_completes_without_duplicate_pods(cluster):
    apply(cluster, "restart")
    wait_for(lambda: progress_step(cluster, "restart") >= 5, 300, "training under way")
    cluster["operator"].stop(signal.SIGKILL)
    cluster["operator"].start()
    wait_succeeded(cluster, "restart")
    assert pods_of(cluster, "restart") == ["restart-attempt-1"]
    assert status(cluster, "restart")["attempt"] == 1

"""The operator as a real process: kopf over HTTP against the sandbox's Kubernetes API emulator,
S3 on a moto server. The test plays the kubelet by writing pod statuses into the emulator and
plays the trainer by writing progress, checkpoints and the adapter into S3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from loraresume_sandbox.k8s_api import KubernetesEmulator
from loraresume_trainer.checkpoint_store import CheckpointStore
from loraresume_trainer.s3uri import S3Uri
from tests.support import waiting
from tests.support.waiting import free_port

ROOT = Path(__file__).resolve().parents[2]
NS = "default"
CANARY = "CANARYoperatorSECRET0123456789"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    return waiting.wait_for(check, timeout, what, every=0.2)


@pytest.fixture(scope="module")
def k8s(tmp_path_factory):
    with KubernetesEmulator() as emulator:
        emulator.load_crds([ROOT / "crds"])
        emulator.kubeconfig = emulator.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")
        yield emulator


class Operator:
    def __init__(self, kubeconfig: Path, log: Path, scope: tuple[str, ...] = ("-A",),
                 env: dict[str, str] | None = None) -> None:
        self.kubeconfig, self.log_path, self.proc = kubeconfig, log, None
        self.scope, self.env = scope, env or {}
        self.metrics_port, self.liveness_port = free_port(), free_port()

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraresume_operator.cli", *self.scope, "--interval", "1",
             "--metrics-port", str(self.metrics_port),
             "--liveness", f"http://127.0.0.1:{self.liveness_port}/healthz"],
            stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT, env=env,
        )

    def stop(self, sig: int = 15) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)

    @property
    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture(scope="module")
def operator(k8s, s3_server, tmp_path_factory):
    op = Operator(k8s.kubeconfig, tmp_path_factory.mktemp("op") / "operator.log")
    op.start()
    yield op
    op.stop()


@pytest.fixture
def job(k8s, s3_bucket):
    """A LoraResume named for this test, its S3 store, and helpers to play kubelet and trainer."""
    endpoint, bucket = s3_bucket
    name = f"bot-{uuid.uuid4().hex[:6]}"
    k8s.create("secrets", {"metadata": {"name": f"{name}-s3"}, "stringData": {
        "AWS_ACCESS_KEY_ID": "operator-test", "AWS_SECRET_ACCESS_KEY": CANARY}}, NS)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return Job(k8s, name, endpoint, bucket, CheckpointStore(client, S3Uri(bucket, f"{name}/")))


class Job:
    def __init__(self, k8s, name, endpoint, bucket, store):
        self.k8s, self.name, self.endpoint, self.bucket, self.store = k8s, name, endpoint, bucket, store

    def apply(self, **spec_over):
        spec = {
            "baseModel": "unsloth/llama-3-8b-bnb-4bit",
            "dataset": {"source": f"s3://{self.bucket}/data.jsonl"},
            "storage": {"uri": f"s3://{self.bucket}/{self.name}/", "endpoint": self.endpoint,
                        "credentialsSecret": f"{self.name}-s3"},
            "training": {"maxSteps": 30, "saveSteps": 10},
            "restartPolicy": {"backoffSeconds": 1, "maxBackoffSeconds": 2, "backoffLimit": 1},
            **spec_over,
        }
        body = {"apiVersion": "loraresume.dev/v1alpha1", "kind": "LoraResume", "metadata": {"name": self.name},
                "spec": spec}
        return self.k8s.create("loraresumes", body, NS)

    def resource(self):
        return self.k8s.get("loraresumes", NS, self.name)

    def status(self):
        return (self.resource() or {}).get("status") or {}

    def pod(self, attempt):
        return wait_for(f"pod attempt {attempt}", lambda: self.k8s.get("pods", NS, f"{self.name}-attempt-{attempt}"))

    def pods(self):
        return [p for p in self.k8s.list("pods", NS) if p["metadata"]["name"].startswith(self.name + "-")]

    def run_pod(self, attempt):
        self.pod(attempt)
        self.k8s.update_status("pods", NS, f"{self.name}-attempt-{attempt}", {
            "phase": "Running",
            "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0, "image": "x", "imageID": "",
                                   "state": {"running": {"startedAt": "2026-11-28T12:00:00Z"}}}],
        })

    def end_pod(self, attempt, exit_code, message, phase=None, **extra):
        self.k8s.update_status("pods", NS, f"{self.name}-attempt-{attempt}", {
            "phase": phase or ("Succeeded" if exit_code == 0 else "Failed"),
            "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                                   "state": {"terminated": {"exitCode": exit_code, "reason": "Error" if exit_code else "Completed",
                                                            "message": json.dumps(message)}}}],
            **extra,
        })

    def checkpoint(self, tmp_path, step):
        d = tmp_path / f"ckpt-{step}"
        d.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                     "rng_state.pth", "trainer_state.json"):
            (d / name).write_text(f"{name} {step}")
        self.store.upload_checkpoint(d, step, {"fake": True})

    def succeed(self, tmp_path, attempt):
        """Play a trainer that saved its adapter and exited 0."""
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_model.safetensors").write_text("weights")
        self.store.upload_adapter(adapter, {"fake": True})
        self.end_pod(attempt, 0, {"outcome": "succeeded", "reason": "adapter saved"})

    def progress(self, step, attempt, loss=1.5):
        self.store.put_json("progress.json", {"step": step, "max_steps": 30, "loss": loss, "attempt": attempt})

    def condition(self, type_):
        return next((c for c in self.status().get("conditions", []) if c["type"] == type_), None)

    def events(self):
        return [e for e in self.k8s.list("events", NS) if e.get("involvedObject", {}).get("name") == self.name]


def job_env(pod) -> dict:
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    return json.loads(env["LORARESUME_JOB"]["value"])


def test_apply_preempt_fail_succeed_story(operator, job, tmp_path):
    job.apply()
    pod1 = job.pod(1)
    assert pod1["metadata"]["ownerReferences"][0]["uid"] == job.resource()["metadata"]["uid"]
    assert job_env(pod1)["resume"]["fromCheckpoint"] is None

    job.run_pod(1)
    wait_for("Running", lambda: job.status().get("phase") == "Running")
    job.checkpoint(tmp_path, 10)
    job.progress(14, attempt=1)
    wait_for("progress", lambda: job.status().get("progress") == "14/30")
    assert job.status()["latestCheckpoint"]["step"] == 10 and job.status()["loss"] == "1.5"

    # Preempted: SIGTERM saved checkpoint-14, exit 75 -> relaunched at once from it.
    job.checkpoint(tmp_path, 14)
    job.end_pod(1, 75, {"outcome": "preempted", "reason": "SIGTERM: checkpoint-14 is durable"})
    pod2 = job.pod(2)
    assert job_env(pod2)["resume"]["fromCheckpoint"] == f"s3://{job.bucket}/{job.name}/checkpoints/checkpoint-14/"
    st = job.status()
    assert (st["preemptions"], st["failures"], st["attempt"]) == (1, 0, 2)

    # Crash: a failure, relaunched after the backoff.
    job.run_pod(2)
    wait_for("attempt 2 running", lambda: job.status().get("phase") == "Running")
    job.progress(17, attempt=2)
    job.end_pod(2, 1, {"outcome": "failed", "reason": "RuntimeError: CUDA error"})
    job.pod(3)
    st = job.status()
    assert (st["preemptions"], st["failures"], st["lostSteps"]) == (1, 1, 3)

    # Success: exit 0 with a complete adapter.
    job.run_pod(3)
    job.succeed(tmp_path, 3)
    wait_for("Succeeded", lambda: job.status().get("phase") == "Succeeded")
    assert job.condition("Succeeded")["status"] == "True"
    assert job.status()["outputAdapter"] == f"s3://{job.bucket}/{job.name}/adapter/"
    wanted = {"AttemptStarted", "SigtermCheckpointSaved", "Relaunching", "TrainerFailed", "AdapterSaved"}
    # kopf posts events asynchronously: wait for all of them, not for a count.
    wait_for(f"events {sorted(wanted)}", lambda: wanted <= {e["reason"] for e in job.events()})
    assert len(job.pods()) == 3
    kubectl = ["kubectl", "--kubeconfig", str(job.k8s.kubeconfig), "-n", NS]
    waited = subprocess.run([*kubectl, "wait", "--for=condition=Succeeded", f"lr/{job.name}", "--timeout=20s"],
                            capture_output=True, text=True, timeout=30)
    assert waited.returncode == 0, waited.stderr
    table = subprocess.run([*kubectl, "get", "lr", job.name], capture_output=True, text=True, timeout=30).stdout
    assert "Succeeded" in table and "17/30" in table and "PREEMPTIONS" in table.upper()

    # Nothing secret anywhere.
    everything = json.dumps(job.resource()) + json.dumps(job.events()) + operator.log + json.dumps(job.pods())
    assert CANARY not in everything


def test_config_error_fails_at_once_without_retry(operator, job):
    job.apply()
    job.run_pod(1)
    job.end_pod(1, 78, {"outcome": "config_error", "reason": "dataset.template: needs column(s) output",
                        "field": "dataset.template"})
    wait_for("Failed", lambda: job.status().get("phase") == "Failed")
    assert job.condition("Failed")["reason"] == "ConfigError"
    assert "needs column(s) output" in job.status()["message"]
    time.sleep(3)
    assert len(job.pods()) == 1


def test_exhausted_failure_budget_ends_failed(operator, job):
    job.apply()
    for attempt in (1, 2):
        job.run_pod(attempt)
        job.end_pod(attempt, 1, {"outcome": "failed", "reason": "boom"})
        if attempt == 1:
            job.pod(2)
    wait_for("Failed", lambda: job.status().get("phase") == "Failed")
    assert job.condition("Failed")["reason"] == "BackoffLimitExceeded"


def test_deleted_pod_is_a_preemption_and_resource_deletion_removes_pods(operator, job, tmp_path):
    job.apply()
    job.run_pod(1)
    wait_for("Running", lambda: job.status().get("phase") == "Running")
    job.k8s.delete("pods", NS, f"{job.name}-attempt-1", grace_period_seconds=0)
    job.pod(2)
    assert job.status()["preemptions"] == 1
    job.checkpoint(tmp_path, 10)
    job.k8s.delete("loraresumes", NS, job.name)
    wait_for("resource gone", lambda: job.resource() is None)
    wait_for("pods gone", lambda: not job.pods())
    assert job.store.complete_checkpoints()  # S3 keeps the checkpoints


def test_chained_resource_waits_for_its_source(operator, job, k8s):
    first = Job(k8s, job.name + "-s1", job.endpoint, job.bucket, job.store)
    k8s.create("secrets", {"metadata": {"name": f"{first.name}-s3"}, "stringData": {"AWS_ACCESS_KEY_ID": "x",
               "AWS_SECRET_ACCESS_KEY": "y"}}, NS)
    job.apply(adapter={"fromResource": first.name})
    wait_for("waiting message", lambda: "waiting for LoraResume" in job.status().get("message", ""))
    assert not job.pods()
    first.apply()
    first.run_pod(1)
    first.store = CheckpointStore(first.store.client, S3Uri(job.bucket, f"{first.name}/"))
    adapter = Path(k8s.kubeconfig).parent / f"{first.name}-adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_text("w")
    first.store.upload_adapter(adapter, {})
    first.end_pod(1, 0, {"outcome": "succeeded", "reason": "adapter saved"})
    pod = job.pod(1)
    assert job_env(pod)["adapter"] == f"s3://{job.bucket}/{first.name}/adapter/"


def test_operator_restart_mid_attempt_creates_no_duplicate(operator, job):
    job.apply()
    job.run_pod(1)
    wait_for("Running", lambda: job.status().get("phase") == "Running")
    operator.stop()
    operator.start()
    time.sleep(4)
    assert [p["metadata"]["name"] for p in job.pods()] == [f"{job.name}-attempt-1"]
    job.end_pod(1, 75, {"outcome": "preempted", "reason": "SIGTERM"})
    job.pod(2)
    assert job.status()["preemptions"] == 1


def test_liveness_and_metrics_endpoints(operator, job):
    import urllib.request

    job.apply()
    job.run_pod(1)
    job.end_pod(1, 75, {"outcome": "preempted", "reason": "SIGTERM"})
    job.pod(2)

    def get(port, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()

    status, _ = wait_for("liveness", lambda: get(operator.liveness_port, "/healthz"))
    assert status == 200
    _, text = get(operator.metrics_port, "/metrics")
    assert 'loraresume_preemptions_total{namespace="default"}' in text
    assert "loraresume_relaunch_seconds_count" in text and 'loraresume_resources{phase="Resuming"}' in text


def test_checkpoints_deleted_with_the_resource_only_when_asked(operator, job, tmp_path):
    job.apply(storage={"uri": f"s3://{job.bucket}/{job.name}/", "endpoint": job.endpoint,
                       "credentialsSecret": f"{job.name}-s3", "deleteOnResourceDeletion": True})
    job.pod(1)
    job.checkpoint(tmp_path, 10)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_text("w")
    job.store.upload_adapter(adapter, {})
    job.k8s.delete("loraresumes", NS, job.name)
    wait_for("resource gone", lambda: job.resource() is None)
    assert job.store.complete_checkpoints() == []
    assert job.store.read_adapter_manifest() is not None  # the adapter is the product: kept


def test_missing_credentials_secret_fails_with_the_reason(operator, job):
    job.apply(storage={"uri": f"s3://{job.bucket}/{job.name}/", "endpoint": job.endpoint,
                       "credentialsSecret": "no-such-secret"})
    wait_for("a message naming the Secret", lambda: "no-such-secret" in job.status().get("message", ""))
    assert job.condition("StorageReady")["status"] == "False" and not job.pods()
    job.k8s.create("secrets", {"metadata": {"name": "no-such-secret"}, "stringData": {
        "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}}, NS)
    job.pod(1)

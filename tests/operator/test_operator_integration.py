"""The operator as a real process on a real control plane (kube-apiserver, scheduler, controllers),
installed from the chart and running as its ServiceAccount; S3 on a moto server. There are no
nodes: the test plays the kubelet by writing pod statuses and plays the trainer by writing
progress, checkpoints and the adapter into S3 (tests/support/operator_stack.py).
"""

from __future__ import annotations

import json
import subprocess
import time

from loraresume_operator.policy import CREDENTIALS_LABEL
from loraresume_trainer.checkpoint_store import CheckpointStore
from loraresume_trainer.s3uri import S3Uri
from tests.support.operator_stack import CANARY, NS, Job, job_env, wait_for


def test_apply_preempt_fail_succeed_story(operator, job, tmp_path):
    job.apply()
    pod1 = job.pod(1)
    assert pod1["metadata"]["ownerReferences"][0]["uid"] == job.resource()["metadata"]["uid"]
    assert job_env(pod1)["resume"]["fromCheckpoint"] is None

    job.run_pod(1)
    wait_for("Running", lambda: job.status().get("phase") == "Running")
    job.checkpoint(tmp_path, 10)
    job.progress(14, attempt=1, durable_step=10)
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
    kubectl = ["kubectl", "--kubeconfig", str(job.kubeconfig), "-n", NS]
    waited = subprocess.run(
        [*kubectl, "wait", "--for=condition=Succeeded", f"lr/{job.name}", "--timeout=20s"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert waited.returncode == 0, waited.stderr
    table = subprocess.run([*kubectl, "get", "lr", job.name], capture_output=True, text=True, timeout=30).stdout
    assert "Succeeded" in table and "17/30" in table and "PREEMPTIONS" in table.upper()

    # Nothing secret anywhere.
    everything = json.dumps(job.resource()) + json.dumps(job.events()) + operator.log + json.dumps(job.pods())
    assert CANARY not in everything


def test_config_error_fails_at_once_without_retry(operator, job):
    job.apply()
    job.run_pod(1)
    job.end_pod(
        1,
        78,
        {"outcome": "config_error", "reason": "dataset.template: needs column(s) output", "field": "dataset.template"},
    )
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
    # kept readable by the accounting finalizer until counted (pod GC ends it here: no kubelet), then let go
    wait_for("attempt 1 let go", lambda: job.k8s.get("pods", NS, f"{job.name}-attempt-1") is None)
    job.checkpoint(tmp_path, 10)
    job.k8s.delete("loraresumes", NS, job.name)
    wait_for("resource gone", lambda: job.resource() is None)
    wait_for("pods gone", lambda: not job.pods())
    assert job.store.complete_checkpoints()  # S3 keeps the checkpoints


def test_chained_resource_waits_for_its_source(operator, job, k8s, tmp_path):
    first = Job(k8s, job.kubeconfig, job.name + "-s1", job.endpoint, job.bucket, job.store)
    k8s.create(
        "secrets",
        {
            "metadata": {"name": f"{first.name}-s3", "labels": CREDENTIALS_LABEL},
            "stringData": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
        },
        NS,
    )
    job.apply(adapter={"fromResource": first.name})
    wait_for("waiting message", lambda: "waiting for LoraResume" in job.status().get("message", ""))
    assert not job.pods()
    first.apply()
    first.run_pod(1)
    first.store = CheckpointStore(first.store.client, S3Uri(job.bucket, f"{first.name}/"))
    adapter = tmp_path / f"{first.name}-adapter"
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
    operator.restart()
    operator.wait_ready()
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
    job.apply(
        storage={
            "uri": f"s3://{job.bucket}/{job.name}/",
            "endpoint": job.endpoint,
            "credentialsSecret": f"{job.name}-s3",
            "deleteOnResourceDeletion": True,
        }
    )
    job.pod(1)
    job.checkpoint(tmp_path, 10)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_text("w")
    job.store.upload_adapter(adapter, {})
    cache = job.store.compile_cache_uri("c0" * 16)  # what an attempt saved after its first steps
    job.store.upload_tree(adapter, cache, kind="compile-cache", step=None, fingerprint={})
    assert len(job.store.compile_cache_keys()) == 1
    job.k8s.delete("loraresumes", NS, job.name)
    wait_for("resource gone", lambda: job.resource() is None)
    assert job.store.complete_checkpoints() == []
    assert job.store.compile_cache_keys() == []
    left = job.store.client.list_objects_v2(Bucket=job.bucket, Prefix=cache.key)
    assert left.get("KeyCount", 0) == 0
    assert job.store.read_adapter_manifest() is not None  # the adapter is the product: kept


def test_missing_credentials_secret_fails_with_the_reason(operator, job):
    job.apply(
        storage={
            "uri": f"s3://{job.bucket}/{job.name}/",
            "endpoint": job.endpoint,
            "credentialsSecret": "no-such-secret",
        }
    )
    wait_for("a message naming the Secret", lambda: "no-such-secret" in job.status().get("message", ""))
    assert job.condition("StorageReady")["status"] == "False" and not job.pods()
    job.k8s.create(
        "secrets",
        {
            "metadata": {"name": "no-such-secret", "labels": CREDENTIALS_LABEL},
            "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
        },
        NS,
    )
    job.pod(1)


def test_another_jobs_checkpoints_under_the_prefix_are_reported(operator, job):
    job.apply()
    job.run_pod(1)
    wait_for("Running", lambda: job.status().get("phase") == "Running")
    job.store.put_json("progress.json", {"step": 2, "max_steps": 30, "attempt": 1, "foreign_checkpoints": [20, 10]})
    wait_for("status lists them", lambda: job.status().get("foreignCheckpoints") == [10, 20])
    [event] = [e for e in job.events() if e["reason"] == "ForeignCheckpoints"]
    assert "2 complete checkpoint(s)" in event["message"] and "steps 10, 20" in event["message"]


def test_the_trainers_startup_phases_reach_the_status_and_the_metric(operator, job):
    import urllib.request

    job.apply()
    job.run_pod(1)
    wait_for("Running", lambda: job.status().get("phase") == "Running")
    phases = {"imports_done": 20.0, "inputs_ready": 20.5, "model_loaded": 30.0, "first_step": 34.0}
    job.store.put_json("progress.json", {"step": 1, "max_steps": 30, "attempt": 1, "startup": phases})
    wait_for("status.lastStartup", lambda: (job.status().get("lastStartup") or {}).get("seconds") == 34.0)
    startup = job.status()["lastStartup"]
    assert startup["attempt"] == 1
    assert [(p["phase"], p["tookSeconds"]) for p in startup["phases"]] == [
        ("imports_done", 20.0),
        ("inputs_ready", 0.5),
        ("model_loaded", 9.5),
        ("first_step", 4.0),
    ]
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'loraresume_trainer_startup_seconds_count{phase="total"}' in text
    assert 'loraresume_trainer_startup_seconds_sum{phase="model_loaded"}' in text


def test_an_extending_job_waits_then_starts_from_the_final_checkpoint(operator, job, k8s, tmp_path):
    first = Job(k8s, job.kubeconfig, job.name + "-s1", job.endpoint, job.bucket, job.store)
    k8s.create(
        "secrets",
        {
            "metadata": {"name": f"{first.name}-s3", "labels": CREDENTIALS_LABEL},
            "stringData": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
        },
        NS,
    )
    job.apply(resume={"extendFrom": first.name}, training={"maxSteps": 60, "saveSteps": 10})
    wait_for("waiting message", lambda: "resume.extendFrom" in job.status().get("message", ""))
    assert job.condition("Running")["reason"] == "WaitingForPredecessor" and not job.pods()
    first.apply()
    first.run_pod(1)
    first.store = CheckpointStore(first.store.client, S3Uri(job.bucket, f"{first.name}/"))
    first.checkpoint(tmp_path, 30)
    first.progress(30, 1)
    first.succeed(tmp_path, 1)
    wait_for("first Succeeded", lambda: first.status().get("phase") == "Succeeded")
    resume = job_env(job.pod(1))["resume"]
    assert resume == {
        "fromCheckpoint": f"s3://{job.bucket}/{first.name}/checkpoints/checkpoint-30/",
        "warmStart": False,
        "extend": True,
    }

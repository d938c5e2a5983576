"""The operator on the real control plane, with the test playing kubelet and trainer.

One stack per test module: control plane, the chart's CRD/ServiceAccount/RBAC applied, the
operator process running as that ServiceAccount (namespaced mode, namespace `default`
with PodSecurity `restricted`), and no nodes: the scheduler leaves the pods Pending, and the
test writes their statuses (as a kubelet would) and the trainer's S3 objects. Import the
fixtures (`stack`, `k8s`, `operator`, `job`) into a test module to use them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from loraresume_operator.policy import CREDENTIALS_LABEL
from loraresume_sandbox.cluster import OperatorProcess, SandboxCluster
from loraresume_sandbox.kube_client import KubeClient
from loraresume_trainer.checkpoint_store import REQUIRED_CHECKPOINT_FILES, CheckpointStore
from loraresume_trainer.s3uri import S3Uri
from tests.support import specs, waiting

NS = "default"
CANARY = "CANARYoperatorSECRET0123456789"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    return waiting.wait_for(check, timeout, what, every=0.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxCluster]:
    with SandboxCluster(
        tmp_path_factory.mktemp("stack"), namespaces=(NS,), pools=[], with_operator=False, quiet=True
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def k8s(stack: SandboxCluster) -> KubeClient:
    return stack.kube


@pytest.fixture(scope="module")
def operator(stack: SandboxCluster) -> Iterator[OperatorProcess]:
    op = stack.new_operator()
    op.start()
    op.wait_ready()
    yield op
    op.stop()


@pytest.fixture
def job(stack: SandboxCluster, s3_bucket: tuple[str, str]) -> Job:
    """A LoraResume named for this test, its S3 store, and helpers to play kubelet and trainer."""
    endpoint, bucket = s3_bucket
    name = f"bot-{uuid.uuid4().hex[:6]}"
    stack.kube.create(
        "secrets",
        {
            "metadata": {"name": f"{name}-s3", "labels": CREDENTIALS_LABEL},
            "stringData": {"AWS_ACCESS_KEY_ID": "operator-test", "AWS_SECRET_ACCESS_KEY": CANARY},
        },
        NS,
    )
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return Job(stack.kube, stack.kubeconfig, name, endpoint, bucket, CheckpointStore(client, S3Uri(bucket, f"{name}/")))


class Job:
    def __init__(
        self, k8s: KubeClient, kubeconfig: Path, name: str, endpoint: str, bucket: str, store: CheckpointStore
    ) -> None:
        self.k8s, self.kubeconfig, self.name = k8s, kubeconfig, name
        self.endpoint, self.bucket, self.store = endpoint, bucket, store

    def apply(self, **spec_over: Any) -> dict[str, Any]:
        base = specs.spec_doc(
            dataset={"source": f"s3://{self.bucket}/data.jsonl"},
            storage=specs.s3_storage(self.bucket, self.name, self.endpoint, f"{self.name}-s3"),
            training={"maxSteps": 30, "saveSteps": 10},
            restartPolicy={"backoffSeconds": 1, "maxBackoffSeconds": 2, "backoffLimit": 1},
        )
        spec = specs.spec_doc(base, **spec_over)
        return self.k8s.create("loraresumes", specs.resource(spec, self.name), NS)

    def resource(self) -> dict[str, Any] | None:
        return self.k8s.get("loraresumes", NS, self.name)

    def status(self) -> dict[str, Any]:
        return (self.resource() or {}).get("status") or {}

    def pod_name(self, attempt: int) -> str:
        return f"{self.name}-attempt-{attempt}"

    def pod(self, attempt: int) -> dict[str, Any]:
        return wait_for(f"pod attempt {attempt}", lambda: self.k8s.get("pods", NS, self.pod_name(attempt)))

    def pods(self) -> list[dict[str, Any]]:
        return [p for p in self.k8s.list("pods", NS) if p["metadata"]["name"].startswith(self.name + "-")]

    def run_pod(self, attempt: int) -> None:
        self.pod(attempt)
        self.k8s.update_status(
            "pods",
            NS,
            self.pod_name(attempt),
            {
                "phase": "Running",
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "ready": True,
                        "restartCount": 0,
                        "image": "x",
                        "imageID": "",
                        "state": {"running": {"startedAt": "2026-11-28T12:00:00Z"}},
                    }
                ],
            },
        )

    def end_pod(
        self, attempt: int, exit_code: int, message: dict[str, Any], phase: str | None = None, **extra: Any
    ) -> None:
        self.k8s.update_status(
            "pods",
            NS,
            self.pod_name(attempt),
            {
                "phase": phase or ("Succeeded" if exit_code == 0 else "Failed"),
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "ready": False,
                        "restartCount": 0,
                        "image": "x",
                        "imageID": "",
                        "state": {
                            "terminated": {
                                "exitCode": exit_code,
                                "reason": "Error" if exit_code else "Completed",
                                "message": json.dumps(message),
                            }
                        },
                    }
                ],
                **extra,
            },
        )

    def checkpoint(self, tmp_path: Path, step: int) -> None:
        d = tmp_path / f"ckpt-{step}"
        d.mkdir()
        for name in REQUIRED_CHECKPOINT_FILES:
            (d / name).write_text(f"{name} {step}")
        self.store.upload_checkpoint(d, step, {"fake": True})

    def succeed(self, tmp_path: Path, attempt: int) -> None:
        """Play a trainer that saved its adapter and exited 0."""
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_model.safetensors").write_text("weights")
        self.store.upload_adapter(adapter, {"fake": True})
        self.end_pod(attempt, 0, {"outcome": "succeeded", "reason": "adapter saved"})

    def progress(self, step: int, attempt: int, loss: float = 1.5, durable_step: int | None = None) -> None:
        """progress.json as the trainer writes it (`durable_step`: its newest checkpoint in S3)."""
        self.store.put_json(
            "progress.json",
            {"step": step, "max_steps": 30, "loss": loss, "attempt": attempt, "durable_step": durable_step},
        )

    def condition(self, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status().get("conditions", []) if c["type"] == type_), None)

    def events(self) -> list[dict[str, Any]]:
        return [e for e in self.k8s.list("events", NS) if e.get("involvedObject", {}).get("name") == self.name]


def job_env(pod: dict[str, Any]) -> dict[str, Any]:
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    return json.loads(env["LORARESUME_JOB"]["value"])

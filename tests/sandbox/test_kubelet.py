"""The sandbox's simulated kubelet: pods run as local processes, reported like the kubelet does.

Short `python -c` commands stand in for the trainer; everything is observed through the
emulator (and kubectl for logs and deletion), as the operator would see it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loraresume_sandbox import KubernetesEmulator
from loraresume_sandbox.kubelet import SimulatedKubelet, exit_code_of, expand_refs, fallback_message
from tests.support.waiting import wait_for

NS = "default"
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kubelet")


@pytest.fixture(scope="module")
def k8s() -> Iterator[KubernetesEmulator]:
    with KubernetesEmulator() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def kubelet(k8s: KubernetesEmulator, node_dir: Path) -> Iterator[SimulatedKubelet]:
    with SimulatedKubelet(
        k8s, workdir=node_dir / "node", extra_env={"SANDBOX_EXTRA": "extra-value"}, poll_interval=0.1
    ) as running:
        yield running


@pytest.fixture(scope="module")
def kubeconfig(k8s: KubernetesEmulator, node_dir: Path) -> Path:
    return k8s.write_kubeconfig(node_dir / "kubeconfig")


def kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True, timeout=30
    )


def make_pod(
    k8s: KubernetesEmulator,
    script: str,
    *,
    env: list[dict[str, Any]] | None = None,
    grace: int = 30,
    policy: str = "File",
    volumes: list[dict[str, Any]] | None = None,
    **container: Any,
) -> str:
    name = f"p-{uuid.uuid4().hex[:8]}"
    k8s.create(
        "pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": grace,
                "volumes": volumes or [],
                "containers": [
                    {
                        "name": "trainer",
                        "image": "ghcr.io/loraresume/trainer:0.1.0",
                        "command": [sys.executable, "-c", script],
                        "env": env or [],
                        "terminationMessagePolicy": policy,
                        **container,
                    }
                ],
            },
        },
        namespace=NS,
    )
    return name


def pod(k8s: KubernetesEmulator, name: str) -> dict[str, Any] | None:
    return k8s.get("pods", NS, name)


def state(k8s: KubernetesEmulator, name: str) -> dict[str, Any]:
    current = pod(k8s, name)
    statuses = ((current or {}).get("status") or {}).get("containerStatuses") or [{}]
    return statuses[0].get("state") or {}


def wait_phase(k8s: KubernetesEmulator, name: str, *phases: str, timeout: float = 10) -> dict[str, Any]:
    return wait_for(
        lambda: (p := pod(k8s, name)) is not None and p["status"].get("phase") in phases and p,
        timeout,
        f"pod {name} in {phases}",
    )


def wait_running(k8s: KubernetesEmulator, kubelet: SimulatedKubelet, name: str, marker: str) -> None:
    """Running, and the process has reached `marker` in its log (e.g. its signal handler is set)."""
    wait_phase(k8s, name, "Running")
    wait_for(lambda: marker in kubelet.read_log(NS, name, "trainer"), 10, f"{marker!r} in the log of {name}")


def test_helpers() -> None:
    assert expand_refs("$(A)-$(B)-$$(A)", {"A": "1"}) == "1-$(B)-$(A)"
    assert exit_code_of(-9) == 137 and exit_code_of(-15) == 143 and exit_code_of(3) == 3
    log = b"".join(b"line %d\n" % i for i in range(200))
    tail = fallback_message(log)
    assert tail.endswith("line 199\n") and tail.startswith("line 120\n")
    assert len(fallback_message(b"x" * 5000)) == 2048


def test_pod_runs_with_env_and_secrets_then_succeeds(
    k8s: KubernetesEmulator, kubelet: SimulatedKubelet, kubeconfig: Path
) -> None:
    k8s.create(
        "secrets",
        {"metadata": {"name": "s3-creds"}, "stringData": {"AWS_ACCESS_KEY_ID": "AKIDSANDBOX", "token": "s3cr3t"}},
        namespace=NS,
    )
    script = (
        "import os\n"
        "for k in ('PLAIN', 'KEY', 'TOKEN', 'SANDBOX_EXTRA', 'REF', 'HOSTNAME'): print(k, '=', os.environ.get(k))\n"
        "print('OPTIONAL' in os.environ, bool(os.environ.get('PATH')))\n"
        "print('cwd', os.getcwd())\n"
    )
    name = make_pod(
        k8s,
        script,
        env=[
            {"name": "PLAIN", "value": "plain-value"},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "token"}}},
            {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}},
            {"name": "REF", "value": "$(PLAIN)/x"},
        ],
    )
    done = wait_phase(k8s, name, "Succeeded", "Failed")
    assert done["spec"]["nodeName"] == "sandbox-node"
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    assert status["podIP"] == "127.0.0.1" and status["startTime"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["PodScheduled"]["status"] == "True"
    assert conditions["Ready"]["status"] == "False" and conditions["Ready"]["reason"] == "PodCompleted"
    (cs,) = status["containerStatuses"]
    assert cs["name"] == "trainer" and cs["restartCount"] == 0 and cs["imageID"] == ""
    terminated = cs["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert terminated["startedAt"] and terminated["finishedAt"] and "message" not in terminated

    text = kubelet.read_log(NS, name, "trainer")
    for line in ("PLAIN = plain-value", "KEY = AKIDSANDBOX", "TOKEN = s3cr3t", "SANDBOX_EXTRA = extra-value",
                 "REF = plain-value/x", f"HOSTNAME = {name}", "False True", f"cwd {kubelet.pod_dir(NS, name)}"):  # fmt: skip
        assert line in text, text
    if shutil.which("kubectl"):
        logs = kubectl(kubeconfig, "logs", name, "-n", NS)
        assert logs.returncode == 0, logs.stderr
        assert "KEY = AKIDSANDBOX" in logs.stdout and "PLAIN = plain-value" in logs.stdout


def test_pod_runs_while_running_reports_running(k8s: KubernetesEmulator, kubelet: SimulatedKubelet) -> None:
    name = make_pod(k8s, "import time; print('up', flush=True); time.sleep(0.7)")
    wait_running(k8s, kubelet, name, "up")
    current = pod(k8s, name)
    assert current is not None
    conditions = {c["type"]: c["status"] for c in current["status"]["conditions"]}
    assert conditions == {"PodScheduled": "True", "Initialized": "True", "ContainersReady": "True", "Ready": "True"}
    (cs,) = current["status"]["containerStatuses"]
    assert cs["ready"] is True and cs["state"]["running"]["startedAt"]
    wait_phase(k8s, name, "Succeeded")


def test_failure_reports_exit_code_and_log_tail(k8s: KubernetesEmulator, kubelet: SimulatedKubelet) -> None:
    script = "import sys\nfor i in range(100): print('noise', i)\nprint('boom: bad config', flush=True)\nsys.exit(3)"
    name = make_pod(k8s, script, policy="FallbackToLogsOnError")
    done = wait_phase(k8s, name, "Succeeded", "Failed")
    assert done["status"]["phase"] == "Failed"
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"
    message = terminated["message"]
    assert message.rstrip().endswith("boom: bad config") and message.startswith("noise 21\n")  # the last 80 lines

    # The File policy gives no log fallback.
    quiet = make_pod(k8s, "import sys; print('only in the log'); sys.exit(4)")
    terminated = wait_phase(k8s, quiet, "Failed")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 4 and "message" not in terminated


def test_termination_message_file(k8s: KubernetesEmulator, kubelet: SimulatedKubelet) -> None:
    script = (
        "import json, sys\n"
        "open('termination-log', 'w').write(json.dumps({'outcome': 'config-error', 'reason': 'x' * 5000}))\n"
        "print('to the log'); sys.exit(2)"
    )
    name = make_pod(k8s, script, policy="FallbackToLogsOnError", terminationMessagePath="/dev/termination-log")
    terminated = wait_phase(k8s, name, "Failed")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 2
    assert terminated["message"].startswith('{"outcome": "config-error"') and len(terminated["message"]) == 4096


def test_missing_secret_or_key_is_a_config_error(k8s: KubernetesEmulator, kubelet: SimulatedKubelet) -> None:
    marker = kubelet.workdir / f"ran-{uuid.uuid4().hex[:6]}"
    script = f"open({str(marker)!r}, 'w').write('ran')"
    name = make_pod(k8s, script, env=[{"name": "K", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}])
    waiting = wait_for(lambda: state(k8s, name).get("waiting"), 10, "a waiting container")
    assert waiting == {"reason": "CreateContainerConfigError", "message": 'secret "nope" not found'}
    k8s.create("secrets", {"metadata": {"name": "partial"}, "stringData": {"other": "v"}}, namespace=NS)
    keyless = make_pod(
        k8s, script, env=[{"name": "K", "valueFrom": {"secretKeyRef": {"name": "partial", "key": "token"}}}]
    )
    waiting = wait_for(lambda: state(k8s, keyless).get("waiting"), 10, "a waiting container")
    assert waiting["reason"] == "CreateContainerConfigError"
    assert waiting["message"] == f"couldn't find key token in Secret {NS}/partial"
    for each in (name, keyless):
        current = pod(k8s, each)
        assert current is not None and current["status"]["phase"] == "Pending"
        assert current["status"]["containerStatuses"][0]["ready"] is False
    assert not marker.exists()
    # Deleting a pod that never started: confirmed at once.
    k8s.delete("pods", NS, name)
    wait_for(lambda: pod(k8s, name) is None, 10, "the waiting pod gone")
    k8s.delete("pods", NS, keyless)
    wait_for(lambda: pod(k8s, keyless) is None, 10, "the waiting pod gone")
    assert not marker.exists()


TRAP_75 = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(75)))\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)
IGNORE_TERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def _delete_and_observe_end(k8s: KubernetesEmulator, name: str, delete: Callable[[], None]) -> dict[str, Any]:
    """The terminated state reported between `delete()` and the pod's removal."""
    seen: list[dict[str, Any]] = []

    def listener(event_type: str, group_resource: str, obj: dict[str, Any]) -> None:
        if group_resource == "pods" and obj["metadata"]["name"] == name:
            statuses = (obj.get("status") or {}).get("containerStatuses") or [{}]
            terminated = (statuses[0].get("state") or {}).get("terminated")
            if terminated:
                seen.append({**terminated, "phase": obj["status"]["phase"], "event": event_type})

    unsubscribe = k8s.subscribe(listener)
    try:
        delete()
        wait_for(lambda: pod(k8s, name) is None, 10, f"pod {name} gone")
    finally:
        unsubscribe()
    assert seen, "no terminated state was reported before the pod went away"
    return seen[-1]


@needs_kubectl
def test_kubectl_delete_sends_sigterm(
    k8s: KubernetesEmulator, kubelet: SimulatedKubelet, kubeconfig: Path
) -> None:
    name = make_pod(k8s, TRAP_75)
    wait_running(k8s, kubelet, name, "ready")

    def delete() -> None:
        deleted = kubectl(kubeconfig, "delete", "pod", name, "-n", NS, "--wait=false")
        assert deleted.returncode == 0, deleted.stderr

    end = _delete_and_observe_end(k8s, name, delete)
    assert end["exitCode"] == 75 and end["reason"] == "Error" and end["phase"] == "Failed"
    assert "got SIGTERM" in kubelet.read_log(NS, name, "trainer")


def test_sigkill_after_grace_period(k8s: KubernetesEmulator, kubelet: SimulatedKubelet) -> None:
    name = make_pod(k8s, IGNORE_TERM, grace=1)
    wait_running(k8s, kubelet, name, "ready")

    def delete() -> None:
        deleting = k8s.delete("pods", NS, name)
        assert deleting is not None and deleting["metadata"]["deletionGracePeriodSeconds"] == 1
        assert pod(k8s, name) is not None  # held until the kubelet confirms

    started = time.monotonic()
    end = _delete_and_observe_end(k8s, name, delete)
    assert time.monotonic() - started >= 1.0  # the grace period was given
    assert end["exitCode"] == 137 and end["phase"] == "Failed"


def test_preempt_node(k8s: KubernetesEmulator, kubelet: SimulatedKubelet) -> None:
    name = make_pod(k8s, TRAP_75, grace=5)
    wait_running(k8s, kubelet, name, "ready")
    seen: list[dict[str, Any]] = []
    unsubscribe = k8s.subscribe(lambda t, gr, obj: gr == "pods" and obj["metadata"]["name"] == name and seen.append(obj))
    try:
        kubelet.preempt_node(NS, name, reason="PreemptionByScheduler")
    finally:
        unsubscribe()
    assert pod(k8s, name) is None
    disrupted = [
        c for obj in seen for c in obj["status"].get("conditions", []) if c["type"] == "DisruptionTarget"
    ]
    assert disrupted and disrupted[0]["status"] == "True" and disrupted[0]["reason"] == "PreemptionByScheduler"
    assert disrupted[0]["message"] == "sandbox: simulated node preemption"
    # The condition was set while the container was still running, then the end was reported.
    first = next(obj for obj in seen if any(c["type"] == "DisruptionTarget" for c in obj["status"]["conditions"]))
    assert "running" in first["status"]["containerStatuses"][0]["state"]
    final = [obj for obj in seen if obj["status"].get("phase") == "Failed"]
    assert final, "no Failed status before the pod was deleted"
    terminated = final[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 75
    assert final[0]["status"]["reason"] == "Terminated"
    with pytest.raises(LookupError):
        kubelet.preempt_node(NS, name)


def test_job_config_and_volumes_rewritten(k8s: KubernetesEmulator, kubelet: SimulatedKubelet) -> None:
    job = {"name": "j", "workDir": "/work", "terminationLog": "/dev/termination-log", "attempt": 2}
    script = (
        "import json, os\n"
        "job = json.loads(os.environ['LORARESUME_JOB'])\n"
        "open(job['terminationLog'], 'w').write(json.dumps({'job': job, 'hf': os.environ['HF_HOME'],"
        " 'tmp': os.environ.get('TMPDIR'), 'other': os.environ['OTHER']}))\n"
    )
    name = make_pod(
        k8s,
        script,
        env=[
            {"name": "LORARESUME_JOB", "value": json.dumps(job)},
            {"name": "HF_HOME", "value": "/work/hf"},
            {"name": "OTHER", "value": "/workshop"},
        ],
        volumeMounts=[{"name": "work", "mountPath": "/work"}, {"name": "tmp", "mountPath": "/tmp"}],
        volumes=[{"name": "work", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
    )
    done = wait_phase(k8s, name, "Succeeded", "Failed")
    pod_dir = kubelet.pod_dir(NS, name)
    assert pod_dir is not None and pod_dir.is_relative_to(kubelet.workdir)
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0, kubelet.read_log(NS, name, "trainer")
    reported = json.loads(terminated["message"])
    assert reported["job"] == {**job, "workDir": str(pod_dir / "work"), "terminationLog": str(pod_dir / "termination-log")}
    assert reported["other"] == "/workshop"
    # emptyDir mounts are directories of the pod; env paths under them point there.
    assert reported["hf"] == str(pod_dir / "volumes" / "work" / "hf")
    assert reported["tmp"] == str(pod_dir / "volumes" / "tmp") and Path(reported["tmp"]).is_dir()


def test_image_entrypoint_and_secret_created_later(k8s: KubernetesEmulator, kubelet: SimulatedKubelet) -> None:
    saved = kubelet.entrypoints
    kubelet.entrypoints = {"ghcr.io/loraresume/trainer": [sys.executable, "-c", "import sys; print('argv', sys.argv[1:])"]}
    try:
        secret_ref = [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "late", "key": "k"}}}]
        name = f"p-{uuid.uuid4().hex[:8]}"
        k8s.create(
            "pods",
            {
                "metadata": {"name": name},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "trainer", "image": "ghcr.io/loraresume/trainer:0.1.0",
                                    "args": ["--config", "$(K)"], "env": secret_ref}],  # fmt: skip
                },
            },
            namespace=NS,
        )
        wait_for(lambda: state(k8s, name).get("waiting"), 10, "a waiting container")
        # The kubelet retries: once the Secret exists, the container starts.
        k8s.create("secrets", {"metadata": {"name": "late"}, "stringData": {"k": "job.yaml"}}, namespace=NS)
        wait_phase(k8s, name, "Succeeded")
        assert "argv ['--config', 'job.yaml']" in kubelet.read_log(NS, name, "trainer")
    finally:
        kubelet.entrypoints = saved

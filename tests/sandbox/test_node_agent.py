"""The node agent on a real control plane: nodes registered, pods the real scheduler binds run as
local processes and are reported as a kubelet reports them; the clouds' disruptions go through
the API so that the real controllers react.

Short `python -c` commands stand in for the trainer; everything is observed through the API
server (and kubectl for logs and deletion), as the operator sees it.
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

from loraresume_sandbox.control_plane import ControlPlane
from loraresume_sandbox.kube_client import KubeClient
from loraresume_sandbox.node_agent import (
    SHUTDOWN_MESSAGE,
    NodeAgent,
    NodePool,
    default_pools,
    exit_code_of,
    expand_refs,
    fallback_message,
)
from tests.support.cluster import PodRecorder
from tests.support.waiting import wait_for

NS = "default"
IMAGE = "ghcr.io/loraresume/trainer:0.1.0"
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with ControlPlane(tmp_path_factory.mktemp("kube"), quiet=True) as plane:
        yield plane


@pytest.fixture(scope="module")
def kube(cp: ControlPlane) -> KubeClient:
    return cp.admin


@pytest.fixture(scope="module")
def agent(cp: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeAgent]:
    client, serving = cp.node_agent_client()
    pools = [
        *default_pools(spot=1, on_demand=1),
        NodePool("tiny", 1, {"loraresume.dev/pool": "tiny"}, ({"key": "tiny", "effect": "NoSchedule"},), gpus=0),
    ]
    with NodeAgent(
        client,
        workdir=tmp_path_factory.mktemp("nodes"),
        pools=pools,
        serving=serving,
        extra_env={"SANDBOX_EXTRA": "extra-value"},
    ) as running:
        wait_for(
            lambda: all(_ready(n) for n in cp.admin.list("nodes")) and len(cp.admin.list("nodes")) == 3,
            30,
            "3 Ready nodes",
        )
        yield running


def _ready(node: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions") or [])


def kubectl(cp: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", "--kubeconfig", str(cp.admin_kubeconfig), *args], capture_output=True, text=True, timeout=30
    )


def make_pod(
    kube: KubeClient,
    script: str,
    *,
    env: list[dict[str, Any]] | None = None,
    grace: int = 30,
    policy: str = "File",
    volumes: list[dict[str, Any]] | None = None,
    spec: dict[str, Any] | None = None,
    **container: Any,
) -> str:
    name = f"p-{uuid.uuid4().hex[:8]}"
    kube.create(
        "pods",
        {
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": grace,
                "volumes": volumes or [],
                "containers": [
                    {
                        "name": "trainer",
                        "image": IMAGE,
                        "command": [sys.executable, "-c", script],
                        "env": env or [],
                        "terminationMessagePolicy": policy,
                        **container,
                    }
                ],
                **(spec or {}),
            },
        },
        NS,
    )
    return name


def pod(kube: KubeClient, name: str) -> dict[str, Any] | None:
    return kube.get("pods", NS, name)


def state(kube: KubeClient, name: str) -> dict[str, Any]:
    statuses = (((pod(kube, name) or {}).get("status") or {}).get("containerStatuses")) or [{}]
    return statuses[0].get("state") or {}


def wait_phase(kube: KubeClient, name: str, *phases: str, timeout: float = 20) -> dict[str, Any]:
    return wait_for(
        lambda: (p := pod(kube, name)) is not None and p["status"].get("phase") in phases and p,
        timeout,
        f"pod {name} in {phases}",
    )


def wait_running(kube: KubeClient, agent: NodeAgent, name: str, marker: str) -> None:
    wait_phase(kube, name, "Running")
    wait_for(lambda: marker in agent.read_log(NS, name, "trainer"), 20, f"{marker!r} in the log of {name}")


def test_helpers() -> None:
    assert expand_refs("$(A)-$(B)-$$(A)", {"A": "1"}) == "1-$(B)-$(A)"
    assert exit_code_of(-9) == 137 and exit_code_of(-15) == 143 and exit_code_of(3) == 3
    log = b"".join(b"line %d\n" % i for i in range(200))
    tail = fallback_message(log)
    assert tail.endswith("line 199\n") and tail.startswith("line 120\n")
    assert len(fallback_message(b"x" * 5000)) == 2048


def test_nodes_are_registered_with_capacity_labels_taints_and_leases(kube: KubeClient, agent: NodeAgent) -> None:
    nodes = {n["metadata"]["name"]: n for n in kube.list("nodes")}
    assert set(nodes) == {"spot-0", "on-demand-0", "tiny-0"}
    spot = nodes["spot-0"]
    assert spot["metadata"]["labels"]["cloud.google.com/gke-spot"] == "true"
    assert {"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NoSchedule"} in spot["spec"]["taints"]
    assert spot["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    assert {"cpu", "memory", "ephemeral-storage", "pods"} <= set(spot["status"]["capacity"])
    lease = kube.get("leases", "kube-node-lease", "spot-0")
    assert lease is not None and lease["spec"]["holderIdentity"] == "spot-0"
    first = lease["spec"]["renewTime"]
    wait_for(
        lambda: kube.get("leases", "kube-node-lease", "spot-0")["spec"]["renewTime"] != first, 10, "the lease renewed"
    )


def test_pod_runs_with_env_and_secrets_then_succeeds(kube: KubeClient, agent: NodeAgent, cp: ControlPlane) -> None:
    kube.create(
        "secrets",
        {"metadata": {"name": "s3-creds"}, "stringData": {"AWS_ACCESS_KEY_ID": "AKIDSANDBOX", "token": "s3cr3t"}},
        NS,
    )
    script = (
        "import os\n"
        "for k in ('PLAIN', 'KEY', 'TOKEN', 'SANDBOX_EXTRA', 'REF', 'HOSTNAME', 'NODE'): print(k, "
        "'=', os.environ.get(k))\n"
        "print('OPTIONAL' in os.environ, bool(os.environ.get('PATH')))\n"
        "print('cwd', os.getcwd())\n"
    )
    name = make_pod(
        kube,
        script,
        env=[
            {"name": "PLAIN", "value": "plain-value"},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "token"}}},
            {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}},
            {"name": "REF", "value": "$(PLAIN)/x"},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        ],
    )
    done = wait_phase(kube, name, "Succeeded", "Failed")
    # The real scheduler placed it: the only untainted node.
    assert done["spec"]["nodeName"] == "on-demand-0"
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    assert status["startTime"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["PodScheduled"]["status"] == "True"
    assert conditions["Ready"]["status"] == "False" and conditions["Ready"]["reason"] == "PodCompleted"
    (cs,) = status["containerStatuses"]
    terminated = cs["state"]["terminated"]
    assert set(cs["state"]) == {"terminated"}
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed" and "message" not in terminated
    text = agent.read_log(NS, name, "trainer")
    for line in (
        "PLAIN = plain-value",
        "KEY = AKIDSANDBOX",
        "TOKEN = s3cr3t",
        "SANDBOX_EXTRA = extra-value",
        "REF = plain-value/x",
        f"HOSTNAME = {name}",
        "NODE = on-demand-0",
        "False True",
        f"cwd {agent.pod_dir(NS, name)}",
    ):
        assert line in text, text
    if shutil.which("kubectl"):  # through the API server's proxy to the agent's kubelet endpoint
        logs = kubectl(cp, "logs", name, "-n", NS)
        assert logs.returncode == 0, logs.stderr
        assert "KEY = AKIDSANDBOX" in logs.stdout and "PLAIN = plain-value" in logs.stdout


def test_running_pod_reports_running(kube: KubeClient, agent: NodeAgent) -> None:
    name = make_pod(kube, "import time; print('up', flush=True); time.sleep(1.5)")
    wait_running(kube, agent, name, "up")
    current = pod(kube, name)
    assert current is not None
    conditions = {c["type"]: c["status"] for c in current["status"]["conditions"]}
    assert conditions["Ready"] == "True" and conditions["PodScheduled"] == "True"
    (cs,) = current["status"]["containerStatuses"]
    assert cs["ready"] is True and set(cs["state"]) == {"running"}
    wait_phase(kube, name, "Succeeded")


def test_failure_reports_exit_code_and_log_tail(kube: KubeClient, agent: NodeAgent) -> None:
    script = "import sys\nfor i in range(100): print('noise', i)\nprint('boom: bad config', flush=True)\nsys.exit(3)"
    name = make_pod(kube, script, policy="FallbackToLogsOnError")
    done = wait_phase(kube, name, "Succeeded", "Failed")
    assert done["status"]["phase"] == "Failed"
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"
    message = terminated["message"]
    assert message.rstrip().endswith("boom: bad config") and message.startswith("noise 21\n")
    quiet = make_pod(kube, "import sys; print('only in the log'); sys.exit(4)")
    terminated = wait_phase(kube, quiet, "Failed")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 4 and "message" not in terminated


def test_termination_message_file(kube: KubeClient, agent: NodeAgent) -> None:
    script = (
        "import json, sys\n"
        "open('termination-log', 'w').write(json.dumps({'outcome': 'config-error', 'reason': 'x' * 5000}))\n"
        "print('to the log'); sys.exit(2)"
    )
    name = make_pod(kube, script, policy="FallbackToLogsOnError", terminationMessagePath="/dev/termination-log")
    terminated = wait_phase(kube, name, "Failed")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 2
    assert terminated["message"].startswith('{"outcome": "config-error"') and len(terminated["message"]) == 4096


def test_missing_secret_or_key_is_a_config_error(kube: KubeClient, agent: NodeAgent) -> None:
    marker = agent.workdir / f"ran-{uuid.uuid4().hex[:6]}"
    script = f"open({str(marker)!r}, 'w').write('ran')"
    name = make_pod(kube, script, env=[{"name": "K", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}])
    waiting = wait_for(lambda: state(kube, name).get("waiting"), 20, "a waiting container")
    assert waiting == {"reason": "CreateContainerConfigError", "message": 'secret "nope" not found'}
    kube.create("secrets", {"metadata": {"name": "partial"}, "stringData": {"other": "v"}}, NS)
    keyless = make_pod(
        kube, script, env=[{"name": "K", "valueFrom": {"secretKeyRef": {"name": "partial", "key": "token"}}}]
    )
    waiting = wait_for(lambda: state(kube, keyless).get("waiting"), 20, "a waiting container")
    assert waiting == {
        "reason": "CreateContainerConfigError",
        "message": f"couldn't find key token in Secret {NS}/partial",
    }
    for each in (name, keyless):
        current = pod(kube, each)
        assert current is not None and current["status"]["phase"] == "Pending"
    assert not marker.exists()
    for each in (name, keyless):  # a pod that never started is confirmed deleted at once
        kube.delete("pods", NS, each)
        wait_for(lambda each=each: pod(kube, each) is None, 20, "the waiting pod gone")
    assert not marker.exists()


def test_unknown_image_backs_off_like_a_pull_failure(kube: KubeClient, agent: NodeAgent) -> None:
    name = f"p-{uuid.uuid4().hex[:8]}"
    kube.create(
        "pods",
        {
            "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "trainer", "image": "registry.example/nope:1"}]},
        },
        NS,
    )
    saved = agent.entrypoints
    agent.entrypoints = {IMAGE: [sys.executable, "-c", "pass"]}
    try:
        reasons = set()
        wait_for(
            lambda: (
                reasons.add((state(kube, name).get("waiting") or {}).get("reason"))
                or {"ErrImagePull", "ImagePullBackOff"} <= reasons
            ),
            20,
            "ErrImagePull then ImagePullBackOff",
        )
        waiting = state(kube, name)["waiting"]
        assert "registry.example/nope:1" in waiting["message"]
        assert pod(kube, name)["status"]["phase"] == "Pending"
    finally:
        agent.entrypoints = saved
    kube.delete("pods", NS, name)


def test_no_capacity_left_is_the_schedulers_unschedulable(kube: KubeClient, agent: NodeAgent) -> None:
    name = make_pod(kube, "pass", resources={"requests": {"nvidia.com/gpu": "5"}, "limits": {"nvidia.com/gpu": "5"}})

    def unschedulable() -> dict[str, Any] | None:
        conditions = ((pod(kube, name) or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"), None)

    condition = wait_for(unschedulable, 30, "PodScheduled=False Unschedulable")
    assert "Insufficient nvidia.com/gpu" in condition["message"], condition
    kube.delete("pods", NS, name)


TRAP_75 = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(75)))\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)
IGNORE_TERM = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)\n"
)


def _delete_and_observe_end(kube: KubeClient, name: str, delete: Callable[[], None]) -> dict[str, Any]:
    with PodRecorder(kube, NS, name) as recorder:
        delete()
        wait_for(lambda: pod(kube, name) is None, 30, f"pod {name} gone")
        time.sleep(0.5)
    seen = recorder.terminated_states()
    assert seen, "no terminated state was reported before the pod went away"
    return seen[-1]


@needs_kubectl
def test_kubectl_delete_sends_sigterm(kube: KubeClient, agent: NodeAgent, cp: ControlPlane) -> None:
    name = make_pod(kube, TRAP_75)
    wait_running(kube, agent, name, "ready")

    def delete() -> None:
        deleted = kubectl(cp, "delete", "pod", name, "-n", NS, "--wait=false")
        assert deleted.returncode == 0, deleted.stderr

    end = _delete_and_observe_end(kube, name, delete)
    assert end["exitCode"] == 75 and end["reason"] == "Error" and end["phase"] == "Failed"
    assert "got SIGTERM" in agent.read_log(NS, name, "trainer")


def test_sigkill_after_grace_period(kube: KubeClient, agent: NodeAgent) -> None:
    name = make_pod(kube, IGNORE_TERM, grace=1)
    wait_running(kube, agent, name, "ready")

    def delete() -> None:
        deleting = kube.delete("pods", NS, name)
        assert deleting is not None and deleting["metadata"]["deletionGracePeriodSeconds"] == 1

    started = time.monotonic()
    end = _delete_and_observe_end(kube, name, delete)
    assert time.monotonic() - started >= 1.0
    assert end["exitCode"] == 137 and end["phase"] == "Failed"


def test_eviction_api_sets_disruption_target_and_terminates(kube: KubeClient, agent: NodeAgent) -> None:
    name = make_pod(kube, TRAP_75, grace=5)
    wait_running(kube, agent, name, "ready")
    with PodRecorder(kube, NS, name) as recorder:
        kube.evict(NS, name)
        wait_for(lambda: pod(kube, name) is None, 30, "the evicted pod gone")
        time.sleep(0.5)
    disrupted = [
        c for obj in recorder.objects for c in obj["status"].get("conditions", []) if c["type"] == "DisruptionTarget"
    ]
    assert disrupted and disrupted[0]["reason"] == "EvictionByEvictionAPI", disrupted
    assert recorder.terminated_states()[-1]["exitCode"] == 75


def test_spot_reclaim_shuts_pods_down_then_the_node_goes(kube: KubeClient, agent: NodeAgent) -> None:
    spot = {
        "nodeSelector": {"cloud.google.com/gke-spot": "true"},
        "tolerations": [
            {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
        ],
    }
    name = make_pod(kube, TRAP_75, grace=5, spec=spot)
    wait_running(kube, agent, name, "ready")
    node = agent.node_of(NS, name)
    assert node.startswith("spot-")
    with PodRecorder(kube, NS, name) as recorder:
        agent.reclaim_spot(node)
        assert kube.get("nodes", None, node) is None
        final = wait_phase(kube, name, "Failed")
    first = next(
        obj
        for obj in recorder.objects
        if any(c["type"] == "DisruptionTarget" for c in obj["status"].get("conditions", []))
    )
    assert set(first["status"]["containerStatuses"][0]["state"]) == {"running"}, "condition set before SIGTERM"
    condition = next(c for c in final["status"]["conditions"] if c["type"] == "DisruptionTarget")
    assert (condition["reason"], condition["message"]) == ("TerminationByKubelet", SHUTDOWN_MESSAGE)
    assert final["status"]["reason"] == "Terminated"
    assert final["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 75
    # A replacement spot node registered (a cloud's autoscaler would bring one).
    wait_for(lambda: any(n["metadata"]["name"].startswith("spot-") for n in kube.list("nodes")), 10, "a new spot node")
    with pytest.raises(LookupError):
        agent.reclaim_spot(node)


def test_lost_node_is_marked_unreachable_and_its_pods_evicted(kube: KubeClient, agent: NodeAgent) -> None:
    tiny = {"nodeSelector": {"loraresume.dev/pool": "tiny"}, "tolerations": [{"key": "tiny", "operator": "Exists"}]}
    name = make_pod(kube, TRAP_75, grace=5, spec=tiny)
    wait_running(kube, agent, name, "ready")
    agent.lose_node("tiny-0")

    def node_unknown() -> bool:
        node = kube.get("nodes", None, "tiny-0") or {}
        ready = next((c for c in node.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {})
        return ready.get("status") == "Unknown"

    wait_for(node_unknown, 60, "the node controller marking tiny-0 Unknown")

    def taints() -> set[str]:
        return {t["key"] for t in kube.get("nodes", None, "tiny-0")["spec"].get("taints", [])}

    # The taint follows the condition in its own pass of the node lifecycle controller (a later update).
    wait_for(lambda: "node.kubernetes.io/unreachable" in taints(), 30, "the unreachable taint on tiny-0")
    # The taint-eviction controller deletes the pod (toleration 5 s in the sandbox) with a DisruptionTarget.
    evicted = wait_for(
        lambda: (p := pod(kube, name)) and p["metadata"].get("deletionTimestamp") and p, 60, "the pod evicted"
    )
    condition = next(c for c in evicted["status"]["conditions"] if c["type"] == "DisruptionTarget")
    assert condition["reason"] == "DeletionByTaintManager", condition


def test_job_config_and_volumes_rewritten(kube: KubeClient, agent: NodeAgent) -> None:
    job = {"name": "j", "workDir": "/work", "terminationLog": "/dev/termination-log", "attempt": 2}
    script = (
        "import json, os\n"
        "job = json.loads(os.environ['LORARESUME_JOB'])\n"
        "open(job['terminationLog'], 'w').write(json.dumps({'job': job, 'hf': os.environ['HF_HOME'],"
        " 'tmp': os.environ.get('TMPDIR'), 'other': os.environ['OTHER']}))\n"
    )
    name = make_pod(
        kube,
        script,
        env=[
            {"name": "LORARESUME_JOB", "value": json.dumps(job)},
            {"name": "HF_HOME", "value": "/work/hf"},
            {"name": "OTHER", "value": "/workshop"},
        ],
        volumeMounts=[{"name": "work", "mountPath": "/work"}, {"name": "tmp", "mountPath": "/tmp"}],
        volumes=[{"name": "work", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
    )
    done = wait_phase(kube, name, "Succeeded", "Failed")
    pod_dir = agent.pod_dir(NS, name)
    assert pod_dir is not None and pod_dir.is_relative_to(agent.workdir)
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0, agent.read_log(NS, name, "trainer")
    reported = json.loads(terminated["message"])
    assert reported["job"] == {
        **job,
        "workDir": str(pod_dir / "volumes" / "work"),  # the emptyDir at /work
        "terminationLog": str(pod_dir / "termination-log"),
    }
    assert reported["other"] == "/workshop"
    assert reported["hf"] == str(pod_dir / "volumes" / "work" / "hf")
    assert reported["tmp"] == str(pod_dir / "volumes" / "tmp") and Path(reported["tmp"]).is_dir()


def test_image_entrypoint_and_secret_created_later(kube: KubeClient, agent: NodeAgent) -> None:
    saved = agent.entrypoints
    agent.entrypoints = {
        "ghcr.io/loraresume/trainer": [sys.executable, "-c", "import sys; print('argv', sys.argv[1:])"]
    }
    try:
        name = f"p-{uuid.uuid4().hex[:8]}"
        kube.create(
            "pods",
            {
                "metadata": {"name": name},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "trainer",
                            "image": IMAGE,
                            "args": ["--config", "$(K)"],
                            "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "late", "key": "k"}}}],
                        }
                    ],
                },
            },
            NS,
        )
        wait_for(lambda: state(kube, name).get("waiting"), 20, "a waiting container")
        kube.create("secrets", {"metadata": {"name": "late"}, "stringData": {"k": "job.yaml"}}, NS)
        wait_phase(kube, name, "Succeeded")
        assert "argv ['--config', 'job.yaml']" in agent.read_log(NS, name, "trainer")
    finally:
        agent.entrypoints = saved


def test_a_new_node_is_the_agents_before_it_is_ready(
    kube: KubeClient, agent: NodeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod bound to a replacement node the moment it is Ready brings one event; the agent must know
    the node by then, or the pod is never run (seen in two scale runs: 5 pods Pending on a Ready node)."""
    known_when_ready: list[bool] = []
    patch = agent.kube.patch

    def spy(resource: str, namespace: str | None, name: str, body: Any, **kw: Any) -> Any:
        if resource == "nodes" and kw.get("subresource") == "status":
            known_when_ready.append(name in agent.nodes)
        return patch(resource, namespace, name, body, **kw)

    monkeypatch.setattr(agent.kube, "patch", spy)
    tiny = next(p for p in agent.pools if p.name == "tiny")
    name = agent.add_node(tiny)
    monkeypatch.undo()
    assert known_when_ready == [True]
    assert _ready(kube.get("nodes", None, name))
    agent.reclaim_spot(name, replace=False)  # no pods on it: the node goes, and the other tests see 3 nodes


def test_a_lease_made_meanwhile_is_renewed_not_an_error(
    kube: KubeClient, agent: NodeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new node's Lease may be made by the heartbeat round beside add_node's own renewal: the second
    create is refused (409), and that must renew the Lease, not fail (a demo's spot reclaim did)."""
    name = "lease-race-0"
    create = agent.kube.create

    def racing(resource: str, body: Any, namespace: str | None = None) -> Any:
        if resource == "leases":  # the other renewer gets there first
            kube.create("leases", {"metadata": {"name": name}, "spec": {"holderIdentity": name}}, "kube-node-lease")
        return create(resource, body, namespace)

    monkeypatch.setattr(agent.kube, "create", racing)
    agent._renew_lease(name)
    monkeypatch.undo()
    lease = kube.get("leases", "kube-node-lease", name)
    assert lease is not None and lease["spec"].get("renewTime")
    kube.delete("leases", "kube-node-lease", name)

"""A node agent on a real API server: registers Nodes and runs the pods bound to them as local
processes, doing through the API what a kubelet does (sandbox and tests only).

There is no container runtime on the development machines. The agent plays the kubelet of
every node of its pools with plain client calls, so the real scheduler places pods, the real
controllers (node lifecycle, pod GC, taint eviction, garbage collector) react, and the
operator meets the API as it is:

- Nodes: created with capacity (cpu, memory, ephemeral-storage, `nvidia.com/gpu`), labels and
  taints per pool, status `Ready`, addresses and the kubelet endpoint; their Leases in
  `kube-node-lease` renewed every `lease_renew_seconds`.
- Pods bound to its nodes (one watch over all pods, re-listed after 410 Gone): the first
  container runs as a process (see "containers" below), and `pods/status` is patched as the
  kubelet does (phase, conditions, container states, exit codes, termination message).
  Graceful deletion: SIGTERM to the process group, the grace period, SIGKILL, the final
  status, then the kubelet's zero-grace delete with a uid precondition.
- Images: an image the agent has no entrypoint for cannot be "pulled": the container waits
  with `ErrImagePull`, then `ImagePullBackOff`, as a kubelet reports it.
- `kubectl logs [-f]`: an HTTPS kubelet endpoint (`/containerLogs/...`, `follow` and `tailLines`)
  that the API server proxies to.

What clouds do, each through the API so that the real controllers react:

- `reclaim_spot(node)`: the node is tainted (impending termination), then shut down gracefully:
  each pod gets `DisruptionTarget` (TerminationByKubelet), SIGTERM, at most its grace
  period, ends Failed with reason `Terminated`; then the Node object is deleted (the pod GC
  controller removes the orphaned pods).
- `lose_node(node)`: the machine is gone: its processes are killed and its heartbeats stop;
  the node lifecycle controller marks it NotReady/Unknown and taints it, the taint-eviction
  controller deletes its pods (DisruptionTarget: DeletionByTaintManager).
- Eviction API: `KubeClient.evict` (the API server sets DisruptionTarget; the agent sees a
  graceful deletion).
- No capacity left: the scheduler's own `Unschedulable`.
- Disk: an emptyDir over its `sizeLimit` gets its pod evicted, as the kubelet's eviction
  manager does (`DisruptionTarget` TerminationByKubelet, killed at once, phase Failed, reason
  `Evicted` with the kubelet's message); `evict_for_disk_pressure(node)` evicts a node's pods
  as a node low on ephemeral-storage does.

Containers map onto processes like this:

- Command: `command` + `args` when `command` is set; else the image's entrypoint from
  `entrypoints` (the image reference, the reference without tag/digest, or "*") + `args`.
  `$(VAR)` references are expanded. Only the first container runs.
- Environment: PATH and HOME of this process, `extra_env`, then the container's `env`
  (`value`, `secretKeyRef`, `configMapKeyRef`, `fieldRef`). A missing Secret/ConfigMap or key
  that is not optional keeps the container waiting with `CreateContainerConfigError`.
- Files: `<workdir>/<node>/<namespace>/<pod>-<uid8>/` is the working directory; an emptyDir
  becomes `<pod dir>/volumes/<name>` and env values under its mountPath are rewritten into
  it (a mount at /tmp sets TMPDIR). A JSON `LORARESUME_JOB` gets its `workDir` rewritten the
  same way (into the pod directory when no emptyDir holds it) and its `terminationLog` into the
  pod directory.
- Termination message: `<pod dir>/termination-log` (at most 4096 bytes); with
  FallbackToLogsOnError, an empty message and a non-zero exit, the log's tail.
- Exit codes: death by signal N is 128+N; reason Completed for 0, Error otherwise.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from loraresume_operator.scratch import quantity_bytes

from .kube_client import ApiError, KubeClient, follow
from .pki import CertPair

log = logging.getLogger(__name__)

Object = dict[str, Any]

ENV_JOB = "LORARESUME_JOB"
TERMINATION_LOG = "termination-log"
MAX_MESSAGE_BYTES = 4096
FALLBACK_LINES, FALLBACK_BYTES = 80, 2048
LOCALHOST = "127.0.0.1"
KUBELET_VERSION = "v1.37.2"
SHUTDOWN_MESSAGE = "Pod was terminated in response to imminent node shutdown."
# The kubelet's eviction messages (pkg/kubelet/eviction/helpers.go).
NODE_LOW_ON_DISK = "The node was low on resource: ephemeral-storage. Threshold quantity: 10Gi, available: 9Gi. "
EMPTY_DIR_OVER_LIMIT = 'Usage of EmptyDir volume "{volume}" exceeds the limit "{limit}". '
SPOT_TERMINATION_TAINT = {"key": "cloud.google.com/impending-node-termination", "effect": "NoSchedule"}
IMAGE_BACKOFF_SECONDS = 2.0
CONTAINER_ID_SCHEME = "local-process://"  # containerID: <scheme><pid>
_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- pools ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodePool:
    """Identical nodes: `<name>-<i>` with these labels, taints and capacity."""

    name: str
    count: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[Object, ...] = ()
    gpus: int = 1
    cpu: str = "8"
    memory: str = "64Gi"
    ephemeral_storage: str = "200Gi"
    pods: int = 110

    def capacity(self) -> dict[str, str]:
        return {
            "cpu": self.cpu,
            "memory": self.memory,
            "ephemeral-storage": self.ephemeral_storage,
            "pods": str(self.pods),
            "nvidia.com/gpu": str(self.gpus),
        }


SPOT_LABELS = {"cloud.google.com/gke-spot": "true", "loraresume.dev/pool": "spot"}
SPOT_TAINT = {"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NoSchedule"}
ON_DEMAND_LABELS = {"loraresume.dev/pool": "on-demand"}
# What the sandbox's operator is told about these pools (its Helm values would say the same).
SPOT_OPERATOR_ENV = {
    "LORARESUME_SPOT_NODE_SELECTOR": json.dumps({"cloud.google.com/gke-spot": "true"}),
    "LORARESUME_SPOT_TOLERATIONS": json.dumps(
        [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]
    ),
    "LORARESUME_ON_DEMAND_NODE_SELECTOR": json.dumps(ON_DEMAND_LABELS),
}


def default_pools(spot: int = 2, on_demand: int = 1, gpus: int = 1) -> list[NodePool]:
    return [
        NodePool("spot", spot, dict(SPOT_LABELS), (dict(SPOT_TAINT),), gpus=gpus),
        NodePool("on-demand", on_demand, dict(ON_DEMAND_LABELS), gpus=gpus),
    ]


# -- pure helpers -----------------------------------------------------------------------------
class ContainerConfigError(Exception):
    """The container cannot be created (the kubelet's CreateContainerConfigError, ErrImagePull)."""

    def __init__(self, message: str, reason: str = "CreateContainerConfigError") -> None:
        super().__init__(message)
        self.reason = reason


def expand_refs(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined names are replaced, `$$` escapes, others stay."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR_REF.sub(sub, text)


def exit_code_of(returncode: int) -> int:
    """Popen's returncode as the kubelet reports it: a death by signal N is 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def fallback_message(log_bytes: bytes) -> str:
    """The kubelet's FallbackToLogsOnError text: the last 80 lines, at most 2048 bytes."""
    tail = b"".join(log_bytes.splitlines(keepends=True)[-FALLBACK_LINES:])[-FALLBACK_BYTES:]
    return tail.decode("utf-8", errors="replace")


def rewrite_path(value: str, mounts: list[tuple[str, Path]]) -> str:
    """A container path at or under an emptyDir mount, as the local directory standing in for it."""
    for mount_path, local in mounts:
        if value == mount_path:
            return str(local)
        if value.startswith(mount_path.rstrip("/") + "/"):
            return str(local / value[len(mount_path.rstrip("/")) + 1 :])
    return value


def bare_image(image: str) -> str:
    bare = re.sub(r"@.*$", "", image)
    if ":" in bare.rsplit("/", 1)[-1]:
        bare = bare.rsplit(":", 1)[0]
    return bare


# -- one pod ----------------------------------------------------------------------------------
@dataclass
class _Run:
    """One pod this agent runs (or failed to start)."""

    node: str
    namespace: str
    name: str
    uid: str
    pod: Object
    dir: Path
    start_time: str = field(default_factory=now_rfc3339)
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    waiting: dict[str, str] | None = None
    terminated: Object | None = None
    disruption: Object | None = None  # a DisruptionTarget condition this agent adds (node shutdown)
    shutdown: bool = False
    evicted: str | None = None  # the kubelet's eviction message
    stopping: bool = False
    next_try: float = 0.0
    exited: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def container(self) -> Object:
        return self.pod["spec"]["containers"][0]

    @property
    def log_path(self) -> Path:
        return self.dir / f"{_SAFE.sub('_', self.container['name'])}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and not self.exited.is_set()


@dataclass
class _Node:
    name: str
    pool: NodePool
    heartbeat: bool = True
    lost: bool = False


class NodeAgent:
    """Registers the pools' Nodes and plays their kubelets; see the module docstring."""

    def __init__(
        self,
        kube: KubeClient,
        *,
        workdir: Path,
        pools: list[NodePool] | None = None,
        serving: CertPair | None = None,
        extra_env: dict[str, str] | None = None,
        entrypoints: dict[str, list[str]] | None = None,
        python: str = sys.executable,
        lease_seconds: int = 8,
        lease_renew_seconds: float = 2.0,
    ) -> None:
        self.kube = kube
        self.workdir = Path(workdir)
        self.pools = pools if pools is not None else default_pools()
        self.serving = serving
        self.extra_env = dict(extra_env or {})
        self.entrypoints = entrypoints if entrypoints is not None else {"*": [python, "-m", "loraresume_trainer.cli"]}
        self.lease_seconds = lease_seconds
        self.lease_renew_seconds = lease_renew_seconds
        self.nodes: dict[str, _Node] = {}
        self._runs: dict[str, _Run] = {}
        self._by_name: dict[tuple[str, str], _Run] = {}
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._http: ThreadingHTTPServer | None = None
        self._pool_counters: dict[str, int] = {}
        self.kubelet_port = 0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> NodeAgent:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._closed.clear()
        self._serve_logs()
        for pool in self.pools:
            for _ in range(pool.count):
                self.add_node(pool)
        for target, name in (
            (self._heartbeats, "heartbeats"),
            (self._watch_pods, "pod-watch"),
            (self._retry_loop, "retries"),
            (self._storage_loop, "local-storage"),
        ):
            thread = threading.Thread(target=target, name=f"node-agent-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, grace_seconds: float = 2.0) -> None:
        """Stop playing the kubelets; end every process still running (SIGTERM, grace, SIGKILL)."""
        self._closed.set()
        with self._lock:
            running = [run for run in self._runs.values() if run.running]
        for run in running:
            self._signal(run, signal.SIGTERM)
        for run in running:
            if not run.exited.wait(grace_seconds):
                self._signal(run, signal.SIGKILL)
            run.exited.wait(5)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self.kube.close()  # ends the pod watch at once
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- nodes ----------------------------------------------------------------------------
    def add_node(self, pool: NodePool) -> str:
        """Register one more node of `pool` (as a cloud's autoscaler would) and return its name.

        The node is this agent's before the API server shows it Ready: a pod the scheduler binds to it
        at once brings one event, which `_on_pod` drops for a node it does not know (two scale runs
        kept 5 pods bound to a replacement node that never ran them)."""
        with self._lock:
            index = self._pool_counters.get(pool.name, 0)
            self._pool_counters[pool.name] = index + 1
            name = f"{pool.name}-{index}"
            node = self.nodes[name] = _Node(name, pool, heartbeat=False)  # beats once its Lease is made below
        labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": "sandbox-gpu",
            **pool.labels,
        }
        body = {"metadata": {"name": name, "labels": labels}, "spec": {"taints": [dict(t) for t in pool.taints]}}
        try:
            self.kube.create("nodes", body)
        except ApiError as exc:
            if exc.code != 409:
                raise
        self.kube.patch(
            "nodes", None, name, {"status": self._node_status(pool)}, subresource="status", patch_type="strategic"
        )
        self._renew_lease(name)
        with self._lock:
            node.heartbeat = not node.lost  # a node lost meanwhile stays silent
        return name

    def _node_status(self, pool: NodePool) -> Object:
        stamp = now_rfc3339()

        def condition(type_: str, status: str, reason: str, message: str) -> Object:
            return {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": stamp,
            }

        capacity = pool.capacity()
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                condition(
                    "MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"
                ),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "kubelet is posting ready status (loraresume node agent)"),
            ],
            "addresses": [{"type": "InternalIP", "address": LOCALHOST}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": uuid.uuid4().hex,
                "systemUUID": str(uuid.uuid4()),
                "bootID": str(uuid.uuid4()),
                "kernelVersion": os.uname().release,
                "osImage": "loraresume sandbox node agent",
                "containerRuntimeVersion": "local-process://1",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def _renew_lease(self, node: str) -> None:
        spec = {"holderIdentity": node, "leaseDurationSeconds": self.lease_seconds, "renewTime": now_micro()}
        try:
            self.kube.patch("leases", "kube-node-lease", node, {"spec": spec})
        except ApiError as exc:
            if exc.code != 404:
                raise
            try:
                self.kube.create("leases", {"metadata": {"name": node}, "spec": spec}, "kube-node-lease")
            except ApiError as exc:
                if exc.code != 409:  # made meanwhile (a renewal beside add_node's): renew that one
                    raise
                self.kube.patch("leases", "kube-node-lease", node, {"spec": spec})

    def _heartbeats(self) -> None:
        """Every node's Lease renewed each round, side by side, as each kubelet renews its own: one after
        the other, 20 nodes under load (a renewal taking 0.5-1.4 s) outlasted the 8 s node-monitor grace,
        so the node lifecycle controller took healthy nodes for unreachable and tainted them (a 500-resource
        scale run kept 25 of 100 GPUs schedulable)."""
        with ThreadPoolExecutor(16, thread_name_prefix="node-agent-lease") as renewals:
            while not self._closed.wait(self.lease_renew_seconds):
                with self._lock:
                    beating = [n.name for n in self.nodes.values() if n.heartbeat]
                for name, done in [(name, renewals.submit(self._renew_lease, name)) for name in beating]:
                    try:
                        done.result()
                    except Exception as exc:
                        log.warning("node agent: lease of %s not renewed: %s", name, exc)

    def node_of(self, namespace: str, pod: str) -> str:
        found = self.kube.get("pods", namespace, pod)
        node = ((found or {}).get("spec") or {}).get("nodeName")
        if not node:
            raise LookupError(f"pod {namespace}/{pod} is not bound to a node")
        return str(node)

    def reclaim_spot(
        self, node: str, *, grace_seconds: int | None = None, replace: bool = True, wait: bool = True
    ) -> threading.Thread | None:
        """A cloud reclaiming a spot VM: taint, graceful node shutdown, the Node deleted.

        Every pod on the node gets DisruptionTarget (TerminationByKubelet) and SIGTERM, and is
        killed after min(its grace period, `grace_seconds`); it ends Failed, reason Terminated.
        Then the Node is deleted (pod GC removes the pods) and, with `replace`, a new node of
        the same pool registers. Blocks unless wait=False (then runs in the returned thread).
        """
        with self._lock:
            entry = self.nodes.get(node)
        if entry is None or entry.lost:
            raise LookupError(f"node {node} is not one of this agent's live nodes")

        def run() -> None:
            self.kube.patch(
                "nodes",
                None,
                node,
                {
                    "spec": {
                        "taints": [
                            *[dict(t) for t in entry.pool.taints],
                            {**SPOT_TERMINATION_TAINT, "timeAdded": now_rfc3339()},
                        ]
                    }
                },
            )
            runs = self._runs_on(node)
            threads = [threading.Thread(target=self._shutdown_pod, args=(r, grace_seconds), daemon=True) for r in runs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            with self._lock:
                entry.heartbeat, entry.lost = False, True
            self.kube.delete("nodes", None, node)
            self._forget_node(node)
            if replace:
                self.add_node(entry.pool)

        if not wait:
            thread = threading.Thread(target=run, name=f"reclaim-{node}", daemon=True)
            thread.start()
            return thread
        run()
        return None

    def lose_node(self, node: str) -> None:
        """The machine is gone at once: processes killed, no more heartbeats or status."""
        with self._lock:
            entry = self.nodes.get(node)
            if entry is None:
                raise LookupError(f"node {node} is not one of this agent's nodes")
            entry.heartbeat, entry.lost = False, True
        for run in self._runs_on(node):
            with run.lock:
                run.stopping = True
            self._signal(run, signal.SIGKILL)

    def _forget_node(self, node: str) -> None:
        with self._lock:
            self.nodes.pop(node, None)

    def _runs_on(self, node: str) -> list[_Run]:
        with self._lock:
            return [r for r in self._runs.values() if r.node == node and not r.finished.is_set()]

    # -- pods -----------------------------------------------------------------------------
    def _watch_pods(self) -> None:
        """Every pod, listed then watched (re-listed after 410 Gone): the kubelets' pod source."""
        follow(self.kube, "pods", self._on_pod, self._closed, relisted=self._forget_missing)

    def _forget_missing(self, present: set[str]) -> None:
        with self._lock:
            gone = [run for uid, run in self._runs.items() if uid not in present]
        for run in gone:
            self._on_gone(run)

    def _on_pod(self, kind: str, pod: Object) -> None:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        uid = meta.get("uid", "")
        with self._lock:
            run = self._runs.get(uid)
            node = self.nodes.get(spec.get("nodeName") or "")
        if kind == "DELETED":
            if run is not None:
                self._on_gone(run)
            return
        if run is None:
            if node is None or node.lost:
                return
            phase = (pod.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                return  # ended before this agent started
            if meta.get("deletionTimestamp"):
                self._confirm_deletion(meta["namespace"], meta["name"], uid)
                return
            self._admit(node.name, pod)
            return
        if meta.get("deletionTimestamp") and not run.stopping:
            with self._lock:
                lost = self.nodes.get(run.node) is None or self.nodes[run.node].lost
            if lost:
                return  # nobody on that node confirms anything any more
            self._begin_termination(run, int(meta.get("deletionGracePeriodSeconds") or 0))

    def _on_gone(self, run: _Run) -> None:
        if run.running and not run.stopping:  # force-deleted while running: end it anyway
            self._begin_termination(run, 0, confirm=False)
        elif not run.running:
            with self._lock:
                self._runs.pop(run.uid, None)

    def _admit(self, node: str, pod: Object) -> None:
        meta = pod["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        pod_dir = self.workdir / node / _SAFE.sub("_", namespace) / f"{_SAFE.sub('_', name)}-{uid[:8]}"
        pod_dir.mkdir(parents=True, exist_ok=True)
        run = _Run(node=node, namespace=namespace, name=name, uid=uid, pod=pod, dir=pod_dir)
        with self._lock:
            self._runs[uid] = run
            self._by_name[(namespace, name)] = run
        if len(pod["spec"]["containers"]) > 1:
            log.warning("node agent: pod %s/%s: only its first container runs", namespace, name)
        self._try_start(run)

    def _retry_loop(self) -> None:
        """Containers waiting on a Secret or an image are retried, as the kubelet's sync loop does."""
        while not self._closed.wait(0.5):
            with self._lock:
                waiting = [
                    r
                    for r in self._runs.values()
                    if r.waiting is not None and not r.stopping and r.next_try <= time.monotonic()
                ]
            for run in waiting:
                try:
                    self._try_start(run)
                except Exception as exc:
                    log.warning("node agent: retry of %s/%s failed: %s", run.namespace, run.name, exc)

    def _storage_loop(self) -> None:
        """emptyDir sizeLimits enforced, as the kubelet's eviction manager does (every 2 s here; the
        kubelet's housekeeping runs about every 10 s)."""
        while not self._closed.wait(2.0):
            with self._lock:
                running = [r for r in self._runs.values() if r.running and not r.stopping]
            for run in running:
                try:
                    over = self._volume_over_limit(run)
                    if over is not None:
                        self._evict(run, EMPTY_DIR_OVER_LIMIT.format(volume=over[0], limit=over[1]))
                except Exception:  # one pod's trouble must not end the enforcement for every pod
                    log.exception("node agent: storage check of %s/%s failed", run.namespace, run.name)

    def _volume_over_limit(self, run: _Run) -> tuple[str, str] | None:
        for volume in run.pod["spec"].get("volumes") or []:
            limit = (volume.get("emptyDir") or {}).get("sizeLimit")
            if not limit:
                continue
            used = _tree_bytes(run.dir / "volumes" / _SAFE.sub("_", volume["name"]))
            if used > quantity_bytes(str(limit)):
                return str(volume["name"]), str(limit)
        return None

    def evict_for_disk_pressure(self, node: str) -> None:
        """The node's disk fills up (not necessarily by these pods): the kubelet evicts its pods."""
        for run in self._runs_on(node):
            self._evict(run, NODE_LOW_ON_DISK)

    def _evict(self, run: _Run, message: str) -> None:
        """The kubelet's eviction: DisruptionTarget, the container killed at once (grace 0 for
        local storage), phase Failed with reason Evicted and the message; the pod object stays."""
        with run.lock:
            if run.stopping:
                return
            run.stopping = True
            run.evicted = message
            run.disruption = {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "TerminationByKubelet",
                "message": message,
                "lastTransitionTime": now_rfc3339(),
            }
        log.info("node agent: evicting %s/%s: %s", run.namespace, run.name, message)
        self._signal(run, signal.SIGKILL)
        run.finished.wait(30)
        if not run.finished.is_set():
            self._finish(run, 137, reason="Error", message="")

    def _try_start(self, run: _Run) -> None:
        with run.lock:
            if run.proc is not None or run.stopping:
                return
            try:
                argv_base = self._command(run)
                env = self._environment(run)
                argv = [expand_refs(arg, env) for arg in argv_base]
            except ContainerConfigError as exc:
                reason = exc.reason
                if (
                    reason == "ErrImagePull"
                    and run.waiting
                    and run.waiting["reason"] in ("ErrImagePull", "ImagePullBackOff")
                ):
                    reason = "ImagePullBackOff" if run.waiting["reason"] == "ErrImagePull" else "ErrImagePull"
                message = (
                    str(exc)
                    if reason != "ImagePullBackOff"
                    else (f'Back-off pulling image "{run.container.get("image", "")}": {exc}')
                )
                run.waiting = {"reason": reason, "message": message}
                run.next_try = time.monotonic() + IMAGE_BACKOFF_SECONDS
                self._write_status(run)
                return
            run.waiting = None
            with open(run.log_path, "ab") as logfile:
                try:
                    run.proc = subprocess.Popen(
                        argv,
                        cwd=run.dir,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=logfile,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                except OSError as exc:
                    logfile.write(f"node agent: cannot start {argv[0]!r}: {exc}\n".encode())
                    run.started_at = now_rfc3339()
                    self._finish(run, 128, reason="StartError", message=str(exc))
                    return
            run.started_at = now_rfc3339()
            log.info("node agent: pod %s/%s started on %s (pid %d)", run.namespace, run.name, run.node, run.proc.pid)
            self._write_status(run)
        threading.Thread(target=self._wait_exit, args=(run,), name=f"pod-{run.name}", daemon=True).start()

    def _command(self, run: _Run) -> list[str]:
        container = run.container
        args = [str(a) for a in container.get("args") or []]
        if container.get("command"):
            return [str(c) for c in container["command"]] + args
        image = str(container.get("image", ""))
        for key in (image, bare_image(image), "*"):
            if key in self.entrypoints:
                return list(self.entrypoints[key]) + args
        raise ContainerConfigError(
            f'failed to pull and unpack image "{image}": not found (the sandbox runs only the images it knows: '
            f"{', '.join(sorted(k for k in self.entrypoints if k != '*')) or 'none'})",
            reason="ErrImagePull",
        )

    def _environment(self, run: _Run) -> dict[str, str]:
        env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
        env.update(self.extra_env)
        env["HOSTNAME"] = run.name
        mounts = self._empty_dir_mounts(run)
        for mount_path, local in mounts:
            if mount_path.rstrip("/") == "/tmp":
                env["TMPDIR"] = str(local)
        pod_env: dict[str, str] = {}
        for var in run.container.get("env") or []:
            name = var["name"]
            if var.get("valueFrom"):
                value = self._value_from(run, var["valueFrom"])
                if value is None:
                    continue
            else:
                value = expand_refs(str(var.get("value", "")), {**env, **pod_env})
            pod_env[name] = rewrite_path(value, mounts)
        if ENV_JOB in pod_env:
            pod_env[ENV_JOB] = self._rewrite_job(run, pod_env[ENV_JOB])
        env.update(pod_env)
        return env

    def _empty_dir_mounts(self, run: _Run) -> list[tuple[str, Path]]:
        volumes = {v["name"]: v for v in run.pod["spec"].get("volumes") or [] if "name" in v}
        mounts = []
        for mount in run.container.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name", ""))
            if volume is None or "emptyDir" not in volume or not str(mount.get("mountPath", "")).startswith("/"):
                continue
            local = run.dir / "volumes" / _SAFE.sub("_", volume["name"])
            sub = str(mount.get("subPath") or "").strip("/")
            if sub:
                local = local / sub
            local.mkdir(parents=True, exist_ok=True)
            mounts.append((str(mount["mountPath"]).rstrip("/") or "/", local))
        return sorted(mounts, key=lambda m: -len(m[0]))

    def _value_from(self, run: _Run, source: Object) -> str | None:
        meta = run.pod["metadata"]
        for kind, resource, label in (
            ("secretKeyRef", "secrets", "secret"),
            ("configMapKeyRef", "configmaps", "configmap"),
        ):
            ref = source.get(kind)
            if not ref:
                continue
            obj_name, key, optional = ref.get("name", ""), ref.get("key", ""), bool(ref.get("optional", False))
            obj = self.kube.get(resource, run.namespace, obj_name)
            if obj is None:
                if optional:
                    return None
                raise ContainerConfigError(f'{label} "{obj_name}" not found')
            data = obj.get("data") or {}
            if key in data:
                return (
                    base64.b64decode(data[key]).decode("utf-8", errors="replace")
                    if resource == "secrets"
                    else str(data[key])
                )
            if resource == "configmaps" and key in (obj.get("binaryData") or {}):
                return base64.b64decode(obj["binaryData"][key]).decode("utf-8", errors="replace")
            if optional:
                return None
            raise ContainerConfigError(f"couldn't find key {key} in {label.capitalize()} {run.namespace}/{obj_name}")
        ref = source.get("fieldRef")
        if ref:
            fields = {
                "metadata.name": meta["name"],
                "metadata.namespace": meta["namespace"],
                "metadata.uid": meta["uid"],
                "spec.nodeName": run.node,
                "spec.serviceAccountName": run.pod["spec"].get("serviceAccountName", ""),
                "status.podIP": LOCALHOST,
                "status.hostIP": LOCALHOST,
            }
            path = ref.get("fieldPath", "")
            if path in fields:
                return fields[path]
            raise ContainerConfigError(f"unsupported fieldPath in the sandbox: {path}")
        raise ContainerConfigError("sandbox: unsupported valueFrom source")

    def _rewrite_job(self, run: _Run, text: str) -> str:
        try:
            job = json.loads(text)
        except json.JSONDecodeError:
            return text
        if not isinstance(job, dict):
            return text
        # On the emptyDir mounted there (its sizeLimit then counts the trainer's files), else its own.
        work = Path(rewrite_path(str(job.get("workDir") or ""), self._empty_dir_mounts(run)))
        if not work.is_absolute() or not work.is_relative_to(run.dir):
            work = run.dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        job["workDir"] = str(work)
        job["terminationLog"] = str(run.dir / TERMINATION_LOG)
        return json.dumps(job, separators=(",", ":"))

    # -- ending ---------------------------------------------------------------------------
    def _wait_exit(self, run: _Run) -> None:
        assert run.proc is not None
        code = exit_code_of(run.proc.wait())
        run.exited.set()
        with self._lock:
            node = self.nodes.get(run.node)
        if node is None or (node.lost and not run.shutdown):
            run.finished.set()  # the machine is gone: nobody reports the end
            return
        self._finish(
            run, code, reason="Completed" if code == 0 else "Error", message=self._termination_message(run, code)
        )

    def _termination_message(self, run: _Run, code: int) -> str:
        try:
            raw = (run.dir / TERMINATION_LOG).read_bytes()[:MAX_MESSAGE_BYTES]
        except OSError:
            raw = b""
        message = raw.decode("utf-8", errors="replace")
        if not message and code != 0 and run.container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            try:
                message = fallback_message(run.log_path.read_bytes())
            except OSError:
                message = ""
        return message

    def _finish(self, run: _Run, code: int, *, reason: str, message: str) -> None:
        with run.lock:
            terminated: Object = {
                "exitCode": code,
                "reason": reason,
                "startedAt": run.started_at or now_rfc3339(),
                "finishedAt": now_rfc3339(),
                "containerID": f"{CONTAINER_ID_SCHEME}{run.proc.pid if run.proc else 0}",
            }
            if message:
                terminated["message"] = message
            run.terminated = terminated
            run.exited.set()
            if not self._closed.is_set():
                self._write_status(run)
            run.finished.set()
        log.info("node agent: pod %s/%s ended with exit code %d", run.namespace, run.name, code)

    def _signal(self, run: _Run, sig: signal.Signals) -> None:
        if run.proc is None or run.exited.is_set():
            return
        try:
            os.killpg(run.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _begin_termination(self, run: _Run, grace: int, *, confirm: bool = True) -> None:
        with run.lock:
            if run.stopping:
                return
            run.stopping = True
        threading.Thread(
            target=self._terminate, args=(run, grace, confirm), name=f"kill-{run.name}", daemon=True
        ).start()

    def _terminate(self, run: _Run, grace: int, confirm: bool) -> None:
        """SIGTERM, the grace period, SIGKILL; the final status; the zero-grace delete."""
        if run.running:
            self._signal(run, signal.SIGTERM)
            if not run.exited.wait(max(grace, 0)):
                log.info("node agent: pod %s/%s ignored SIGTERM for %d s: SIGKILL", run.namespace, run.name, grace)
                self._signal(run, signal.SIGKILL)
            run.finished.wait(30)
        elif not run.finished.is_set():  # never started (waiting): it ends without running
            self._finish(
                run,
                137 if run.waiting else 0,
                reason="ContainerStatusUnknown" if run.waiting else "Completed",
                message="",
            )
        if confirm:
            self._confirm_deletion(run.namespace, run.name, run.uid)

    def _shutdown_pod(self, run: _Run, grace_seconds: int | None) -> None:
        """Graceful node shutdown of one pod, as the kubelet does it."""
        with run.lock:
            run.shutdown = True
            run.disruption = {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "TerminationByKubelet",
                "message": SHUTDOWN_MESSAGE,
                "lastTransitionTime": now_rfc3339(),
            }
            already = run.stopping
            run.stopping = True
            if not run.finished.is_set():
                self._write_status(run)
        grace = int(run.pod["spec"].get("terminationGracePeriodSeconds", 30))
        if grace_seconds is not None:
            grace = min(grace, grace_seconds)
        if already:
            run.finished.wait(grace + 30)
        elif run.running:
            self._signal(run, signal.SIGTERM)
            if not run.exited.wait(grace):
                self._signal(run, signal.SIGKILL)
            run.finished.wait(30)
        if not run.finished.is_set():
            self._finish(run, 137, reason="Error", message="")

    def _confirm_deletion(self, namespace: str, name: str, uid: str) -> None:
        try:
            self.kube.delete("pods", namespace, name, grace_period_seconds=0, uid=uid)
        except ApiError as exc:
            if exc.code not in (404, 409):
                log.warning("node agent: cannot confirm deletion of %s/%s: %s", namespace, name, exc)

    # -- status ---------------------------------------------------------------------------
    def _write_status(self, run: _Run) -> None:
        try:
            self.kube.patch(
                "pods",
                run.namespace,
                run.name,
                {"metadata": {"uid": run.uid}, "status": self._status(run)},
                subresource="status",
                patch_type="strategic",
            )
        except ApiError as exc:
            if exc.code not in (404, 409):
                log.warning("node agent: status of %s/%s not written: %s", run.namespace, run.name, exc)

    def _status(self, run: _Run) -> Object:
        names = [c["name"] for c in run.pod["spec"]["containers"]]
        unready = ("ContainersNotReady", f"containers with unready status: [{' '.join(names)}]")
        if run.terminated is not None:
            failed = run.terminated["exitCode"] != 0 or run.shutdown or run.evicted is not None
            phase = "Failed" if failed else "Succeeded"
            state: Object = {"terminated": run.terminated, "running": None, "waiting": None}
            ready, why = False, ("PodCompleted", "")
        elif run.proc is not None:
            phase, ready, why = "Running", True, ("", "")
            state = {"running": {"startedAt": run.started_at}, "waiting": None, "terminated": None}
        else:
            phase, ready, why = "Pending", False, unready
            state = {
                "waiting": dict(run.waiting or {"reason": "ContainerCreating"}),
                "running": None,
                "terminated": None,
            }
        stamp = now_rfc3339()

        def cond(type_: str, value: bool, reason: str = "", message: str = "") -> Object:
            out: Object = {
                "type": type_,
                "status": "True" if value else "False",
                "lastProbeTime": None,
                "lastTransitionTime": stamp,
            }
            if reason:
                out["reason"] = reason
            if message:
                out["message"] = message
            return out

        conditions = [
            cond("PodReadyToStartContainers", True),
            cond("Initialized", True),
            cond("ContainersReady", ready, *why),
            cond("Ready", ready, *why),
        ]
        if run.disruption is not None:
            conditions.append(run.disruption)
        statuses = []
        for i, container in enumerate(run.pod["spec"]["containers"]):
            cstate = state
            if i > 0 and state.get("terminated"):
                cstate = {**state, "terminated": {**state["terminated"], "exitCode": 0, "reason": "Completed"}}
                cstate["terminated"].pop("message", None)
            entry: Object = {
                "name": container["name"],
                "ready": ready,
                "restartCount": 0,
                "image": container.get("image", ""),
                "imageID": "",
                "started": bool(cstate.get("running")),
                "state": cstate,
            }
            if run.proc is not None:
                entry["containerID"] = f"{CONTAINER_ID_SCHEME}{run.proc.pid}"
            statuses.append(entry)
        status: Object = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": LOCALHOST,
            "hostIPs": [{"ip": LOCALHOST}],
            "startTime": run.start_time,
            "containerStatuses": statuses,
        }
        if run.proc is not None:
            status.update(podIP=LOCALHOST, podIPs=[{"ip": LOCALHOST}])
        if run.shutdown and run.terminated is not None:
            status.update(reason="Terminated", message=SHUTDOWN_MESSAGE)
        elif run.evicted is not None and run.terminated is not None:
            status.update(reason="Evicted", message=run.evicted)
        return status

    # -- logs -----------------------------------------------------------------------------
    def pod_dir(self, namespace: str, name: str) -> Path | None:
        """The local directory of the latest pod run under that name, if any."""
        with self._lock:
            run = self._by_name.get((namespace, name))
        return run.dir if run else None

    def run_of(self, namespace: str, pod: str) -> _Run | None:
        with self._lock:
            return self._by_name.get((namespace, pod))

    def read_log(self, namespace: str, pod: str, container: str = "") -> str:
        """What the pod's process wrote so far (the latest pod of that name)."""
        with self._lock:
            run = self._by_name.get((namespace, pod))
        if run is None or (container and container != run.container["name"]):
            return ""
        try:
            return run.log_path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _serve_logs(self) -> None:
        """The kubelet's /containerLogs endpoint over HTTPS, which the API server proxies to."""
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404)
                    return
                query = parse_qs(url.query)
                if query.get("follow") == ["true"]:
                    self._follow(parts[1], parts[2], parts[3])
                    return
                text = agent.read_log(parts[1], parts[2], parts[3])
                tail = query.get("tailLines")
                if tail and tail[0].isdigit():
                    text = "".join(text.splitlines(keepends=True)[-int(tail[0]) :])
                data = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _follow(self, namespace: str, pod: str, container: str) -> None:
                """`kubectl logs -f`: the log so far, then what is appended, until the process ends."""
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.end_headers()  # no length: the stream ends when the connection closes
                run = agent.run_of(namespace, pod)
                if run is None or (container and container != run.container["name"]):
                    return
                try:
                    with open(run.log_path, "rb") as log_file:
                        while True:
                            ended = run.exited.is_set() or agent._closed.is_set()
                            data = log_file.read()
                            if data:
                                self.wfile.write(data)
                                self.wfile.flush()
                            elif ended:
                                return
                            else:
                                time.sleep(0.2)
                except (FileNotFoundError, BrokenPipeError, ConnectionResetError):
                    return

        self._http = ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self._http.daemon_threads = True
        if self.serving is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.serving.cert), str(self.serving.key))
            self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
        self.kubelet_port = self._http.server_address[1]
        thread = threading.Thread(target=self._http.serve_forever, name="node-agent-logs", daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- waiting helpers for tests and tools ----------------------------------------------
    def wait_finished(self, namespace: str, pod: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                run = self._by_name.get((namespace, pod))
            if run is not None and run.finished.wait(0.2):
                return True
            time.sleep(0.05)
        return False


def _tree_bytes(root: Path) -> int:
    """Bytes of the files under `root`, walked while the trainer writes there: a directory or file it
    renames or removes meanwhile (a checkpoint moved into place, an upload's temporary file) is skipped,
    as du does (rglob raised FileNotFoundError and the storage loop ended for every pod)."""
    total = 0
    for folder, _dirs, files in os.walk(root, onerror=lambda _exc: None):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name), follow_symlinks=False).st_size
            except OSError:
                continue
    return total

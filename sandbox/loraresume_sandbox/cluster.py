"""The operator as a cluster runs it, on the sandbox's real control plane (sandbox and tests only).

`install_chart` renders the Helm chart with Helm's own engine (helm-python-sdk) and applies,
with server-side apply, what an install puts into the API: the CRD, the ServiceAccount and the
Roles/RoleBindings (or ClusterRole/Binding). The Deployment is not applied (there is no
container runtime to run the operator image); instead `OperatorProcess` runs the operator
locally with the Deployment's own command, args and environment and a token of the chart's
ServiceAccount (TokenRequest), so every request it makes is authorized by the chart's RBAC.

`SandboxCluster` puts it together: control plane, namespaces for trainer pods (PodSecurity
`restricted` enforced), the chart, the operator process, and the node agent with a spot pool
and an on-demand pool.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from .control_plane import RESTRICTED, ControlPlane, repo_root
from .kube_client import ApiError, KubeClient
from .node_agent import SPOT_LABELS, SPOT_TAINT, NodeAgent, NodePool, default_pools
from .waiting import free_port, stop_process, wait_for

Object = dict[str, Any]
RELEASE = "loraresume"
RELEASE_NAMESPACE = "loraresume-system"
SANDBOX_TRAINER_IMAGE = "ghcr.io/loraresume/trainer:0.1.0"
# Kinds an install applies here; the Deployment, Service and ServiceMonitor need a runtime or CRDs
# the sandbox does not have (the operator runs as a local process instead).
APPLIED_KINDS = (
    "CustomResourceDefinition",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
)


def chart_dir() -> Path:
    return repo_root() / "helm" / "loraresume-operator"


def sandbox_values(
    *,
    namespaces: list[str] | None = None,
    cluster_wide: bool = False,
    grace_period: int = 30,
    interval: float = 1,
    log_level: str = "INFO",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Helm values for the sandbox: its spot/on-demand pools, a short grace period and interval."""
    values: dict[str, Any] = {
        "watch": {"clusterWide": True} if cluster_wide else {"namespaces": list(namespaces or ["default"])},
        "trainer": {"image": SANDBOX_TRAINER_IMAGE, "terminationGracePeriodSeconds": grace_period},
        "spot": {
            "nodeSelector": {"cloud.google.com/gke-spot": SPOT_LABELS["cloud.google.com/gke-spot"]},
            "tolerations": [
                {
                    "key": SPOT_TAINT["key"],
                    "operator": "Equal",
                    "value": SPOT_TAINT["value"],
                    "effect": SPOT_TAINT["effect"],
                }
            ],
            "onDemandNodeSelector": {"loraresume.dev/pool": "on-demand"},
        },
        "reconcileIntervalSeconds": interval,
        "logLevel": log_level,
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


def render_chart(values: dict[str, Any], *, release: str = RELEASE, namespace: str = RELEASE_NAMESPACE) -> list[Object]:
    """Every object `helm install` would create, rendered by Helm's engine (NOTES.txt left out)."""
    import helm_python as helm

    with helm.Chart.load(chart_dir()) as chart:
        rendered = chart.render(copy.deepcopy(values), name=release, namespace=namespace, is_install=True)
    objects: list[Object] = []
    for path, text in sorted(rendered.items()):
        if not path.endswith("NOTES.txt"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


@dataclass
class Installation:
    objects: list[Object]
    namespace: str

    @property
    def deployment(self) -> Object:
        return next(o for o in self.objects if o["kind"] == "Deployment")

    @property
    def container(self) -> Object:
        return self.deployment["spec"]["template"]["spec"]["containers"][0]

    @property
    def service_account(self) -> str:
        return str(self.deployment["spec"]["template"]["spec"]["serviceAccountName"])

    @property
    def cluster_wide(self) -> bool:
        return "-A" in (self.container.get("args") or [])

    def operator_env(self) -> dict[str, str]:
        """The container's env as the kubelet would give it (fieldRefs resolved)."""
        env: dict[str, str] = {}
        for var in self.container.get("env") or []:
            if "value" in var:
                env[var["name"]] = str(var["value"])
            elif (var.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
                env[var["name"]] = self.namespace
        return env


def install_chart(
    kube: KubeClient, values: dict[str, Any], *, release: str = RELEASE, namespace: str = RELEASE_NAMESPACE
) -> Installation:
    """Render and apply (server-side) the chart's CRD, ServiceAccount and RBAC; wait for the CRD."""
    objects = render_chart(values, release=release, namespace=namespace)
    try:
        kube.create("namespaces", {"metadata": {"name": namespace}})
    except ApiError as exc:
        if exc.code != 409:
            raise
    order = {kind: i for i, kind in enumerate(APPLIED_KINDS)}
    for obj in sorted((o for o in objects if o["kind"] in order), key=lambda o: order[o["kind"]]):
        kube.apply(obj, field_manager="helm")
        if obj["kind"] == "CustomResourceDefinition":
            _wait_served(kube, obj["metadata"]["name"], obj["spec"]["names"]["plural"])
    return Installation(objects, namespace)


def _wait_served(kube: KubeClient, crd: str, plural: str) -> None:
    """Established, and then its storage initialized (until then requests get 429)."""

    def established() -> bool:
        found = kube.get("customresourcedefinitions", None, crd) or {}
        conditions = found.get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    wait_for(established, 30, f"CRD {crd} Established")
    wait_for(lambda: _lists(kube, plural), 30, f"{plural} served")


def _lists(kube: KubeClient, plural: str) -> bool:
    try:
        kube.list_raw(plural)
    except ApiError:
        return False
    return True


@dataclass
class OperatorProcess:
    """The operator, run locally the way the chart's Deployment runs it, as its ServiceAccount."""

    installation: Installation
    kubeconfig: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0
    liveness_port: int = 0
    _log: IO[bytes] | None = None

    def argv(self) -> list[str]:
        args = list(self.installation.container.get("args") or [])
        out: list[str] = []
        skip = False
        for i, arg in enumerate(args):  # the pod's ports become free loopback ports
            if skip:
                skip = False
                continue
            if arg in ("--metrics-port", "--liveness") and i + 1 < len(args):
                skip = True
                continue
            out.append(arg)
        return [
            sys.executable,
            "-m",
            "loraresume_operator.cli",
            *out,
            "--metrics-port",
            str(self.metrics_port),
            "--liveness",
            f"http://127.0.0.1:{self.liveness_port}/healthz",
        ]

    def start(self) -> OperatorProcess:
        if self.running:
            return self
        self.metrics_port, self.liveness_port = free_port(), free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("LORARESUME_") and k != "KUBECONFIG"}
        env = {**base, **self.installation.operator_env(), **self.env, "KUBECONFIG": str(self.kubeconfig)}
        env["LORARESUME_METRICS_PORT"] = str(self.metrics_port)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the operator was never started")
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        stop_process(self.proc, timeout, sig)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 60) -> None:
        """Until kopf's liveness endpoint answers (the operator has started its watches)."""
        import urllib.request

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"operator exited with {self.proc.returncode}:\n" + "\n".join(self.log.splitlines()[-20:])
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(ready, timeout, "the operator's liveness endpoint", every=0.2)


@dataclass
class SandboxCluster:
    """Control plane + chart + operator (as its ServiceAccount) + node agent, in one directory."""

    directory: Path
    namespaces: tuple[str, ...] = ("default",)
    cluster_wide: bool = False
    pools: list[NodePool] | None = None  # None: default_pools(); []: no nodes (a test plays the kubelet)
    extra_env: dict[str, str] = field(default_factory=dict)  # for trainer processes
    entrypoints: dict[str, list[str]] | None = None
    operator_env: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] | None = None
    with_operator: bool = True
    quiet: bool = False

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        self.control_plane = ControlPlane(self.directory / "kube", quiet=self.quiet)
        self.agent: NodeAgent | None = None
        self.operator: OperatorProcess | None = None
        self.installation: Installation | None = None

    @property
    def kube(self) -> KubeClient:
        return self.control_plane.admin

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.admin_kubeconfig

    def start(self) -> SandboxCluster:
        t0 = time.monotonic()
        self.directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.directory / "nodes", ignore_errors=True)  # pods of an earlier cluster here
        try:
            self.control_plane.start()
            for ns in self.namespaces:
                self.control_plane.create_namespace(ns, RESTRICTED)
            values = self.values or sandbox_values(namespaces=list(self.namespaces), cluster_wide=self.cluster_wide)
            self.installation = install_chart(self.kube, values)
            client, serving = self.control_plane.node_agent_client()
            self.agent = NodeAgent(
                client,
                workdir=self.directory / "nodes",
                pools=default_pools() if self.pools is None else self.pools,
                serving=serving,
                extra_env=self.extra_env,
                entrypoints=self.entrypoints,
            ).start()
            if self.with_operator:
                self.operator = self.new_operator()
                self.operator.start()
                self.operator.wait_ready()
        except BaseException:
            self.stop()
            raise
        if not self.quiet:
            print(
                f"sandbox cluster ready in {time.monotonic() - t0:.1f}s (chart installed, operator as "
                f"ServiceAccount {self.installation.namespace}/{self.installation.service_account})",
                file=sys.stderr,
                flush=True,
            )
        return self

    def new_operator(self, log_path: Path | None = None, env: dict[str, str] | None = None) -> OperatorProcess:
        """An operator process (not started) with a fresh token of the chart's ServiceAccount."""
        assert self.installation is not None
        inst = self.installation
        kubeconfig = self.control_plane.service_account_kubeconfig(
            inst.namespace, inst.service_account, self.directory / "operator.kubeconfig"
        )
        return OperatorProcess(
            inst, kubeconfig, log_path or self.directory / "operator.log", env={**self.operator_env, **(env or {})}
        )

    def stop(self) -> None:
        if self.operator is not None:
            self.operator.stop()
        if self.agent is not None:
            self.agent.stop()
        self.control_plane.stop()

    def __enter__(self) -> SandboxCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def operator_user(self) -> str:
        assert self.installation is not None
        return f"system:serviceaccount:{self.installation.namespace}:{self.installation.service_account}"

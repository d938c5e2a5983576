"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, built from Go modules by `tools/kube/build.sh` (sandbox and tests only).

Started the way controller-runtime's envtest starts its API server (secure port, throw-away
CA and serving certificate, client-certificate users, service-account signing keys, etcd
without fsync in a temporary directory), plus what envtest leaves out: the controller-manager
(service accounts, garbage collection, node lifecycle, pod GC, taint eviction) and the
scheduler, each with its own kubeconfig and identity. Authorization is `Node,RBAC` and the
default admission chain runs (PodSecurity included). Every request from a user that is not a
control-plane component is written to an audit log (`audit.jsonl`), which the RBAC audit reads.

    with ControlPlane(tmp / "kube") as kube:     # prints its start-up time
        client = kube.admin                       # a KubeClient as system:masters
        kubeconfig = kube.admin_kubeconfig         # for kubectl and kopf
        sa_config = kube.service_account_kubeconfig("default", "loraresume-operator", tmp / "op.kubeconfig")

Sandbox settings that differ from a cloud's defaults, so that node failures play out in
seconds (each is a real flag of the real component): node-monitor grace 8 s, default
not-ready/unreachable toleration 5 s.
"""

from __future__ import annotations

import ctypes
import json
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

from .kube_client import ApiError, KubeClient
from .pki import CertificateAuthority, CertPair, service_account_keys
from .waiting import free_port, stop_process

LOOPBACK = "127.0.0.1"
SERVICE_CIDR = "10.0.0.0/24"
ISSUER = "https://kubernetes.default.svc.cluster.local"
NODE_AGENT_USER = "loraresume-node-agent"
ADMIN_USER = "sandbox-admin"
# Users whose requests the audit log leaves out: the control plane's own components.
_QUIET_USERS = ("system:kube-controller-manager", "system:kube-scheduler", "system:apiserver", NODE_AGENT_USER)
_QUIET_GROUPS = ("system:serviceaccounts:kube-system", "system:nodes")


def repo_root() -> Path:
    for base in (Path.cwd(), *Path(__file__).resolve().parents):
        if (base / "tools" / "kube" / "build.sh").is_file():
            return base
    raise RuntimeError("cannot find tools/kube/build.sh (run from the LoraResume repository)")


def kube_binaries() -> Path:
    """The directory with etcd, kube-apiserver, kube-controller-manager and kube-scheduler.

    `$LORARESUME_KUBE_BIN` if set; else `tools/kube/build.sh` builds them once into a cache
    outside the repository (progress on stderr) and names the directory.
    """
    if os.environ.get("LORARESUME_KUBE_BIN"):
        return Path(os.environ["LORARESUME_KUBE_BIN"])
    script = repo_root() / "tools" / "kube" / "build.sh"
    result = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {result.returncode}); its messages are above")
    return Path(result.stdout.strip().splitlines()[-1])


def _die_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies (no orphaned servers)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def write_kubeconfig(
    path: Path,
    server: str,
    ca: Path,
    *,
    cert: CertPair | None = None,
    token: str | None = None,
    user: str = "user",
    namespace: str = "default",
) -> Path:
    entry: dict[str, Any] = {}
    if cert is not None:
        entry = {"client-certificate": str(cert.cert), "client-key": str(cert.key)}
    if token is not None:
        entry = {"token": token}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "sandbox",
        "clusters": [{"name": "sandbox", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": entry}],
        "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": user, "namespace": namespace}}],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def audit_policy() -> dict[str, Any]:
    return {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [
            {"level": "None", "users": list(_QUIET_USERS)},
            {"level": "None", "userGroups": list(_QUIET_GROUPS)},
            {"level": "None", "nonResourceURLs": ["/healthz*", "/readyz*", "/livez*", "/version"]},
            {"level": "Metadata"},
        ],
    }


@dataclass
class _Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler as local processes."""

    directory: Path
    bin_dir: Path | None = None
    node_monitor_grace_seconds: int = 8
    toleration_seconds: int = 5
    compaction_interval: str = "5m"  # etcd compaction by the API server (its default); older versions: 410 Gone
    apiserver_flags: tuple[str, ...] = ()  # extra kube-apiserver flags (e.g. --watch-cache=false)
    quiet: bool = False
    startup_seconds: float = 0.0
    port: int = 0
    _procs: list[_Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()

    # -- paths ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    @property
    def pki_dir(self) -> Path:
        return self.directory / "pki"

    @property
    def ca_file(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.directory / "admin.kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self.directory / "audit.jsonl"

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> ControlPlane:
        t0 = time.monotonic()
        bins = self.bin_dir or kube_binaries()
        self.directory.mkdir(parents=True, exist_ok=True)
        # A fresh cluster every start: etcd data and the audit log of an earlier one in this
        # directory would outlive the CA and service-account keys they were made with.
        shutil.rmtree(self.directory / "etcd", ignore_errors=True)
        self.audit_log.unlink(missing_ok=True)
        self.ca = CertificateAuthority(self.pki_dir)
        serving = self.ca.issue("apiserver", "kube-apiserver", server=True)
        self._admin_cert = self.ca.issue("admin", ADMIN_USER, groups=("system:masters",))
        kubelet_client = self.ca.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", groups=("system:masters",)
        )
        sa = service_account_keys(self.pki_dir)
        self.port = free_port()
        etcd_port, peer_port = free_port(), free_port()
        (self.directory / "audit-policy.yaml").write_text(yaml.safe_dump(audit_policy()))
        try:
            self._spawn(
                "etcd",
                [
                    str(bins / "etcd"),
                    f"--data-dir={self.directory / 'etcd'}",
                    f"--listen-client-urls=http://{LOOPBACK}:{etcd_port}",
                    f"--listen-peer-urls=http://{LOOPBACK}:{peer_port}",
                ],
            )
            self._spawn(
                "kube-apiserver",
                [
                    str(bins / "kube-apiserver"),
                    f"--etcd-servers=http://{LOOPBACK}:{etcd_port}",
                    f"--bind-address={LOOPBACK}",
                    f"--advertise-address={LOOPBACK}",
                    f"--secure-port={self.port}",
                    "--endpoint-reconciler-type=none",  # a loopback address cannot be the kubernetes Service endpoint
                    f"--tls-cert-file={serving.cert}",
                    f"--tls-private-key-file={serving.key}",
                    f"--client-ca-file={self.ca_file}",
                    "--authorization-mode=Node,RBAC",
                    f"--service-account-issuer={ISSUER}",
                    f"--service-account-key-file={sa.cert}",
                    f"--service-account-signing-key-file={sa.key}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    f"--kubelet-client-certificate={kubelet_client.cert}",
                    f"--kubelet-client-key={kubelet_client.key}",
                    f"--kubelet-certificate-authority={self.ca_file}",
                    "--kubelet-preferred-address-types=InternalIP",
                    f"--default-not-ready-toleration-seconds={self.toleration_seconds}",
                    f"--default-unreachable-toleration-seconds={self.toleration_seconds}",
                    f"--audit-policy-file={self.directory / 'audit-policy.yaml'}",
                    f"--audit-log-path={self.audit_log}",
                    "--audit-log-format=json",
                    "--audit-log-maxsize=0",
                    f"--cert-dir={self.pki_dir}",
                    "--profiling=false",
                    f"--etcd-compaction-interval={self.compaction_interval}",
                    *self.apiserver_flags,
                ],
            )
            write_kubeconfig(self.admin_kubeconfig, self.url, self.ca_file, cert=self._admin_cert, user=ADMIN_USER)
            self.admin = KubeClient(
                self.url, self.ca_file, cert_file=self._admin_cert.cert, key_file=self._admin_cert.key
            )
            self._wait_ready()
            cm = self.ca.issue("controller-manager", "system:kube-controller-manager")
            cm_config = write_kubeconfig(
                self.directory / "controller-manager.kubeconfig",
                self.url,
                self.ca_file,
                cert=cm,
                user="system:kube-controller-manager",
            )
            self._spawn(
                "kube-controller-manager",
                [
                    str(bins / "kube-controller-manager"),
                    f"--kubeconfig={cm_config}",
                    "--leader-elect=false",
                    "--secure-port=0",
                    "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={sa.key}",
                    f"--root-ca-file={self.ca_file}",
                    f"--cluster-signing-cert-file={self.ca_file}",
                    f"--cluster-signing-key-file={self.pki_dir / 'ca.key'}",
                    "--node-monitor-period=1s",
                    f"--node-monitor-grace-period={self.node_monitor_grace_seconds}s",
                    "--node-startup-grace-period=20s",
                ],
            )
            sched = self.ca.issue("scheduler", "system:kube-scheduler")
            sched_config = write_kubeconfig(
                self.directory / "scheduler.kubeconfig",
                self.url,
                self.ca_file,
                cert=sched,
                user="system:kube-scheduler",
            )
            self._spawn(
                "kube-scheduler",
                [
                    str(bins / "kube-scheduler"),
                    f"--kubeconfig={sched_config}",
                    "--leader-elect=false",
                    "--secure-port=0",
                ],
            )
            self._wait_for(
                "the default ServiceAccount (controller-manager running)",
                lambda: self.admin.get("serviceaccounts", "default", "default"),
                60,
            )
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        if not self.quiet:
            version = self.admin.request("GET", "/version")["gitVersion"]
            print(
                f"control plane {version} at {self.url} ready in {self.startup_seconds:.1f}s "
                f"(etcd, kube-apiserver, kube-controller-manager, kube-scheduler; logs in {self.directory})",
                file=sys.stderr,
                flush=True,
            )
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.directory / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            preexec_fn=_die_with_parent,
        )
        self._procs.append(_Process(name, proc, log))

    def _check_alive(self) -> None:
        for p in self._procs:
            if p.proc.poll() is not None:
                tail = (self.directory / f"{p.name}.log").read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n" + "\n".join(tail))

    def _wait_for(self, what: str, check: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                value = check()
            except (ApiError, OSError, ValueError):
                value = None
            except Exception as exc:  # urllib3 connection errors before the port opens
                if "connect" not in str(exc).lower() and "refused" not in str(exc).lower():
                    raise
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise RuntimeError(
            f"control plane: timed out after {timeout:.0f}s waiting for {what} (logs in {self.directory})"
        )

    def _wait_ready(self) -> None:
        self._wait_for("kube-apiserver /readyz", lambda: self.admin.text("/readyz") == "ok", 120)

    def pids(self) -> dict[str, int]:
        return {p.name: p.proc.pid for p in self._procs}

    def alive(self) -> bool:
        return bool(self._procs) and all(p.proc.poll() is None for p in self._procs)

    def stop(self) -> None:
        """SIGTERM in reverse start order, SIGKILL after 15 s; logs closed."""
        for p in reversed(self._procs):
            stop_process(p.proc, 15)
            p.log.close()
        self._procs.clear()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- credentials ----------------------------------------------------------------------
    def user_client(self, user: str, groups: tuple[str, ...] = ()) -> KubeClient:
        """A client authenticated as `user` (client certificate), authorized by RBAC like anyone."""
        stem = "user-" + "".join(c if c.isalnum() else "-" for c in user)
        pair = self.ca.issue(stem, user, groups=groups)
        return KubeClient(self.url, self.ca_file, cert_file=pair.cert, key_file=pair.key)

    def node_agent_client(self) -> tuple[KubeClient, CertPair]:
        """The node agent's client (its own user, in system:masters: it plays many kubelets) and a
        serving certificate for its kubelet endpoint (logs)."""
        pair = self.ca.issue("node-agent", NODE_AGENT_USER, groups=("system:masters",))
        serving = self.ca.issue("node-agent-serving", "loraresume-node-agent", server=True)
        return KubeClient(self.url, self.ca_file, cert_file=pair.cert, key_file=pair.key), serving

    def service_account_token(self, namespace: str, name: str, expiration_seconds: int = 86400) -> str:
        """A bound token of that ServiceAccount (TokenRequest), as a pod would be given."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": expiration_seconds},
        }
        reply = self.admin.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", body)
        return str(reply["status"]["token"])

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount: requests are authorized by its RBAC."""
        token = self.service_account_token(namespace, name)
        return write_kubeconfig(
            Path(path),
            self.url,
            self.ca_file,
            token=token,
            user=f"system:serviceaccount:{namespace}:{name}",
            namespace=namespace,
        )

    # -- audit ----------------------------------------------------------------------------
    def audit_events(self, user: str | None = None) -> list[dict[str, Any]]:
        """One audit event per request, optionally of one user, in order: its ResponseComplete, or
        ResponseStarted for a long-running request still open (a watch)."""
        events: dict[str, dict[str, Any]] = {}
        try:
            lines = self.audit_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if event.get("stage") not in ("ResponseStarted", "ResponseComplete"):
                continue
            if user is not None and event.get("user", {}).get("username") != user:
                continue
            events[event["auditID"]] = event  # dict order: first seen; the later stage wins
        return list(events.values())

    # -- namespaces -----------------------------------------------------------------------
    def create_namespace(self, name: str, labels: dict[str, str] | None = None, timeout: float = 30) -> None:
        """A namespace, ready for pods: its default ServiceAccount exists (the ServiceAccount
        admission plugin refuses pods until the controller-manager has made it)."""
        try:
            self.admin.create("namespaces", {"metadata": {"name": name, "labels": labels or {}}})
        except ApiError as exc:
            if exc.code != 409:
                raise
            if labels:
                self.admin.patch("namespaces", None, name, {"metadata": {"labels": labels}})
        self._wait_for(
            f"ServiceAccount {name}/default", lambda: self.admin.get("serviceaccounts", name, "default"), timeout
        )


RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}

"""Scale benchmark: many LoraResume resources through the operator, in the local sandbox.

    python benchmarks/scale.py --resources 500 --json benchmarks/results/scale-DATE.json \
        --markdown benchmarks/results/scale-DATE.md

Runs the sandbox cluster (`loraresume_sandbox.cluster.SandboxCluster`): a real control plane
(etcd, kube-apiserver, kube-controller-manager, kube-scheduler as local processes) with the Helm
chart's CRD, ServiceAccount and RBAC applied; the node agent playing the kubelets of a spot node
pool, running each pod as the stand-in trainer (`loraresume_sandbox.stand_in_trainer`: the
trainer's CLI, checkpoint store, progress and exit codes around a timed loop, no torch); an S3
server on loopback (`--s3-server`: moto, one Python process, the default; or `go`, gofakes3 built
from Go modules by `tools/s3/build.sh`, which answers in milliseconds where moto takes seconds
under this load, so that the operator's share of a number can be told from the test S3's); and
the operator as a real process, started as the chart's Deployment runs it,
cluster-wide (`watch.clusterWide`: `loraresume-operator -A`), with a token of the chart's
ServiceAccount.

Counting: the operator's API requests are read from the API server's audit log, filtered to the
operator's ServiceAccount (one request per audit ID; a watch counts once, when its response
starts). This script's own requests (as the sandbox admin), the node agent's and the control
plane components' are not the operator's and not counted. Request times are the audit log's
(wall clock, microseconds); times of changes to pods and LoraResumes are when this script's own
watches of them see the change (list, then watch; re-list after 410 Gone), on its monotonic clock.

Capacity: `--capacity` GPUs on `--capacity / --gpus-per-node` spot nodes (labels and taint of the
sandbox's spot pool), and every resource asks for one GPU (`resources.gpus: 1`,
`scheduling.spot.enabled`): the real scheduler runs at most `--capacity` trainers at once and
leaves the rest Pending (Unschedulable) until a pod ends (it does not count Succeeded or Failed
pods' requests).

Phases (durations from this process's monotonic clock, or from audit timestamps against the wall
clock taken when the operator was started):

1. wave 1, clean: N resources created at once; time until all are Succeeded; the
   operator's API requests in that window per Succeeded resource, by verb and resource;
   the operator's RSS (peak, and at steady state while idle for `--idle-seconds` after);
   the idle request rate. Then all N are deleted (time until all are gone).
2. wave 2, disrupted: N new resources. Once `--disrupt` M pods run, M running trainer pods
   are ended, half by pod deletion (as `kubectl delete pod`), half by a spot reclaim of the
   pod's node (`NodeAgent.reclaim_spot`: impending-termination taint, DisruptionTarget,
   SIGTERM, the grace period, the Node deleted and a replacement registered; until it
   registers the pool has `--gpus-per-node` fewer slots). With one GPU per node (the
   default) a reclaim ends exactly its victim; with more, every pod on that node that had
   not ended is a victim too, counted under "preempt". Relaunch latency = from that call
   until the next attempt's pod exists in the API (p50/p99), and the operator's share of it
   (from the old pod's end -- its terminated status or its removal -- to the new pod). A
   victim that exited 0 before the disruption reached it has no relaunch and is left out
   (counted as `ran_to_the_end_first`).
3. restart: when `--restart-at` of wave 2 has Succeeded (the rest Running, Pending,
   Resuming), the operator is SIGKILLed, left down `--down-seconds`, and started again.
   "Reconciled" for a resource means: the new process has decided on it (its
   `loraresume_resources{phase}` gauge counts every resource it reconciled, so the k-th resource
   was reconciled when the sum first reached k; sampled every 50 ms). The operator reconciles
   from its watches, so there is no per-resource GET to time. Reported: time from the new
   process's start to its first API request, to every resource in the cluster reconciled (p50 and
   all), and to every resource whose pod ended while the operator was down showing it in its
   status (Succeeded, or the next attempt).
4. wave 2 runs to all Succeeded (its wall time includes the disruptions and the restart).
5. steady (unless `--skip-steady`): with wave 2's resources Succeeded and the operator
   settled, `--steady-disrupt` long runs are lost and relaunched (half deleted, half
   reclaimed; with `--steady-how reclaim`, every node holding one is reclaimed at once, as a
   cloud takes back a spot pool), then the operator is restarted with them running.

Counting (exit 1, "COUNTING WRONG"): every pod ended by the benchmark and not finished first is
counted as exactly one preemption and relaunched as the next attempt (never re-created under its
own name), the operator restart counts none of them again, and no pod name is created twice.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loraresume_operator.policy import CREDENTIALS_LABEL
from loraresume_sandbox.cluster import OperatorProcess, SandboxCluster, chart_dir, sandbox_values
from loraresume_sandbox.kube_client import KubeClient, follow
from loraresume_sandbox.node_agent import SPOT_LABELS, SPOT_TAINT, NodePool
from loraresume_sandbox.waiting import free_port

NS = "default"
BUCKET = "bench"
SECRET = "s3-creds"
AWS = {
    "AWS_ACCESS_KEY_ID": "sandbox",
    "AWS_SECRET_ACCESS_KEY": "sandbox-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_AWS_CLEARED = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
LR = "loraresumes"
S3_SERVERS = ("moto", "go")
ENV_S3_SERVER = "LORARESUME_S3_SERVER"  # a built gofakes3 binary (`make test` sets it); else tools/s3/build.sh


def now() -> float:
    return time.monotonic()


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def git_state() -> dict[str, Any]:
    """The commit this checkout is at, and which files of what the run exercises differ from it (the
    operator, the trainer and the sandbox run from this tree, uncommitted edits included)."""

    def git(*args: str) -> str:
        try:
            repo = Path(__file__).resolve().parents[1]
            return subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    paths = ("operator", "trainer_image", "sandbox", "helm", "crds", "benchmarks/scale.py")
    changed = git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    return {"commit": git("rev-parse", "HEAD") or None, "uncommitted": changed.splitlines()}


def gofakes3_binary() -> Path:
    """The gofakes3 server: $LORARESUME_S3_SERVER, else tools/s3/build.sh's (built once into a cache
    outside the repository, ~30 s the first time; progress on stderr)."""
    if os.environ.get(ENV_S3_SERVER):
        return Path(os.environ[ENV_S3_SERVER])
    script = Path(__file__).resolve().parents[1] / "tools" / "s3" / "build.sh"
    out = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True, check=True).stdout
    return Path(out.strip().splitlines()[-1])


def s3_server_command(kind: str, port: int) -> tuple[list[str], str]:
    """(argv, what it is) of the S3 server this run starts on 127.0.0.1:port."""
    if kind == "go":
        binary = gofakes3_binary()
        version = binary.parent.name.split("-")[1] if binary.parent.name.startswith("gofakes3-") else "?"
        argv = [str(binary), "-backend", "memory", "-host", f"127.0.0.1:{port}", "-quiet"]
        return argv, f"gofakes3 {version} (Go, in-memory backend; tools/s3/build.sh)"
    from importlib.metadata import version as dist_version

    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return argv, f"moto {dist_version('moto')} (moto.server: one Python process)"


def process_cpu_seconds(pid: int, thread: int | None = None) -> float | None:
    """User + system CPU of a running process, or of one of its threads (Linux /proc), None when it
    cannot be read."""
    try:
        with open(f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def chart_interval() -> float:
    """The chart's default reconcile interval (values.yaml), the operator's when --interval is not given."""
    values = yaml.safe_load((chart_dir() / "values.yaml").read_text())
    return float(values["reconcileIntervalSeconds"])


# -- counting the operator's API requests, from the audit log -----------------------------------------
@dataclass(frozen=True)
class Request:
    """One API request of the operator, as its audit event tells it (times: wall clock, seconds)."""

    received: float  # requestReceivedTimestamp
    answered: float  # stageTimestamp: response complete (for a watch still open: response started)
    who: str  # "kopf" or "client" (the official Kubernetes client), from the User-Agent
    verb: str  # the RBAC verb, or "discovery"
    res: str  # resource, or the discovery path
    name: str | None
    sub: str | None
    status: int


def audit_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


def request_of(event: dict[str, Any]) -> Request:
    """A request as RBAC sees it (verb, resource, subresource), from its audit event."""
    ref = event.get("objectRef") or {}
    if ref.get("resource"):
        verb, res, name, sub = str(event.get("verb")), ref["resource"], ref.get("name"), ref.get("subresource")
    else:  # /api, /apis, /apis/GROUP/VERSION, /version: no object
        path = str(event.get("requestURI", "")).split("?", 1)[0]
        verb, res, name, sub = "discovery", "/".join([p for p in path.split("/") if p][:3]), None, None
    return Request(
        audit_time(event["requestReceivedTimestamp"]),
        audit_time(event["stageTimestamp"]),
        client_of(str(event.get("userAgent", ""))),
        verb,
        res,
        name,
        sub,
        int((event.get("responseStatus") or {}).get("code") or 0),
    )


def client_of(user_agent: str) -> str:
    ua = user_agent.lower()
    if "kopf" in ua:
        return "kopf"
    if "openapi" in ua or "kubernetes" in ua:
        return "client"
    return user_agent[:40] or "unknown"


class RequestLog(threading.Thread):
    """The operator's requests, read from the API server's audit log as it grows (a tail, not a re-read:
    the log holds every request of the run). Each request is counted at its first event and handed to
    the hooks."""

    def __init__(self, path: Path, user: str, every: float = 0.1) -> None:
        super().__init__(daemon=True, name="audit-tail")
        self.path, self.user, self.every = path, user, every
        self.lock = threading.Lock()
        self.read_lock = threading.Lock()
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (client, verb, resource[/sub])
        self.total = 0
        self.last_answered = 0.0  # when the last request other than a watch was answered (wall clock)
        self.hooks: list[Any] = []  # hook(request: Request)
        self.user_agents: Counter[str] = Counter()
        self.stopped = threading.Event()
        self._offset = 0
        self._partial = b""
        self._seen: set[str] = set()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.poll()

    def poll(self) -> None:
        """Take in what the API server has appended since the last call."""
        with self.read_lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return
            self._offset += len(data)
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()  # a line being written
            for line in lines:
                self._take(line)

    def _take(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return
        audit_id = event.get("auditID")
        if (event.get("user") or {}).get("username") != self.user or audit_id in self._seen:
            return  # not the operator's, or a later stage of a request already counted
        if event.get("stage") not in ("ResponseStarted", "ResponseComplete"):
            return
        self._seen.add(audit_id)
        req = request_of(event)
        with self.lock:
            self.counts[(req.who, req.verb, req.res + (f"/{req.sub}" if req.sub else ""))] += 1
            self.total += 1
            self.user_agents[str(event.get("userAgent", ""))[:60]] += 1
            if req.verb != "watch":
                self.last_answered = max(self.last_answered, req.answered)
        for hook in list(self.hooks):
            hook(req)

    def snapshot(self) -> tuple[int, Counter[tuple[str, str, str]]]:
        self.poll()
        with self.lock:
            return self.total, Counter(self.counts)


def diff_counts(after: Counter, before: Counter) -> Counter:
    out = Counter(after)
    out.subtract(before)
    return Counter({k: v for k, v in out.items() if v})


# -- what the API holds, from this script's watches -----------------------------------------------------
class Tracker:
    """Timestamps of pod and LoraResume changes, as this script's watches see them (record only).

    Pods are tracked by uid: the operator may re-create a pod under the same name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pods: dict[str, dict[str, Any]] = {}  # uid -> name, resource, node, added, running, ended, ...
        self.uid_of: dict[str, str] = {}  # pod name -> uid of its newest incarnation
        self.adds: dict[str, list[tuple[float, str, str]]] = defaultdict(list)  # resource -> (t, pod, uid)
        self.lr_status: dict[str, dict[str, Any]] = {}
        self.lr_created: dict[str, float] = {}
        self.lr_deleted: dict[str, float] = {}
        self.lr_running: dict[tuple[str, int], float] = {}  # (resource, attempt) -> status first Running
        self.succeeded: dict[str, float] = {}
        self.status_changed: dict[str, float] = {}  # last status change of each resource
        self.sink: Any = None  # optional: (t, text) of every change, for --request-log

    def __call__(self, event: str, kind: str, obj: dict[str, Any]) -> None:
        t = now()
        meta = obj.get("metadata", {})
        name = meta.get("name", "")
        status = obj.get("status") or {}
        if self.sink is not None:
            states = [list((cs.get("state") or {}).keys()) for cs in status.get("containerStatuses") or []]
            self.sink(t, f"{event} {kind} {name} phase={status.get('phase')} attempt={status.get('attempt')} {states}")
        with self.lock:
            if kind == "pods":
                self._pod(t, event, meta, obj)
            elif kind == LR:
                if event == "ADDED":
                    self.lr_created.setdefault(name, t)
                elif event == "DELETED":
                    self.lr_deleted.setdefault(name, t)
                if status != self.lr_status.get(name):
                    self.status_changed[name] = t
                self.lr_status[name] = status
                if status.get("phase") == "Running":
                    self.lr_running.setdefault((name, int(status.get("attempt") or 0)), t)
                if status.get("phase") == "Succeeded":
                    self.succeeded.setdefault(name, t)

    def _pod(self, t: float, event: str, meta: dict[str, Any], obj: dict[str, Any]) -> None:
        uid, name = meta.get("uid", ""), meta.get("name", "")
        pod = self.pods.get(uid)
        if pod is None:
            owner = (meta.get("labels") or {}).get("loraresume.dev/resource", "")
            pod = self.pods[uid] = {"name": name, "resource": owner, "added": t}
            self.uid_of[name] = uid
            self.adds[owner].append((t, name, uid))
        pod["node"] = (obj.get("spec") or {}).get("nodeName") or pod.get("node")
        if event == "DELETED":
            pod.setdefault("deleted", t)
        status = obj.get("status") or {}
        if meta.get("deletionTimestamp") or any(
            c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in status.get("conditions") or []
        ):
            pod.setdefault("ending", t)  # deleted gracefully, or its node shutting down
        if status.get("phase") == "Succeeded":
            pod["succeeded"] = True
        for cs in status.get("containerStatuses") or []:
            state = cs.get("state") or {}
            if state.get("running"):
                pod.setdefault("running", t)
            if state.get("terminated"):
                pod.setdefault("ended", t)
                pod.setdefault("said", _what_it_said(state["terminated"].get("message")))

    def ended_on(self, nodes: dict[str, float], known: set[str]) -> list[tuple[str, str, str]]:
        """(name, uid, node) of pods bound to one of `nodes` that began to end at or after its time there
        and had not succeeded, except those named in `known`."""
        with self.lock:
            return [
                (p["name"], uid, p["node"])
                for uid, p in self.pods.items()
                if p.get("node") in nodes
                and p["name"] not in known
                and not p.get("succeeded")
                and min((t for t in (p.get("ending"), p.get("ended"), p.get("deleted")) if t), default=-1.0)
                >= nodes[p["node"]]
            ]

    def names_created_twice(self) -> list[str]:
        """Pod names created more than once (pod names are per attempt: each is created once)."""
        with self.lock:
            seen = Counter(name for adds in self.adds.values() for _t, name, _uid in adds)
        return sorted(name for name, n in seen.items() if n > 1)

    def pod(self, name: str) -> dict[str, Any]:
        """The newest incarnation of the pod with this name ({} if none)."""
        with self.lock:
            uid = self.uid_of.get(name)
            return dict(self.pods[uid]) if uid else {}

    def pod_by_uid(self, uid: str | None) -> dict[str, Any]:
        with self.lock:
            return dict(self.pods.get(uid or "", {}))

    def running_pods(self) -> dict[str, float]:
        """Pods (the newest of each name) whose trainer runs and that nothing is ending yet: name -> since."""
        with self.lock:
            return {
                name: p["running"]
                for name, uid in self.uid_of.items()
                if "running" in (p := self.pods[uid]) and not any(k in p for k in ("ended", "deleted", "ending"))
            }

    def live_pods_on(self, node: str) -> list[str]:
        """Pods (the newest of each name) bound to `node` that have not ended: what a reclaim of it ends."""
        with self.lock:
            return [
                name
                for name, uid in self.uid_of.items()
                if (p := self.pods[uid]).get("node") == node and "ended" not in p and "deleted" not in p
            ]

    def count_succeeded(self, names: list[str]) -> int:
        with self.lock:
            return sum(1 for n in names if n in self.succeeded)

    def end_lag(self, names: list[str]) -> list[float]:
        """Per resource: from its last pod's terminated status to the resource's status saying Succeeded."""
        out = []
        with self.lock:
            for res in names:
                pod = (self.lr_status.get(res) or {}).get("podName")
                uid = self.uid_of.get(pod or "")
                ended = self.pods[uid].get("ended") if uid else None
                if ended is not None and res in self.succeeded:
                    out.append(self.succeeded[res] - ended)
        return out

    def observe_lag(self, names: list[str]) -> list[float]:
        """Per attempt: from its pod's first Running status to the resource's status saying Running."""
        out = []
        with self.lock:
            for (res, attempt), t_lr in self.lr_running.items():
                if res not in names:
                    continue
                uid = self.uid_of.get(f"{res}-attempt-{attempt}")
                started = self.pods[uid].get("running") if uid else None
                if started is not None:
                    out.append(t_lr - started)
        return out


class Feed(threading.Thread):
    """This script's watch of one resource in NS (`follow`: list, then watch from that resourceVersion,
    re-list after 410 Gone), handing every change to the tracker; what a re-list no longer holds is
    handed over as DELETED."""

    def __init__(self, kube: KubeClient, resource: str, tracker: Tracker) -> None:
        super().__init__(daemon=True, name=f"feed-{resource}")
        self.kube, self.resource, self.tracker = kube, resource, tracker
        self.live: dict[str, dict[str, Any]] = {}  # uid -> latest object
        self.synced = threading.Event()  # the first list is in
        self.stopped = threading.Event()

    def run(self) -> None:
        follow(self.kube, self.resource, self.deliver, self.stopped, namespace=NS, relisted=self.relisted)

    def relisted(self, present: set[str]) -> None:
        for uid, obj in list(self.live.items()):
            if uid not in present:
                self.deliver("DELETED", obj)
        self.synced.set()

    def deliver(self, kind: str, obj: dict[str, Any]) -> None:
        uid = (obj.get("metadata") or {}).get("uid", "")
        if kind == "DELETED":
            self.live.pop(uid, None)
        else:
            self.live[uid] = obj
        self.tracker(kind, self.resource, obj)


# -- the operator process and its memory ---------------------------------------------------------------
class Operator:
    """The operator, started each time as the chart's Deployment runs it (`SandboxCluster.new_operator`:
    a fresh ServiceAccount token), with its memory and CPU from /proc and its /metrics."""

    def __init__(
        self,
        cluster: SandboxCluster,
        logdir: Path,
        profile_dir: Path | None = None,
        profile_seconds: float = 0.0,
        profile_gil: bool = False,
        cpu_shares: CpuShares | None = None,
    ) -> None:
        self.cluster, self.logdir, self.profile_dir = cluster, logdir, profile_dir
        self.profile_seconds, self.profile_gil = profile_seconds, profile_gil
        self.process: OperatorProcess | None = None
        self.profilers: list[subprocess.Popen[bytes]] = []
        self.cpu_shares = cpu_shares  # --operator-cpu-request: each process started goes into its group
        self.starts = 0
        self.started_at = 0.0  # monotonic
        self.started_wall = 0.0  # wall clock, to compare with audit timestamps

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.process.proc if self.process else None

    @property
    def metrics_port(self) -> int:
        return self.process.metrics_port if self.process else 0

    def start(self) -> None:
        self.starts += 1
        self.process = self.cluster.new_operator(
            log_path=self.logdir / f"operator-{self.starts}.log", env={"PYTHONUNBUFFERED": "1"}
        )
        self.started_at, self.started_wall = now(), time.time()
        self.process.start()
        if self.cpu_shares is not None and self.proc is not None:
            self.cpu_shares.put_operator(self.proc.pid)
        if self.profile_dir is not None and self.proc is not None:
            out = self.profile_dir / f"operator-{self.starts}.txt"
            self.profilers.append(self.profile(self.proc.pid, out, self.profile_seconds, self.profile_gil))

    @staticmethod
    def profile(pid: int, out: Path, seconds: float, gil: bool = False) -> subprocess.Popen[bytes]:
        """py-spy samples the process from outside (collapsed stacks per thread) for its first `seconds` (0:
        until it exits): waiting threads included (where the wall time goes), or with `gil` only the thread
        holding the interpreter's lock (where the operator's Python runs: its CPU)."""
        py_spy = Path(sys.executable).with_name("py-spy")
        command = [str(py_spy), "record", "--pid", str(pid), "--rate", "50", "--format", "raw", "--nonblocking"]
        command += ["--gil" if gil else "--idle", "--threads"]
        command += ["--duration", str(max(1, round(seconds)))] if seconds else []
        return subprocess.Popen([*command, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop_profilers(self) -> None:
        for profiler in self.profilers:
            if profiler.poll() is None:
                profiler.send_signal(signal.SIGINT)  # py-spy writes what it has
            try:
                profiler.wait(30)
            except subprocess.TimeoutExpired:
                profiler.kill()

    def kill(self) -> None:
        assert self.process is not None
        self.process.stop(signal.SIGKILL)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=30)

    def cpu_seconds(self) -> float | None:
        """The operator process's CPU, all its threads."""
        return process_cpu_seconds(self.proc.pid) if self.proc else None

    def event_loop_cpu_seconds(self) -> float | None:
        """The CPU of the operator's main thread alone: asyncio's event loop, where kopf receives, decodes
        and processes every watch event and the handlers queue reconciles (they run on other threads)."""
        return process_cpu_seconds(self.proc.pid, thread=self.proc.pid) if self.proc else None

    def memory(self) -> dict[str, float]:
        """VmRSS and VmHWM (peak RSS) of the operator process, MiB."""
        out: dict[str, float] = {}
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:  # type: ignore[union-attr]
                for line in f:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        key, value = line.split(":", 1)
                        out[key] = int(value.split()[0]) / 1024
        except (OSError, AttributeError):
            pass
        return out

    def watch_events(self) -> dict[str, float]:
        """Watch events delivered to this operator process's handlers so far, by kind
        (loraresume_watch_events_total)."""
        return self.by_label("loraresume_watch_events_total", "kind")

    def reconciles(self) -> tuple[float, float]:
        """(reconciles run, their threads' CPU seconds) so far (loraresume_reconciles_total,
        loraresume_reconcile_cpu_seconds_total)."""
        runs, cpu = (
            sum(value for _, value in self.metric(f"{name} "))
            for name in ("loraresume_reconciles_total", "loraresume_reconcile_cpu_seconds_total")
        )
        return runs, cpu

    def s3_requests(self) -> dict[str, float]:
        """This operator process's S3 requests so far, by operation (loraresume_s3_requests_total)."""
        return self.by_label("loraresume_s3_requests_total", "operation")

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """A labelled metric's samples so far, summed by one label's value."""
        out: dict[str, float] = {}
        for key, value in self.metric(name + "{"):
            which = key.split(f'{label}="', 1)[1].split('"', 1)[0]
            out[which] = out.get(which, 0.0) + value
        return out

    def metric(self, name: str) -> list[tuple[str, float]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
                text = response.read().decode()
        except (OSError, urllib.error.URLError):
            return []
        out = []
        for line in text.splitlines():
            if line.startswith(name):
                key, value = line.rsplit(" ", 1)
                out.append((key, float(value)))
        return out


class MemorySampler(threading.Thread):
    """RSS of the current operator process every `every` seconds, labelled with the phase."""

    def __init__(self, operator: Operator, every: float = 0.5) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.operator, self.every = operator, every
        self.phase = "startup"
        self.samples: list[tuple[float, int, str, float]] = []  # (t, operator start #, phase, MiB)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            mem = self.operator.memory()
            if "VmRSS" in mem:
                self.samples.append((now(), self.operator.starts, self.phase, mem["VmRSS"]))

    def of(self, phase: str) -> list[float]:
        return [s[3] for s in self.samples if s[2] == phase]


class Prober(threading.Thread):
    """Latency of the sandbox itself, once a second: an API GET (as the admin: not counted) and an S3 GET
    from the run's S3 server (moto or gofakes3: `--s3-server`)."""

    def __init__(self, kube: KubeClient, s3: Any, sampler: MemorySampler, every: float = 1.0) -> None:
        super().__init__(daemon=True, name="sandbox-prober")
        self.kube, self.s3, self.sampler, self.every = kube, s3, sampler, every
        self.samples: list[tuple[str, str, float]] = []  # (phase, "api"|"s3", seconds)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            phase = self.sampler.phase
            try:
                t = now()
                self.kube.get("secrets", NS, SECRET)
                self.samples.append((phase, "api", now() - t))
                t = now()
                self.s3.get_object(Bucket=BUCKET, Key="probe.json")["Body"].read()
                self.samples.append((phase, "s3", now() - t))
            except Exception:
                pass

    def summary(self, phase: str) -> dict[str, Any]:
        out = {}
        for kind in ("api", "s3"):
            values = [v for p, k, v in self.samples if p == phase and k == kind]
            out[kind] = {
                "n": len(values),
                "p50_ms": r(1000 * (pct(values, 50) or 0.0), 1) if values else None,
                "p99_ms": r(1000 * (pct(values, 99) or 0.0), 1) if values else None,
            }
        return out


def host_load() -> dict[str, Any]:
    try:
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
    except OSError:
        load = []
    return {"loadavg_1_5_15": [float(x) for x in load]}


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


class CpuShares:
    """`--operator-cpu-request`: the host's CPUs shared as a Kubernetes node shares them under contention,
    by the pods' requests. The kubelet gives each pod's cgroup cpu.shares of milliCPU * 1024 / 1000 (cgroup
    v1); here the operator gets its request's shares and this benchmark with all it starts (control plane,
    S3 server, node agent, stand-in trainers) the rest of the host's CPUs', as if their pods requested the
    rest of the node. Without it (the default) every thread of the host competes alone, so the operator's
    ~90 threads take more than a process's share in a burst (round 12: with 500m a burst of 500 waited
    79 s for its pods, on equal terms 7.6 s). Needs a writable /sys/fs/cgroup/cpu (cgroup v1)."""

    ROOT = Path("/sys/fs/cgroup/cpu")

    HOST_MILLICPU = (os.cpu_count() or 1) * 1000

    @classmethod
    def refusal(cls, operator_millicpu: int) -> str | None:
        """Why this request cannot be set up here, or None."""
        if not 0 < operator_millicpu < cls.HOST_MILLICPU:
            return f"--operator-cpu-request: between 1 and {cls.HOST_MILLICPU - 1} milliCPU on this host"
        if not os.access(cls.ROOT, os.W_OK):
            return f"--operator-cpu-request: {cls.ROOT} is not a writable cgroup v1 cpu hierarchy"
        return None

    def __init__(self, operator_millicpu: int) -> None:
        host = self.HOST_MILLICPU
        self.base = self.ROOT / f"loraresume-scale-{os.getpid()}"
        self.operator, self.sandbox = self.base / "operator", self.base / "sandbox"
        self.millicpu = {"operator": operator_millicpu, "sandbox": host - operator_millicpu}
        for group, milli in ((self.operator, self.millicpu["operator"]), (self.sandbox, self.millicpu["sandbox"])):
            group.mkdir(parents=True, exist_ok=True)
            (group / "cpu.shares").write_text(str(milli * 1024 // 1000))
        self.move(self.sandbox, os.getpid())  # what this process starts from now on is born there

    @staticmethod
    def move(group: Path, pid: int) -> None:
        (group / "cgroup.procs").write_text(str(pid))  # the whole process, all its threads

    def put_operator(self, pid: int) -> None:
        self.move(self.operator, pid)

    def close(self) -> None:
        """This process back to the root group; the groups go once their processes have exited."""
        self.move(self.ROOT, os.getpid())
        for group in (self.operator, self.sandbox, self.base):
            try:
                group.rmdir()
            except OSError:
                pass


# -- the benchmark ----------------------------------------------------------------------------------------
Victims = dict[str, tuple[str, float, str | None]]  # pod -> (how, time of the call, its uid then)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lr-scale-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tracker = Tracker()
        self.result: dict[str, Any] = {}
        self.cluster: SandboxCluster | None = None
        self.kube: KubeClient | None = None
        self.requests: RequestLog | None = None
        self.feeds: list[Feed] = []
        self.s3_server: subprocess.Popen[bytes] | None = None
        self.operator: Operator | None = None
        self.sampler: MemorySampler | None = None
        self.prober: Prober | None = None
        self.wave2_names: list[str] = []
        self.reclaimed: dict[str, float] = {}  # node -> when this phase reclaimed it
        self.cpu_shares: CpuShares | None = None

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def wait(self, what: str, check: Any, timeout: float, every: float = 0.2) -> Any:
        deadline = now() + timeout
        while now() < deadline:
            value = check()
            if value:
                return value
            if self.operator and self.operator.proc and self.operator.proc.poll() is not None:
                raise RuntimeError(f"the operator exited ({self.operator.proc.returncode}) while waiting for {what}")
            time.sleep(every)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    # -- setup -----------------------------------------------------------------------------
    def pool(self) -> NodePool:
        """`--capacity` GPUs on spot nodes of `--gpus-per-node`: the scheduler's limit on trainers at once."""
        a = self.args
        return NodePool(
            "bench", a.capacity // a.gpus_per_node, dict(SPOT_LABELS), (dict(SPOT_TAINT),), gpus=a.gpus_per_node
        )

    def setup(self) -> None:
        import boto3

        from loraresume_sandbox.stand_in_trainer import ENV_STEP_SECONDS

        a = self.args
        for name in _AWS_CLEARED:
            os.environ.pop(name, None)
        os.environ.update(AWS)  # the operator's environment too (it reads S3 with the resource's Secret)
        s3_port = free_port()
        endpoint = f"http://127.0.0.1:{s3_port}"
        argv, what = s3_server_command(a.s3_server, s3_port)  # (a gofakes3 build happens here, untimed)
        self.result["s3_server"] = {"kind": a.s3_server, "what": what}
        s3_log = open(self.workdir / f"s3-{a.s3_server}.log", "wb")
        self.s3_server = subprocess.Popen(argv, stdout=s3_log, stderr=subprocess.STDOUT, start_new_session=True)
        s3_log.close()
        self.wait(what, lambda: _http_ok(f"{endpoint}/"), 60)
        self.log(f"S3: {what} at {endpoint}")
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=AWS["AWS_DEFAULT_REGION"])
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="probe.json", Body=b"{}")
        self.endpoint = endpoint

        t0 = now()
        self.cluster = SandboxCluster(
            self.workdir / "cluster",
            namespaces=(NS,),
            pools=[self.pool()],
            values=sandbox_values(cluster_wide=True, interval=a.interval),
            extra_env={
                **{k: AWS[k] for k in ("AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")},
                ENV_STEP_SECONDS: str(a.step_seconds),
                "PYTHONUNBUFFERED": "1",
                # the stand-ins import the same tree as this process (a run from a pinned worktree)
                **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ},
            },
            entrypoints={"*": [sys.executable, "-m", "loraresume_sandbox.stand_in_trainer"]},
            with_operator=False,
            quiet=True,
        )
        self.cluster.start()
        self.kube = self.cluster.kube
        self.result["sandbox_start_seconds"] = r(now() - t0)
        self.log(
            f"sandbox cluster up in {now() - t0:.1f} s: API {self.kube.server}, "
            f"{a.capacity // a.gpus_per_node} spot nodes x {a.gpus_per_node} GPU, logs in {self.workdir}"
        )
        self.kube.create(
            "secrets",
            {
                "metadata": {"name": SECRET, "labels": CREDENTIALS_LABEL},
                "stringData": {
                    "AWS_ACCESS_KEY_ID": AWS["AWS_ACCESS_KEY_ID"],
                    "AWS_SECRET_ACCESS_KEY": AWS["AWS_SECRET_ACCESS_KEY"],
                },
            },
            NS,
        )
        self.requests = RequestLog(self.cluster.control_plane.audit_log, self.cluster.operator_user)
        self.requests.start()
        self.feeds = [Feed(self.kube, kind, self.tracker) for kind in ("pods", LR)]
        for feed in self.feeds:
            feed.start()
        self.wait("this script's watches", lambda: all(f.synced.is_set() for f in self.feeds), 60)

        if a.request_log:
            self.log_requests(Path(a.request_log))
        profile_dir = Path(self.args.py_spy) if self.args.py_spy else None
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
        self.operator = Operator(
            self.cluster, self.workdir, profile_dir, self.args.py_spy_seconds, self.args.py_spy_gil, self.cpu_shares
        )
        self.sampler = MemorySampler(self.operator)
        self.prober = Prober(self.kube, s3, self.sampler)
        self.result["operator_start_seconds"] = r(self.start_operator())
        self.sampler.start()
        self.prober.start()

    def log_requests(self, path: Path) -> None:
        """--request-log: every answered request of the operator (not watches) and every change seen."""
        assert self.requests is not None
        sink = open(path, "w", buffering=1)
        t_zero, t_zero_wall = now(), time.time()

        def log_request(req: Request) -> None:
            if req.verb != "watch":
                sink.write(
                    f"{req.answered - t_zero_wall:.3f} {req.who} {req.verb} {req.res}"
                    f"{'/' + req.sub if req.sub else ''} {req.name or '-'} {req.status}\n"
                )

        self.requests.hooks.append(log_request)
        self.tracker.sink = lambda t, text: sink.write(f"{t - t_zero:.3f} STORE {text}\n")

    def start_operator(self) -> float:
        """Start the operator; seconds until it has opened its watches of LoraResumes and pods (audit log)."""
        assert self.operator is not None and self.requests is not None
        t_wall = time.time()
        opened: dict[str, float] = {}

        def watch_opened(req: Request) -> None:
            if req.verb == "watch" and req.res in (LR, "pods") and req.received >= t_wall:
                opened.setdefault(req.res, req.received)

        self.requests.hooks.append(watch_opened)
        try:
            self.operator.start()
            self.wait("the operator to watch", lambda: len(opened) == 2, 120, every=0.05)
        finally:
            self.requests.hooks.remove(watch_opened)
        return max(opened.values()) - self.operator.started_wall

    def teardown(self) -> None:
        for thread in (self.sampler, self.prober, self.requests, *self.feeds):
            if thread is not None:
                thread.stopped.set()
        if self.operator:
            self.operator.stop()
            self.operator.stop_profilers()
        if self.cluster:
            self.cluster.stop()
        if self.s3_server and self.s3_server.poll() is None:
            if "s3_server" in self.result:
                self.result["s3_server"]["cpu_seconds"] = r(process_cpu_seconds(self.s3_server.pid) or 0.0, 1)
            self.s3_server.terminate()
            try:
                self.s3_server.wait(20)
            except subprocess.TimeoutExpired:
                self.s3_server.kill()
        if self.cpu_shares is not None:
            self.cpu_shares.close()

    # -- resources ---------------------------------------------------------------------------
    def body(self, name: str, wave: str, steps: int | None = None) -> dict[str, Any]:
        a = self.args
        return {
            "apiVersion": "loraresume.dev/v1alpha1",
            "kind": "LoraResume",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "baseModel": f"s3://{BUCKET}/models/stand-in/",
                "maxSeqLength": 128,
                "loadIn4bit": False,
                "dataset": {"source": f"s3://{BUCKET}/data/train.jsonl"},
                "training": {"maxSteps": steps or a.steps, "saveSteps": a.save_steps, "loggingSteps": a.logging_steps},
                "storage": {
                    "uri": f"s3://{BUCKET}/{wave}/{name}/",
                    "endpoint": self.endpoint,
                    "credentialsSecret": SECRET,
                    "keepCheckpoints": 2,
                },
                "resources": {"gpus": 1},  # one of the pool's GPUs: what the scheduler counts
                "scheduling": {"spot": {"enabled": True}},  # the chart's spot selector and toleration
                "restartPolicy": {"backoffSeconds": 1, "maxBackoffSeconds": 4},
                "terminationGracePeriodSeconds": 30,
            },
        }

    def create_wave(self, wave: str) -> list[str]:
        assert self.kube is not None
        names = [f"{wave}-{i:04d}" for i in range(self.args.resources)]
        for name in names:
            self.kube.create(LR, self.body(name, wave), NS)
        return names

    def progress_line(self, names: list[str]) -> str:
        with self.tracker.lock:
            phases = Counter((self.tracker.lr_status.get(n) or {}).get("phase", "-") for n in names)
        mem = self.operator.memory() if self.operator else {}
        total = self.requests.total if self.requests else 0
        return (
            f"{dict(sorted(phases.items()))} running={len(self.tracker.running_pods())} "
            f"operator RSS {mem.get('VmRSS', 0):.0f} MiB, API requests {total}"
        )

    def wait_all_succeeded(self, names: list[str], label: str) -> float:
        deadline = now() + self.args.timeout
        last_log = 0.0
        while now() < deadline:
            done = self.tracker.count_succeeded(names)
            if done == len(names):
                return now()
            failed = [n for n in names if (self.tracker.lr_status.get(n) or {}).get("phase") == "Failed"]
            if failed:
                raise RuntimeError(
                    f"{label}: {len(failed)} resources Failed, e.g. {failed[0]}: "
                    f"{self.tracker.lr_status[failed[0]].get('message')}"
                )
            if self.operator and self.operator.proc and self.operator.proc.poll() is not None:
                raise RuntimeError(f"the operator exited ({self.operator.proc.returncode}) during {label}")
            if now() - last_log > 15:
                self.log(f"{label}: {done}/{len(names)} Succeeded; {self.progress_line(names)}")
                last_log = now()
            time.sleep(0.2)
        raise TimeoutError(f"{label}: not all Succeeded after {self.args.timeout:.0f} s: {self.progress_line(names)}")

    # -- phases ------------------------------------------------------------------------------
    def wave1(self) -> None:
        a = self.args
        assert (
            self.sampler is not None
            and self.operator is not None
            and self.requests is not None
            and self.kube is not None
        )
        self.sampler.phase = "wave1"
        mem_start = self.operator.memory()
        total0, counts0 = self.requests.snapshot()
        cpu0 = self.operator.cpu_seconds() or 0.0
        loop_cpu0 = self.operator.event_loop_cpu_seconds() or 0.0
        s3_0 = self.operator.s3_requests()
        events_0 = self.operator.watch_events()
        reconciles_0 = self.operator.reconciles()
        self.log(f"wave 1: creating {a.resources} resources")
        t0 = now()
        names = self.create_wave("w1")
        t_created = now()
        t_done = self.wait_all_succeeded(names, "wave 1")
        total1, counts1 = self.requests.snapshot()
        cpu1 = self.operator.cpu_seconds() or 0.0
        loop_cpu1 = self.operator.event_loop_cpu_seconds() or 0.0
        s3_1 = self.operator.s3_requests()
        s3_window = {op: s3_1[op] - s3_0.get(op, 0.0) for op in sorted(s3_1) if s3_1[op] > s3_0.get(op, 0.0)}
        events_1 = self.operator.watch_events()
        reconciles_1 = self.operator.reconciles()
        events_window = {kind: int(events_1[kind] - events_0.get(kind, 0.0)) for kind in sorted(events_1)}
        window = diff_counts(counts1, counts0)
        first_pod = [
            self.tracker.adds[n][0][0] - self.tracker.lr_created[n]
            for n in names
            if self.tracker.adds.get(n) and n in self.tracker.lr_created
        ]
        lag = self.tracker.observe_lag(names)
        end_lag = self.tracker.end_lag(names)
        to_done = [
            self.tracker.succeeded[n] - self.tracker.lr_created[n] for n in names if n in self.tracker.lr_created
        ]
        attempts = sum(int((self.tracker.lr_status.get(n) or {}).get("attempt") or 0) for n in names)
        mem_done = self.operator.memory()
        self.log(f"wave 1: all {len(names)} Succeeded in {t_done - t0:.1f} s; {total1 - total0} API requests")

        # Steady state: everything Succeeded, the event backlog worked off, only the periodic loop left.
        settle = self.settle("wave 1")
        self.log(f"wave 1: operator settled {settle:.1f} s after the last Succeeded")
        self.sampler.phase = "idle"
        t_idle = now()
        idle_total0, idle_counts0 = self.requests.snapshot()
        idle_s3_0 = sum(self.operator.s3_requests().values())
        time.sleep(a.idle_seconds)
        idle_total1, idle_counts1 = self.requests.snapshot()
        idle_s3_1 = sum(self.operator.s3_requests().values())
        idle_span = now() - t_idle
        idle_rss = self.sampler.of("idle")
        self.result["wave1"] = {
            "resources": len(names),
            "create_seconds": r(t_created - t0),
            "wall_seconds_to_all_succeeded": r(t_done - t0),
            "attempts": attempts,
            "create_to_first_pod_seconds": {
                "p50": r(pct(first_pod, 50)),
                "p99": r(pct(first_pod, 99)),
                "max": r(max(first_pod, default=None)),
            },
            "create_to_succeeded_seconds": {"p50": r(pct(to_done, 50)), "p99": r(pct(to_done, 99))},
            "pod_ended_to_status_succeeded_seconds": {
                "n": len(end_lag),
                "p50": r(pct(end_lag, 50)),
                "p99": r(pct(end_lag, 99)),
                "max": r(max(end_lag, default=None)),
            },
            "pod_running_to_status_running_seconds": {
                "n": len(lag),
                "p50": r(pct(lag, 50)),
                "p99": r(pct(lag, 99)),
                "max": r(max(lag, default=None)),
            },
            "api_requests": total1 - total0,
            "api_requests_per_succeeded_resource": r((total1 - total0) / len(names)),
            "api_requests_by_kind": {
                f"{who} {verb} {res}": n for (who, verb, res), n in sorted(window.items(), key=lambda kv: -kv[1])
            },
            "operator_cpu_seconds": r(cpu1 - cpu0),
            "operator_cpu_seconds_event_loop_thread": r(loop_cpu1 - loop_cpu0),
            "reconciles_per_succeeded_resource": r((reconciles_1[0] - reconciles_0[0]) / len(names)),
            "reconcile_cpu_seconds": r(reconciles_1[1] - reconciles_0[1]),
            "s3_requests_per_succeeded_resource": r(sum(s3_window.values()) / len(names)),
            "s3_requests_by_operation": {op: int(n) for op, n in s3_window.items()},
            "watch_events_per_succeeded_resource": r(sum(events_window.values()) / len(names)),
            "watch_events_by_kind": events_window,
            "sandbox_latency": self.prober.summary("wave1") if self.prober else None,
            "operator_rss_mib": {
                "at_start": r(mem_start.get("VmRSS"), 1),
                "peak_during_wave": r(max(self.sampler.of("wave1"), default=0), 1),
                "peak_hwm_after_wave": r(mem_done.get("VmHWM"), 1),
                "steady_idle_median": r(statistics.median(idle_rss), 1) if idle_rss else None,
            },
            "settle_seconds_after_all_succeeded": r(settle, 1),
            "idle": {
                "seconds": r(idle_span, 1),
                "api_requests_per_second": r((idle_total1 - idle_total0) / idle_span),
                "s3_requests_per_second": r((idle_s3_1 - idle_s3_0) / idle_span),
                "by_kind": {
                    f"{who} {verb} {res}": n
                    for (who, verb, res), n in sorted(
                        diff_counts(idle_counts1, idle_counts0).items(), key=lambda kv: -kv[1]
                    )
                },
            },
        }

        # Deleting them all (gone at once: none asks for its checkpoints to go with it, so none has kopf's finalizer).
        self.sampler.phase = "delete"
        self.log("wave 1: deleting all")
        t_del = now()
        for name in names:
            self.kube.delete(LR, NS, name)
        self.wait("wave 1 deleted", lambda: all(n in self.tracker.lr_deleted for n in names), a.timeout, every=0.2)
        self.result["wave1"]["delete_all_seconds"] = r(now() - t_del)
        # What the operator does for a deleted resource (its pods deleted and let go, its per-resource metric
        # series dropped) follows the deletion: only a resource whose checkpoints go with it has kopf's finalizer
        # holding it until then. So wait (a minute at most) for that too, and report what is still left.
        deleted = set(names)

        def cleaned_up() -> bool:
            if self.operator.metric("loraresume_checkpoint_age_seconds{"):
                return False
            return not any(
                (p["metadata"].get("labels") or {}).get("loraresume.dev/resource") in deleted
                for p in self.kube.list("pods", NS)
            )

        try:
            self.wait("wave 1's pods and metric series gone", cleaned_up, 60, every=0.5)
            self.result["wave1"]["delete_cleaned_up_seconds"] = r(now() - t_del)
        except TimeoutError:
            self.result["wave1"]["delete_cleaned_up_seconds"] = None
        # Per-resource metric series the operator still exports for the deleted resources.
        self.result["wave1"]["checkpoint_age_series_after_delete"] = len(
            self.operator.metric("loraresume_checkpoint_age_seconds{")
        )
        self.log(f"wave 1: deleted in {now() - t_del:.1f} s")

    # -- disruptions, shared by the loaded and the steady phase ----------------------------------------
    @staticmethod
    def next_how(victims: Victims) -> str:
        """Deletion and reclaim take turns, so that each ends about half of the pods."""
        deleted = sum(1 for how, _t, _u in victims.values() if how == "delete")
        return "delete" if deleted <= len(victims) - deleted else "preempt"

    def disrupt(self, pod: str, how: str, victims: Victims) -> int:
        """End `pod`: delete it (graceful, as `kubectl delete pod`), or reclaim its spot node, which ends
        every pod on that node. Each pod ended is recorded with the call's time and the uid it had then;
        returns how many (0: it had ended or lost its node meanwhile)."""
        assert self.kube is not None and self.cluster is not None and self.cluster.agent is not None
        if how == "delete":
            uid, t_call = self.tracker.uid_of.get(pod), now()
            if self.kube.delete("pods", NS, pod) is None:
                return 0
            victims[pod] = (how, t_call, uid)
            return 1
        agent = self.cluster.agent
        try:
            node = agent.node_of(NS, pod)
            on_node = sorted({pod, *self.tracker.live_pods_on(node)} - set(victims))
            uids, t_call = {p: self.tracker.uid_of.get(p) for p in on_node}, now()
            agent.reclaim_spot(node, wait=False)  # taint, DisruptionTarget, SIGTERM, grace, Node replaced
            self.reclaimed[node] = t_call
        except LookupError:
            return 0
        for p in on_node:
            victims[p] = (how, t_call, uids[p])
        return len(on_node)

    def late_victims(self, victims: Victims) -> int:
        """Adds the pods a reclaim ended that were not on its node when the node's pods were listed (bound
        by the scheduler just after): every pod bound to a reclaimed node that began to end after the
        reclaim, unless it had succeeded. Returns how many were added."""
        found = self.tracker.ended_on(self.reclaimed, set(victims))
        for name, uid, node in found:
            victims[name] = ("preempt", self.reclaimed[node], uid)
        return len(found)

    def relaunch_stats(self, victims: Victims) -> dict[str, Any]:
        """Waits for every victim's replacement pod; latencies from the call and from the old pod's end."""

        def replacement(pod: str) -> tuple[float, str] | None:
            """The first pod of the same resource created after the victim: the next attempt, or the
            same name again when the operator had not seen the victim run (decide.py re-creates it)."""
            _how, t_call, uid = victims[pod]
            with self.tracker.lock:
                later = [
                    (t, n) for t, n, u in self.tracker.adds[pod.rsplit("-attempt-", 1)[0]] if u != uid and t >= t_call
                ]
            return later[0] if later else None

        def ran_to_the_end(pod: str) -> bool:
            """It exited 0 before the disruption reached it: its resource Succeeded with this attempt, nothing to
            relaunch (its pod may be marked Failed all the same: a node shutting down marks every pod Failed)."""
            if self.tracker.pod_by_uid(victims[pod][2]).get("succeeded"):
                return True
            name, attempt = pod.rsplit("-attempt-", 1)
            with self.tracker.lock:
                status = dict(self.tracker.lr_status.get(name) or {})
            return status.get("phase") == "Succeeded" and str(status.get("attempt")) == attempt

        late = 0

        def replaced() -> bool:
            nonlocal late
            late += self.late_victims(victims)
            return all(replacement(p) or ran_to_the_end(p) for p in victims)

        self.wait("the replacement pods", replaced, self.args.timeout)
        by: dict[str, list[float]] = defaultdict(list)
        share: dict[str, list[float]] = defaultdict(list)
        # the operator's share by what the trainer said as it ended: a durable checkpoint (counted on its word,
        # no S3 read) or none (SIGTERMed before it trained, or deleted before it could say: its end is read)
        by_word: dict[str, list[float]] = defaultdict(list)
        same_name = finished_first = 0
        lost_by_resource: Counter[str] = Counter()
        for pod, (how, t_call, uid) in victims.items():
            found = replacement(pod)
            if found is None:
                finished_first += 1
                continue
            lost_by_resource[pod.rsplit("-attempt-", 1)[0]] += 1
            t_new, new_name = found
            same_name += new_name == pod
            old = self.tracker.pod_by_uid(uid)
            ends = [t for t in (old.get("ended"), old.get("deleted")) if t]
            by[how].append(t_new - t_call)
            if ends:
                share[how].append(t_new - min(ends))
                by_word[old.get("said", SAID_NONE)].append(t_new - min(ends))
        every = by["delete"] + by["preempt"]
        every_share = share["delete"] + share["preempt"]
        return {
            "pods": len(every),
            "victims": len(victims),
            "ran_to_the_end_first": finished_first,
            "bound_to_a_reclaimed_node_after_it_was_listed": late,
            "relaunched_as_the_same_pod_name": same_name,
            "lost_by_resource": dict(sorted(lost_by_resource.items())),
            "seconds": {"p50": r(pct(every, 50)), "p99": r(pct(every, 99)), "max": r(max(every, default=None))},
            "operator_share_seconds": {"p50": r(pct(every_share, 50)), "p99": r(pct(every_share, 99))},
            "operator_share_by_what_the_trainer_said": {
                said: {"n": len(v), "p50": r(pct(v, 50)), "p99": r(pct(v, 99))} for said, v in sorted(by_word.items())
            },
            "by_kind": {
                how: {
                    "n": len(v),
                    "p50": r(pct(v, 50)),
                    "p99": r(pct(v, 99)),
                    "operator_share_p50": r(pct(share[how], 50)),
                    "operator_share_p99": r(pct(share[how], 99)),
                }
                for how, v in by.items()
                if v
            },
        }

    def miscounted(self, names: list[str], lost_by_resource: dict[str, int]) -> list[dict[str, Any]]:
        """Resources whose status.preemptions is not the number of their pods this benchmark ended (and
        that did not finish first), each with what this script saw of its pods: a loss counted twice,
        one not counted, or a loss the benchmark did not record, and which pod it was."""
        out = []
        with self.tracker.lock:
            for name in names:
                counted = int((self.tracker.lr_status.get(name) or {}).get("preemptions") or 0)
                lost = lost_by_resource.get(name, 0)
                if counted == lost:
                    continue
                pods = [
                    {k: (r(v) if isinstance(v, float) else v) for k, v in p.items() if k != "resource"}
                    for p in self.tracker.pods.values()
                    if p.get("resource") == name
                ]
                status = self.tracker.lr_status.get(name) or {}
                out.append(
                    {
                        "resource": name,
                        "preemptions_counted": counted,
                        "pods_lost_recorded": lost,
                        "attempt": status.get("attempt"),
                        "phase": status.get("phase"),
                        "pods": sorted(pods, key=lambda p: p.get("added") or 0.0),
                        "reclaimed_nodes": {n: r(t) for n, t in self.reclaimed.items()},
                    }
                )
        return out

    def disrupt_while_loaded(self, names: list[str], disrupt: int) -> dict[str, Any]:
        """Pods of `names` are ended as they run, once `--disrupt-at` of the first pods have ended."""
        a = self.args
        # Trigger on the pods, not on the statuses: the operator may lag far behind the pods.
        target = int(a.disrupt_at * len(names))
        wave = set(names)
        prefix = names[0].split("-")[0] + "-"

        def first_pods_ended() -> int:
            with self.tracker.lock:
                return sum(
                    1
                    for p in self.tracker.pods.values()
                    if p["resource"] in wave and p["name"].endswith("-attempt-1") and "ended" in p
                )

        self.wait(f"{target} first pods ended before the pod loss", lambda: first_pods_ended() >= target, a.timeout)
        # Each victim is picked once it has trained a couple of steps, until `disrupt` are ended
        # or no first-attempt pod is left to pick.
        victims: Victims = {}
        self.reclaimed = {}
        deadline = now() + a.timeout
        while len(victims) < disrupt:
            if now() > deadline:
                raise TimeoutError(f"only {len(victims)} of {disrupt} pods could be disrupted")
            running = self.tracker.running_pods()
            ready = sorted(
                p
                for p, since in running.items()
                if p.startswith(prefix)
                and p.endswith("-attempt-1")
                and p not in victims
                and now() - since >= 2 * a.step_seconds
            )
            for pod in self.rng.sample(ready, min(len(ready), disrupt - len(victims))):
                if pod not in victims and len(victims) < disrupt:  # a reclaim just now may have ended it
                    self.disrupt(pod, self.next_how(victims), victims)
            with self.tracker.lock:
                firsts = {
                    p["resource"]
                    for p in self.tracker.pods.values()
                    if p["resource"] in wave and p["name"].endswith("-attempt-1")
                }
            if len(firsts) == len(names) and not ready and not [p for p in running if p.startswith(prefix)]:
                self.log(f"pod loss: only {len(victims)} pods could be picked (the others ran to the end)")
                break
            time.sleep(0.1)
        if not victims:
            raise RuntimeError("pod loss: no running pod could be picked")
        return self.relaunch_stats(victims)

    # -- operator restart, shared too ------------------------------------------------------------------
    def measure_restart(self, names: list[str]) -> dict[str, Any]:
        """SIGKILL, `--down-seconds` down, start; see the module docstring for "reconciled"."""
        a = self.args
        assert self.operator is not None and self.sampler is not None and self.requests is not None
        phase = self.sampler.phase
        mem_before = self.operator.memory()
        with self.tracker.lock:
            at_kill = {n: dict(self.tracker.lr_status.get(n) or {}) for n in names}
        phases = Counter(s.get("phase", "(none)") for s in at_kill.values())
        self.log(f"restart: SIGKILL the operator; phases {dict(phases)}")
        t_kill = now()
        self.operator.kill()
        self.sampler.phase = "restart"
        time.sleep(a.down_seconds)
        ended_down = {}  # non-terminal resources whose pod ended (or went away) while the operator was down
        for n, st in at_kill.items():
            if st.get("phase") not in ("Succeeded", "Failed") and st.get("podName"):
                pod = self.tracker.pod(st["podName"])
                if pod.get("ended") or pod.get("deleted"):
                    ended_down[n] = st
        received: list[float] = []  # every request of the new process
        t_wall = time.time()  # the killed process's last requests were received before this

        def hook(req: Request) -> None:
            if req.received >= t_wall:
                received.append(req.received)

        with self.tracker.lock:
            present = sum(1 for n in self.tracker.lr_created if n not in self.tracker.lr_deleted)
        self.requests.hooks.append(hook)
        self.operator.start()
        t_start, t_start_wall = self.operator.started_at, self.operator.started_wall
        self.wait("the first request of the new operator", lambda: received, 120, every=0.02)
        cpu_at_first = self.operator.cpu_seconds()
        load_at_start = (host_load()["loadavg_1_5_15"] or [None])[0]
        # Reconciled: the new process has decided on the resource (loraresume_resources{phase} counts
        # every resource it reconciled, whatever it found), so the k-th resource was reconciled when
        # the sum first reached k. Sampled every 50 ms (reconciles no longer read the resource by GET).
        done: list[float] = []  # done[k - 1]: seconds from the start until k were reconciled
        deadline = now() + a.timeout
        cpu_at_all: float | None = None  # the new process's CPU (all threads) when all were reconciled
        while len(done) < present:
            if now() > deadline:
                raise TimeoutError(f"only {len(done)} of {present} resources reconciled after the restart")
            count = int(sum(v for _k, v in self.operator.metric("loraresume_resources{")))
            cpu_at_all = self.operator.cpu_seconds()  # read after the count: the CPU until then, or a little over
            t = now() - t_start
            while len(done) < min(count, present):
                done.append(t)
            time.sleep(0.05)
        t_all_wall = t_start_wall + max(done)
        requests_until = sum(1 for t in list(received) if t <= t_all_wall)

        def caught_up(n: str) -> float | None:
            s0 = at_kill[n]
            with self.tracker.lock:
                s = self.tracker.lr_status.get(n) or {}
                changed = self.tracker.status_changed.get(n)
            if s.get("phase") == "Succeeded" or int(s.get("attempt") or 0) > int(s0.get("attempt") or 0):
                return changed
            return None

        if ended_down:
            self.wait(
                "resources whose pods ended during the downtime to catch up",
                lambda: all(caught_up(n) is not None for n in ended_down),
                a.timeout,
            )
        catch = [caught_up(n) - self.operator.started_at for n in ended_down]  # type: ignore[operator]
        self.requests.hooks.remove(hook)
        self.sampler.phase = phase
        out = {
            "resources": len(names),
            "phases_at_kill": dict(phases),
            "operator_rss_before_kill_mib": r(mem_before.get("VmRSS"), 1),
            "down_seconds": a.down_seconds,
            "resources_in_cluster": present,
            "start_to_first_request_seconds": r(min(received) - t_start_wall),
            "start_to_all_reconciled_seconds": r(max(done)),
            "reconciled_seconds": {"p50": r(pct(done, 50)), "p99": r(pct(done, 99))},
            "requests_until_all_reconciled": requests_until,
            # The process's own CPU: what the restart costs whatever else the host runs (the wall times
            # above are that CPU at the share of the host's cores the operator gets beside the sandbox).
            "operator_cpu_seconds_to_first_request": r(cpu_at_first),
            "operator_cpu_seconds_to_all_reconciled": r(cpu_at_all),
            "host_load_1min_at_start": load_at_start,
            "pods_ended_while_down": len(ended_down),
            "start_to_those_caught_up_seconds": {"p50": r(pct(catch, 50)), "max": r(max(catch, default=None))},
            "kill_to_all_reconciled_seconds": r(self.operator.started_at - t_kill + max(done)),
        }
        self.log(
            f"restart: first request after {out['start_to_first_request_seconds']} s, "
            f"all {present} reconciled after {out['start_to_all_reconciled_seconds']} s"
        )
        return out

    def settle(self, label: str) -> float:
        """Seconds until the operator's last API request before a quiet spell of `--quiet-seconds`: its
        backlog of events is worked off and only the periodic loop is left (it sleeps `interval` between
        rounds, so the spell comes once the backlog is gone). Request times from the audit log."""
        assert self.requests is not None
        requests = self.requests
        t0 = time.time()
        quiet = self.args.quiet_seconds
        last: list[float] = []

        def quiet_now() -> bool:
            requests.poll()
            seen = requests.last_answered
            if time.time() - seen >= quiet:
                last.append(seen)
                return True
            return False

        self.wait(f"the operator to settle after {label}", quiet_now, self.args.timeout, every=0.2)
        return max(0.0, last[-1] - t0)

    # -- phase 2: loaded, disrupted, restarted ----------------------------------------------------------
    def wave2(self) -> None:
        a = self.args
        assert self.sampler is not None and self.operator is not None and self.requests is not None
        self.sampler.phase = "wave2"
        total0, _ = self.requests.snapshot()
        self.log(f"wave 2: creating {a.resources} resources")
        t0 = now()
        names = self.create_wave("w2")
        disrupt = min(a.disrupt, a.resources - int(a.disrupt_at * a.resources))
        relaunch: dict[str, Any] = {}
        if disrupt:
            relaunch = self.disrupt_while_loaded(names, disrupt)
            self.log(
                f"relaunch after pod loss ({relaunch['pods']} pods): p50 {relaunch['seconds']['p50']} s, "
                f"p99 {relaunch['seconds']['p99']} s"
            )
        restart: dict[str, Any] = {}
        if a.restart_at is not None:
            target = int(a.restart_at * len(names))
            self.wait(
                f"{target} Succeeded before the restart",
                lambda: self.tracker.count_succeeded(names) >= target,
                a.timeout,
                every=0.2,
            )
            restart = self.measure_restart(names)

        t_done = self.wait_all_succeeded(names, "wave 2")
        mem = self.operator.memory()
        total1, _ = self.requests.snapshot()
        attempts = sum(int((self.tracker.lr_status.get(n) or {}).get("attempt") or 0) for n in names)
        preemptions = sum(int((self.tracker.lr_status.get(n) or {}).get("preemptions") or 0) for n in names)
        self.result["wave2"] = {
            "resources": len(names),
            "wall_seconds_to_all_succeeded": r(t_done - t0),
            "attempts": attempts,
            "preemptions_counted": preemptions,
            "miscounted_resources": self.miscounted(names, relaunch.get("lost_by_resource") or {}),
            "api_requests": total1 - total0,
            "api_requests_per_succeeded_resource": r((total1 - total0) / len(names)),
            "operator_rss_mib_after_restart": {"peak_hwm": r(mem.get("VmHWM"), 1), "now": r(mem.get("VmRSS"), 1)},
            "relaunch_after_pod_loss": relaunch,
            "sandbox_latency": self.prober.summary("wave2") if self.prober else None,
            "operator_restart": restart,
        }
        self.log(f"wave 2: all Succeeded in {t_done - t0:.1f} s")
        self.wave2_names = names

    # -- phase 3: steady state --------------------------------------------------------------------------
    # -- phase 3: steady state --------------------------------------------------------------------------
    def steady(self) -> None:
        """N Succeeded resources in the cluster, the operator settled; M long runs are lost and relaunched,
        then the operator is restarted with them running."""
        from loraresume_sandbox.stand_in_trainer import ENV_STEP_SECONDS

        a = self.args
        assert self.sampler is not None and self.operator is not None and self.kube is not None
        assert self.cluster is not None and self.cluster.agent is not None
        settle = self.settle("wave 2")
        self.sampler.phase = "steady"
        m = a.steady_disrupt
        self.log(f"steady: operator settled {settle:.1f} s after wave 2; {m} long runs")
        self.cluster.agent.extra_env[ENV_STEP_SECONDS] = str(a.steady_step_seconds)  # read when a pod starts
        names = [f"w3-{i:04d}" for i in range(m)]
        t0 = now()
        for name in names:
            self.kube.create(LR, self.body(name, "w3", steps=a.steady_steps), NS)

        def running_seen(attempt: int) -> bool:
            with self.tracker.lock:
                return all((n, attempt) in self.tracker.lr_running for n in names)

        self.wait(f"{m} resources Running", lambda: running_seen(1), a.timeout)
        with self.tracker.lock:
            first_pod = [self.tracker.adds[n][0][0] - self.tracker.lr_created[n] for n in names]
            seen = [self.tracker.lr_running[(n, 1)] - self.tracker.lr_created[n] for n in names]
        lag = self.tracker.observe_lag(names)
        victims: Victims = {}
        self.reclaimed = {}
        for name in names:  # back to back: with --steady-how reclaim, the whole pool is reclaimed at once
            pod = f"{name}-attempt-1"
            if pod not in victims:  # a reclaim of a node with more GPUs may have ended it already
                how = "preempt" if a.steady_how == "reclaim" else self.next_how(victims)
                self.disrupt(pod, how, victims)
        relaunch = self.relaunch_stats(victims)
        self.log(
            f"steady relaunch ({relaunch['pods']} pods): p50 {relaunch['seconds']['p50']} s, "
            f"p99 {relaunch['seconds']['p99']} s"
        )
        # the relaunched ones (a run that ended before the reclaim reached it has no next attempt)
        lost = relaunch.get("lost_by_resource") or {}

        def relaunched_running() -> bool:
            with self.tracker.lock:
                return all((n, 1 + k) in self.tracker.lr_running for n, k in lost.items())

        self.wait(f"{len(lost)} relaunched resources Running again", relaunched_running, a.timeout)
        with self.tracker.lock:
            preemptions = sum(int((self.tracker.lr_status.get(n) or {}).get("preemptions") or 0) for n in names)
        restart = self.measure_restart(self.wave2_names + names) if a.restart_at is not None else {}
        if restart:
            self.wait(f"{len(lost)} resources Running after the restart", relaunched_running, a.timeout)
            time.sleep(2 * a.interval)  # the restarted process has had its rounds: a double count would show
        with self.tracker.lock:
            after_restart = sum(int((self.tracker.lr_status.get(n) or {}).get("preemptions") or 0) for n in names)
        self.result["steady"] = {
            "succeeded_resources_in_cluster": len(self.wave2_names),
            "settle_seconds_after_wave2": r(settle, 1),
            "long_runs": m,
            "create_to_first_pod_seconds": {"p50": r(pct(first_pod, 50)), "p99": r(pct(first_pod, 99))},
            "create_to_status_running_seconds": {"p50": r(pct(seen, 50)), "p99": r(pct(seen, 99))},
            "pod_running_to_status_running_seconds": {"p50": r(pct(lag, 50)), "p99": r(pct(lag, 99))},
            "relaunch_after_pod_loss": relaunch,
            "preemptions_counted": preemptions,
            "preemptions_counted_after_restart": after_restart,
            "miscounted_resources": self.miscounted(names, relaunch.get("lost_by_resource") or {}),
            "how": a.steady_how,
            "operator_restart": restart,
            "sandbox_latency": self.prober.summary("steady") if self.prober else None,
            "seconds": r(now() - t0, 1),
        }

    # -- all --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        a = self.args
        started = datetime.datetime.now(datetime.UTC)
        self.result = {
            "benchmark": "scale",
            "date": started.strftime("%Y-%m-%d"),
            "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
            "settings": {k: v for k, v in vars(a).items() if k not in ("json", "markdown")},
            "machine": machine(),
            "git": git_state(),
            "load_before": host_load(),
            "stand_in": {
                "steps": a.steps,
                "save_steps": a.save_steps,
                "logging_steps": a.logging_steps,
                "step_seconds": a.step_seconds,
            },
        }
        t0 = now()
        try:
            if a.operator_cpu_request is not None:
                self.cpu_shares = CpuShares(a.operator_cpu_request)
                self.result["cpu_shares_millicpu"] = self.cpu_shares.millicpu
            self.setup()
            if not a.skip_wave1:
                self.wave1()
            self.wave2()
            if not a.skip_steady:
                self.steady()
        finally:
            self.result["load_after"] = host_load()
            self.result["benchmark_wall_seconds"] = r(now() - t0, 1)
            if self.sampler:
                self.result["operator_rss_mib_peak_sampled"] = r(
                    max((s[3] for s in self.sampler.samples), default=0), 1
                )
                self.result["operator_rss_samples"] = len(self.sampler.samples)
            self.result["api_user_agents"] = dict(self.requests.user_agents) if self.requests else {}
            self.result["pod_names_created_twice"] = self.tracker.names_created_twice()
            self.teardown()
            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            me = resource.getrusage(resource.RUSAGE_SELF)
            self.result["cpu_seconds"] = {
                "this_process_node_agent_watches": r(me.ru_utime + me.ru_stime, 1),
                "children_control_plane_operator_s3_stand_ins": r(kids.ru_utime + kids.ru_stime, 1),
            }
            self.result["workdir"] = str(self.workdir)
        return self.result


def _http_ok(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


# -- report ----------------------------------------------------------------------------------------------
def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    w1, w2 = result.get("wave1") or {}, result.get("wave2") or {}
    n = (w1 or w2).get("resources")
    s = result["settings"]
    rows.append(
        (
            "resources per wave",
            f"{n} (capacity {s['capacity']} GPUs on {s['capacity'] // s['gpus_per_node']} "
            f"spot nodes, one GPU per trainer; stand-in {s['steps']} steps x "
            f"{s['step_seconds']} s, checkpoint every {s['save_steps']})",
        )
    )
    s3 = result.get("s3_server") or {"what": "moto (before --s3-server)"}
    rows.append(
        ("S3 server (its CPU over the run)", f"{s3['what']} ({s3.get('cpu_seconds', '-')} s)"),
    )
    rows.append(("the host's CPUs shared", shared(result.get("cpu_shares_millicpu"))))
    git = result.get("git") or {}
    if git:
        rows.append(
            (
                "commit (uncommitted edits to what runs)",
                f"{(git.get('commit') or '?')[:12]} ({len(git.get('uncommitted') or [])} files)",
            )
        )
    rows.append(("operator start to watching", f"{result.get('operator_start_seconds')} s"))
    if w1:
        mem = w1["operator_rss_mib"]
        rows += [
            (
                "wave 1: wall time, create -> all Succeeded",
                f"{w1['wall_seconds_to_all_succeeded']} s ({w1['attempts']} attempts)",
            ),
            (
                "wave 1: create -> first pod p50 / p99",
                f"{w1['create_to_first_pod_seconds']['p50']} / {w1['create_to_first_pod_seconds']['p99']} s",
            ),
            (
                "wave 1: pod exited 0 -> resource Succeeded p50 / p99",
                f"{w1['pod_ended_to_status_succeeded_seconds']['p50']} / "
                f"{w1['pod_ended_to_status_succeeded_seconds']['p99']} s",
            ),
            (
                "wave 1: pod Running -> resource Running p50 / p99 (n seen)",
                f"{w1['pod_running_to_status_running_seconds']['p50']} / "
                f"{w1['pod_running_to_status_running_seconds']['p99']} s "
                f"({w1['pod_running_to_status_running_seconds']['n']} of {w1['attempts']} attempts)",
            ),
            ("wave 1: sandbox latency, API GET / S3 GET p50 (p99)", _latency(w1.get("sandbox_latency"))),
            (
                "wave 1: API requests per Succeeded resource",
                f"{w1['api_requests_per_succeeded_resource']} ({w1['api_requests']} in all)",
            ),
            (
                "wave 1: operator's S3 requests per Succeeded resource",
                f"{w1.get('s3_requests_per_succeeded_resource')} "
                + ", ".join(f"{op} {n}" for op, n in (w1.get("s3_requests_by_operation") or {}).items()),
            ),
            (
                "wave 1: watch events delivered to the operator per Succeeded resource",
                f"{w1.get('watch_events_per_succeeded_resource')} "
                + ", ".join(f"{kind} {n}" for kind, n in (w1.get("watch_events_by_kind") or {}).items()),
            ),
            (
                "wave 1: operator CPU",
                f"{w1['operator_cpu_seconds']} s ({r(w1['operator_cpu_seconds'] / n, 3)} s per resource; "
                f"event loop thread {w1.get('operator_cpu_seconds_event_loop_thread')} s; "
                f"reconciles {w1.get('reconcile_cpu_seconds')} s, {w1.get('reconciles_per_succeeded_resource')} "
                "per resource)",
            ),
            (
                "operator RSS: start / peak (wave 1) / steady (idle)",
                f"{mem['at_start']} / {mem['peak_hwm_after_wave']} / {mem['steady_idle_median']} MiB",
            ),
            (
                "wave 1: operator busy after the last Succeeded (backlog)",
                f"{w1['settle_seconds_after_all_succeeded']} s",
            ),
            (
                f"idle API requests/s; S3 requests/s ({n} Succeeded, settled)",
                f"{w1['idle']['api_requests_per_second']}; {w1['idle'].get('s3_requests_per_second')}",
            ),
            (
                f"delete {n} resources",
                f"{w1['delete_all_seconds']} s"
                + (
                    f"; pods and metric series gone after {w1['delete_cleaned_up_seconds']} s"
                    if "delete_cleaned_up_seconds" in w1
                    else ""
                )
                + (
                    f" ({w1['checkpoint_age_series_after_delete']} checkpoint-age metric series left behind)"
                    if "checkpoint_age_series_after_delete" in w1
                    else ""
                ),
            ),
        ]
    if w2:
        rl, rs = w2.get("relaunch_after_pod_loss") or {}, w2.get("operator_restart") or {}
        if rl:
            kinds = ", ".join(f"{k} {v['p50']}/{v['p99']}" for k, v in sorted(rl["by_kind"].items()))
            rows += [
                (
                    f"wave 2 (loaded): relaunch after pod loss ({rl['pods']} pods) p50 / p99",
                    f"{rl['seconds']['p50']} / {rl['seconds']['p99']} s ({kinds})",
                ),
                (
                    "  operator's share (old pod ended -> new pod) p50 / p99",
                    f"{rl['operator_share_seconds']['p50']} / {rl['operator_share_seconds']['p99']} s",
                ),
                ("  operator's share by what the trainer said as it ended: n, p50 / p99", _by_word(rl)),
                (
                    "  relaunched under the same pod name (loss not seen); ran to the end first; preemptions counted",
                    f"{rl['relaunched_as_the_same_pod_name']}; {rl.get('ran_to_the_end_first')}; "
                    f"{w2.get('preemptions_counted')}",
                ),
                (
                    "  per resource: preemptions counted = its pods lost (late-bound victims among them)",
                    f"{len(w2.get('miscounted_resources') or [])} resources differ; "
                    f"{rl.get('bound_to_a_reclaimed_node_after_it_was_listed')} late-bound",
                ),
            ]
        if rs:
            rows += [
                (
                    "wave 2 restart (loaded): phases at SIGKILL",
                    ", ".join(f"{k} {v}" for k, v in sorted(rs["phases_at_kill"].items())),
                ),
                ("restart: start -> first API request", f"{rs['start_to_first_request_seconds']} s"),
                (
                    "restart: start -> all reconciled (p50 / all)",
                    f"{rs['reconciled_seconds']['p50']} / {rs['start_to_all_reconciled_seconds']} s",
                ),
                restart_cpu_row("restart", rs),
                (
                    f"restart: {rs['pods_ended_while_down']} pods ended while down -> status caught up (p50 / all)",
                    f"{rs['start_to_those_caught_up_seconds']['p50']} / "
                    f"{rs['start_to_those_caught_up_seconds']['max']} s",
                ),
            ]
        rows += [
            (
                "wave 2 (disruptions + restart): wall time to all Succeeded",
                f"{w2['wall_seconds_to_all_succeeded']} s ({w2['attempts']} attempts)",
            ),
            ("wave 2: API requests per Succeeded resource", f"{w2['api_requests_per_succeeded_resource']}"),
            ("wave 2: sandbox latency, API GET / S3 GET p50 (p99)", _latency(w2.get("sandbox_latency"))),
            ("operator RSS peak after restart", f"{w2['operator_rss_mib_after_restart']['peak_hwm']} MiB"),
        ]
    st = result.get("steady") or {}
    if st:
        rl, rs = st["relaunch_after_pod_loss"], st.get("operator_restart") or {}
        rows += [
            (
                f"steady ({st['succeeded_resources_in_cluster']} Succeeded + {st['long_runs']} long runs): "
                "create -> first pod p50 / p99",
                f"{st['create_to_first_pod_seconds']['p50']} / {st['create_to_first_pod_seconds']['p99']} s",
            ),
            (
                "steady: pod Running -> resource Running p50 / p99",
                f"{st['pod_running_to_status_running_seconds']['p50']} / "
                f"{st['pod_running_to_status_running_seconds']['p99']} s",
            ),
            (
                f"steady: relaunch after pod loss ({rl['pods']} pods) p50 / p99",
                f"{rl['seconds']['p50']} / {rl['seconds']['p99']} s ("
                + ", ".join(f"{k} {v['p50']}/{v['p99']}" for k, v in sorted(rl["by_kind"].items()))
                + ")",
            ),
            (
                "  operator's share p50 / p99; same pod name; preemptions counted",
                f"{rl['operator_share_seconds']['p50']} / {rl['operator_share_seconds']['p99']} s; "
                f"{rl['relaunched_as_the_same_pod_name']}; {st['preemptions_counted']}",
            ),
            ("  operator's share by what the trainer said as it ended: n, p50 / p99", _by_word(rl)),
            (
                "  per resource: preemptions counted = its pods lost",
                f"{len(st.get('miscounted_resources') or [])} resources differ; "
                f"{rl.get('bound_to_a_reclaimed_node_after_it_was_listed')} late-bound",
            ),
            ("steady: sandbox latency, API GET / S3 GET p50 (p99)", _latency(st.get("sandbox_latency"))),
        ]
        if rs:
            rows += [
                (
                    f"steady restart ({rs['resources']} resources: "
                    + ", ".join(f"{k} {v}" for k, v in sorted(rs["phases_at_kill"].items()))
                    + "): start -> first request",
                    f"{rs['start_to_first_request_seconds']} s",
                ),
                (
                    "steady restart: start -> all reconciled (p50 / all)",
                    f"{rs['reconciled_seconds']['p50']} / {rs['start_to_all_reconciled_seconds']} s",
                ),
                restart_cpu_row("steady restart", rs),
            ]
    load = result.get("load_before", {}).get("loadavg_1_5_15"), result.get("load_after", {}).get("loadavg_1_5_15")
    rows.append(("host load average before / after", f"{load[0]} / {load[1]}"))
    return rows


SAID_NONE = "said none"  # no termination message the benchmark saw, or one naming nothing durable


def _what_it_said(message: Any) -> str:
    """What a trainer's termination message says of what is durable: that it stopped before it trained, or a
    durable checkpoint (a preemption saying either is counted on its word, without reading S3:
    decide.counted_on_its_word), or neither."""
    try:
        said = json.loads(message) if isinstance(message, str) else None
    except ValueError:
        said = None
    if isinstance(said, dict) and said.get("trained") is False:
        return "said it had not trained"
    if isinstance(said, dict) and said.get("durable_step"):
        return "said a durable checkpoint"
    return SAID_NONE


def _by_word(rl: dict[str, Any]) -> str:
    split = rl.get("operator_share_by_what_the_trainer_said") or {}
    return "; ".join(f"{said}: {v['n']}, {v['p50']} / {v['p99']} s" for said, v in split.items()) or "-"


def _latency(lat: dict[str, Any] | None) -> str:
    if not lat:
        return "-"
    return " / ".join(f"{lat[k]['p50_ms']} ({lat[k]['p99_ms']}) ms" for k in ("api", "s3"))


def render_text(result: dict[str, Any]) -> str:
    rows = table(result)
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    w1 = result.get("wave1")
    if w1:
        lines += ["", "wave 1 API requests by client, verb, resource (per Succeeded resource):"]
        n = w1["resources"]
        for kind, count in w1["api_requests_by_kind"].items():
            lines.append(f"  {kind.ljust(40)} {count:7d}  {count / n:7.2f}")
    return "\n".join(lines)


def restart_cpu_row(label: str, restart: dict[str, Any]) -> tuple[str, str]:
    """A restart's own CPU (measure_restart) as a table row."""
    return (
        f"{label}: the new process's CPU to its first request / to all reconciled; host load then",
        f"{restart.get('operator_cpu_seconds_to_first_request')} / "
        f"{restart.get('operator_cpu_seconds_to_all_reconciled')} s; {restart.get('host_load_1min_at_start')}",
    )


def shared(shares: dict[str, int] | None) -> str:
    """How the host's CPUs were shared (--operator-cpu-request)."""
    if not shares:
        return "on equal terms (every process)"
    return f"by requests (cgroup cpu.shares): operator {shares['operator']}m, everything else {shares['sandbox']}m"


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    out = [
        f"## Scale: {result['settings']['resources']} LoraResume resources in the sandbox ({result['date']})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']}. "
        "Shared with other work: load average before / after "
        f"{result['load_before']['loadavg_1_5_15']} / {result['load_after']['loadavg_1_5_15']}, so times are noisy "
        "and include CPU contention (the control plane, the node agent, the S3 server, the stand-in trainers and the "
        f"operator all share the same cores, {shared(result.get('cpu_shares_millicpu'))}).",
        "",
        "Setup: the sandbox cluster: etcd, kube-apiserver, kube-controller-manager and kube-scheduler (v1.37) as "
        "local processes, the Helm chart's CRD, ServiceAccount and RBAC applied, the operator as a process started "
        "as the chart's Deployment runs it (`loraresume-operator -A`, `watch.clusterWide`, the chart's reconcile "
        "interval unless `--interval`) with a token of its ServiceAccount; its API requests counted from the API "
        "server's audit log (its user only; a watch once). A node agent plays the kubelets of a spot pool of "
        "`--capacity` GPUs and runs each pod as the stand-in trainer (`loraresume_sandbox.stand_in_trainer`: the "
        "trainer's CLI, checkpoint store, progress.json and exit codes around a timed loop, no torch); each "
        "resource asks for one GPU, so the real scheduler keeps further pods Pending (Unschedulable) until one "
        f"ends. S3: {(result.get('s3_server') or {}).get('what', 'moto')}, on loopback. "
        "Wave 1: N resources at once to Succeeded, then deleted. Wave 2: N more, with pod losses "
        "(half `delete pod`, half a spot reclaim of the pod's node: taint, DisruptionTarget, SIGTERM, the Node "
        "replaced) and an operator SIGKILL + restart while loaded. Steady: with N Succeeded resources present and "
        "the operator settled, long runs are lost and relaunched (`--steady-how reclaim`: every node holding one "
        'reclaimed at once), then the operator is restarted. "Reconciled" after a restart: the new process has '
        "decided on the resource (its loraresume_resources gauge counts every resource it reconciled).",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    out += [f"| {k} | {v} |" for k, v in table(result)]
    w1 = result.get("wave1")
    if w1:
        n = w1["resources"]
        out += [
            "",
            "Wave 1 API requests (client, verb, resource), per Succeeded resource:",
            "",
            "| request | count | per resource |",
            "| --- | ---: | ---: |",
        ]
        out += [f"| {k} | {c} | {c / n:.2f} |" for k, c in w1["api_requests_by_kind"].items()]
    return "\n".join(out) + "\n"


def _fraction(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resources", type=int, default=500, help="resources per wave (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of pods to disrupt")
    parser.add_argument("--capacity", type=int, default=25, help="GPUs of the spot pool: trainers at once")
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=1,
        help="GPUs per spot node (a reclaim ends every pod of its node; divides --capacity)",
    )
    parser.add_argument("--steps", type=int, default=12, help="stand-in training steps (maxSteps)")
    parser.add_argument("--save-steps", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--step-seconds", type=float, default=0.3, help="wall time of one stand-in step")
    parser.add_argument("--logging-steps", type=int, default=3, help="steps between progress.json writes")
    parser.add_argument("--disrupt", type=int, default=50, help="running pods ended for the relaunch latency")
    parser.add_argument(
        "--disrupt-at", type=float, default=0.2, help="fraction of wave 2 Succeeded before pods are ended"
    )
    parser.add_argument(
        "--restart-at",
        type=_fraction,
        default=0.5,
        help="fraction of wave 2 Succeeded when the operator is SIGKILLed ('none' to skip)",
    )
    parser.add_argument("--down-seconds", type=float, default=5.0, help="how long the operator stays down")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="steady-state window after wave 1")
    parser.add_argument(
        "--interval",
        type=float,
        default=None,
        help="the operator's periodic reconcile interval (chart value reconcileIntervalSeconds); default: the chart's",
    )
    parser.add_argument(
        "--steady-disrupt", type=int, default=20, help="long runs lost and relaunched in the steady phase"
    )
    parser.add_argument("--steady-steps", type=int, default=120, help="steps of the steady phase's long runs")
    parser.add_argument("--steady-step-seconds", type=float, default=1.0, help="their step time")
    parser.add_argument(
        "--steady-how",
        choices=("mixed", "reclaim"),
        default="mixed",
        help="how the steady phase ends its long runs: half deleted, half reclaimed (mixed), or every node "
        "holding one reclaimed at once (reclaim: a spot pool taken back)",
    )
    parser.add_argument("--skip-steady", action="store_true", help="no steady phase")
    parser.add_argument(
        "--quiet-seconds",
        type=float,
        default=None,
        help="no request for this long = the operator settled (default: 0.6 x interval)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds any one wait may take")
    parser.add_argument("--skip-wave1", action="store_true", help="only the disrupted wave")
    parser.add_argument("--workdir", help="where pods' directories and logs go (default: a temporary dir)")
    parser.add_argument(
        "--request-log",
        help="write every answered API request of the operator (not watches) and "
        "every change this script's watches see here",
    )
    parser.add_argument(
        "--py-spy",
        metavar="DIR",
        help="sample every operator process with py-spy (pip install py-spy) into DIR/operator-N.txt "
        "(collapsed stacks); it costs CPU on the same cores, so a profiled run's times are not reported",
    )
    parser.add_argument(
        "--py-spy-seconds", type=float, default=0.0, help="with --py-spy: sample each process's first N s only"
    )
    parser.add_argument(
        "--py-spy-gil",
        action="store_true",
        help="with --py-spy: sample only the thread holding the GIL (the operator's CPU), not every thread",
    )
    parser.add_argument(
        "--s3-server",
        choices=S3_SERVERS,
        default="moto",
        help="the S3 server on loopback: moto (one Python process; the default, as in rounds 1 and 2) or go "
        "(gofakes3, built from Go modules by tools/s3/build.sh, or $LORARESUME_S3_SERVER)",
    )
    parser.add_argument(
        "--operator-cpu-request",
        type=int,
        metavar="MILLICPU",
        help="share the host's CPUs as a Kubernetes node does by requests: the operator's cgroup gets this "
        "request's cpu.shares, everything else the rest of the host (CpuShares; needs cgroup v1). Default: "
        "every process on equal terms",
    )
    parser.add_argument("--json", help="write the result as JSON here")
    parser.add_argument("--markdown", help="write a markdown section here")
    args = parser.parse_args(argv)
    if args.gpus_per_node < 1 or args.capacity % args.gpus_per_node:
        parser.error("--gpus-per-node must divide --capacity")
    if args.operator_cpu_request is not None and (refused := CpuShares.refusal(args.operator_cpu_request)):
        parser.error(refused)
    if args.interval is None:
        args.interval = chart_interval()
    if args.quiet_seconds is None:
        args.quiet_seconds = 0.6 * args.interval

    bench = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the teardown (the stand-ins have own sessions)
    try:
        result = bench.run()
    except BaseException:
        print(f"benchmark failed; logs in {bench.workdir}", file=sys.stderr)
        if args.json:
            Path(args.json).with_suffix(".partial.json").write_text(json.dumps(bench.result, indent=2))
        raise
    problems = counting_problems(result)
    result["counting_problems"] = problems
    print()
    print(render_text(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(result))
    for problem in problems:
        print(f"COUNTING WRONG: {problem}", file=sys.stderr)
    return 1 if problems else 0


def counting_problems(result: dict[str, Any]) -> list[str]:
    """Every pod this benchmark ended (and that had not finished first) must be counted as exactly one
    preemption, and relaunched as the next attempt, never re-created under its own name unseen; an
    operator restart counts nothing again; no pod name is ever created twice."""
    problems = []
    for phase in ("wave2", "steady"):
        section = result.get(phase) or {}
        relaunch = section.get("relaunch_after_pod_loss") or {}
        if not relaunch:
            continue
        lost, counted = relaunch.get("pods", 0), section.get("preemptions_counted")
        if counted != lost:
            problems.append(f"{phase}: {lost} pods lost and relaunched, {counted} preemptions counted")
        if relaunch.get("relaunched_as_the_same_pod_name"):
            problems.append(f"{phase}: {relaunch['relaunched_as_the_same_pod_name']} re-created under the same name")
        for wrong in section.get("miscounted_resources") or []:
            problems.append(
                f"{phase}: {wrong['resource']}: {wrong['preemptions_counted']} preemptions counted, "
                f"{wrong['pods_lost_recorded']} of its pods lost"
            )
        after = section.get("preemptions_counted_after_restart")
        if after is not None and after != counted:
            problems.append(f"{phase}: {counted} preemptions before the operator restart, {after} after it")
    if result.get("pod_names_created_twice"):
        problems.append(f"pod names created twice: {result['pod_names_created_twice'][:10]}")
    return problems


if __name__ == "__main__":
    sys.exit(main())

"""A simulated kubelet: runs the emulator's pods as local processes (sandbox only).

`SimulatedKubelet` plays scheduler and kubelet for one node of the `KubernetesEmulator`:
it binds every unscheduled pod to its node, runs the pod's first container as a local
process and reports back through the status subresource what the real kubelet reports
(phase, conditions, containerStatuses with running/waiting/terminated states, exit codes,
reasons, the termination message). Pod deletion follows the kubelet's protocol: SIGTERM
to the process group, the grace period, SIGKILL, the final status, then the zero-grace
delete that lets the API server drop the pod. `preempt_node` simulates a node preemption.

    kubelet = SimulatedKubelet(k8s, workdir=tmp / "node", extra_env={"AWS_ENDPOINT_URL": url})
    kubelet.start()
    ...
    kubelet.preempt_node("default", "trainer-pod")     # DisruptionTarget, SIGTERM, ..., pod deleted
    kubelet.stop()

How a container maps onto a local process (there is no container runtime here):

- Command: the container's `command` + `args` when `command` is set; otherwise the image's
  entrypoint from `entrypoints` (image reference, the reference without tag/digest, or
  "*"; by default every image runs `python -m loraresume_trainer.cli`, the trainer
  image's ENTRYPOINT) + `args`. `$(VAR)` references are expanded as the kubelet does.
  Only the first container runs; any further containers are reported as mirroring the
  first one's state (a warning is logged).
- Environment: PATH and HOME of this process, then `extra_env` (sandbox settings such as
  the S3 endpoint), then the container's `env` (`value`, `valueFrom.secretKeyRef`,
  `valueFrom.configMapKeyRef`, and `valueFrom.fieldRef` for metadata.name/namespace/uid,
  spec.nodeName, status.podIP/hostIP). A missing Secret/ConfigMap or key that is not
  optional keeps the container waiting with reason CreateContainerConfigError and the
  kubelet's message (retried while the pod exists, as the kubelet does). `envFrom` is
  not supported.
- Files: each pod gets a directory `<workdir>/<namespace>/<name>-<uid prefix>/`, which
  is the process's working directory. Volumes are not mounted (no mount namespace):
  an emptyDir volume becomes `<pod dir>/volumes/<volume name>`, and env values that are
  paths at or under an emptyDir volumeMount's mountPath are rewritten into it (so
  HF_HOME=/work/hf becomes `<pod dir>/volumes/work/hf`; a mount at /tmp also sets
  TMPDIR). Other volume kinds are ignored.
- The trainer's job: when the env has LORARESUME_JOB holding a JSON object, its
  `workDir` is rewritten to `<pod dir>/work` and its `terminationLog` to
  `<pod dir>/termination-log` before the process starts.
- Termination message: whatever the container's terminationMessagePath is, it is read
  from `<pod dir>/termination-log` (a relative "termination-log" for the process) when
  the process ends, at most 4096 bytes; with FallbackToLogsOnError, an empty message and
  a non-zero exit, the last 80 lines / 2048 bytes of the log are used instead.
- Logs: stdout and stderr go to `<pod dir>/<container>.log`, served to `kubectl logs`
  through `KubernetesEmulator.set_log_source`.
- Exit codes: a death by signal N is reported as 128+N (SIGTERM 143, SIGKILL 137);
  reason Completed for 0, Error otherwise (never OOMKilled). restartPolicy is always
  treated as Never (others log a warning).

Pods bound to other nodes, and pods that were bound before this kubelet started, are left
alone (except that such pods on this node in graceful deletion are confirmed deleted).
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .k8s_api import KubernetesEmulator
from .k8s_errors import ApiError

log = logging.getLogger(__name__)

Object = dict[str, Any]

ENV_JOB = "LORARESUME_JOB"
TERMINATION_LOG = "termination-log"
MAX_MESSAGE_BYTES = 4096
FALLBACK_LINES, FALLBACK_BYTES = 80, 2048
PREEMPTION_MESSAGE = "sandbox: simulated node preemption"
LOCALHOST = "127.0.0.1"
_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ContainerConfigError(Exception):
    """The container cannot be created (the kubelet's CreateContainerConfigError)."""

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


@dataclass
class _Run:
    """One pod this kubelet runs (or failed to start)."""

    namespace: str
    name: str
    uid: str
    pod: Object  # the pod as bound (spec is immutable for what matters here)
    dir: Path
    start_time: str = field(default_factory=_now)
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    waiting: dict[str, str] | None = None  # reason/message while the container cannot start
    terminated: Object | None = None
    disruption: Object | None = None  # the DisruptionTarget condition, once preempted
    stopping: bool = False  # a termination (deletion or preemption) is under way
    exited: threading.Event = field(default_factory=threading.Event)  # the process has ended
    finished: threading.Event = field(default_factory=threading.Event)  # its final status is written
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)  # condition -> (status, since)
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


class SimulatedKubelet:
    """Binds and runs the emulator's pods as local processes; see the module docstring."""

    def __init__(
        self,
        k8s: KubernetesEmulator,
        *,
        node_name: str = "sandbox-node",
        workdir: Path,
        extra_env: dict[str, str] | None = None,
        python: str = sys.executable,
        entrypoints: dict[str, list[str]] | None = None,
        poll_interval: float = 0.5,
    ) -> None:
        self.k8s = k8s
        self.node_name = node_name
        self.workdir = Path(workdir)
        self.extra_env = dict(extra_env or {})
        self.python = python
        self.entrypoints = entrypoints if entrypoints is not None else {"*": [python, "-m", "loraresume_trainer.cli"]}
        self.poll_interval = poll_interval
        self._runs: dict[str, _Run] = {}  # by pod uid
        self._by_name: dict[tuple[str, str], _Run] = {}  # latest run per namespace/name (for logs)
        self._lock = threading.RLock()
        self._wake: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> SimulatedKubelet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._closed.clear()
        self.k8s.set_log_source(self.read_log)
        self._unsubscribe = self.k8s.subscribe(self._on_change)
        self._thread = threading.Thread(target=self._loop, name=f"kubelet-{self.node_name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace_seconds: float = 2.0) -> None:
        """Stop reconciling and end every process still running (SIGTERM, a short grace, SIGKILL)."""
        self._closed.set()
        self._wake.put(None)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        with self._lock:
            running = [run for run in self._runs.values() if run.running]
        for run in running:
            self._signal(run, signal.SIGTERM)
        for run in running:
            if not run.exited.wait(grace_seconds):
                self._signal(run, signal.SIGKILL)
            run.exited.wait(5)

    def __enter__(self) -> SimulatedKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- public helpers -------------------------------------------------------------------
    def pod_dir(self, namespace: str, name: str) -> Path | None:
        """The local directory of the latest pod run under that name, if any."""
        with self._lock:
            run = self._by_name.get((namespace, name))
        return run.dir if run else None

    def read_log(self, namespace: str, pod: str, container: str) -> str:
        """The log source for `kubectl logs`: the text the pod's process wrote so far."""
        with self._lock:
            run = self._by_name.get((namespace, pod))
        if run is None or (container and container != run.container["name"]):
            return ""
        try:
            return run.log_path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def preempt_node(
        self,
        namespace: str,
        pod_name: str,
        reason: str = "TerminationByKubelet",
        *,
        grace_period_seconds: int | None = None,
        wait: bool = True,
    ) -> threading.Thread | None:
        """Simulate the node under the pod going away.

        Adds the DisruptionTarget condition (True, `reason`), then SIGTERM, the grace period
        (the pod's terminationGracePeriodSeconds unless given), SIGKILL; the pod ends Failed
        with the container's terminated state and is then deleted (grace 0). Blocks until
        the pod is gone unless wait=False (then runs in a returned, started thread).
        """
        with self._lock:
            run = self._by_name.get((namespace, pod_name))
        if run is None or run.finished.is_set() or run.uid not in self._runs:
            raise LookupError(f"pod {namespace}/{pod_name} is not running on node {self.node_name}")
        if not wait:
            thread = threading.Thread(
                target=self._preempt, args=(run, reason, grace_period_seconds), name=f"preempt-{pod_name}", daemon=True
            )
            thread.start()
            return thread
        self._preempt(run, reason, grace_period_seconds)
        return None

    # -- event handling -------------------------------------------------------------------
    def _on_change(self, event_type: str, group_resource: str, obj: Object) -> None:
        # Runs under the store lock: only wake the loop, never call back into the emulator.
        if group_resource in ("pods", "secrets", "configmaps"):
            self._wake.put(None)

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                self._reconcile()
            except Exception:
                log.exception("simulated kubelet: reconcile failed")
            try:
                self._wake.get(timeout=self.poll_interval)
                while True:  # coalesce a burst of events into one pass
                    self._wake.get_nowait()
            except queue.Empty:
                pass

    def _reconcile(self) -> None:
        pods = self.k8s.list("pods")
        present = set()
        for pod in pods:
            if self._closed.is_set():
                return
            meta, spec = pod["metadata"], pod.get("spec") or {}
            uid = meta["uid"]
            present.add(uid)
            with self._lock:
                run = self._runs.get(uid)
            if run is None:
                if not spec.get("nodeName"):
                    if not meta.get("deletionTimestamp"):
                        self._admit(pod)
                elif spec["nodeName"] == self.node_name and meta.get("deletionTimestamp"):
                    self._confirm_deletion(meta["namespace"], meta["name"], uid)
                continue
            if meta.get("deletionTimestamp"):
                self._begin_termination(run, int(meta.get("deletionGracePeriodSeconds") or 0) or None, delete=True)
            elif run.waiting is not None and not run.stopping:
                self._try_start(run)
        with self._lock:
            gone = [run for uid, run in self._runs.items() if uid not in present]
        for run in gone:
            if run.running and not run.stopping:  # force-deleted (grace 0) while running: end it anyway
                self._begin_termination(run, None, delete=False)
            elif not run.running:
                with self._lock:
                    self._runs.pop(run.uid, None)

    # -- starting -------------------------------------------------------------------------
    def _admit(self, pod: Object) -> None:
        meta = pod["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        try:
            bound = self.k8s.patch(
                "pods", namespace, name, {"metadata": {"uid": uid}, "spec": {"nodeName": self.node_name}}
            )
        except ApiError as exc:
            log.warning("simulated kubelet: cannot bind pod %s/%s: %s", namespace, name, exc)
            return
        if bound["metadata"]["uid"] != uid:
            return
        restart = bound["spec"].get("restartPolicy", "Always")
        if restart != "Never":
            log.warning("simulated kubelet: pod %s/%s has restartPolicy %s; treated as Never", namespace, name, restart)
        if len(bound["spec"]["containers"]) > 1:
            log.warning("simulated kubelet: pod %s/%s: only its first container runs", namespace, name)
        pod_dir = self.workdir / _SAFE.sub("_", namespace) / f"{_SAFE.sub('_', name)}-{uid[:8]}"
        pod_dir.mkdir(parents=True, exist_ok=True)
        run = _Run(namespace=namespace, name=name, uid=uid, pod=bound, dir=pod_dir)
        with self._lock:
            self._runs[uid] = run
            self._by_name[(namespace, name)] = run
        self._try_start(run)

    def _try_start(self, run: _Run) -> None:
        with run.lock:
            if run.proc is not None or run.stopping:
                return
            try:
                env = self._environment(run)
                argv = [expand_refs(arg, env) for arg in self._command(run)]
            except ContainerConfigError as exc:
                waiting = {"reason": exc.reason, "message": str(exc)}
                if waiting != run.waiting:
                    run.waiting = waiting
                    log.info("simulated kubelet: pod %s/%s: %s", run.namespace, run.name, exc)
                    self._write_status(run)
                return
            run.waiting = None
            with open(run.log_path, "ab") as logfile:  # the child keeps its own descriptor
                try:
                    run.proc = subprocess.Popen(
                        argv,
                        cwd=run.dir,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=logfile,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group, signalled as a whole
                    )
                except OSError as exc:
                    logfile.write(f"sandbox kubelet: cannot start {argv[0]!r}: {exc}\n".encode())
                    failure = str(exc)
                else:
                    failure = None
            if failure is not None:
                run.started_at = _now()
                self._finish(run, 128, reason="StartError", message=failure)
                return
            run.started_at = _now()
            log.info("simulated kubelet: pod %s/%s started (pid %d)", run.namespace, run.name, run.proc.pid)
            self._write_status(run)
        threading.Thread(target=self._watch, args=(run,), name=f"pod-{run.name}", daemon=True).start()

    def _command(self, run: _Run) -> list[str]:
        container = run.container
        args = [str(a) for a in container.get("args") or []]
        if container.get("command"):
            return [str(c) for c in container["command"]] + args
        image = str(container.get("image", ""))
        bare = re.sub(r"@.*$", "", image)
        if ":" in bare.rsplit("/", 1)[-1]:
            bare = bare.rsplit(":", 1)[0]
        for key in (image, bare, "*"):
            if key in self.entrypoints:
                return list(self.entrypoints[key]) + args
        raise ContainerConfigError(f'sandbox: no entrypoint known for image "{image}"', reason="ErrImagePull")

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
            if "valueFrom" in var and var["valueFrom"]:
                value = self._value_from(run, var["valueFrom"])
                if value is None:
                    continue
            else:
                value = expand_refs(str(var.get("value", "")), {**env, **pod_env})
            pod_env[name] = _rewrite_path(value, mounts)
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
        return sorted(mounts, key=lambda m: -len(m[0]))  # the most specific mount first

    def _value_from(self, run: _Run, source: Object) -> str | None:
        meta = run.pod["metadata"]
        for kind, resource, label in (
            ("secretKeyRef", "secrets", "Secret"),
            ("configMapKeyRef", "configmaps", "ConfigMap"),
        ):
            ref = source.get(kind)
            if not ref:
                continue
            obj_name, key, optional = ref.get("name", ""), ref.get("key", ""), bool(ref.get("optional", False))
            obj = self.k8s.get(resource, run.namespace, obj_name)
            if obj is None:
                if optional:
                    return None
                raise ContainerConfigError(f'{resource[:-1]} "{obj_name}" not found')
            if resource == "secrets":
                data = obj.get("data") or {}
                if key in data:
                    return base64.b64decode(data[key]).decode("utf-8", errors="replace")
                if key in (obj.get("stringData") or {}):
                    return str(obj["stringData"][key])
            else:
                if key in (obj.get("data") or {}):
                    return str(obj["data"][key])
                if key in (obj.get("binaryData") or {}):
                    return base64.b64decode(obj["binaryData"][key]).decode("utf-8", errors="replace")
            if optional:
                return None
            raise ContainerConfigError(f"couldn't find key {key} in {label} {run.namespace}/{obj_name}")
        ref = source.get("fieldRef")
        if ref:
            fields = {
                "metadata.name": meta["name"],
                "metadata.namespace": meta["namespace"],
                "metadata.uid": meta["uid"],
                "spec.nodeName": self.node_name,
                "spec.serviceAccountName": run.pod["spec"].get("serviceAccountName", "default"),
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
            return text  # a path to a config file, or YAML: left as is
        if not isinstance(job, dict):
            return text
        (run.dir / "work").mkdir(exist_ok=True)
        job["workDir"] = str(run.dir / "work")
        job["terminationLog"] = str(run.dir / TERMINATION_LOG)
        return json.dumps(job, separators=(",", ":"))

    # -- running and ending ---------------------------------------------------------------
    def _watch(self, run: _Run) -> None:
        assert run.proc is not None
        returncode = run.proc.wait()
        run.exited.set()
        code = exit_code_of(returncode)
        message = self._termination_message(run, code)
        self._finish(run, code, reason="Completed" if code == 0 else "Error", message=message)

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
                "startedAt": run.started_at or _now(),
                "finishedAt": _now(),
                "containerID": f"sandbox://{run.proc.pid if run.proc else 0}",
            }
            if message:
                terminated["message"] = message
            run.terminated = terminated
            run.exited.set()
            if not self._closed.is_set():
                self._write_status(run)
            run.finished.set()
        log.info("simulated kubelet: pod %s/%s ended with exit code %d", run.namespace, run.name, code)
        self._wake.put(None)

    def _signal(self, run: _Run, sig: signal.Signals) -> None:
        if run.proc is None or run.exited.is_set():
            return
        try:
            os.killpg(run.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _begin_termination(self, run: _Run, grace: int | None, *, delete: bool) -> None:
        with run.lock:
            if run.stopping:
                return
            run.stopping = True
        threading.Thread(
            target=self._terminate, args=(run, grace, delete), name=f"kill-{run.name}", daemon=True
        ).start()

    def _terminate(self, run: _Run, grace: int | None, delete: bool) -> None:
        """SIGTERM, the grace period, SIGKILL; wait for the final status; confirm the deletion."""
        if grace is None:
            grace = int(run.pod["spec"].get("terminationGracePeriodSeconds", 30))
        if run.running:
            self._signal(run, signal.SIGTERM)
            if not run.exited.wait(max(grace, 0)):
                log.info("simulated kubelet: pod %s/%s ignored SIGTERM for %d s: SIGKILL", run.namespace, run.name, grace)
                self._signal(run, signal.SIGKILL)
            run.finished.wait(30)
        if delete:
            self._confirm_deletion(run.namespace, run.name, run.uid)
        self._wake.put(None)

    def _confirm_deletion(self, namespace: str, name: str, uid: str) -> None:
        current = self.k8s.get("pods", namespace, name)
        if current is None or current["metadata"]["uid"] != uid:
            return
        try:
            self.k8s.delete("pods", namespace, name, grace_period_seconds=0)
        except ApiError as exc:
            log.warning("simulated kubelet: cannot confirm deletion of %s/%s: %s", namespace, name, exc)

    def _preempt(self, run: _Run, reason: str, grace: int | None) -> None:
        with run.lock:
            run.disruption = {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": reason,
                "message": PREEMPTION_MESSAGE,
                "lastTransitionTime": _now(),
            }
            already = run.stopping
            run.stopping = True
            if not run.finished.is_set():
                self._write_status(run)
        if already:
            run.finished.wait(60)
        else:
            self._terminate(run, grace, delete=False)
        if run.proc is None and not run.finished.is_set():  # never started (config error)
            self._finish(run, 137, reason="Error", message="")
        self._confirm_deletion(run.namespace, run.name, run.uid)
        self._wake.put(None)

    # -- status ---------------------------------------------------------------------------
    def _write_status(self, run: _Run) -> None:
        """Replace the pod's status with what this run looks like now (PUT .../status)."""
        with run.lock:
            status = self._status(run)
            try:
                current = self.k8s.get("pods", run.namespace, run.name)
                if current is None or current["metadata"]["uid"] != run.uid:
                    return
                status["qosClass"] = (current.get("status") or {}).get("qosClass", "BestEffort")
                self.k8s.update_status("pods", run.namespace, run.name, status)
            except ApiError as exc:
                if exc.code != 404:
                    log.warning("simulated kubelet: status of %s/%s not written: %s", run.namespace, run.name, exc)

    def _condition(self, run: _Run, type_: str, value: bool, reason: str = "", message: str = "") -> Object:
        status = "True" if value else "False"
        previous = run.transitions.get(type_)
        since = previous[1] if previous and previous[0] == status else _now()
        run.transitions[type_] = (status, since)
        cond: Object = {"type": type_, "status": status, "lastProbeTime": None, "lastTransitionTime": since}
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        return cond

    def _status(self, run: _Run) -> Object:
        names = [c["name"] for c in run.pod["spec"]["containers"]]
        if run.terminated is not None:
            failed = run.terminated["exitCode"] != 0 or run.disruption is not None
            phase = "Failed" if failed else "Succeeded"
            state: Object = {"terminated": run.terminated}
            ready = False
            not_ready = ("PodCompleted", "")
        elif run.proc is not None:
            phase, state, ready, not_ready = "Running", {"running": {"startedAt": run.started_at}}, True, ("", "")
        else:
            phase = "Pending"
            state = {"waiting": dict(run.waiting or {"reason": "ContainerCreating"})}
            ready = False
            not_ready = ("ContainersNotReady", f"containers with unready status: [{' '.join(names)}]")
        conditions = [
            self._condition(run, "PodScheduled", True),
            self._condition(run, "Initialized", True),
            self._condition(run, "ContainersReady", ready, *not_ready),
            self._condition(run, "Ready", ready, *not_ready),
        ]
        if run.disruption is not None:
            conditions.append(run.disruption)
        statuses = []
        for i, container in enumerate(run.pod["spec"]["containers"]):
            cstate = state
            if i > 0 and "terminated" in state:  # extra containers are not run: they "complete" with it
                cstate = {"terminated": {**state["terminated"], "exitCode": 0, "reason": "Completed"}}
                cstate["terminated"].pop("message", None)
            entry: Object = {
                "name": container["name"],
                "ready": ready,
                "restartCount": 0,
                "image": container.get("image", ""),
                "imageID": "",
                "started": "running" in cstate,
                "state": cstate,
                "lastState": {},
            }
            if run.proc is not None:
                entry["containerID"] = f"sandbox://{run.proc.pid}"
            statuses.append(entry)
        status: Object = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": LOCALHOST,
            "hostIPs": [{"ip": LOCALHOST}],
            "podIP": LOCALHOST,
            "podIPs": [{"ip": LOCALHOST}],
            "startTime": run.start_time,
            "containerStatuses": statuses,
        }
        if run.disruption is not None and run.terminated is not None:
            status["reason"] = "Terminated"
            status["message"] = PREEMPTION_MESSAGE
        return status


def _rewrite_path(value: str, mounts: list[tuple[str, Path]]) -> str:
    """A container path at or under an emptyDir mount, as the local directory standing in for it."""
    for mount_path, local in mounts:
        if value == mount_path:
            return str(local)
        if value.startswith(mount_path.rstrip("/") + "/"):
            return str(local / value[len(mount_path.rstrip("/")) + 1 :])
    return value

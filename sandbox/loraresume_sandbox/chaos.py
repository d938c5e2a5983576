"""Seeded chaos runs against the whole sandbox: disrupt real processes, demand a bitwise-equal adapter.

Every run applies one LoraResume (the tiny seeded model, a few dozen steps) to a stack of real
processes: the sandbox's real control plane (kube-apiserver, scheduler, controllers) with the
chart installed, the node agent running trainer pods as local processes, a moto S3 server
behind the fault-injecting proxy (`s3_faults`), and the operator as its own process running as
the chart's ServiceAccount. A seeded schedule of 1-4
disruptions hits the run; it must still end Succeeded with an adapter whose files are
byte-for-byte those of an uninterrupted run of the same spec (the reference, computed once
per spec variant through the same stack).

Disruption kinds (`KINDS`):

- ``sigkill``: SIGKILL to the trainer's process group (a crash, an OOM kill) while it trains.
- ``sigterm``: the trainer pod deleted with its grace period (``kubectl delete pod``): SIGTERM.
- ``upload_kill``: SIGKILL while a checkpoint upload is provably in flight: the proxy holds the
  k-th file PUT of the attempt's first or second checkpoint (after the second, one is complete);
  the kill lands while S3 has some of the checkpoint's files and no manifest.
- ``download_kill``: SIGKILL while a resumed attempt downloads its checkpoint: the proxy holds
  the k-th file GET; the kill lands before the trainer's ``start`` event, with the partial
  download directory on disk.
- ``preempt``: a spot reclaim of the node under the pod (`NodeAgent.reclaim_spot`: taint,
  DisruptionTarget, SIGTERM, the grace period, SIGKILL, the Node deleted and replaced).
- ``operator_restart``: SIGKILL to the operator, a seeded downtime, a new operator process;
  either while a trainer runs (window ``training``) or right after a trainer was disrupted,
  before the next attempt's pod exists (window ``relaunch``).

For each disruption the report counts whether it was delivered (the signal/deletion/preemption
reached a live target) and whether it hit its intended window (checked independently at the
moment of delivery: e.g. for ``upload_kill``, S3 itself shows the checkpoint's files without
its ``_COMPLETE.json``). A disruption whose window never comes (the run finished first) is
neither (e.g. a download kill after a kill that left no complete checkpoint: nothing is
downloaded). The schedule is a function of the seed; process timing is not, so delivered counts
can differ between two runs of one seed.

Adapters are compared file by file, byte for byte, except `NORMALIZED_FILES` (compared by
meaning unless ``--strict``): PEFT writes adapter_config.json's target_modules from a set, in an
order that follows the process's string-hash seed, and README.md names the pod-local path of
the base model.

    python -m loraresume_sandbox.chaos --runs 50 --seed 7 [--s3-fault-rate 0.05]

A development tool only (sandbox): nothing here runs on a real cluster.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import AWS, BUCKET, NAMESPACE, OFFLINE, SECRET, _wait_http, create_s3_secret
from .node_agent import CONTAINER_ID_SCHEME
from .s3_faults import RequestInfo, S3FaultProxy, checkpoint_file, uniform_rates
from .waiting import free_port, stop_process, wait_for

log = logging.getLogger(__name__)

KINDS = ("sigkill", "sigterm", "upload_kill", "download_kill", "preempt", "operator_restart")
# Disruptions that end the running trainer attempt (the operator must relaunch it).
TRAINER_ENDING = frozenset(KINDS) - {"operator_restart"}
MANIFEST = "_COMPLETE.json"
TERMINAL = ("Succeeded", "Failed")
POLL = 0.05
TRIGGER_TIMEOUT = 300.0  # an attempt starts in ~10 s on an idle 2-core machine; generous under load
RUN_TIMEOUT = 900.0


# -- the schedule (pure) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """The spec knobs a run draws; one reference run per variant."""

    max_steps: int
    save_steps: int

    @property
    def name(self) -> str:
        return f"steps{self.max_steps}-save{self.save_steps}"


VARIANTS = (Variant(30, 3), Variant(36, 4), Variant(40, 5))


@dataclass(frozen=True)
class Disruption:
    kind: str
    after_steps: int = 1  # step kinds: steps past the attempt's start step
    file_index: int = 2  # upload/download kills: hold the k-th file request of a checkpoint (k >= 2)
    nth_checkpoint: int = 1  # upload kill: in the attempt's n-th checkpoint upload (n=2: one is complete)
    window: str = "training"  # operator_restart: "training" or "relaunch"
    downtime: float = 0.0  # operator_restart: seconds without an operator

    def describe(self) -> str:
        if self.kind == "upload_kill":
            return f"{self.kind}(checkpoint {self.nth_checkpoint}, file {self.file_index})"
        if self.kind == "download_kill":
            return f"{self.kind}(file {self.file_index})"
        if self.kind == "operator_restart":
            where = "relaunch" if self.window == "relaunch" else f"+{self.after_steps} steps"
            return f"operator_restart({where}, down {self.downtime:.1f}s)"
        return f"{self.kind}(+{self.after_steps} steps)"


@dataclass(frozen=True)
class RunPlan:
    index: int
    seed: int
    variant: Variant
    disruptions: tuple[Disruption, ...]

    def describe(self) -> str:
        return ", ".join(d.describe() for d in self.disruptions) or "no disruption"


def plan_run(index: int, seed: int, variants: Iterable[Variant] = VARIANTS) -> RunPlan:
    """One run's variant and 1-4 disruptions, from `seed` alone.

    A ``download_kill`` only follows a disruption that ends the trainer (only a resumed attempt
    downloads a checkpoint), and so does an operator restart in the ``relaunch`` window.
    """
    rng = random.Random(seed)
    variant = rng.choice(tuple(variants))
    disruptions: list[Disruption] = []
    for _ in range(rng.randint(1, 4)):
        after_trainer_end = bool(disruptions) and disruptions[-1].kind in TRAINER_ENDING
        kinds = [k for k in KINDS if k != "download_kill" or after_trainer_end]
        kind = rng.choice(kinds)
        window = "relaunch" if kind == "operator_restart" and after_trainer_end and rng.random() < 0.5 else "training"
        disruptions.append(
            Disruption(
                kind=kind,
                after_steps=rng.randint(1 if kind != "operator_restart" else 0, 2 * variant.save_steps),
                file_index=rng.randint(2, 8),
                window=window,
                downtime=round(rng.uniform(0.0, 3.0), 1),
                nth_checkpoint=rng.randint(1, 2),
            )
        )
    return RunPlan(index, seed, variant, tuple(disruptions))


def plan_runs(seed: int, runs: int, variants: Iterable[Variant] = VARIANTS) -> list[RunPlan]:
    """`runs` run plans derived from one session seed (run i's seed is the i-th draw)."""
    rng = random.Random(seed)
    variants = tuple(variants)
    return [plan_run(i + 1, rng.randrange(2**31), variants) for i in range(runs)]


# -- comparing adapters ----------------------------------------------------------------------------
# Files of a published adapter that are not byte-reproducible across processes (trainer findings),
# compared by meaning unless strict; every other file byte for byte.
NORMALIZED_FILES = {
    "adapter_config.json": "as JSON, target_modules order ignored (PEFT keeps a set: its order follows the "
    "process's string-hash seed)",
    "README.md": "without its base_model lines (PEFT's model card names the pod-local cache path of the base model)",
}
_BASE_MODEL_LINE = re.compile(rb"^.*base_model.*$", re.MULTILINE)


def _normalized(path: str, data: bytes) -> bytes:
    if path == "adapter_config.json":
        doc = json.loads(data)
        if isinstance(doc.get("target_modules"), list):
            doc["target_modules"] = sorted(doc["target_modules"])
        return json.dumps(doc, sort_keys=True).encode()
    if path == "README.md":
        return _BASE_MODEL_LINE.sub(b"base_model: <normalized>", data)
    return data


def read_adapter(s3: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    """The files of the adapter published under s3://bucket/prefix (as its manifest lists them)."""
    from loraresume_trainer.manifest import Manifest

    prefix = prefix.rstrip("/") + "/" if prefix else ""
    key = f"{prefix}adapter/{MANIFEST}"
    manifest = Manifest.from_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), source=key)
    return {
        f.path: s3.get_object(Bucket=bucket, Key=f"{prefix}adapter/{f.path}")["Body"].read() for f in manifest.files
    }


def adapter_differences(got: dict[str, bytes], reference: dict[str, bytes], *, strict: bool = False) -> list[str]:
    """Files that differ (or exist on one side only); `NORMALIZED_FILES` by meaning unless `strict`."""
    differing = []
    for path in sorted(set(got) | set(reference)):
        mine, theirs = got.get(path), reference.get(path)
        if mine is None or theirs is None:
            differing.append(f"{path} ({'missing' if mine is None else 'unexpected'})")
        elif mine != theirs and (
            strict or path not in NORMALIZED_FILES or _normalized(path, mine) != _normalized(path, theirs)
        ):
            differing.append(path)
    return differing


# -- results ---------------------------------------------------------------------------------------
@dataclass
class Delivery:
    kind: str
    attempt: int | None = None
    delivered: bool = False
    hit: bool = False
    note: str = ""


@dataclass
class RunResult:
    plan: RunPlan
    outcome: str  # ok | mismatch | failed
    seconds: float
    deliveries: list[Delivery] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    accounting: str = ""  # non-empty: status counters disagree with what was delivered

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def line(self) -> str:
        st = self.status
        return (
            f"run {self.plan.index} seed {self.plan.seed} {self.plan.variant.name} [{self.plan.describe()}]: "
            f"{self.outcome.upper()} in {self.seconds:.0f}s (attempts {st.get('attempt')}, preemptions "
            f"{st.get('preemptions')}, failures {st.get('failures')}; delivered "
            f"{sum(d.delivered for d in self.deliveries)}/{len(self.deliveries)}, hit "
            f"{sum(d.hit for d in self.deliveries)})"
            + (f" {self.detail}" if self.detail else "")
            + (f" [accounting: {self.accounting}]" if self.accounting else "")
        )


@dataclass
class Summary:
    results: list[RunResult]
    seconds: float
    proxy_counts: dict[str, int] = field(default_factory=dict)
    strict: bool = False

    @property
    def mismatches(self) -> int:
        return sum(r.outcome == "mismatch" for r in self.results)

    @property
    def failures(self) -> int:
        return sum(r.outcome == "failed" for r in self.results)

    def by_kind(self) -> dict[str, tuple[int, int, int]]:
        """kind -> (planned, delivered, hit window)."""
        out: dict[str, list[int]] = {k: [0, 0, 0] for k in KINDS}
        for result in self.results:
            for d in result.deliveries:
                out[d.kind][0] += 1
                out[d.kind][1] += d.delivered
                out[d.kind][2] += d.hit
        return {k: (v[0], v[1], v[2]) for k, v in out.items()}

    def to_json(self, *, seed: int | None = None, fault_rate: float = 0.0) -> dict[str, Any]:
        return {
            "seed": seed,
            "s3_fault_rate": fault_rate,
            "runs": len(self.results),
            "seconds": round(self.seconds, 1),
            "mismatches": self.mismatches,
            "failures": self.failures,
            "strict": self.strict,
            "by_kind": {
                k: dict(zip(("planned", "delivered", "hit"), v, strict=True)) for k, v in self.by_kind().items()
            },
            "proxy": self.proxy_counts,
            "results": [
                {
                    "index": r.plan.index,
                    "seed": r.plan.seed,
                    "variant": r.plan.variant.name,
                    "outcome": r.outcome,
                    "seconds": round(r.seconds, 1),
                    "plan": r.plan.describe(),
                    "detail": r.detail,
                    "accounting": r.accounting,
                    "status": {
                        k: r.status.get(k) for k in ("phase", "attempt", "preemptions", "failures", "lostSteps")
                    },
                    "deliveries": [d.__dict__ for d in r.deliveries],
                }
                for r in self.results
            ],
        }

    def report(self, *, seed: int | None = None, fault_rate: float = 0.0) -> str:
        lines = [
            f"chaos: {len(self.results)} runs"
            + (f", seed {seed}" if seed is not None else "")
            + f", S3 fault rate {fault_rate:g}"
        ]
        lines.append(f"  {'kind':<17}{'planned':>8}{'delivered':>10}{'hit window':>11}")
        totals = [0, 0, 0]
        for kind, (planned, delivered, hit) in self.by_kind().items():
            lines.append(f"  {kind:<17}{planned:>8}{delivered:>10}{hit:>11}")
            totals = [totals[0] + planned, totals[1] + delivered, totals[2] + hit]
        lines.append(f"  {'total':<17}{totals[0]:>8}{totals[1]:>10}{totals[2]:>11}")
        anomalies = sum(bool(r.accounting) for r in self.results)
        lines.append(f"  succeeded bitwise equal: {sum(r.ok for r in self.results)}")
        lines.append(
            f"  mismatches: {self.mismatches}"
            + ("" if self.strict else f" (byte for byte except {', '.join(NORMALIZED_FILES)}: by meaning)")
        )
        lines.append(f"  failures: {self.failures}")
        lines.append(f"  accounting anomalies (status counters vs delivered disruptions): {anomalies}")
        if self.proxy_counts:
            lines.append("  S3 proxy: " + ", ".join(f"{k} {v}" for k, v in self.proxy_counts.items()))
        lines.append(f"  wall time: {self.seconds:.0f} s")
        return "\n".join(lines)


# -- the stack -------------------------------------------------------------------------------------
class ChaosStack:
    """The sandbox's processes for chaos runs, with handles to disrupt them.

    moto S3 (subprocess) behind `S3FaultProxy` (clients use the proxy's endpoint), the sandbox
    cluster (control plane, chart, node agent in this process), the operator as a subprocess
    (killed and restarted by `restart_operator`), the seeded tiny model and dataset in S3.
    """

    def __init__(self, workdir: Path, *, fault_rate: float = 0.0, seed: int = 0, interval: float = 1.0) -> None:
        self.dir = Path(workdir).resolve()
        self.fault_rate = fault_rate
        self.seed = seed
        self.interval = interval
        self.moto: subprocess.Popen[bytes] | None = None
        self.proxy: S3FaultProxy | None = None
        self.cluster: Any = None
        self.k8s: Any = None
        self.agent: Any = None
        self.operator: Any = None
        self.operator_starts = 0
        self.unexpected_operator_exits = 0
        self._logs: list[Any] = []

    def start(self) -> ChaosStack:
        import boto3

        from .seed_data import seed_s3

        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start(boto3, seed_s3)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, boto3: Any, seed_s3: Any) -> None:
        from .cluster import SandboxCluster, sandbox_values

        moto_port = free_port()
        moto_log = open(self.dir / "moto.log", "ab")
        self._logs.append(moto_log)
        self.moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
            stdout=moto_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.moto_endpoint = f"http://127.0.0.1:{moto_port}"
        _wait_http(f"{self.moto_endpoint}/moto-api/", 120, self.moto)
        # Our own view of S3 goes around the proxy: checks must not meet injected faults.
        self.s3 = boto3.client(
            "s3",
            endpoint_url=self.moto_endpoint,
            region_name=AWS["AWS_DEFAULT_REGION"],
            aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
        )
        self.s3.create_bucket(Bucket=BUCKET)
        self.proxy = S3FaultProxy(self.moto_endpoint, rates=uniform_rates(self.fault_rate), seed=self.seed).start()
        self.seed_uris = seed_s3(self.s3, BUCKET, self.dir / "seed", rows=40)

        extra = {
            **OFFLINE,
            "HF_HOME": str(self.dir / "hf"),
            "TRITON_CACHE_DIR": str(self.dir / "triton"),
            "AWS_DEFAULT_REGION": AWS["AWS_DEFAULT_REGION"],
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.cluster = SandboxCluster(
            self.dir / "cluster",
            namespaces=(NAMESPACE,),
            extra_env=extra,
            values=sandbox_values(namespaces=[NAMESPACE], interval=self.interval),
            with_operator=False,
            quiet=True,
        ).start()
        self.k8s, self.agent, self.kubeconfig = self.cluster.kube, self.cluster.agent, self.cluster.kubeconfig
        create_s3_secret(self.k8s)
        self.start_operator()

    def stop(self) -> None:
        self.kill_operator(signal.SIGTERM)
        if self.cluster is not None:
            self.cluster.stop()
        if self.proxy is not None:
            self.proxy.stop()
        stop_process(self.moto, 20)
        for f in self._logs:
            f.close()

    def __enter__(self) -> ChaosStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """The S3 endpoint the operator and the trainers use (the fault proxy)."""
        assert self.proxy is not None
        return self.proxy.endpoint

    # -- the operator ------------------------------------------------------------------------
    def start_operator(self) -> None:
        self.operator_starts += 1
        with open(self.dir / "operator.log", "ab") as log_file:
            log_file.write(f"\n==== chaos: operator start #{self.operator_starts} at {time.time():.3f}\n".encode())
        self.operator = self.cluster.new_operator(log_path=self.dir / "operator.log")
        self.operator.start()

    def kill_operator(self, sig: int = signal.SIGKILL) -> bool:
        """Signal the operator and wait for it; False when it was not running."""
        if self.operator is None or not self.operator.running:
            return False
        self.operator.stop(sig, timeout=30)
        return True

    def ensure_operator(self) -> bool:
        """Restart the operator if it died on its own; True when it had (that is a finding)."""
        if self.operator is not None and self.operator.proc is not None and not self.operator.running:
            self.unexpected_operator_exits += 1
            log.error("the operator exited on its own with %s; restarting it", self.operator.proc.returncode)
            self.start_operator()
            return True
        return False

    def operator_log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.dir / "operator.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# -- one run ---------------------------------------------------------------------------------------
def trainer_events(text: str) -> list[dict[str, Any]]:
    """The trainer's JSON-line events from a pod log (stderr lines are skipped)."""
    events = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


class _Run:
    """The state of one LoraResume under chaos; helpers to observe it through the sandbox."""

    def __init__(self, stack: ChaosStack, name: str, variant: Variant) -> None:
        self.stack, self.name, self.variant = stack, name, variant
        self.prefix = f"chaos/{name}/"

    def body(self) -> dict[str, Any]:
        return {
            "apiVersion": "loraresume.dev/v1alpha1",
            "kind": "LoraResume",
            "metadata": {"name": self.name, "namespace": NAMESPACE},
            "spec": {
                "baseModel": self.stack.seed_uris["model"],
                "maxSeqLength": 128,
                "loadIn4bit": False,
                "lora": {"r": 8, "alpha": 16},
                "dataset": {"source": self.stack.seed_uris["dataset"], "template": "alpaca"},
                "training": {
                    "perDeviceTrainBatchSize": 2,
                    "gradientAccumulationSteps": 1,
                    "warmupSteps": 2,
                    "maxSteps": self.variant.max_steps,
                    "learningRate": 1e-3,
                    "optim": "adamw_torch",
                    "loggingSteps": 1,
                    "saveSteps": self.variant.save_steps,
                    "seed": 1234,
                },
                "storage": {
                    "uri": f"s3://{BUCKET}/{self.prefix}",
                    "endpoint": self.stack.endpoint,
                    "credentialsSecret": SECRET,
                    "keepCheckpoints": 3,
                },
                "resources": {"gpus": 0},
                "scheduling": {"spot": {"enabled": True}},  # on the sandbox's spot pool: `preempt` reclaims nodes
                "terminationGracePeriodSeconds": 30,
                "restartPolicy": {
                    "backoffSeconds": 1,
                    "maxBackoffSeconds": 2,
                    "backoffLimit": 20,
                    "maxPreemptions": 50,
                },
            },
        }

    # -- observation ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return (self.stack.k8s.get("loraresumes", NAMESPACE, self.name) or {}).get("status") or {}

    def pod_name(self, attempt: int) -> str:
        return f"{self.name}-attempt-{attempt}"

    def pod(self, attempt: int) -> dict[str, Any] | None:
        return self.stack.k8s.get("pods", NAMESPACE, self.pod_name(attempt))

    def events(self, attempt: int) -> list[dict[str, Any]]:
        return trainer_events(self.stack.agent.read_log(NAMESPACE, self.pod_name(attempt), ""))

    def pod_state(self, attempt: int) -> tuple[str | None, int | None]:
        """(phase, pid of the running trainer) of an attempt's pod."""
        pod = self.pod(attempt)
        if pod is None:
            return None, None
        status = pod.get("status") or {}
        for cs in status.get("containerStatuses") or []:
            if "running" in (cs.get("state") or {}) and str(cs.get("containerID", "")).startswith(CONTAINER_ID_SCHEME):
                return status.get("phase"), int(cs["containerID"][len(CONTAINER_ID_SCHEME) :])
        return status.get("phase"), None

    def running_pid(self, attempt: int) -> int | None:
        phase, pid = self.pod_state(attempt)
        if phase != "Running" or pid is None or (self.pod(attempt) or {}).get("metadata", {}).get("deletionTimestamp"):
            return None
        return pid

    def current_attempt(self) -> int:
        return int(self.status().get("attempt") or 0)

    def terminal(self) -> bool:
        return self.status().get("phase") in TERMINAL

    def s3_keys(self, sub: str) -> list[str]:
        pages = self.stack.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=self.prefix + sub)
        return [o["Key"] for page in pages for o in page.get("Contents", []) or []]

    def adapter_files(self) -> dict[str, bytes]:
        """The published adapter's files, read around the proxy."""
        return read_adapter(self.stack.s3, BUCKET, self.prefix)

    # -- waiting ---------------------------------------------------------------------------------
    def wait_training(self, min_attempt: int, extra_steps: int | None, timeout: float = TRIGGER_TIMEOUT) -> int | None:
        """The attempt (>= min_attempt) once it trains, `extra_steps` past its start step when given.

        None when the job ends first. An attempt that ends before the mark passes the watch on
        to the next one (e.g. an attempt that failed on its own under S3 faults).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.terminal():
                return None
            attempt = self.current_attempt()
            if attempt < min_attempt:
                time.sleep(POLL)
                continue
            events = self.events(attempt)
            start = next((e for e in events if e["event"] == "start"), None)
            if start is None or self.running_pid(attempt) is None:
                phase, _ = self.pod_state(attempt)
                if phase in ("Succeeded", "Failed") or any(
                    e["event"] in ("adapter_saved", "preempted") for e in events
                ):
                    min_attempt = attempt + 1
                time.sleep(POLL)
                continue
            if any(e["event"] in ("adapter_saved", "preempted") for e in events):
                min_attempt = attempt + 1
                continue
            if extra_steps is None:
                return attempt
            steps = [int(e.get("step") or 0) for e in events if e["event"] == "log"]
            if steps and max(steps) >= int(start.get("step") or 0) + extra_steps:
                return attempt
            time.sleep(POLL)
        raise TimeoutError(f"{self.name}: no attempt >= {min_attempt} trained within {timeout:.0f}s")

    def in_training(self, attempt: int) -> bool:
        events = self.events(attempt)
        return (
            any(e["event"] == "start" for e in events)
            and not any(e["event"] in ("adapter_saved", "preempted") for e in events)
            and self.running_pid(attempt) is not None
        )


class ChaosRunner:
    """Runs plans against a `ChaosStack`: references per variant, disruptions, comparison."""

    def __init__(
        self,
        stack: ChaosStack,
        *,
        run_timeout: float = RUN_TIMEOUT,
        strict: bool = False,
        say: Callable[[str], None] = lambda text: print(text, flush=True),
    ) -> None:
        self.stack = stack
        self.strict = strict
        self.run_timeout = run_timeout
        self.say = say
        self.references: dict[Variant, dict[str, bytes]] = {}
        self._held: queue.Queue[tuple[concurrent.futures.Future[str], RequestInfo, int]] = queue.Queue()

    # -- references ------------------------------------------------------------------------------
    def reference(self, variant: Variant) -> dict[str, bytes]:
        """The adapter of an undisturbed run of `variant` (fault-free), computed once."""
        if variant not in self.references:
            proxy = self.stack.proxy
            assert proxy is not None
            rates = proxy.rates
            proxy.set_rates({})
            try:
                started = time.monotonic()
                run = _Run(self.stack, f"ref-{variant.name}-{uuid.uuid4().hex[:6]}", variant)
                self.stack.k8s.create("loraresumes", run.body(), NAMESPACE)
                phase = self._wait_terminal(run)
                if phase != "Succeeded":
                    raise RuntimeError(f"the reference run {run.name} ended {phase}: {run.status().get('message')}")
                self.references[variant] = run.adapter_files()
                self._cleanup(run)
                self.say(
                    f"reference {variant.name}: {len(self.references[variant])} adapter files "
                    f"({time.monotonic() - started:.0f}s)"
                )
            finally:
                proxy.set_rates(rates)
        return self.references[variant]

    # -- a run -----------------------------------------------------------------------------------
    def run(self, plan: RunPlan) -> RunResult:
        reference = self.reference(plan.variant)
        started = time.monotonic()
        run = _Run(self.stack, f"chaos-{plan.index:03d}-{uuid.uuid4().hex[:6]}", plan.variant)
        result = RunResult(plan, "failed", 0.0)
        self.stack.ensure_operator()
        try:
            self.stack.k8s.create("loraresumes", run.body(), NAMESPACE)
            min_attempt, previous = 1, None
            for disruption in plan.disruptions:
                delivery = self._disrupt(run, disruption, min_attempt, previous)
                result.deliveries.append(delivery)
                if delivery.delivered and disruption.kind in TRAINER_ENDING and delivery.attempt:
                    min_attempt = delivery.attempt + 1
                previous = (disruption, delivery)
            phase = self._wait_terminal(run)
            result.status = run.status()
            if phase != "Succeeded":
                result.detail = f"ended {phase}: {result.status.get('message')}"
            else:
                differing = adapter_differences(run.adapter_files(), reference, strict=self.strict)
                if differing:
                    result.outcome, result.detail = "mismatch", f"adapter files differ: {', '.join(differing)}"
                else:
                    result.outcome = "ok"
            result.accounting = self._accounting(result)
        except Exception as exc:  # reported as a failed run; the session goes on
            result.status = run.status()
            result.detail = f"{type(exc).__name__}: {exc}"
        finally:
            if self.stack.ensure_operator():
                result.detail += " (the operator had exited on its own)"
            result.seconds = time.monotonic() - started
            if not result.ok:
                self._diagnose(run, result)
            self._cleanup(run)
        return result

    def _wait_terminal(self, run: _Run) -> str:
        def ended() -> str | None:
            self.stack.ensure_operator()
            phase = run.status().get("phase")
            return phase if phase in TERMINAL else None

        try:
            return wait_for(ended, self.run_timeout, f"{run.name} to end", every=0.25)
        except AssertionError:
            return f"not terminal after {self.run_timeout:.0f}s (phase {run.status().get('phase')})"

    def _accounting(self, result: RunResult) -> str:
        """Each ended attempt counts once: preemptions + failures == attempts - 1, and no fewer
        than the delivered trainer disruptions (more only if an attempt failed on its own)."""
        st = result.status
        attempts, pre, fail = int(st.get("attempt") or 0), int(st.get("preemptions") or 0), int(st.get("failures") or 0)
        ended = sum(d.delivered for d in result.deliveries if d.kind in TRAINER_ENDING)
        problems = []
        if pre + fail != attempts - 1:
            problems.append(f"preemptions {pre} + failures {fail} != attempts {attempts} - 1")
        if pre + fail < ended:
            problems.append(f"{ended} trainer disruptions delivered but only {pre + fail} counted")
        return "; ".join(problems)

    def _diagnose(self, run: _Run, result: RunResult) -> None:
        path = self.stack.dir / "failures" / f"{run.name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [result.line(), "", "status:", json.dumps(run.status(), indent=1), "", "deliveries:"]
        lines += [repr(d) for d in result.deliveries]
        for attempt in range(1, max(run.current_attempt(), 1) + 1):
            lines += ["", f"--- pod {run.pod_name(attempt)} log (tail) ---"]
            lines += self.stack.agent.read_log(NAMESPACE, run.pod_name(attempt), "").splitlines()[-40:]
        lines += ["", "--- operator log (tail) ---", self.stack.operator_log_tail(60)]
        path.write_text("\n".join(lines))
        result.detail += f" (details: {path})"

    def _cleanup(self, run: _Run) -> None:
        try:
            self.stack.k8s.delete("loraresumes", NAMESPACE, run.name)
            wait_for(
                lambda: (
                    self.stack.k8s.get("loraresumes", NAMESPACE, run.name) is None
                    and not self.stack.k8s.list("pods", NAMESPACE, label_selector=f"loraresume.dev/resource={run.name}")
                ),
                120,
                f"{run.name} deleted",
                every=0.25,
            )
        except Exception as exc:  # a leftover resource does not spoil later runs (names are unique)
            log.warning("cleanup of %s: %s", run.name, exc)

    # -- disruptions -----------------------------------------------------------------------------
    def _disrupt(
        self, run: _Run, d: Disruption, min_attempt: int, previous: tuple[Disruption, Delivery] | None
    ) -> Delivery:
        try:
            if d.kind in ("upload_kill", "download_kill"):
                return self._kill_in_transfer(run, d, min_attempt)
            if d.kind == "operator_restart" and d.window == "relaunch":
                return self._restart_operator_at_relaunch(run, d, previous)
            attempt = run.wait_training(min_attempt, d.after_steps)
            if attempt is None:
                return Delivery(d.kind, note="the run ended before the window")
            if d.kind == "operator_restart":
                return self._restart_operator(run, d, attempt)
            return self._end_trainer(run, d, attempt)
        except TimeoutError as exc:
            return Delivery(d.kind, note=str(exc))

    def _end_trainer(self, run: _Run, d: Disruption, attempt: int) -> Delivery:
        hit = run.in_training(attempt)
        pid = run.running_pid(attempt)
        if pid is None:
            return Delivery(d.kind, attempt, note="the pod was not running any more")
        if d.kind == "sigkill":
            delivered = _killpg(pid, signal.SIGKILL)
        elif d.kind == "sigterm":  # what `kubectl delete pod` does: graceful deletion, the kubelet sends SIGTERM
            delivered = self.stack.k8s.delete("pods", NAMESPACE, run.pod_name(attempt)) is not None
        else:
            try:
                node = self.stack.agent.node_of(NAMESPACE, run.pod_name(attempt))
                self.stack.agent.reclaim_spot(node, wait=False)
                delivered = True
            except LookupError:
                delivered = False
        return Delivery(d.kind, attempt, delivered, hit and delivered)

    def _restart_operator(self, run: _Run, d: Disruption, attempt: int) -> Delivery:
        hit = run.in_training(attempt)
        delivered = self.stack.kill_operator(signal.SIGKILL)
        time.sleep(d.downtime)
        self.stack.start_operator()
        return Delivery(d.kind, attempt, delivered, hit and delivered, note="window training")

    def _restart_operator_at_relaunch(
        self, run: _Run, d: Disruption, previous: tuple[Disruption, Delivery] | None
    ) -> Delivery:
        """Right after a trainer was disrupted: the operator dies before it relaunched the job."""
        if previous is None or not previous[1].delivered or previous[0].kind not in TRAINER_ENDING:
            return Delivery(d.kind, note="no trainer disruption to follow")
        ended = previous[1].attempt or 0
        hit = run.pod(ended + 1) is None and not run.terminal()
        delivered = self.stack.kill_operator(signal.SIGKILL)
        time.sleep(d.downtime)
        self.stack.start_operator()
        return Delivery(d.kind, ended, delivered, hit and delivered, note="window relaunch")

    def _kill_in_transfer(self, run: _Run, d: Disruption, min_attempt: int) -> Delivery:
        """Hold the k-th file request of a checkpoint upload (PUT) or download (GET); SIGKILL the
        trainer while it is held; then drop the request."""
        upload = d.kind == "upload_kill"
        method = "PUT" if upload else "GET"
        floor, uploader = 0, 0
        if upload:  # the attempt that will upload must be the one training now, not a terminating one
            training = run.wait_training(min_attempt, None)
            if training is None:
                return Delivery(d.kind, note="the run ended before the window")
            uploader = training
            floor = int(next(e for e in run.events(uploader) if e["event"] == "start").get("step") or 0)
        seen: Counter[int] = Counter()
        order: list[int] = []  # checkpoint steps in the order their first file request came
        fired = threading.Event()
        root = f"{BUCKET}/{run.prefix}"

        def hook(info: RequestInfo) -> concurrent.futures.Future[str] | None:
            if fired.is_set() or info.method != method:
                return None
            where = checkpoint_file(info)
            if where is None or where[0] != root or where[2] == MANIFEST or (upload and where[1] <= floor):
                return None
            if where[1] not in seen:
                order.append(where[1])
            seen[where[1]] += 1
            nth = d.nth_checkpoint if upload else 1
            if seen[where[1]] < d.file_index or len(order) < nth or where[1] != order[nth - 1]:
                return None
            fired.set()
            future: concurrent.futures.Future[str] = concurrent.futures.Future()
            self._held.put((future, info, where[1]))
            return future

        assert self.stack.proxy is not None
        remove = self.stack.proxy.add_hook(hook)
        try:
            deadline = time.monotonic() + TRIGGER_TIMEOUT
            while True:
                try:
                    future, info, step = self._held.get(timeout=0.2)
                    break
                except queue.Empty:
                    if run.terminal() or time.monotonic() > deadline:
                        return Delivery(d.kind, note="no checkpoint transfer before the run ended")
                    if upload and run.current_attempt() > uploader and run.pod(uploader) is None:
                        return Delivery(d.kind, uploader, note="the attempt ended before uploading")
        finally:
            remove()
        try:
            attempt = run.current_attempt()
            pid = run.running_pid(attempt)
            if upload:
                keys = run.s3_keys(f"checkpoints/checkpoint-{step}/")
                hit = bool(keys) and not any(k.endswith("/" + MANIFEST) for k in keys)
                note = (
                    f"checkpoint-{step}: {len(keys)} object(s) in S3, no manifest"
                    if hit
                    else f"checkpoint-{step}: {keys}"
                )
            else:
                pod_dir = self.stack.agent.pod_dir(NAMESPACE, run.pod_name(attempt)) or Path("/nonexistent")
                work = pod_dir / "volumes" / "work"  # the pod's /work emptyDir
                # under resume/ (a download after the imports) or resume/ahead/ (prefetched during them)
                partial = list((work / "resume").rglob(f".checkpoint-{step}.partial-*"))
                started = any(e["event"] == "start" for e in run.events(attempt))
                hit = bool(partial) and not started
                note = (
                    f"checkpoint-{step}: partial download on disk, no start event"
                    if hit
                    else f"checkpoint-{step}: partial={bool(partial)} started={started}"
                )
            delivered = pid is not None and _killpg(pid, signal.SIGKILL)
            if delivered:  # let the process die before the held request is answered
                wait_for(lambda: run.running_pid(attempt) is None, 30, f"trainer {pid} gone", every=POLL)
            return Delivery(d.kind, attempt, delivered, hit and delivered, note=f"{info.method} {info.path}; {note}")
        finally:
            future.set_result("drop")


def _killpg(pid: int, sig: int) -> bool:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# -- the session -----------------------------------------------------------------------------------
def run_session(
    plans: list[RunPlan],
    workdir: Path,
    *,
    fault_rate: float = 0.0,
    seed: int = 0,
    interval: float = 1.0,
    run_timeout: float = RUN_TIMEOUT,
    strict: bool = False,
    say: Callable[[str], None] = lambda text: print(text, flush=True),
) -> Summary:
    """Bring up a `ChaosStack`, run every plan in order, return the summary."""
    started = time.monotonic()
    results: list[RunResult] = []
    with ChaosStack(workdir, fault_rate=fault_rate, seed=seed, interval=interval) as stack:
        say(
            f"chaos stack up in {time.monotonic() - started:.0f}s: API {stack.k8s.server}, S3 {stack.moto_endpoint} "
            f"behind the fault proxy {stack.endpoint} (rate {fault_rate:g}), logs in {stack.dir}"
        )
        runner = ChaosRunner(stack, run_timeout=run_timeout, strict=strict, say=say)
        for plan in plans:
            result = runner.run(plan)
            results.append(result)
            say(f"[{len(results)}/{len(plans)}] {result.line()}")
        assert stack.proxy is not None
        counts = stack.proxy.counts
        if stack.unexpected_operator_exits:
            counts["unexpected_operator_exits"] = stack.unexpected_operator_exits
    return Summary(results, time.monotonic() - started, counts, strict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraresume-chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="randomized runs (default 50)")
    parser.add_argument("--seed", type=int, default=7, help="session seed: schedules and fault draws derive from it")
    parser.add_argument(
        "--s3-fault-rate",
        type=float,
        default=0.0,
        help="S3 fault probability per request (5xx, SlowDown, reset, truncated body), e.g. 0.05",
    )
    parser.add_argument(
        "--workdir",
        default=str(Path(tempfile.gettempdir()) / "loraresume-chaos"),
        help="logs, pod directories and failure reports go to WORKDIR/<timestamp>/",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="operator reconcile interval, seconds")
    parser.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT, help="seconds a run may take to end")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="compare every adapter file byte for byte (see NORMALIZED_FILES for the known exceptions)",
    )
    parser.add_argument("--json", help="also write the summary and every run's result to this JSON file")
    parser.add_argument("--plan-only", action="store_true", help="print the schedule and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    plans = plan_runs(args.seed, args.runs)
    if args.plan_only:
        for plan in plans:
            print(f"run {plan.index} seed {plan.seed} {plan.variant.name}: {plan.describe()}")
        return 0
    workdir = Path(args.workdir) / time.strftime("%Y%m%d-%H%M%S")
    summary = run_session(
        plans,
        workdir,
        fault_rate=args.s3_fault_rate,
        seed=args.seed,
        interval=args.interval,
        run_timeout=args.run_timeout,
        strict=args.strict,
    )
    print()
    print(summary.report(seed=args.seed, fault_rate=args.s3_fault_rate), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary.to_json(seed=args.seed, fault_rate=args.s3_fault_rate), indent=1))
    return 1 if summary.mismatches or summary.failures or len(summary.results) < len(plans) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Event-path benchmark: the operator's CPU per watch event, kopf's path against a lean watch.

    python benchmarks/event_path.py --objects 200 --rounds 10 --json benchmarks/results/event_path-DATE.json

Why: issue 15's CPU target (20 ms per resource lifecycle) is missed by about 2x, and profiles put
about half of the operator's CPU in receiving, decoding and processing watch events (kopf), with a
lifecycle bringing about a dozen events (the resource's own status writes, the pod's creation,
binding, start and end). scale.py's CPU per lifecycle moves by ±15 % with the machine's load, too
much to judge a change to the event path; this measures the event path alone, side by side.

A real control plane (etcd, kube-apiserver, controller-manager, scheduler; no nodes, so every pod
stays Pending), the chart's CRD, `--objects` LoraResumes and as many trainer pods (the operator's
own pod manifest, `pods.build_trainer_pod`). Each watcher is a process of its own, watching one
namespace as the operator does:

- `kopf`: kopf's watch and per-event processing with the operator's settings (finalizer, annotation
  progress storage, no diff-base, the pod label selector, the delete handler and its `when`), and
  handlers that only count: what the operator pays before its own handlers run.
- `lean`: list then watch both kinds over aiohttp (kopf's own HTTP client), one `json.loads` a line,
  a counter: what any watch must pay.

Each watcher in turn (ABBA order, `--repeats` times) is started, settles, then this script makes
`--rounds` rounds of one change to every object (a pod annotation, a LoraResume status write), one
object after another, and waits until the watcher has counted every event (or none came for 5 s).
The watcher's CPU (utime + stime, /proc) over that window, less its idle rate, per event: the
ratio of the two watchers is the point, both measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for sub in ("operator", "sandbox"):
    sys.path.insert(0, str(ROOT / sub))

NAMESPACE = "bench"
GROUP, VERSION, PLURAL = "loraresume.dev", "v1alpha1", "loraresumes"
COUNT_EVERY_S = 0.1


# -- watchers (each runs as its own process) -----------------------------------------------------


class _Counter:
    """Events seen, written to a file every COUNT_EVERY_S (read by the driver)."""

    def __init__(self, path: Path) -> None:
        self.path, self.n = path, 0
        threading.Thread(target=self._write, daemon=True).start()

    def _write(self) -> None:
        while True:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(str(self.n))
            tmp.replace(self.path)
            time.sleep(COUNT_EVERY_S)


def watch_kopf(count_file: Path) -> None:
    import logging

    import kopf

    from loraresume_operator.handlers import FINALIZER, KOPF_WORKERS, NoDiffBase, checkpoints_go_with_it
    from loraresume_operator.observed import LABEL_RESOURCE

    counter = _Counter(count_file)
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kw: Any) -> Any:
        return kopf.login_via_client(**kw)  # what kopf's default registry does for the operator

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.posting.level = logging.INFO
        settings.scanning.disabled = True
        settings.watching.server_timeout = 300
        settings.watching.label_selectors["", "v1", "pods"] = LABEL_RESOURCE
        settings.execution.max_workers = KOPF_WORKERS

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def on_resource(**_: Any) -> None:
        counter.n += 1

    @kopf.on.event("", "v1", "pods", labels={LABEL_RESOURCE: kopf.PRESENT}, registry=registry)
    async def on_pod(**_: Any) -> None:
        counter.n += 1

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, when=checkpoints_go_with_it)
    def on_delete(**_: Any) -> None:
        pass

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(kopf.operator(registry=registry, namespaces=[NAMESPACE], standalone=True))


def watch_lean(count_file: Path, server: str, ca: str, cert: str, key: str) -> None:
    import aiohttp

    from loraresume_operator.observed import LABEL_RESOURCE

    counter = _Counter(count_file)
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)

    async def follow(session: aiohttp.ClientSession, path: str, params: dict[str, str]) -> None:
        async with session.get(server + path, params=params) as listed:
            version = (await listed.json())["metadata"]["resourceVersion"]
        while True:
            query = {**params, "watch": "true", "resourceVersion": version, "allowWatchBookmarks": "true"}
            async with session.get(server + path, params=query, timeout=aiohttp.ClientTimeout(total=None)) as w:
                async for line in w.content:
                    event = json.loads(line)
                    version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        counter.n += 1

    async def main() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
            await asyncio.gather(
                follow(session, f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}", {}),
                follow(session, f"/api/v1/namespaces/{NAMESPACE}/pods", {"labelSelector": LABEL_RESOURCE}),
            )

    asyncio.run(main())


# -- the driver ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """The watcher's CPU (scale.process_cpu_seconds); it runs throughout a measurement."""
    from scale import process_cpu_seconds

    seconds = process_cpu_seconds(pid)
    if seconds is None:
        raise SystemExit(f"CPU of watcher {pid} unreadable")
    return seconds


def read_count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def settle(proc: subprocess.Popen[bytes], count_file: Path, quiet_s: float, timeout_s: float) -> int:
    """Wait until the watcher's count has not moved for quiet_s; its count then."""
    deadline, last, since = time.monotonic() + timeout_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"watcher exited with {proc.returncode}")
        n = read_count(count_file)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return n
        time.sleep(0.05)
    return last


SPEC = {  # a spot LoraResume's spec, as a user applies it
    "baseModel": "unsloth/llama-3-8b-bnb-4bit",
    "dataset": {"source": "s3://data/d.jsonl"},
    "storage": {"uri": "s3://ckpt/bot/", "credentialsSecret": "s3-creds"},
    "resources": {"gpus": 1},
    "scheduling": {"spot": {"enabled": True}},
}


def create_job(kube: Any, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A LoraResume created in the API, and the trainer pod manifest the operator would create for it."""
    from loraresume_operator.decide import CreatePod, Resource
    from loraresume_operator.defaults import OperatorDefaults
    from loraresume_operator.pods import build_trainer_pod
    from loraresume_operator.spec import LoraResumeSpec

    created = kube.create("loraresumes", {"metadata": {"name": name}, "spec": SPEC}, NAMESPACE)
    pod = build_trainer_pod(
        Resource(name, NAMESPACE, created["metadata"]["uid"], 1),
        LoraResumeSpec.model_validate(SPEC),
        CreatePod(f"{name}-attempt-1", 1, None, False, None),
        OperatorDefaults(trainer_image="ghcr.io/loraresume/trainer:0.1.0"),
    )
    return created, pod


def make_objects(kube: Any, n: int) -> tuple[list[str], list[str]]:
    names = [f"job-{i:04d}" for i in range(n)]
    pods = [kube.create("pods", create_job(kube, name)[1], NAMESPACE)["metadata"]["name"] for name in names]
    return names, pods


def one_round(kube: Any, names: list[str], pods: list[str], r: int) -> int:
    """One change to every object: a pod annotation (the kubelet's and the operator's patches bring
    a whole pod each), a LoraResume status (as the operator writes it). Returns the events caused."""
    for name, pod in zip(names, pods, strict=True):
        kube.patch("pods", NAMESPACE, pod, {"metadata": {"annotations": {"bench/round": str(r)}}})
        status = {
            "phase": "Running",
            "message": f"training, step {r} of 1000",
            "attempt": 1,
            "preemptions": 0,
            "failures": 0,
            "step": r,
            "maxSteps": 1000,
            "progress": f"{r}/1000",
            "loss": "1.2345",
            "storageUri": f"s3://ckpt/{name}/",
            "podName": pod,
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "Training",
                    "message": "the trainer runs",
                    "lastTransitionTime": "2026-12-06T08:00:00Z",
                }
            ],
        }
        kube.patch("loraresumes", NAMESPACE, name, {"status": status}, subresource="status")
    return 2 * len(names)


def measure(
    kind: str, cp: Any, kube: Any, names: list[str], pods: list[str], rounds: int, work: Path, first_round: int
) -> dict[str, Any]:
    count_file = work / f"count-{kind}-{first_round}"
    count_file.unlink(missing_ok=True)
    env = {**os.environ, "KUBECONFIG": str(cp.admin_kubeconfig)}
    argv = [sys.executable, __file__, "--watch", kind, "--count-file", str(count_file)]
    if kind == "lean":
        cert, key = cp.pki_dir / "admin.crt", cp.pki_dir / "admin.key"  # the admin's pair, as the kubeconfig names it
        argv += ["--server", cp.url, "--ca", str(cp.ca_file), "--cert", str(cert), "--key", str(key)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"{kind}.log", "ab"))
    try:
        listed = settle(proc, count_file, quiet_s=3.0, timeout_s=120)
        idle_c0, idle_t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(3.0)
        idle_rate = (cpu_seconds(proc.pid) - idle_c0) / (time.monotonic() - idle_t0)
        n0, c0, t0 = read_count(count_file), cpu_seconds(proc.pid), time.monotonic()
        caused = sum(one_round(kube, names, pods, first_round + r) for r in range(rounds))
        deadline = time.monotonic() + 120
        while read_count(count_file) - n0 < caused and time.monotonic() < deadline:
            time.sleep(0.05)
        seen = settle(proc, count_file, quiet_s=1.0, timeout_s=30) - n0
        c1, t1 = cpu_seconds(proc.pid), time.monotonic()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    cpu = c1 - c0 - idle_rate * (t1 - t0)
    return {
        "watcher": kind,
        "listed_events": listed,
        "events_caused": caused,
        "events_handled": seen,
        "window_s": round(t1 - t0, 2),
        "cpu_s": round(c1 - c0, 3),
        "idle_cpu_rate": round(idle_rate, 4),
        "cpu_ms_per_event": round(1000 * cpu / caused, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="ABBA blocks")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--watch", choices=("kopf", "lean"), help=argparse.SUPPRESS)
    parser.add_argument("--count-file", type=Path, help=argparse.SUPPRESS)
    for flag in ("--server", "--ca", "--cert", "--key"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.watch == "kopf":
        watch_kopf(args.count_file)
        return 0
    if args.watch == "lean":
        watch_lean(args.count_file, args.server, args.ca, args.cert, args.key)
        return 0

    from loraresume_sandbox.cluster import install_chart, sandbox_values
    from loraresume_sandbox.control_plane import ControlPlane

    work = args.work or Path(tempfile.mkdtemp(prefix="lr-event-path-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"control plane in {work} ...", flush=True)
    cp = ControlPlane(work / "cp", quiet=True).start()
    try:
        cp.create_namespace(NAMESPACE)
        install_chart(cp.admin, sandbox_values(namespaces=[NAMESPACE]))
        print(f"creating {args.objects} LoraResumes and their pods ...", flush=True)
        names, pods = make_objects(cp.admin, args.objects)
        runs: list[dict[str, Any]] = []
        order = ["kopf", "lean", "lean", "kopf"] * args.repeats
        for i, kind in enumerate(order):
            run = measure(kind, cp, cp.admin, names, pods, args.rounds, work, first_round=1 + i * args.rounds)
            runs.append(run)
            print(json.dumps(run), flush=True)
    finally:
        cp.stop()
    per = {k: [r["cpu_ms_per_event"] for r in runs if r["watcher"] == k] for k in ("kopf", "lean")}
    summary = {
        "objects": args.objects,
        "rounds": args.rounds,
        "kopf_ms_per_event_median": round(statistics.median(per["kopf"]), 3),
        "lean_ms_per_event_median": round(statistics.median(per["lean"]), 3),
        "ratio_kopf_over_lean": round(statistics.median(per["kopf"]) / statistics.median(per["lean"]), 2),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Request-cost benchmark: the operator's own CPU per API and S3 request, through the clients it uses.

    python benchmarks/request_cost.py --requests 300 --json benchmarks/results/request_cost-DATE.json

Why: a resource's lifecycle at 200 costs the operator ~45 ms of CPU (issue 15's target: 20 ms) for
~8 API requests, ~5 S3 requests and ~11 watch events (scale.py); event_path.py prices the events.
This prices the requests, on this process's clock only (the API server and S3 run in processes of
their own), each made the way the operator makes it, and beside it the same request made with
urllib3 alone (a pool of its own, the same TLS, `json` both ways), the floor any Python client pays:

- a LoraResume status write (`CustomObjectsApi.replace_namespaced_custom_object_status`, the
  operator's status body);
- an Event posted (`LeanCoreV1Api.create_namespaced_event`);
- a trainer pod created (`LeanCoreV1Api.create_namespaced_pod`, the operator's manifest; dry run,
  so nothing is stored or scheduled);
- an S3 GetObject of a progress.json (`s3_view`'s client: boto3 with the operator's Config) against
  moto on loopback; its floor is not measured (no leaner S3 client is a fair stand-in for boto3).

Kinds are interleaved in ABBA blocks so drift falls on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for sub in ("operator", "sandbox", "trainer_image", "benchmarks"):
    sys.path.insert(0, str(ROOT / sub))

BLOCK = 25  # requests per timed block


def cpu_per_call(call: Callable[[int], Any], n: int, start: int = 0) -> float:
    """CPU seconds of this process per call, over n calls."""
    c0 = time.process_time()
    for i in range(n):
        call(start + i)
    return (time.process_time() - c0) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="per kind and client")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import boto3
    import urllib3
    from event_path import NAMESPACE, create_job
    from kubernetes import client, config
    from scale import s3_server_command

    from loraresume_operator.lean_api import LeanCoreV1Api
    from loraresume_operator.s3_view import _client as operator_s3_client
    from loraresume_operator.spec import GROUP, PLURAL, VERSION
    from loraresume_sandbox.cluster import install_chart, sandbox_values
    from loraresume_sandbox.control_plane import ControlPlane, free_port

    work = args.work or Path(tempfile.mkdtemp(prefix="lr-request-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"control plane and moto in {work} ...", flush=True)
    cp = ControlPlane(work / "cp", quiet=True).start()
    s3_port = free_port()
    s3_argv, s3_what = s3_server_command("moto", s3_port)
    s3_proc = subprocess.Popen(s3_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cp.create_namespace(NAMESPACE)
        install_chart(cp.admin, sandbox_values(namespaces=[NAMESPACE]))
        created, pod = create_job(cp.admin, "bot")

        # The operator's clients, configured as it configures them (handlers.startup, s3_view._client).
        api = client.ApiClient(config.new_client_from_config(str(cp.admin_kubeconfig)).configuration)
        custom, core = client.CustomObjectsApi(api), LeanCoreV1Api(client.CoreV1Api(api))
        pool = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED",
            ca_certs=str(cp.ca_file),
            cert_file=str(cp.pki_dir / "admin.crt"),
            key_file=str(cp.pki_dir / "admin.key"),
        )
        env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret"}
        endpoint = f"http://127.0.0.1:{s3_port}"
        s3 = operator_s3_client(endpoint, "us-east-1", tuple(sorted(env.items())))
        admin_s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", **{k.lower(): v for k, v in env.items()}
        )
        for _ in range(100):
            try:
                admin_s3.create_bucket(Bucket="ckpt")
                break
            except Exception:  # moto still starting
                time.sleep(0.1)
        progress = {"step": 120, "max_steps": 1000, "durable_step": 120, "loss": 1.2345, "phase": "Running"}
        admin_s3.put_object(Bucket="ckpt", Key="bot/progress.json", Body=json.dumps(progress).encode())

        status_path = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}/bot/status"

        def status_body(i: int) -> dict[str, Any]:
            current = custom.get_namespaced_custom_object_status(GROUP, VERSION, NAMESPACE, PLURAL, "bot")
            return {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "LoraResume",
                "metadata": {
                    "name": "bot",
                    "namespace": NAMESPACE,
                    "resourceVersion": current["metadata"]["resourceVersion"],
                },
                "status": {
                    "phase": "Running",
                    "message": f"training, step {i}",
                    "attempt": 1,
                    "step": i,
                    "maxSteps": 1000,
                    "storageUri": "s3://ckpt/bot/",
                    "podName": "bot-attempt-1",
                    "observedGeneration": 1,
                },
            }

        def raw(method: str, path: str, body: Any, params: str = "") -> Any:
            answer = pool.request(
                method,
                cp.url + path + params,
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
            if answer.status >= 300:
                raise RuntimeError(f"{method} {path}: {answer.status} {answer.data[:200]!r}")
            return json.loads(answer.data)

        def event(i: int) -> dict[str, Any]:
            return {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": "bot.", "namespace": NAMESPACE},
                "involvedObject": {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "LoraResume",
                    "name": "bot",
                    "namespace": NAMESPACE,
                    "uid": created["metadata"]["uid"],
                },
                "type": "Normal",
                "reason": "Launched",
                "message": f"attempt {i} launched",
                "source": {"component": "loraresume-operator"},
                "reportingComponent": "loraresume-operator",
                "reportingInstance": "loraresume-operator",
                "firstTimestamp": "2026-12-06T08:00:00Z",
                "lastTimestamp": "2026-12-06T08:00:00Z",
                "count": 1,
            }

        # The status write needs the current resourceVersion: its GET is timed on its own and subtracted.
        kinds: dict[str, dict[str, Callable[[int], Any]]] = {
            "status write": {
                "operator's client": lambda i: custom.replace_namespaced_custom_object_status(
                    GROUP, VERSION, NAMESPACE, PLURAL, "bot", status_body(i)
                ),
                "urllib3": lambda i: raw("PUT", status_path, status_body(i)),
            },
            "status read (subtracted from the write)": {
                "operator's client": lambda i: status_body(i),
            },
            "Event post": {
                "operator's client": lambda i: core.create_namespaced_event(NAMESPACE, event(i)),
                "urllib3": lambda i: raw("POST", f"/api/v1/namespaces/{NAMESPACE}/events", event(i)),
            },
            "pod create (dry run)": {
                "operator's client": lambda i: core.create_namespaced_pod(NAMESPACE, pod, dry_run="All"),
                "urllib3": lambda i: raw("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod, "?dryRun=All"),
            },
            "S3 GetObject progress.json": {
                "operator's client": lambda i: s3.get_object(Bucket="ckpt", Key="bot/progress.json")["Body"].read(),
            },
        }
        for by_client in kinds.values():  # warm every path once (connections, models, botocore's loaders)
            for call in by_client.values():
                call(0)
        samples: dict[str, dict[str, list[float]]] = {k: {c: [] for c in v} for k, v in kinds.items()}
        blocks = max(1, args.requests // BLOCK)
        print(f"{blocks} blocks of {BLOCK} requests per kind and client ...", flush=True)
        for b in range(blocks):
            for kind, by_client in kinds.items():
                order = list(by_client) if b % 2 == 0 else list(reversed(by_client))
                for name in order:
                    samples[kind][name].append(cpu_per_call(by_client[name], BLOCK, start=b * BLOCK))
    finally:
        s3_proc.terminate()
        s3_proc.wait(10)
        cp.stop()

    ms = {k: {c: round(1000 * statistics.median(v), 3) for c, v in by.items()} for k, by in samples.items()}
    read = ms.pop("status read (subtracted from the write)")["operator's client"]
    ms["status write"] = {c: round(v - read, 3) for c, v in ms["status write"].items()}
    report = {
        "requests_per_kind_and_client": blocks * BLOCK,
        "s3_server": s3_what,
        "cpu_ms_per_request_median_of_blocks": ms,
        "status_read_subtracted_ms": read,
        "ratio_operator_client_over_urllib3": {
            k: round(v["operator's client"] / v["urllib3"], 2) for k, v in ms.items() if "urllib3" in v
        },
        "pid": os.getpid(),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the whole story in the local sandbox, with kubectl.

Starts the sandbox (a real control plane, the chart's RBAC, the operator, the node agent), applies
examples/sandbox/resume.yaml, preempts the trainer twice at seeded random points (`kubectl delete
pod`, then a spot reclaim of the node under attempt 2), waits for Succeeded,
prints `kubectl get` / `kubectl describe`, says where the adapter is, writes demo-loss.png
(loss vs step across attempts, preemptions marked) and shuts the sandbox down.
Environment: DEMO_SEED (default 7), DEMO_DIR (default .sandbox), DEMO_PLOT (default demo-loss.png).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from .cli import AWS, read_state
from .kube_client import KubeClient
from .waiting import wait_for

ROOT = Path.cwd()
EXAMPLE = ROOT / "examples" / "sandbox" / "resume.yaml"
NS = "default"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


class Demo:
    def __init__(self, directory: Path, seed: int) -> None:
        self.dir = directory
        self.rng = random.Random(seed)
        self.logs: dict[int, str] = {}  # attempt -> its `kubectl logs -f` text so far
        self._followers: dict[int, threading.Thread] = {}
        self.kills: list[dict] = []
        self._stop = threading.Event()
        self.name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
        self.storage = yaml.safe_load(EXAMPLE.read_text())["spec"]["storage"]["uri"]

    # -- helpers --------------------------------------------------------------------------
    def sandbox(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "loraresume_sandbox.cli", *args, "--dir", str(self.dir)],
            text=True,
            capture_output=True,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"loraresume-sandbox {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result

    def kubectl(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["kubectl", "-n", NS, *args],
            text=True,
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "KUBECONFIG": self.state["kubeconfig"]},
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def pod(self, attempt: int) -> str:
        return f"{self.name}-attempt-{attempt}"

    def durable_step(self) -> int:
        bucket, _, prefix = self.storage[len("s3://") :].partition("/")
        try:
            body = self.s3.get_object(Bucket=bucket, Key=f"{prefix}progress.json")["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return 0
        return int(json.loads(body).get("durable_step") or 0)

    def pod_phase(self, attempt: int) -> str | None:
        """Polled often, so through the API client rather than a kubectl process each time."""
        pod = self.kube.get("pods", NS, self.pod(attempt))
        return ((pod or {}).get("status") or {}).get("phase")

    def wait(self, predicate, timeout: float, what: str, every: float = 0.2):
        return wait_for(predicate, timeout, what, every)

    def _collect_logs(self) -> None:
        """`kubectl logs -f` of every attempt's pod as it appears, kept: a preempted pod goes away."""
        while not self._stop.is_set():
            attempt = max(self._followers, default=0) + 1
            if self.pod_phase(attempt) in ("Running", "Succeeded", "Failed"):
                follower = threading.Thread(target=self._follow_log, args=(attempt,), daemon=True)
                self._followers[attempt] = follower
                follower.start()
                continue
            self._stop.wait(0.5)

    def _follow_log(self, attempt: int) -> None:
        proc = subprocess.Popen(
            ["kubectl", "-n", NS, "logs", "-f", self.pod(attempt)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "KUBECONFIG": self.state["kubeconfig"]},
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            self.logs[attempt] = self.logs.get(attempt, "") + line
        proc.wait()

    def fetch_logs(self, timeout: float = 30) -> None:
        """Until every attempt's log stream has ended (its process exited)."""
        for follower in list(self._followers.values()):
            follower.join(timeout)

    def kill_at_random(self, attempt: int, how: str) -> None:
        """Wait for `attempt` to make a durable checkpoint of its own, a seeded random number of
        save intervals past its resume point, plus a random fraction of a second or more; then kill it."""
        pod = self.pod(attempt)
        self.wait(lambda: self.pod_phase(attempt) == "Running", 300, f"pod {pod} running")
        start = self.durable_step()
        target = start + 5 * self.rng.randint(1, 2)
        delay = round(self.rng.uniform(0.1, 0.8), 2)
        print(
            f"   {pod}: resumes from durable step {start}; kill after durable step {target} + {delay}s ({how})",
            flush=True,
        )
        self.wait(
            lambda: self.durable_step() >= target or self.pod_phase(attempt) != "Running", 600, f"durable step {target}"
        )
        time.sleep(delay)
        if self.pod_phase(attempt) != "Running":
            print(f"   {pod} already finished: no kill", flush=True)
            return
        if how == "delete":
            self.kubectl("delete", "pod", pod, "--wait=false")
            print(f"   kubectl delete pod {pod}", flush=True)
        else:
            node = self.kubectl("get", "pod", pod, "-o", "jsonpath={.spec.nodeName}").stdout.strip()
            self.sandbox("preempt", pod)
            print(
                f"   loraresume-sandbox preempt {pod}: spot node {node} reclaimed (tainted, graceful shutdown: "
                "DisruptionTarget, SIGTERM; Node deleted)",
                flush=True,
            )
        self.kills.append({"attempt": attempt, "how": how, "durable_at_kill": self.durable_step()})

    # -- the story ---------------------------------------------------------------------------
    def run(self) -> int:
        import boto3

        t0 = time.monotonic()
        say("loraresume-sandbox up --background")
        print(self.sandbox("up", "--background").stdout.strip().splitlines()[-1])
        self.state = read_state(self.dir)
        self.kube = KubeClient.from_kubeconfig(self.state["kubeconfig"])
        self.s3 = boto3.client(
            "s3",
            endpoint_url=self.state["s3_endpoint"],
            region_name=AWS["AWS_DEFAULT_REGION"],
            aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
        )
        say("kubectl version")
        version = json.loads(self.kubectl("version", "-o", "json").stdout)
        print(f"   server {version['serverVersion']['gitVersion']} (kube-apiserver built from Go modules)")
        say(f"kubectl apply -f {EXAMPLE.relative_to(ROOT)}")
        print(self.kubectl("apply", "-f", str(EXAMPLE)).stdout.strip())
        threading.Thread(target=self._collect_logs, daemon=True).start()

        say("preemption 1: kubectl delete pod, at a random point after a durable checkpoint")
        self.kill_at_random(1, "delete")
        say("preemption 2: spot reclaim of the node under attempt 2, after progress of its own")
        self.wait(lambda: self.pod_phase(2), 120, f"pod {self.pod(2)}")
        self.kill_at_random(2, "preempt")

        say(f"kubectl wait --for=condition=Succeeded lr/{self.name} --timeout=600s")
        print(
            self.kubectl(
                "wait", "--for=condition=Succeeded", f"lr/{self.name}", "--timeout=600s", timeout=660
            ).stdout.strip()
        )
        self._stop.set()
        self.fetch_logs()
        say("kubectl get loraresumes")
        print(self.kubectl("get", "loraresumes").stdout.rstrip())
        say(f"kubectl describe lr {self.name}")
        print(self.kubectl("describe", "lr", self.name).stdout.rstrip())

        adapter = f"{self.storage}adapter/"
        bucket, _, prefix = adapter[len("s3://") :].partition("/")
        objects = self.s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        say(f"the adapter is at {adapter} (sandbox S3 {self.state['s3_endpoint']}):")
        for obj in objects:
            print(f"   {obj['Key']}  {obj['Size']} bytes")

        series = self.series()
        plot = Path(os.environ.get("DEMO_PLOT", "demo-loss.png")).resolve()
        lost = self.plot(series, plot)
        status = json.loads(self.kubectl("get", "lr", self.name, "-o", "json").stdout).get("status") or {}
        say("summary")
        print(f"   attempts:    {status.get('attempt', len(series))}")
        print(f"   preemptions: {status.get('preemptions')} ({', '.join(k['how'] for k in self.kills) or 'none'})")
        print(f"   lost steps:  {sum(lost)} (recomputed after each kill: {lost})")
        print(f"   wall time:   {time.monotonic() - t0:.0f}s")
        print(f"   loss plot:   {plot}")
        return 0

    def series(self) -> dict[int, list[tuple[int, float]]]:
        out: dict[int, list[tuple[int, float]]] = {}
        for attempt, text in sorted(self.logs.items()):
            for line in text.splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("event") == "log" and event.get("loss") is not None:
                    out.setdefault(int(event.get("attempt") or attempt), []).append(
                        (int(event["step"]), float(event["loss"]))
                    )
        return out

    def plot(self, series: dict[int, list[tuple[int, float]]], path: Path) -> list[int]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4.8))
        lost: list[int] = []
        attempts = sorted(series)
        for i, attempt in enumerate(attempts):
            steps, losses = zip(*sorted(series[attempt]), strict=True)
            ax.plot(steps, losses, marker=".", label=f"attempt {attempt}")
            if i + 1 < len(attempts) and series[attempts[i + 1]]:
                ended = max(steps)
                resumed = min(s for s, _ in series[attempts[i + 1]]) - 1
                lost.append(max(0, ended - resumed))
                how = next((k["how"] for k in self.kills if k["attempt"] == attempt), "ended")
                how = {"delete": "kubectl delete pod", "preempt": "spot reclaim"}.get(how, how)
                ax.axvline(ended, color="red", linestyle="--", linewidth=1)
                ax.axvline(resumed, color="green", linestyle=":", linewidth=1)
                ax.annotate(
                    f"{how}\n(attempt {attempt} ends, step {ended})",
                    (ended, 1),
                    xycoords=("data", "axes fraction"),
                    textcoords="offset points",
                    xytext=(3, -28 - 26 * i),
                    fontsize=8,
                    color="red",
                )
                ax.annotate(
                    f"attempt {attempts[i + 1]} resumes\nfrom step {resumed}",
                    (resumed, 0),
                    xycoords=("data", "axes fraction"),
                    textcoords="offset points",
                    xytext=(3, 6 + 26 * i),
                    fontsize=8,
                    color="green",
                )
        ax.set_xlabel("global step")
        ax.set_ylabel("training loss")
        ax.set_title(f"LoraResume '{self.name}': loss across attempts (red: preempted, green: resumed)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return lost


def main() -> int:
    directory = Path(os.environ.get("DEMO_DIR", ".sandbox"))
    demo = Demo(directory, int(os.environ.get("DEMO_SEED", "7")))
    try:
        return demo.run()
    except Exception as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        print(
            f"logs: {directory}/supervisor.log, {directory}/cluster/operator.log, {directory}/cluster/nodes/ "
            f"(pods), {directory}/cluster/kube/*.log (control plane)",
            file=sys.stderr,
        )
        return 1
    finally:
        demo._stop.set()
        say("loraresume-sandbox down")
        print(demo.sandbox("down", check=False).stdout.strip())


if __name__ == "__main__":
    sys.exit(main())

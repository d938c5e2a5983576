"""`loraresume-sandbox up | env | preempt | restart operator | down`: the whole stack on one machine.

`up` runs one foreground supervisor process that owns everything and records it in DIR/state.json:
a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
built from Go modules; admin kubeconfig at DIR/cluster/kube/admin.kubeconfig), the Helm chart's
CRD, ServiceAccount and RBAC applied, the operator running as that ServiceAccount, the node
agent (nodes spot-0, spot-1, on-demand-0 running pods as local processes), a moto S3 server
(bucket `sandbox`, Secret `s3-creds` in `default`), the seeded tiny model and dataset, and a
loopback control endpoint (`preempt`, `restart operator`). It runs until SIGTERM/SIGINT and then
stops them all. A development tool: none of it ships in an image.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeGuard

from loraresume_operator.policy import CREDENTIALS_LABEL

from .waiting import port_free, stop_process

if TYPE_CHECKING:
    from .cluster import SandboxCluster

DEFAULT_DIR = ".sandbox"
DEFAULT_S3_PORT = 9000
BUCKET = "sandbox"
SECRET = "s3-creds"
NAMESPACE = "default"
# Dummy credentials of the sandbox's S3 (moto accepts any); fine to print.
AWS = {
    "AWS_ACCESS_KEY_ID": "sandbox",
    "AWS_SECRET_ACCESS_KEY": "sandbox-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_AWS_CLEARED = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def _alive(pid: int | None) -> TypeGuard[int]:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def create_s3_secret(kube: Any) -> None:
    """The sandbox's S3 credentials as the Secret its LoraResumes name (`s3-creds` in `default`)."""
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    kube.create(
        "secrets",
        {"metadata": {"name": SECRET, "labels": CREDENTIALS_LABEL}, "stringData": {k: AWS[k] for k in keys}},
        NAMESPACE,
    )


def read_state(directory: Path) -> dict:
    try:
        return json.loads((directory / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(directory: Path, state: dict) -> None:
    tmp = directory / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(directory / "state.json")


# -- the supervisor ---------------------------------------------------------------------------
class _Control(BaseHTTPRequestHandler):
    cluster: ClassVar[SandboxCluster | None] = None
    on_restart = staticmethod(lambda pid: None)

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            cluster = self.cluster
            if cluster is None or cluster.agent is None or cluster.operator is None:
                raise RuntimeError("the sandbox is still starting")
            if self.path == "/preempt":  # a spot reclaim of the node under the pod
                node = cluster.agent.node_of(body.get("namespace") or NAMESPACE, body["pod"])
                cluster.agent.reclaim_spot(node, wait=True)
                code, reply = 200, {"ok": True, "node": node}
            elif self.path == "/restart/operator":
                cluster.operator.stop()
                cluster.operator = cluster.new_operator()
                cluster.operator.start()
                cluster.operator.wait_ready()
                code, reply = 200, {"ok": True, "pid": cluster.operator.pid}
                _Control.on_restart(cluster.operator.pid)
            else:
                raise LookupError(f"unknown path {self.path}")
        except LookupError as exc:
            code, reply = 404, {"ok": False, "error": str(exc)}
        except Exception as exc:  # reported to the caller
            code, reply = 500, {"ok": False, "error": repr(exc)}
        data = json.dumps(reply).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url}: no answer after {timeout:.0f}s")


def supervise(directory: Path, s3_port: int) -> int:
    import boto3

    from .cluster import SandboxCluster
    from .seed_data import seed_s3

    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    for name in _AWS_CLEARED:
        os.environ.pop(name, None)
    os.environ.update(AWS)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    state: dict = {"status": "starting", "pid": os.getpid(), "dir": str(directory)}
    _write_state(directory, state)
    moto = cluster = control = None
    logs: list = []
    try:
        if not port_free(s3_port):
            raise RuntimeError(f"port {s3_port} for the S3 server is in use (another sandbox up? try `down`)")
        endpoint = f"http://127.0.0.1:{s3_port}"
        moto_log = open(directory / "moto.log", "wb")
        logs.append(moto_log)
        moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
            stdout=moto_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        state.update(s3_endpoint=endpoint, moto_pid=moto.pid)
        _write_state(directory, state)
        _wait_http(f"{endpoint}/moto-api/", 60, moto)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=AWS["AWS_DEFAULT_REGION"])
        try:
            s3.create_bucket(Bucket=BUCKET)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        print(f"S3 (moto) at {endpoint}, bucket s3://{BUCKET}/", flush=True)
        # The tiny model is built (torch, transformers imports) while the control plane starts.
        seeded: dict = {}
        seeding = threading.Thread(
            target=lambda: seeded.update(uris=seed_s3(s3, BUCKET, directory / "seed")), name="seed-s3", daemon=True
        )
        seeding.start()

        extra = {
            **OFFLINE,
            "HF_HOME": str(directory / "hf"),
            "TRITON_CACHE_DIR": str(directory / "triton"),
            "AWS_DEFAULT_REGION": AWS["AWS_DEFAULT_REGION"],
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        cluster = SandboxCluster(directory / "cluster", namespaces=(NAMESPACE,), extra_env=extra, with_operator=False)
        cluster.start()
        create_s3_secret(cluster.kube)
        kubeconfig = cluster.kubeconfig
        state.update(
            api_url=cluster.control_plane.url,
            kubeconfig=str(kubeconfig),
            control_plane_pids=cluster.control_plane.pids(),
            node_dir=str(directory / "cluster" / "nodes"),
        )
        print(f"Kubernetes API at {cluster.control_plane.url}, kubeconfig {kubeconfig}", flush=True)
        cluster.operator = cluster.new_operator()
        cluster.operator.start()
        cluster.operator.wait_ready()
        state.update(operator_pid=cluster.operator.pid, operator_log=str(cluster.operator.log_path))
        _write_state(directory, state)
        print(
            f"operator running as ServiceAccount {cluster.operator_user} (log {cluster.operator.log_path})", flush=True
        )

        seeding.join()
        if "uris" not in seeded:
            raise RuntimeError("seeding the tiny model and dataset into S3 failed (see the traceback above)")
        uris = seeded["uris"]
        print(f"seeded base model: {uris['model']}\nseeded dataset:    {uris['dataset']}", flush=True)

        _Control.cluster = cluster

        def restarted(pid: int) -> None:
            state["operator_pid"] = pid
            _write_state(directory, state)

        _Control.on_restart = staticmethod(restarted)
        control = ThreadingHTTPServer(("127.0.0.1", 0), _Control)
        threading.Thread(target=control.serve_forever, name="sandbox-control", daemon=True).start()
        state.update(status="ready", control_port=control.server_address[1], seed=uris)
        _write_state(directory, state)
        print(f'sandbox ready (state: {directory / "state.json"}); eval "$(loraresume-sandbox env)"', flush=True)
        reported = None
        while not stop.wait(1):
            op = cluster.operator
            if op.proc is not None and op.proc.poll() is not None and reported is not op.proc:
                reported = op.proc
                print(
                    f"operator exited with {op.proc.returncode}; see {op.log_path} "
                    "(`loraresume-sandbox restart operator` starts it again)",
                    flush=True,
                )
            if not cluster.control_plane.alive():
                print("the control plane stopped; shutting the sandbox down", flush=True)
                break
        return 0
    except Exception as exc:
        state.update(status="failed", error=str(exc))
        _write_state(directory, state)
        print(f"loraresume-sandbox: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if control is not None:
            control.shutdown()
        if cluster is not None:
            cluster.stop()
        stop_process(moto, 20)
        for f in logs:
            f.close()
        if state.get("status") != "failed":
            state["status"] = "stopped"
        _write_state(directory, state)


# -- commands -----------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    old = read_state(directory)
    if old.get("status") in ("starting", "ready") and _alive(old.get("pid")):
        print(
            f"loraresume-sandbox: already up (pid {old['pid']}); run `loraresume-sandbox down` first", file=sys.stderr
        )
        return 1
    from .control_plane import kube_binaries

    os.environ["LORARESUME_KUBE_BIN"] = str(kube_binaries())  # built once (progress shown), before the timeout runs
    if not args.background:
        return supervise(directory, args.s3_port)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state.json").unlink(missing_ok=True)
    log = open(directory / "supervisor.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraresume_sandbox.cli", "up", "--dir", str(directory), "--s3-port", str(args.s3_port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        state = read_state(directory)
        if state.get("status") == "ready":
            print((directory / "supervisor.log").read_text(errors="replace"), end="")
            return 0
        if state.get("status") == "failed" or proc.poll() is not None:
            break
        time.sleep(0.3)
    print((directory / "supervisor.log").read_text(errors="replace"), end="", file=sys.stderr)
    print(f"loraresume-sandbox: the sandbox did not come up (see {directory / 'supervisor.log'})", file=sys.stderr)
    if proc.poll() is None:
        proc.terminate()
        proc.wait(60)
    return 1


def _ready_state(directory: Path) -> dict:
    state = read_state(directory)
    if state.get("status") != "ready" or not _alive(state.get("pid")):
        raise SystemExit(f"loraresume-sandbox: no sandbox is up in {directory} (run `loraresume-sandbox up`)")
    return state


def cmd_env(args: argparse.Namespace) -> int:
    state = _ready_state(Path(args.dir))
    print(f"export KUBECONFIG={state['kubeconfig']}")
    print(f"export AWS_ENDPOINT_URL={state['s3_endpoint']}")
    print(
        f"export AWS_ACCESS_KEY_ID={AWS['AWS_ACCESS_KEY_ID']} AWS_SECRET_ACCESS_KEY={AWS['AWS_SECRET_ACCESS_KEY']}"
        f" AWS_DEFAULT_REGION={AWS['AWS_DEFAULT_REGION']}"
    )
    return 0


def _control(state: dict, path: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{state['control_port']}{path}",
        method="POST",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise SystemExit(
            f"loraresume-sandbox: {path.strip('/')} failed: {json.loads(exc.read()).get('error')}"
        ) from None


def cmd_preempt(args: argparse.Namespace) -> int:
    state = _ready_state(Path(args.dir))
    reply = _control(state, "/preempt", {"namespace": args.namespace, "pod": args.pod}, args.timeout)
    print(
        f"spot node {reply['node']} under pod {args.namespace}/{args.pod} reclaimed "
        "(tainted, pods shut down gracefully, Node deleted; a replacement node registered)"
    )
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    state = _ready_state(Path(args.dir))
    reply = _control(state, "/restart/operator", {}, args.timeout)
    print(f"operator restarted (pid {reply['pid']})")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    state = read_state(directory)
    pid = state.get("pid")
    if not _alive(pid):
        print("loraresume-sandbox: not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    for key in ("moto_pid",):  # our own child, if the supervisor could not end it
        if _alive(state.get(key)):
            os.kill(state[key], signal.SIGKILL)
    print("sandbox stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraresume-sandbox", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the sandbox (foreground supervisor, or --background)")
    up.add_argument("--background", action="store_true", help="daemonize; return once ready")
    up.add_argument("--s3-port", type=int, default=int(os.environ.get("SANDBOX_S3_PORT", DEFAULT_S3_PORT)))
    up.add_argument("--timeout", type=float, default=180, help="seconds --background waits for ready")
    up.set_defaults(func=cmd_up)
    env = sub.add_parser("env", help="print shell exports for kubectl and S3 clients")
    env.set_defaults(func=cmd_env)
    pre = sub.add_parser("preempt", help="spot reclaim of the node under a pod (graceful node shutdown)")
    pre.add_argument("pod")
    pre.add_argument("--namespace", "-n", default=NAMESPACE)
    pre.add_argument("--timeout", type=float, default=180)
    pre.set_defaults(func=cmd_preempt)
    restart = sub.add_parser("restart", help="restart one component (operator) without the rest")
    restart.add_argument("component", choices=["operator"])
    restart.add_argument("--timeout", type=float, default=120)
    restart.set_defaults(func=cmd_restart)
    down = sub.add_parser("down", help="stop the sandbox")
    down.add_argument("--timeout", type=float, default=90)
    down.set_defaults(func=cmd_down)
    for p in (up, env, pre, restart, down):
        p.add_argument("--dir", default=DEFAULT_DIR, help="state directory (default: .sandbox/)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

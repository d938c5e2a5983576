"""`loraresume-sandbox up --background | env | down` on non-default ports in a temporary directory."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

from tests.support.waiting import free_port


def _sandbox(tmp_path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraresume_sandbox.cli", *args, "--dir", str(tmp_path / "sbx")],
                          capture_output=True, text=True, timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_up_env_kubectl_down(tmp_path):
    up = _sandbox(tmp_path, "up", "--background", "--api-port", str(free_port()), "--s3-port", str(free_port()))
    state = json.loads((tmp_path / "sbx" / "state.json").read_text())
    try:
        assert up.returncode == 0, up.stderr
        assert "s3://sandbox/models/tiny/" in up.stdout and "s3://sandbox/data/train.jsonl" in up.stdout
        env = _sandbox(tmp_path, "env")
        assert env.returncode == 0, env.stderr
        exports = dict(word.split("=", 1) for line in env.stdout.splitlines()
                       for word in shlex.split(line)[1:])
        assert exports["AWS_ENDPOINT_URL"] == state["s3_endpoint"]
        listed = subprocess.run(["kubectl", "get", "lr", "-o", "json"], capture_output=True, text=True, timeout=30,
                                env={**os.environ, "KUBECONFIG": exports["KUBECONFIG"]})
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["items"] == []
    finally:
        down = _sandbox(tmp_path, "down")
    assert down.returncode == 0, down.stderr
    pids = [state["pid"], state["moto_pid"], state["operator_pid"]]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)
    assert json.loads((tmp_path / "sbx" / "state.json").read_text())["status"] == "stopped"

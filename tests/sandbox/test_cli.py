"""`loraresume-sandbox up --background | env | restart operator | down` on a non-default S3 port in a
temporary directory: a real control plane, the operator as the chart's ServiceAccount, the node agent."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from tests.support.waiting import free_port

pytestmark = pytest.mark.timeout(300)


def _sandbox(tmp_path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loraresume_sandbox.cli", *args, "--dir", str(tmp_path / "sbx")],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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


def _state(tmp_path) -> dict:
    return json.loads((tmp_path / "sbx" / "state.json").read_text())


def test_up_env_kubectl_restart_operator_down(tmp_path):
    up = _sandbox(tmp_path, "up", "--background", "--s3-port", str(free_port()))
    state = _state(tmp_path)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "s3://sandbox/models/tiny/" in up.stdout and "s3://sandbox/data/train.jsonl" in up.stdout
        env = _sandbox(tmp_path, "env")
        assert env.returncode == 0, env.stderr
        exports = dict(word.split("=", 1) for line in env.stdout.splitlines() for word in shlex.split(line)[1:])
        assert exports["AWS_ENDPOINT_URL"] == state["s3_endpoint"]

        def kubectl(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["kubectl", *args],
                capture_output=True,
                text=True,
                timeout=30,
                env={**os.environ, "KUBECONFIG": exports["KUBECONFIG"]},
            )

        version = kubectl("version", "-o", "json")
        assert version.returncode == 0, version.stderr
        assert json.loads(version.stdout)["serverVersion"]["gitVersion"] == "v1.37.2"
        listed = kubectl("get", "lr", "-o", "json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["items"] == []
        nodes = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]
        assert sorted(n["metadata"]["name"] for n in nodes) == ["on-demand-0", "spot-0", "spot-1"]

        # The operator alone restarts; the control plane and the rest stay up.
        old = state["operator_pid"]
        restarted = _sandbox(tmp_path, "restart", "operator")
        assert restarted.returncode == 0, restarted.stderr
        new = _state(tmp_path)["operator_pid"]
        assert new != old and _alive(new) and not _alive(old)
        assert all(_alive(pid) for pid in state["control_plane_pids"].values())
        assert kubectl("get", "lr").returncode == 0
    finally:
        down = _sandbox(tmp_path, "down")
    assert down.returncode == 0, down.stderr
    final = _state(tmp_path)
    pids = [state["pid"], state["moto_pid"], final["operator_pid"], *state["control_plane_pids"].values()]
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)
    assert final["status"] == "stopped"

"""Polling helpers for the demo and tests that watch other processes (no fixed sleeps)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition", every: float = 0.1) -> Any:
    """The first truthy value of `predicate()`, or AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


_PORTS_DIR = Path(tempfile.gettempdir()) / "loraresume-ports"
_RESERVATION_TTL_S = 6 * 3600
_RANDOM = random.SystemRandom()  # not the module generator, which tests may seed alike


def _below_ephemeral_range() -> range:
    """Ports the kernel never hands out to an outgoing connection (Linux: below ip_local_port_range)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(10000, max(low, 12000))


def port_free(port: int) -> bool:
    """Whether a server could bind `port` on loopback now (TIME_WAIT leftovers do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _reserve(port: int) -> bool:
    """Claim `port` for this machine's other callers too (pytest-xdist workers, a second sandbox)."""
    _PORTS_DIR.mkdir(exist_ok=True)
    claim = _PORTS_DIR / str(port)
    try:
        if time.time() - claim.stat().st_mtime > _RESERVATION_TTL_S:
            claim.unlink(missing_ok=True)  # a claim from a run long gone
    except FileNotFoundError:
        pass
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def free_port() -> int:
    """A loopback port for a server started later by another process.

    Not `bind(0)`: that port comes from the ephemeral range, where any outgoing connection made
    before the server binds may take it (seen in CI as kopf's liveness endpoint failing with
    "address already in use"). These ports lie below that range, and each is claimed once per
    machine, so parallel workers never pick the same one.
    """
    candidates = _below_ephemeral_range()
    for _ in range(1000):
        port = _RANDOM.choice(candidates)
        if port_free(port) and _reserve(port):
            return port
    raise RuntimeError(f"no free loopback port in {candidates.start}-{candidates.stop - 1}")


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float, sig: int = signal.SIGTERM) -> None:
    """Signal a child that still runs, give it `grace` seconds, then SIGKILL it; always reaped."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

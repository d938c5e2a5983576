"""Launch `loraresume-train` processes forked from a parent that has already imported the ML stack.

A trainer process spends 15-25 s of a 2-core machine importing unsloth, transformers, peft, trl
and datasets before it reads its first byte, and the trainer tests start over a hundred of them.
This fork server imports that stack once; each launch forks it, and the child runs the real
`loraresume_trainer.cli.main` with the launch's argv, environment and pipes, so it is a real
process (own pid, real signals, its own exit status) that skips only the imports.

Import-time state is the one thing a child does not get fresh, so the server is started with the
environment the HF libraries read at import (the offline switches), which every launch shares;
everything the trainer reads itself (credentials, LORARESUME_*, its config) comes per launch.
The parent only imports: it runs no torch operation, so no thread pool exists to be lost in the
fork. Set LORARESUME_TEST_TRAINER_LAUNCH=spawn to run every trainer in a fresh interpreter.

Protocol (one SOCK_SEQPACKET connection per launch): the client sends a JSON request with its
stdout and stderr write ends attached (SCM_RIGHTS); the server answers {"pid": N}, and later
{"exit_code": C} (negative for a signal, as subprocess reports it) when the child is reaped.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
_MAX_MESSAGE = 1 << 20
# What the trainer imports lazily, imported here once (unsloth first: it patches the others).
_PRELOAD = (
    "unsloth",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "loraresume_trainer.cli",
    "loraresume_trainer.pipeline",
    "loraresume_trainer.model_loading",
    "loraresume_trainer.training_args",
    "loraresume_trainer.dataset_prep",
    "loraresume_trainer.callbacks",
    "loraresume_trainer.uploader",
)


# --- the server (its own process) -------------------------------------------------------------
def _child(request: dict[str, Any], out_fd: int, err_fd: int, closing: list[socket.socket]) -> None:
    """In the forked child: become the launch's process, run the trainer's main, exit with its code."""
    code = 1
    try:
        for sock in closing:
            sock.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.close(out_fd)
        os.close(err_fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["loraresume-train", *request["argv"]]
        import logging
        import random

        import numpy

        # A fresh interpreter's root logger has no handler when main() configures it; the preloaded
        # libraries gave the server's one theirs (and main's basicConfig would then do nothing).
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)

        random.seed()  # a fresh interpreter's generators differ per process; these would not
        numpy.random.seed()
        from loraresume_trainer.cli import main

        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve(path: str) -> None:
    """Preload, listen on `path`, fork a trainer per request; exit when stdin closes."""
    for name in _PRELOAD:
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection to tell its exit code
    print("ready", flush=True)  # imports print banners to stdout too: the client reads up to this line
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nobody reads the pipe from here on
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], 0.05)
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            break
        if listener in ready:
            conn, _ = listener.accept()
            data, fds, _, _ = socket.recv_fds(conn, _MAX_MESSAGE, 2)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(json.loads(data), fds[0], fds[1], [listener, conn, *waiting.values()])
            for fd in fds:
                os.close(fd)
            conn.send(json.dumps({"pid": pid}).encode())
            waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid)
            try:
                conn.send(json.dumps({"exit_code": os.waitstatus_to_exitcode(status)}).encode())
            except OSError:
                pass  # the client went away; the child is reaped all the same
            conn.close()
    for pid in waiting:
        os.kill(pid, signal.SIGKILL)


# --- the client (the test process) ------------------------------------------------------------
class WarmProcess:
    """The subset of subprocess.Popen that trainer_runs uses, for a child of the fork server."""

    def __init__(self, server: str, argv: list[str], env: dict[str, str], cwd: str) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.connect(server)
        request = {"argv": argv, "env": env, "cwd": cwd}
        socket.send_fds(self._sock, [json.dumps(request).encode()], [out_w, err_w])
        os.close(out_w)
        os.close(err_w)
        self.pid: int = json.loads(self._sock.recv(_MAX_MESSAGE))["pid"]
        self.stdout: IO[str] = open(out_r, encoding="utf-8", errors="replace")
        self.stderr: IO[str] = open(err_r, encoding="utf-8", errors="replace")
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._sock.settimeout(timeout)
            try:
                data = self._sock.recv(_MAX_MESSAGE)
            except (TimeoutError, BlockingIOError):  # BlockingIOError: timeout 0
                raise subprocess.TimeoutExpired("loraresume-train (warm)", timeout or 0) from None
            if not data:
                raise RuntimeError("the trainer fork server went away")
            self.returncode = int(json.loads(data)["exit_code"])
            self._sock.close()
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(timeout=0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Server:
    _lock = threading.Lock()
    _path: str | None = None

    @classmethod
    def path(cls, env: dict[str, str]) -> str:
        """Start this test process's fork server once, with the import-time environment."""
        with cls._lock:
            if cls._path is None:
                path = os.path.join(tempfile.mkdtemp(prefix="warm-trainer-"), "sock")
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.support.warm_trainer", path],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=REPO,
                    env=env,
                )
                assert proc.stdout is not None
                if not any(line.strip() == "ready" for line in proc.stdout):
                    raise RuntimeError(f"the trainer fork server did not start (exit {proc.wait()})")
                atexit.register(_stop, proc)
                cls._path = path
            return cls._path


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def warm_enabled() -> bool:
    return os.environ.get("LORARESUME_TEST_TRAINER_LAUNCH", "warm") != "spawn"


def launch(argv: list[str], env: dict[str, str], *, server_env: dict[str, str], cwd: str | None = None) -> WarmProcess:
    """Start `loraresume-train argv` with `env` as a child of the fork server.

    The server starts on first use with `server_env`: what every launch shares at import time.
    """
    return WarmProcess(_Server.path(server_env), argv, env, cwd or os.getcwd())


if __name__ == "__main__":
    serve(sys.argv[1])

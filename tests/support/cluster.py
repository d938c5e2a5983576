"""Shared builders for tests on the real control plane: one per module, and a pod-event recorder."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loraresume_sandbox.control_plane import ControlPlane
from loraresume_sandbox.kube_client import KubeClient, follow

Object = dict[str, Any]


@contextmanager
def control_plane(directory: Path) -> Iterator[ControlPlane]:
    """A control plane of its own (etcd, kube-apiserver, controller-manager, scheduler)."""
    with ControlPlane(directory, quiet=True) as cp:
        yield cp


class PodRecorder:
    """Every watch event of one pod (by name), from a background watch; for transient states."""

    def __init__(self, kube: KubeClient, namespace: str, name: str) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.events: list[tuple[str, Object]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        def record(kind: str, obj: Object) -> None:
            self.events.append((kind, obj))

        follow(
            self.kube,
            "pods",
            record,
            self._stop,
            namespace=self.namespace,
            field_selector=f"metadata.name={self.name}",
            relisted=lambda _: self._ready.set(),
            window_seconds=5,
        )

    def __enter__(self) -> PodRecorder:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def objects(self) -> list[Object]:
        return [obj for _, obj in self.events]

    def terminated_states(self) -> list[Object]:
        out = []
        for kind, obj in self.events:
            statuses = (obj.get("status") or {}).get("containerStatuses") or [{}]
            terminated = (statuses[0].get("state") or {}).get("terminated")
            if terminated:
                out.append({**terminated, "phase": obj["status"].get("phase"), "event": kind})
        return out

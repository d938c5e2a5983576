"""The local sandbox: a stand-in for a Kubernetes cluster on one machine (tests and the demo only).

Nothing here runs on a real cluster. `KubernetesEmulator` is the API server on loopback
(`k8s_api`), `SimulatedKubelet` runs pods as processes (`kubelet`), `seed_data` builds a
tiny model. Submodules are imported on use, so `seed_data` needs neither aiohttp nor jsonschema.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "KubernetesEmulator", "LogSource"]


def __getattr__(name: str) -> Any:
    if name == "KubernetesEmulator":
        from .k8s_api import KubernetesEmulator

        return KubernetesEmulator
    if name == "LogSource":
        from .k8s_http import LogSource

        return LogSource
    if name == "ApiError":
        from .k8s_errors import ApiError

        return ApiError
    raise AttributeError(name)

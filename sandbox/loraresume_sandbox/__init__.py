"""The local sandbox: a stand-in for a Kubernetes cluster on one machine (tests and the demo only).

Nothing here runs on a real cluster. `KubernetesEmulator` is the API server on loopback.
"""

from __future__ import annotations

from .k8s_api import KubernetesEmulator
from .k8s_http import LogSource
from .k8s_errors import ApiError

__all__ = ["ApiError", "KubernetesEmulator", "LogSource"]

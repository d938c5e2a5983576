"""The Kubernetes client's CoreV1Api, less the conversion of answers into its models where the operator
reads an answer as JSON or not at all.

The client turns every answer into its model classes (a V1Pod of a few hundred objects for a pod) and
the operator then turns a created pod back into JSON (the watch cache keeps JSON) or drops the answer
(an Event posted, a pod let go). The answer to letting a pod go alone was ~6 % of the operator's CPU at
200 resources (py-spy, round 2). Here those three calls ask the client for the raw answer
(`_preload_content=False`) and parse it as JSON; errors are raised as before (ApiException, its
`body` the raw answer). A list of pods (the start-up seeding, handlers._seed) is read the same way.
Every other call goes to the client unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes.client import CoreV1Api


def _raw(call: Any, *args: Any, **kw: Any) -> Any:
    """The call's answer as JSON. Read in full (urllib3 then gives the connection back to the pool, as
    ApiException's own read of an error's answer does)."""
    answer = call(*args, _preload_content=False, **kw)
    try:
        data = answer.data
    finally:
        answer.release_conn()
    return json.loads(data) if data else None


class LeanCoreV1Api:
    """A CoreV1Api whose pod creation, pod patch and Event creation answer plain JSON (dicts)."""

    def __init__(self, core: CoreV1Api) -> None:
        self._core = core

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def create_namespaced_pod(self, namespace: str, body: Any, **kw: Any) -> Any:
        return _raw(self._core.create_namespaced_pod, namespace, body, **kw)

    def patch_namespaced_pod(self, name: str, namespace: str, body: Any, **kw: Any) -> Any:
        return _raw(self._core.patch_namespaced_pod, name, namespace, body, **kw)

    def create_namespaced_event(self, namespace: str, body: Any, **kw: Any) -> Any:
        return _raw(self._core.create_namespaced_event, namespace, body, **kw)

    def list_pods(self, namespace: str | None, **kw: Any) -> list[dict[str, Any]]:
        """Pods as JSON, of one namespace or (None) of all."""
        if namespace is None:
            answer = _raw(self._core.list_pod_for_all_namespaces, **kw)
        else:
            answer = _raw(self._core.list_namespaced_pod, namespace, **kw)
        return list((answer or {}).get("items") or [])

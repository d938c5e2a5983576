"""kube-apiserver as the judge of what the cluster takes: dry-run requests to a real control plane.

The fuzz tests ask the real API server, not a model of it: a LoraResume is admitted by the CRD's
structural schema, defaulting, pruning and CEL rules exactly as a cluster admits it (`dryRun=All`,
nothing stored); an update is judged against a stored old object (CEL transition rules need
one); a status against the status subresource; a pod against core validation.
"""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraresume_sandbox.control_plane import ControlPlane
from loraresume_sandbox.kube_client import ApiError, KubeClient

ROOT = Path(__file__).resolve().parents[2]  # the repository
NS = "fuzz"
_WARNING = re.compile(r'^\d{3} \S+ "(.*)"$')


def warning_texts(headers: list[str]) -> list[str]:
    """The text of each `Warning: 299 - "..."` header (RFC 7234 form, as kube-apiserver sends it)."""
    out = []
    for header in headers:
        for part in re.findall(r'\d{3} \S+ "(?:[^"\\]|\\.)*"', header):
            match = _WARNING.match(part)
            if match:
                out.append(match.group(1).replace('\\"', '"').replace("\\\\", "\\"))
    return out


class ApiJudge:
    def __init__(self, kube: KubeClient, namespace: str = NS) -> None:
        self.kube, self.namespace = kube, namespace
        self._status_probe: str | None = None

    def admit(
        self, doc: dict[str, Any], old: dict[str, Any] | None = None, mode: str = "Strict"
    ) -> tuple[dict[str, Any], list[str]]:
        """What the API server stores for `doc` (raises ApiError when it refuses), and its warnings."""
        doc = copy.deepcopy(doc)
        params = {"dryRun": "All", "fieldValidation": mode}
        if old is None:
            stored = self.kube.request(
                "POST", f"/apis/loraresume.dev/v1alpha1/namespaces/{self.namespace}/loraresumes", doc, params=params
            )
            return stored, warning_texts(self.kube.last_warnings)
        name = f"old-{uuid.uuid4().hex[:10]}"
        base = copy.deepcopy(old)
        base["metadata"] = {"name": name}
        created = self.kube.create("loraresumes", base, self.namespace)
        try:
            doc["metadata"] = {
                **doc.get("metadata", {}),
                "name": name,
                "resourceVersion": created["metadata"]["resourceVersion"],
            }
            stored = self.kube.request(
                "PUT",
                f"/apis/loraresume.dev/v1alpha1/namespaces/{self.namespace}/loraresumes/{name}",
                doc,
                params=params,
            )
            return stored, warning_texts(self.kube.last_warnings)
        finally:
            self.kube.delete("loraresumes", self.namespace, name)

    def admit_status(self, status: dict[str, Any]) -> dict[str, Any]:
        """A status as the status subresource takes it (dry run, against one stored resource)."""
        if self._status_probe is None:
            name = f"status-{uuid.uuid4().hex[:8]}"
            self.kube.create(
                "loraresumes",
                {
                    "metadata": {"name": name},
                    "spec": {"baseModel": "m", "dataset": {"source": "/d"}, "storage": {"uri": "s3://bucket/p/"}},
                },
                self.namespace,
            )
            self._status_probe = name
        current = self.kube.get("loraresumes", self.namespace, self._status_probe)
        assert current is not None
        current["status"] = status
        return self.kube.request(
            "PUT",
            f"/apis/loraresume.dev/v1alpha1/namespaces/{self.namespace}/loraresumes/{self._status_probe}/status",
            current,
            params={"dryRun": "All", "fieldValidation": "Strict"},
        )

    def pod_problems(self, pod: dict[str, Any]) -> list[tuple[str, str]]:
        """(field, message) for each cause when the API server refuses `pod` (empty when it takes it):
        validation (400/422) or admission (403, e.g. the ServiceAccount plugin: no such account)."""
        pod = copy.deepcopy(pod)
        pod["metadata"].pop("ownerReferences", None)
        pod["metadata"]["namespace"] = self.namespace
        try:
            self.kube.request("POST", f"/api/v1/namespaces/{self.namespace}/pods", pod, params={"dryRun": "All"})
        except ApiError as error:
            if error.code not in (400, 403, 422):
                raise
            causes = error.details.get("causes") or [{"field": "", "message": error.message}]
            return [(str(c.get("field", "")), str(c.get("message", ""))) for c in causes]
        return []


@pytest.fixture(scope="module")
def judge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiJudge]:
    """A control plane of this module's own with the LoraResume CRD from crds/ installed."""
    with ControlPlane(tmp_path_factory.mktemp("kube"), quiet=True) as cp:
        cp.create_namespace(NS)
        for path in sorted((ROOT / "crds").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            cp.admin.apply(crd)
        from loraresume_sandbox.waiting import wait_for

        def served() -> bool:
            try:
                cp.admin.list_raw("loraresumes", NS)
            except ApiError:
                return False
            return True

        wait_for(served, 30, "LoraResumes served")
        yield ApiJudge(cp.admin)

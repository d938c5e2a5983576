"""The real operator process on the real control plane, fed hypothesis-drawn resources that the
API server takes but the model refuses, and odd-but-valid ones.

It must stay alive (liveness 200, no tracebacks), end each invalid resource Failed with the
field named (and start no pod for it), start one pod for each valid one, and not hot-loop:
once settled, a resource's status and events stay put while the operator keeps reconciling
every second.

Fixtures and helpers are tests/support/operator_stack.py's; the API server's own watch stream
is the change feed.
"""

from __future__ import annotations

import copy
import threading
import time
import urllib.request
import uuid
from collections import Counter
from typing import Any

import boto3
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from pydantic import ValidationError

from loraresume_operator.spec import LoraResumeSpec
from loraresume_sandbox.kube_client import KubeClient, follow
from tests.support.api_judge import ApiJudge
from tests.support.operator_stack import NS, wait_for
from tests.support.spec_strategies import model_loc, valid_specs
from tests.support.specs import resource, s3_storage, spec_doc

QUIET_SECONDS = 4.0  # the operator runs with --interval 1: about four periodic reconciles each
# (Values a Python regex takes but Go's refuses, like "48Gi\n", were drawn here while the
# emulator judged admission; kube-apiserver refuses them: tests/operator/test_spec_judges.py.)
BAD_TEMPLATES = ["shakespeare", "{0}", "{a.b}", "{", "plain text", "{x[0]}"]


@st.composite
def drawn(draw: st.DrawFn) -> tuple[dict[str, Any], str | None]:
    """(spec, field the operator must name) ; field None: a valid resource."""
    spec = copy.deepcopy(draw(valid_specs()))
    spec.pop("storage", None)  # placed on the test's S3 by the test (no Secret: the operator's identity)
    spec.get("restartPolicy", {}).update(backoffSeconds=1, maxBackoffSeconds=2)  # no waiting in this test
    kind = draw(st.sampled_from(["template", "valid"]))
    if kind == "template":
        spec["dataset"]["template"] = draw(st.sampled_from(BAD_TEMPLATES))
        return spec, "dataset.template"
    return spec, None


def _resource(spec: dict[str, Any], name: str, bucket: str, endpoint: str) -> dict[str, Any]:
    storage = {**spec.get("storage", {}), **s3_storage(bucket, name, endpoint)}
    return resource(spec_doc(spec, storage=storage), name)


class Recorder:
    """Counts, per LoraResume, status changes and writes, and Events, from the API server's watches."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self.lock = threading.Lock()
        self.status_changes: Counter[str] = Counter()
        self.modifications: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.last_status: dict[str, Any] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._watch, args=(r,), daemon=True) for r in ("loraresumes", "events")
        ]

    def _watch(self, resource: str) -> None:
        follow(self.kube, resource, self.on_event, self._stop, namespace=NS, window_seconds=5)

    def on_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind in ("ADDED", "MODIFIED"):
            self.record(obj)

    def record(self, obj: dict[str, Any]) -> None:
        kind, name = obj.get("kind"), obj.get("metadata", {}).get("name", "")
        with self.lock:
            if kind == "LoraResume":
                self.modifications[name] += 1
                status = obj.get("status")
                if status != self.last_status.get(name):
                    self.status_changes[name] += 1
                    self.last_status[name] = copy.deepcopy(status)
            elif kind == "Event":
                self.events[obj.get("involvedObject", {}).get("name", "")] += 1

    def __enter__(self) -> Recorder:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def snapshot(self) -> tuple[Counter[str], Counter[str], Counter[str]]:
        with self.lock:
            return Counter(self.status_changes), Counter(self.modifications), Counter(self.events)


def liveness(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return response.status


@settings(
    max_examples=1, phases=[Phase.generate], deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
@given(st.lists(drawn(), min_size=10, max_size=10))
def test_operator_survives_drawn_resources_without_hot_loops(stack, k8s, operator, s3_server, cases):
    bucket = f"fuzz-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    k8s_config.load_kube_config(config_file=str(stack.kubeconfig))
    api = k8s_client.CustomObjectsApi(k8s_client.ApiClient())
    judge = ApiJudge(k8s, NS)
    with Recorder(k8s) as recorder:
        expected: dict[str, str | None] = {}
        for i, (spec, field) in enumerate(cases):
            name = f"fz{i}-{uuid.uuid4().hex[:6]}"
            body = _resource(spec, name, bucket, s3_server.endpoint)
            stored, _ = judge.admit(body)  # the API server takes every drawn resource (that is the point)
            try:
                LoraResumeSpec.model_validate(stored["spec"])
                assert field is None, f"{field}: the model took {stored['spec']}"
            except ValidationError:
                assert field is not None, stored["spec"]
            api.create_namespaced_custom_object("loraresume.dev", "v1alpha1", NS, "loraresumes", body)
            expected[name] = field

        def pods(name: str) -> list[str]:
            return [p["metadata"]["name"] for p in k8s.list("pods", NS) if p["metadata"]["name"].startswith(name + "-")]

        def settled(name: str) -> bool:
            status = (k8s.get("loraresumes", NS, name) or {}).get("status") or {}
            if expected[name] is not None:
                return status.get("phase") == "Failed"
            return status.get("phase") == "Running" or "waiting for LoraResume" in status.get("message", "")

        for name in expected:
            wait_for(f"{name} to settle", lambda n=name: settled(n), timeout=60)

        for name, field in expected.items():
            status = k8s.get("loraresumes", NS, name)["status"]
            if field is not None:
                assert field in status["message"] and status["message"].startswith("invalid spec:"), status
                failed = next(c for c in status["conditions"] if c["type"] == "Failed")
                assert (failed["status"], failed["reason"]) == ("True", "InvalidSpec")
                assert pods(name) == []
            else:
                assert status["phase"] != "Failed", status
                assert len(pods(name)) <= 1 and status.get("attempt", 0) <= 1, status

        # kopf records a finished handler in annotations just after the status is written: let
        # that bookkeeping pass (at most a few seconds), then nothing at all may change.
        def quiet() -> bool:
            first = recorder.snapshot()
            time.sleep(1.5)
            return recorder.snapshot() == first

        wait_for("the operator's writes to stop", quiet, timeout=20)
        before = recorder.snapshot()
        time.sleep(QUIET_SECONDS)
        after = recorder.snapshot()
        for name in expected:
            status_changes = after[0][name] - before[0][name]
            modifications = after[1][name] - before[1][name]
            events = after[2][name] - before[2][name]
            assert (status_changes, modifications, events) == (0, 0, 0), (
                f"{name} ({expected[name] or 'valid'}): {status_changes} status changes, {modifications} writes, "
                f"{events} events in {QUIET_SECONDS} s after settling"
            )
        assert operator.proc.poll() is None, "the operator exited"
        assert liveness(operator.liveness_port) == 200
        assert "Traceback" not in operator.log, operator.log[-3000:]


def test_drawn_cases_cover_invalid_and_valid(k8s) -> None:
    """Not vacuous: the strategy draws both kinds and every invalid one is schema-valid, model-invalid."""
    judge = ApiJudge(k8s, NS)
    seen: set[str] = set()

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(drawn())
    def probe(case: tuple[dict[str, Any], str | None]) -> None:
        spec, field = case
        stored, _ = judge.admit(_resource(spec, "probe", "bucket", "http://127.0.0.1:1"))
        try:
            LoraResumeSpec.model_validate(stored["spec"])
            seen.add("valid")
            assert field is None
        except ValidationError as exc:
            seen.add(field or "?")
            locs = {".".join(str(p) for p in e["loc"]) for e in exc.errors()}
            assert field in locs or model_loc(("spec", *str(field).split("."))) in locs, (field, locs)

    probe()
    assert seen == {"valid", "dataset.template"}, seen

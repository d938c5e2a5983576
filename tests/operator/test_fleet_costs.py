"""What the operator does once per process, not once per resource or thread (issue 15: CPU and a loaded
restart): botocore's data files read once for every S3 client, one Secret read for the threads that ask
at once, and watch bodies kept without the API server's field-ownership records."""

from __future__ import annotations

import copy
import threading
import time
import uuid
from typing import Any

from botocore.loaders import JSONFileLoader

from loraresume_operator import s3_view
from loraresume_operator.defaults import OperatorDefaults
from loraresume_operator.watch_cache import WatchCache
from tests.support.reconciler_harness import FakeCore, FakeCustom
from tests.support.specs import MINIMAL, build_spec, resource, s3_storage

NS = "fleet"


def _fresh_credentials() -> dict[str, str]:
    """Credentials no earlier test built a client for (s3_client keeps one client per key)."""
    return {"AWS_ACCESS_KEY_ID": f"k-{uuid.uuid4().hex}", "AWS_SECRET_ACCESS_KEY": "s"}


def test_s3_clients_share_botocore_data_read_once(monkeypatch: Any) -> None:
    """A new client (a Secret each, or a rotated one) reads no botocore data file once one client was built
    or warm_s3 ran: the files are ~0.1 s of CPU per read, and a restart's reconcile threads waited for them."""
    s3_view.warm_s3()
    s3_view.s3_client("http://127.0.0.1:1", "us-east-1", _fresh_credentials())
    loaded: list[str] = []
    real = JSONFileLoader.load_file

    def counting(self: JSONFileLoader, file_path: str) -> Any:
        loaded.append(file_path)
        return real(self, file_path)

    monkeypatch.setattr(JSONFileLoader, "load_file", counting)
    for _ in range(3):
        client = s3_view.s3_client("http://127.0.0.1:1", "us-east-1", _fresh_credentials())
        assert client.can_paginate("list_objects_v2")
    assert loaded == []


def test_warm_s3_reads_the_files_a_client_needs_without_a_request() -> None:
    s3_view.warm_s3()
    cached = {key[1:] for key in s3_view._LOADER._cache if key and key[0] == "load_data_with_path"}
    assert {("endpoints",), ("partitions",)} <= cached
    assert any("s3/" in str(key[0]) and "service-2" in str(key[0]) for key in cached)


class _SlowSecrets(FakeCore):
    """A Secret read that takes a while (an API server under load), counted."""

    reads: int = 0

    def read_namespaced_secret(self, name: str, namespace: str) -> Any:
        self.reads += 1
        time.sleep(0.05)
        return super().read_namespaced_secret(name, namespace)


def test_threads_that_want_a_secret_at_once_read_it_once() -> None:
    """A restarted operator's reconcile threads all want the credentials at once: one GET, the others take
    its answer (each read it before)."""
    from loraresume_operator.reconcile import Reconciler

    core = _SlowSecrets()
    body = resource(MINIMAL, name="job", namespace=NS)
    rec = Reconciler(core, FakeCustom(body), OperatorDefaults(), s3_factory=lambda *a: None)
    spec = build_spec(MINIMAL, storage=s3_storage("bucket", "job", "http://127.0.0.1:1", secret="creds"))
    start = threading.Barrier(8)
    got: list[dict[str, str] | None] = []

    def ask() -> None:
        start.wait()
        got.append(rec._credentials(NS, spec))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert core.reads == 1
    assert len(got) == 8 and all(g == got[0] and g for g in got)
    rec.forget_credentials(NS, spec)  # storage refused them: read again
    rec._credentials(NS, spec)
    assert core.reads == 2


def test_the_watch_cache_keeps_no_managed_fields_and_its_own_copy() -> None:
    """managedFields (the API server's field-ownership records) were most of what was copied per event;
    nothing reads them. What is kept is a copy: later changes to the delivered body do not reach it."""
    body = resource(MINIMAL, name="job", namespace=NS)
    body["metadata"].update(
        resourceVersion="7",
        uid="u-1",
        generation=2,
        finalizers=["x/y"],
        managedFields=[{"manager": "m", "fieldsV1": {"f:spec": {}}}],
    )
    body["status"] = {"phase": "Running", "conditions": [{"type": "Running", "status": "True"}]}
    delivered = copy.deepcopy(body)
    cache = WatchCache()
    cache.put_resource(delivered)
    kept = cache.resource(NS, "job")
    assert kept is not None
    want = copy.deepcopy(body)
    del want["metadata"]["managedFields"]
    assert kept == want
    delivered["status"]["conditions"][0]["status"] = "False"
    delivered["metadata"]["finalizers"].append("z")
    assert kept == want


def test_resources_by_phase_follow_each_change() -> None:
    """The gauge is kept as phases change (a reconcile recounted every resource before: O(N) each)."""
    from loraresume_operator import metrics
    from loraresume_operator.reconcile import Reconciler

    rec = Reconciler(FakeCore(), FakeCustom(resource(MINIMAL, name="job", namespace=NS)), OperatorDefaults())

    def gauge() -> dict[str, float]:
        return {p: metrics.RESOURCES_BY_PHASE.labels(p)._value.get() for p in ("Pending", "Running", "Succeeded")}

    steps = [
        (("a", "Pending"), {"Pending": 1, "Running": 0, "Succeeded": 0}),
        (("b", "Pending"), {"Pending": 2, "Running": 0, "Succeeded": 0}),
        (("a", "Running"), {"Pending": 1, "Running": 1, "Succeeded": 0}),
        (("a", "Running"), {"Pending": 1, "Running": 1, "Succeeded": 0}),
        (("a", "Succeeded"), {"Pending": 1, "Running": 0, "Succeeded": 1}),
        (("b", None), {"Pending": 0, "Running": 0, "Succeeded": 1}),
        (("c", None), {"Pending": 0, "Running": 0, "Succeeded": 1}),  # never known: nothing changes
    ]
    for (name, phase), want in steps:
        rec.record_phase(NS, name, phase)
        assert gauge() == want, (name, phase)
    assert rec._phases == {(NS, "a"): "Succeeded"}

"""The operator's own watch of trainer pods (pod_watch.py): its pure parts by table, and the watch itself with
the real Kubernetes client against the real API server: every change of a trainer pod delivered once and in
order, no other pod, and a watch whose version expired (410 Gone) lists again and delivers what went meanwhile
as deleted."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client import ApiException

from loraresume_operator.lean_api import LeanCoreV1Api
from loraresume_operator.observed import LABEL_RESOURCE
from loraresume_operator.pod_watch import Expired, PodWatch, events, vanished
from loraresume_sandbox.control_plane import ControlPlane
from loraresume_sandbox.waiting import wait_for

NS = "watched"


def pod(name: str, namespace: str = NS) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}}


@pytest.mark.parametrize(
    ("known", "listed", "want"),
    [
        ([], [], []),
        ([(NS, "a")], [pod("a")], []),
        ([(NS, "a"), (NS, "b")], [pod("a")], [(NS, "b")]),
        ([(NS, "a")], [pod("a", "other"), pod("c")], [(NS, "a")]),  # a name alone is not the pod
        ([], [pod("new")], []),  # new ones are delivered as listed, not here
    ],
)
def test_which_pods_went_between_two_lists(known, listed, want):
    assert vanished(known, listed) == want


@pytest.mark.parametrize(
    ("lines", "want"),
    [
        ([b'{"type":"ADDED","object":{"metadata":{"name":"a"}}}\n'], [("ADDED", "a")]),
        ([b"\n", b"  \n", b'{"type":"DELETED","object":{"metadata":{"name":"a"}}}'], [("DELETED", "a")]),
        ([b'{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"9"}}}\n'], [("BOOKMARK", None)]),
        ([b'{"type":"ERROR","object":{"code":410,"message":"too old resource version"}}\n'], Expired),
        ([b'{"type":"ERROR","object":{"code":500,"reason":"InternalError","message":"etcd"}}\n'], ApiException),
    ],
)
def test_a_watch_answer_read_as_events(lines, want):
    if isinstance(want, type):
        with pytest.raises(want):
            list(events(lines))
    else:
        assert [(kind, obj.get("metadata", {}).get("name")) for kind, obj in events(lines)] == want


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """Without the watch cache and with etcd compacted every second, a watch resumed from a version seen a
    few seconds ago is answered 410 Gone, as on a busy cluster."""
    with ControlPlane(
        tmp_path_factory.mktemp("kube"), quiet=True, compaction_interval="1s", apiserver_flags=("--watch-cache=false",)
    ) as plane:
        plane.create_namespace(NS)
        yield plane


@pytest.fixture
def core(cp: ControlPlane) -> LeanCoreV1Api:
    return LeanCoreV1Api(client.CoreV1Api(config.new_client_from_config(str(cp.admin_kubeconfig))))


class Delivered:
    """What a PodWatch hands over, kept as the operator's cache keeps pods."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str | None, str]] = []
        self.held: set[tuple[str, str]] = set()

    def __call__(self, kind: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        with self.lock:
            self.events.append((kind, meta["name"]))
            (self.held.discard if kind == "DELETED" else self.held.add)(key)

    def known(self, namespace: str | None) -> list[tuple[str, str]]:
        with self.lock:
            return [key for key in self.held if namespace in (None, key[0])]

    def of(self, name: str) -> list[str | None]:
        with self.lock:
            return [kind for kind, seen in self.events if seen == name]


def trainer_pod(name: str, labelled: bool = True) -> dict[str, Any]:
    labels = {LABEL_RESOURCE: "bot"} if labelled else {"app": "other"}
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "trainer", "image": "trainer:test"}], "automountServiceAccountToken": False},
    }


def churn(cp: ControlPlane, seconds: float) -> None:
    """Writes elsewhere: etcd's revision moves on and compaction removes what the watch saw last."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        cp.admin.create("configmaps", {"metadata": {"name": f"churn-{time.time_ns()}"}, "data": {}}, "default")
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_every_change_of_a_trainer_pod_is_delivered_once_in_order_and_no_other_pod(cp, core):
    cp.admin.create("pods", trainer_pod("listed"), NS)
    got, stop = Delivered(), threading.Event()
    watch = PodWatch(core, NS, got, got.known, stop)
    assert [p["metadata"]["name"] for p in watch.list_once().pods] == ["listed"] and got.of("listed") == [None]
    thread = watch.start()
    try:
        cp.admin.create("pods", trainer_pod("other", labelled=False), NS)
        cp.admin.create("pods", trainer_pod("new"), NS)
        cp.admin.patch("pods", NS, "new", {"metadata": {"annotations": {"seen": "yes"}}})
        cp.admin.delete("pods", NS, "new", grace_period_seconds=0)
        wait_for(lambda: "DELETED" in got.of("new"), 20, "the new pod's deletion")
        kinds = got.of("new")  # modified: by the patch, by the scheduler (no node fits), by the deletion
        assert kinds[0] == "ADDED" and kinds[-1] == "DELETED" and set(kinds[1:-1]) == {"MODIFIED"}, kinds
        assert got.of("other") == []
        listed = got.of("listed")  # watched from the list's version: not added a second time
        assert listed[0] is None and set(listed[1:]) <= {"MODIFIED"}, listed
    finally:
        stop.set()
        cp.admin.create("pods", trainer_pod("wakes-the-watch"), NS)  # the thread sees stop at its next event
        thread.join(10)
    assert not thread.is_alive()


@pytest.mark.timeout(120)
def test_an_expired_watch_lists_again_and_delivers_what_went_meanwhile_as_deleted(cp, core):
    for name in ("stays", "goes"):
        cp.admin.create("pods", trainer_pod(name), "default")
    got, stop = Delivered(), threading.Event()
    watch = PodWatch(core, "default", got, got.known, stop, backoff=(0.1,))
    watch.list_once()
    # the operator was busy (or its connection down) while a pod went and etcd was compacted past its version
    cp.admin.delete("pods", "default", "goes", grace_period_seconds=0)
    churn(cp, 3)
    thread = watch.start()
    try:
        wait_for(lambda: got.of("goes") == [None, "DELETED"], 20, "the vanished pod delivered as deleted")
        wait_for(lambda: got.of("stays") == [None, None], 20, "the relist of what stays")
        cp.admin.create("pods", trainer_pod("after"), "default")
        wait_for(lambda: got.of("after")[:1] == ["ADDED"], 20, "a new pod through the watch from the new list")
        assert ("default", "goes") not in got.known(None)
    finally:
        stop.set()
        cp.admin.create("pods", trainer_pod("wakes-the-watch"), "default")
        thread.join(10)

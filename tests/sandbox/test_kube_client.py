"""The sandbox's REST client against the real API server: watch semantics (410 Gone and relists)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from loraresume_sandbox.control_plane import ControlPlane
from loraresume_sandbox.kube_client import ApiError, follow
from loraresume_sandbox.waiting import wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """Without the watch cache (no bookmarks) and with etcd compacted every second, a watch resumed
    from a version seen a few seconds ago is answered 410 Gone, as on a busy cluster."""
    with ControlPlane(
        tmp_path_factory.mktemp("kube"), quiet=True, compaction_interval="1s", apiserver_flags=("--watch-cache=false",)
    ) as plane:
        plane.create_namespace("quiet")
        yield plane


def churn(cp: ControlPlane, seconds: float) -> None:
    """Writes elsewhere: etcd's revision moves on and compaction removes what the quiet watch saw."""
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        cp.admin.create("configmaps", {"metadata": {"name": f"churn-{time.time_ns()}-{i}"}, "data": {}}, "default")
        i += 1
        time.sleep(0.1)


def test_a_watch_from_a_compacted_version_is_gone(cp: ControlPlane) -> None:
    old = cp.admin.list_raw("pods", "quiet")["metadata"]["resourceVersion"]
    churn(cp, 3)
    events = list(cp.admin.watch("pods", "quiet", resource_version=old, timeout_seconds=3))
    assert events and events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410, events[:1]


def test_follow_relists_after_410_and_misses_nothing(cp: ControlPlane) -> None:
    seen: list[tuple[str, str]] = []
    lists: list[set[str]] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=follow,
        args=(cp.admin, "configmaps", lambda kind, obj: seen.append((kind, obj["metadata"]["name"])), stop),
        kwargs={"namespace": "quiet", "relisted": lists.append, "window_seconds": 1},
        daemon=True,
    )
    thread.start()
    try:
        wait_for(lambda: lists, 10, "the first list")
        churn(cp, 4)  # the quiet watch's version is compacted away between its 1 s windows
        wait_for(lambda: len(lists) >= 2, 20, "a relist after 410 Gone")
        cp.admin.create("configmaps", {"metadata": {"name": "after-the-gap"}, "data": {}}, "quiet")
        wait_for(lambda: ("ADDED", "after-the-gap") in seen, 20, "the new object through the resumed watch")
    finally:
        stop.set()
        thread.join(10)


def test_errors_carry_the_status_code_and_message(cp: ControlPlane) -> None:
    with pytest.raises(ApiError) as refused:
        cp.admin.create("configmaps", {"metadata": {"name": "Bad_Name"}, "data": {}}, "quiet")
    assert refused.value.code == 422 and "Bad_Name" in refused.value.message
    assert cp.admin.get("configmaps", "quiet", "absent") is None

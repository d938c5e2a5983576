"""LeanCoreV1Api: the real Kubernetes client against a small HTTP server playing the API server. The
three calls answer plain JSON (no model classes), errors are the client's ApiException as before, and
the connection is reused (read in full, it goes back to the pool)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from kubernetes import client

from loraresume_operator.lean_api import LeanCoreV1Api

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "bot-attempt-1", "namespace": "ns", "resourceVersion": "7", "finalizers": []},
    "spec": {"containers": [{"name": "trainer", "image": "x"}]},
    "status": {"phase": "Pending"},
}


class Server(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection for the calls
    seen: ClassVar[list[tuple[str, str, str, Any]]] = []
    refuse: ClassVar[bool] = False

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body: Any = json.loads(self.rfile.read(length) or b"null")
        answer: Any
        Server.seen.append((self.command, self.path, self.headers.get("Content-Type", ""), self.client_address[1]))
        if Server.refuse:
            status, answer = 422, {"kind": "Status", "message": "the test failed", "code": 422}
        elif self.command == "GET":
            status, answer = 200, {"kind": "PodList", "items": [POD]}
        elif self.path.endswith("/events"):
            status, answer = 201, {**body, "metadata": {**body["metadata"], "name": "bot.1"}}
        else:
            status, answer = (201 if self.command == "POST" else 200), POD
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def core() -> Iterator[LeanCoreV1Api]:
    Server.seen, Server.refuse = [], False
    server = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = client.Configuration()
    config.host = f"http://127.0.0.1:{server.server_port}"
    yield LeanCoreV1Api(client.CoreV1Api(client.ApiClient(config)))
    server.shutdown()


def test_the_answers_are_json_and_the_connection_is_reused(core):
    created = core.create_namespaced_pod("ns", {"metadata": {"name": "bot-attempt-1"}})
    assert created == POD  # a dict, as the watch cache keeps it (no V1Pod)
    patch = [{"op": "test", "path": "/metadata/finalizers/0", "value": "f"}]
    assert core.patch_namespaced_pod("bot-attempt-1", "ns", patch) == POD
    event = core.create_namespaced_event("ns", {"metadata": {"generateName": "bot."}, "reason": "R"})
    assert event["metadata"]["name"] == "bot.1"
    methods = [(m, p, t) for m, p, t, _port in Server.seen]
    assert methods == [
        ("POST", "/api/v1/namespaces/ns/pods", "application/json"),
        ("PATCH", "/api/v1/namespaces/ns/pods/bot-attempt-1", "application/json-patch+json"),
        ("POST", "/api/v1/namespaces/ns/events", "application/json"),
    ]
    assert len({port for *_, port in Server.seen}) == 1  # one connection, back in the pool after each answer
    assert isinstance(core.api_client, client.ApiClient)  # everything else is the client's own


def test_a_list_of_pods_is_json(core):
    assert core.list_pods("ns", label_selector="loraresume.dev/resource") == [POD]
    assert core.list_pods(None) == [POD]
    paths = [p for _m, p, _t, _port in Server.seen]
    assert paths == ["/api/v1/namespaces/ns/pods?labelSelector=loraresume.dev%2Fresource", "/api/v1/pods"]


def test_a_refusal_is_the_clients_api_exception(core):
    Server.refuse = True
    with pytest.raises(client.ApiException) as caught:
        core.patch_namespaced_pod("bot-attempt-1", "ns", [])
    assert caught.value.status == 422
    assert json.loads(caught.value.body)["message"] == "the test failed"
    Server.refuse = False
    assert core.create_namespaced_pod("ns", {}) == POD  # the pool still serves

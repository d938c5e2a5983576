"""The trainer pods, listed and then watched by the operator itself, as client-go's reflector does: one
list, a watch from the list's resourceVersion, a new list when that version has expired (410 Gone).

Not through kopf: trainer pods bring most of a lifecycle's watch events (created, scheduled, started,
ended, let go), and kopf runs each event of each object through its whole per-object machinery
(memories, three loggers, cause detection, handler invocation, patch application: ~1.3 ms of CPU an
event at 200 resources, RESULTS.md round 6) before a handler that only files the pod and asks for its
owner's reconcile. Here an event costs its JSON decoding and that filing. The label selector is the
API server's, so only trainer pods cross the wire (kopf filters labels after decoding every pod of the
namespace, or of the cluster).

Each event is handed to `deliver(event_type, body)` on this watch's thread: the type as the API gives it
(ADDED, MODIFIED, DELETED), None for what a list returned (kopf's convention for listing events), and
DELETED also for a pod a new list no longer holds (its deletion fell between the two).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from kubernetes.client import ApiException

from .lean_api import LeanCoreV1Api, Listing
from .observed import LABEL_RESOURCE

log = logging.getLogger(__name__)

Deliver = Callable[[str | None, dict[str, Any]], None]
Key = tuple[str, str]  # (namespace, name) of a pod

# The API server ends a watch after this many seconds (it is then opened again from the last version); the
# client gives up on a silent connection a little later (bookmarks come about once a minute).
WATCH_SECONDS = 300
READ_TIMEOUT_SECONDS = WATCH_SECONDS + 60
CONNECT_TIMEOUT_SECONDS = 10
# Waits after a failed list or watch, doubling up to the last.
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
GONE = 410


class Expired(Exception):
    """The watch's resourceVersion is too old to continue from (410): list again."""


def vanished(known: Iterable[Key], listed: Iterable[dict[str, Any]]) -> list[Key]:
    """The pods (namespace, name) known before a new list that the list no longer holds: deleted
    meanwhile (pure)."""
    present = {
        (str(meta.get("namespace")), str(meta.get("name"))) for meta in (pod.get("metadata") or {} for pod in listed)
    }
    return sorted(set(known) - present)


def events(lines: Iterable[bytes]) -> Iterator[tuple[str, dict[str, Any]]]:
    """A watch answer's lines as (type, object). An ERROR event raises: `Expired` for 410, ApiException
    otherwise. Blank lines (keep-alives) are skipped."""
    for line in lines:
        if not line.strip():
            continue
        event = json.loads(line)
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            if code == GONE:
                raise Expired(obj.get("message", ""))
            raise ApiException(status=code, reason=f"{obj.get('reason')}: {obj.get('message')}")
        yield str(kind), obj


class PodWatch:
    """Lists and watches the trainer pods of one namespace (None: of all), on its own daemon thread.

    `known(namespace)` gives the pods (namespace, name) this process holds in that scope, so that a new list can tell
    which went meanwhile. `list_once` is the first list, made by the caller before the thread starts (a
    restart files every pod before its first decision); the thread makes one itself when that failed."""

    def __init__(
        self,
        core: LeanCoreV1Api,
        namespace: str | None,
        deliver: Deliver,
        known: Callable[[str | None], Collection[Key]],
        stop: threading.Event,
        backoff: tuple[float, ...] = BACKOFF_SECONDS,
    ) -> None:
        self.core, self.namespace, self.deliver, self.known, self.stop = core, namespace, deliver, known, stop
        self.backoff = backoff
        self.version: str | None = None  # to watch from; None: list first
        self.failures = 0

    # ---- the list ------------------------------------------------------------------------------------
    def list_once(self) -> Listing:
        """List, hand over what went since and every pod listed, and set the version to watch from."""
        answer = self.core.list_pods(self.namespace, label_selector=LABEL_RESOURCE)
        for namespace, name in vanished(self.known(self.namespace), answer.pods):
            self.deliver("DELETED", {"metadata": {"name": name, "namespace": namespace}})
        for pod in answer.pods:
            self.deliver(None, pod)
        self.version = answer.version
        return answer

    # ---- the watch -----------------------------------------------------------------------------------
    def watch_once(self) -> None:
        """One watch from `version` until the server ends it: every event handed over, the version kept
        current (bookmarks too). Raises Expired when the version is too old, ApiException or a connection
        error on other trouble."""
        answer = self.core.watch_pods(
            self.namespace,
            label_selector=LABEL_RESOURCE,
            resource_version=self.version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _request_timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS),
        )
        try:
            for kind, obj in events(answer):
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if kind != "BOOKMARK":
                    self.deliver(kind, obj)
                if version:
                    self.version = version
                self.failures = 0
                if self.stop.is_set():
                    return
        finally:
            answer.close()  # the connection too, when the watch ends early: it has unread events
            answer.release_conn()

    def run(self) -> None:
        """List when there is no version to watch from, watch, and again, until `stop`. Trouble is logged
        and waited out (the backoff), never the end of the thread: a relaunch depends on these events."""
        scope = self.namespace or "all namespaces"
        while not self.stop.is_set():
            try:
                if self.version is None:
                    listed = self.list_once()
                    log.info(
                        "trainer pods of %s listed: %d, watched from version %s",
                        scope,
                        len(listed.pods),
                        listed.version,
                    )
                self.watch_once()
                continue
            except Expired:
                log.info("the watch of trainer pods of %s expired; listing them again", scope)
                self.version = None
                continue
            except ApiException as exc:
                if exc.status == GONE:
                    self.version = None
                    continue
                log.warning("watching trainer pods of %s failed (%s %s); trying again", scope, exc.status, exc.reason)
            except Exception as exc:  # a dropped connection, a timeout: continue from the version held
                log.warning("watching trainer pods of %s broke off (%s); trying again", scope, type(exc).__name__)
            self.stop.wait(self.backoff[min(self.failures, len(self.backoff) - 1)])
            self.failures += 1

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name=f"pod-watch-{self.namespace or 'all'}", daemon=True)
        thread.start()
        return thread

"""Operator bugs the fuzzing found, one minimal repro each, marked strict xfail.

The operator is another engineer's room: these stay red-but-expected until it is fixed, and
then `strict=True` turns each into a failure that says "remove my marker" (and widen the
matching restriction in test_decide_fuzz.py / strategies.py).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from loraresume_operator.decide import Observation, Resource, decide
from loraresume_operator.observed import ObservedPod
from loraresume_operator.spec import LoraResumeSpec, LoraResumeStatus, Phase
from tests.fuzz.harness import Cluster
from tests.fuzz.pod_validation import api_server_pod_problems
from tests.fuzz.strategies import INT64_MAX, resource

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=timezone.utc)
RES = Resource("bot", "ns", "uid-1", 1)
BASE: dict[str, Any] = {"baseModel": "m", "dataset": {"source": "/d.jsonl"}, "storage": {"uri": "s3://bucket/run/"}}


def spec(**over: Any) -> LoraResumeSpec:
    return LoraResumeSpec.model_validate({**BASE, **over})


def crashed_attempt(**over: Any) -> Observation:
    """Attempt 1's pod exited 1: a failure, retried after the backoff."""
    base: dict[str, Any] = dict(
        resource=RES, spec=spec(), pod=ObservedPod(name="bot-attempt-1", phase="Failed", exit_code=1),
        status=LoraResumeStatus(phase=Phase.RUNNING, attempt=1, pod_name="bot-attempt-1"),
        checkpoint=None, progress=None, adapter_complete=False, now=NOW,
    )
    return Observation(**{**base, **over})


def assert_failed_naming(cluster: Cluster, field: str) -> None:
    cluster.reconcile()  # must not raise: a raise is retried forever (kopf + the periodic loop)
    status = cluster.status
    assert status.get("phase") == "Failed", status
    assert field in status["message"], status["message"]
    cluster.reconcile()
    assert len(cluster.custom.status_writes) <= 2  # and then quiet


# --- 1. S3 URIs the CRD pattern and the model accept, S3Uri.parse refuses ---------------------------
@pytest.mark.xfail(strict=True, reason="operator bug: spec.storage.uri only has S3_URI_PATTERN, weaker than "
                   "S3Uri.parse; read_storage raises ValueError in every reconcile (no status, log spam)")
@pytest.mark.parametrize("uri", ["s3://my..bucket/run/", "s3://bucket//run/", "s3://bucket/a/../b/",
                                 "s3://192.168.1.1/run/", "s3://a.-b/run/"])
def test_storage_uri_that_s3uri_refuses_fails_with_the_field(uri: str) -> None:
    LoraResumeSpec.model_validate({**BASE, "storage": {"uri": uri}})  # the model takes it today
    assert_failed_naming(Cluster(resource({**BASE, "storage": {"uri": uri}})), "storage.uri")


# --- 2. unbounded backoff overflows the clock -------------------------------------------------------
@pytest.mark.xfail(strict=True, reason="operator bug: restartPolicy.backoffSeconds/maxBackoffSeconds have no "
                   "upper bound; decide() computes now + delay -> OverflowError after the first failure")
@pytest.mark.parametrize("seconds", [10**12, INT64_MAX])
def test_huge_backoff_does_not_crash_decide(seconds: int) -> None:
    obs = crashed_attempt(spec=spec(restartPolicy={"backoffSeconds": seconds, "maxBackoffSeconds": seconds}))
    plan = decide(obs)
    assert plan.status.failures == 1 and plan.requeue is not None


# --- 3. progress.json is storage content: anyone with bucket access writes it -----------------------
@pytest.mark.xfail(strict=True, reason="operator bug: decide._report_progress/_lost_steps trust progress.json: "
                   "int()/float() of junk raises, a negative step fails LoraResumeStatus, a huge one overflows int64")
@pytest.mark.parametrize("progress", [
    {"step": "abc"}, {"step": -3}, {"loss": {"a": 1}}, {"attempt": "x", "step": 3}, {"max_steps": [1]},
    {"step": 10**30}, {"max_steps": 10**30}, {"step": float("inf")},
], ids=["step-text", "step-negative", "loss-object", "attempt-text", "max-steps-list", "step-huge",
        "max-steps-huge", "step-inf"])
def test_junk_progress_is_ignored_not_fatal(progress: dict[str, Any]) -> None:
    plan = decide(crashed_attempt(progress=progress))
    assert plan.status.failures == 1
    assert 0 <= plan.status.step <= INT64_MAX and 0 <= plan.status.max_steps <= INT64_MAX


# --- 4. a status timestamp in another RFC 3339 spelling -----------------------------------------------
@pytest.mark.xfail(strict=True, reason="operator bug (minor): decide.parse_iso accepts only %Y-%m-%dT%H:%M:%SZ; "
                   "a status edited by hand or by another writer (fractional seconds, +00:00) crashes decide")
@pytest.mark.parametrize("moment", ["2026-11-28T12:00:05.5Z", "2026-11-28T12:00:05+00:00", "soon"])
def test_next_attempt_after_in_any_spelling(moment: str) -> None:
    status = LoraResumeStatus(phase=Phase.RESUMING, attempt=1, failures=1, next_attempt_after=moment)
    decide(crashed_attempt(status=status, pod=None))


# --- 5. specs whose pods a real API server refuses ----------------------------------------------------
POD_REFUSED = {
    "long-name": ("x" * 64, {}, "metadata.name"),  # label values carry the name: at most 63 chars
    "service-account": ("bot", {"serviceAccountName": "Trainer_SA"}, "serviceAccountName"),
    "priority-class": ("bot", {"scheduling": {"priorityClassName": "High Priority"}}, "priorityClassName"),
    "node-selector-key": ("bot", {"scheduling": {"nodeSelector": {"gpu type": "h100"}}}, "nodeSelector"),
    "node-selector-value": ("bot", {"scheduling": {"nodeSelector": {"gpu": "h100 sxm"}}}, "nodeSelector"),
    "exists-with-value": ("bot", {"scheduling": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}},
                          "tolerations"),
    "seconds-without-noexecute": ("bot", {"scheduling": {"tolerations": [{"key": "k", "tolerationSeconds": 5}]}},
                                  "tolerations"),
    "bad-quantity": ("bot", {"resources": {"cpu": "..."}}, "resources.cpu"),
    "negative-quantity": ("bot", {"resources": {"memory": "-1Gi"}}, "resources.memory"),
}


@pytest.mark.xfail(strict=True, reason="operator bug: the CRD/model accept values a pod cannot carry, and a 422 "
                   "from pod creation is raised out of reconcile (kopf retries, the loop logs it every interval); "
                   "the resource stays Pending instead of Failed naming the field")
@pytest.mark.parametrize("name, edit, field", list(POD_REFUSED.values()), ids=list(POD_REFUSED))
def test_spec_whose_pod_the_api_server_refuses_fails_with_the_field(name: str, edit: dict, field: str) -> None:
    cluster = Cluster(resource({**BASE, **edit}, name=name), validate_pod=api_server_pod_problems)
    assert_failed_naming(cluster, field)


@pytest.mark.parametrize("name, edit, field", list(POD_REFUSED.values()), ids=list(POD_REFUSED))
def test_the_pod_validation_stand_in_refuses_those_pods(name: str, edit: dict, field: str) -> None:
    """The stand-in is not vacuous: each case's pod breaks a rule, and a plain spec's pod breaks none."""
    cluster = Cluster(resource({**BASE, **edit}, name=name), validate_pod=api_server_pod_problems)
    with pytest.raises(Exception):  # noqa: B017 - today: the ApiException escapes (see the xfail above)
        cluster.reconcile()
    [pod] = cluster.core.refused
    assert api_server_pod_problems(pod)
    ok = Cluster(resource(BASE, name="bot"), validate_pod=api_server_pod_problems)
    ok.reconcile()
    assert len(ok.core.created) == 1

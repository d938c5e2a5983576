"""The S3 credentials in the credentials Secret never surface: not in the operator's log, events,
status, pods, not in the trainer's logs or termination message, not in exceptions, also on the
failing paths (refused credentials, session tokens, unreachable endpoints, tracebacks).

Already covered elsewhere and not repeated here: the operator's success story
(tests/operator/test_operator_integration.py), the trainer's wrong-credential exit and
store-level exceptions (tests/trainer/test_bad_inputs.py, test_checkpoint_store.py).

Each search looks for the secret itself and for its base64 forms (as a Secret's `data` holds
it, also at every alignment inside a longer base64 text).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest

from loraresume_operator.decide import CreatePod, Resource
from loraresume_operator.pods import build_trainer_pod
from loraresume_operator.policy import CREDENTIALS_LABEL
from loraresume_operator.s3_view import read_storage, s3_client
from loraresume_operator.spec import LoraResumeSpec
from loraresume_sandbox.cluster import SandboxCluster, sandbox_values
from loraresume_sandbox.kube_client import KubeClient
from loraresume_trainer.errors import StorageAuthError, StorageError
from tests.support.operator_stack import NS, wait_for
from tests.support.reconciler_harness import OperatorDefaults
from tests.support.specs import resource, s3_storage, spec_doc
from tests.support.trainer_runs import job_config, run_attempt

CANARY = "CANARYs3SECRETkey0123456789abcdefXYZ"
CANARY_TOKEN = "CANARYsessionTOKEN0123456789abcdefXYZ"


def forms(secret: str) -> list[str]:
    """The secret, and the stable middle of its base64 encoding at each of the three alignments."""
    raw = secret.encode()
    out = [secret]
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for offset in range(3):
            text = encode(b"\0" * offset + raw).decode()
            out.append(text[4 if offset else 0 : -4])
    return out


def leaks(text: str, *secrets: str) -> list[str]:
    return [f"{s[:12]}… as {f[:12]}…" for s in secrets for f in forms(s) if f in text]


def test_the_search_finds_secrets_in_base64() -> None:
    blob = base64.b64encode(json.dumps({"data": {"k": CANARY}}).encode()).decode()
    assert leaks(blob, CANARY) and leaks(base64.b64encode(CANARY.encode()).decode(), CANARY)
    assert leaks(f"x{CANARY}y", CANARY) and not leaks("nothing here", CANARY)


def surfaces(k8s: KubeClient, name: str, log: str) -> dict[str, str]:
    events = [e for e in k8s.list("events", NS) if e.get("involvedObject", {}).get("name") == name]
    pods = [p for p in k8s.list("pods", NS) if p["metadata"]["name"].startswith(name + "-")]
    return {
        "resource": json.dumps(k8s.get("loraresumes", NS, name)),
        "events": json.dumps(events),
        "pods": json.dumps(pods),
        "operator log": log,
    }


def assert_clean(where: dict[str, str], *secrets: str) -> None:
    found = {surface: leaks(text, *secrets) for surface, text in where.items()}
    assert {k: v for k, v in found.items() if v} == {}


def secret(k8s: KubeClient, name: str, data: dict[str, str]) -> None:
    k8s.delete("secrets", NS, name)
    k8s.create("secrets", {"metadata": {"name": name, "labels": CREDENTIALS_LABEL}, "stringData": data}, NS)


def lora_resume(name: str, bucket: str, endpoint: str, secret_name: str) -> dict[str, Any]:
    spec = spec_doc(
        baseModel="m",
        dataset={"source": f"s3://{bucket}/data.jsonl"},
        storage=s3_storage(bucket, name, endpoint, secret_name),
    )
    return resource(spec, name)


# ------------------------------------------------------------------------------- the operator process


def test_refused_and_then_accepted_credentials_never_surface(k8s, operator, s3_auth_server) -> None:
    """Wrong secret key: the storage error is in status and events, the key is not. Then the right
    one: a pod starts (secretKeyRef only), and the real key is nowhere either."""
    name = f"sec-{uuid.uuid4().hex[:6]}"
    secret(
        k8s,
        f"{name}-s3",
        {
            "AWS_ACCESS_KEY_ID": s3_auth_server.access_key_id,
            "AWS_SECRET_ACCESS_KEY": CANARY,
            "AWS_SESSION_TOKEN": CANARY_TOKEN,
        },
    )
    k8s.create("loraresumes", lora_resume(name, s3_auth_server.bucket, s3_auth_server.endpoint, f"{name}-s3"), NS)

    def status() -> dict[str, Any]:
        return (k8s.get("loraresumes", NS, name) or {}).get("status") or {}

    wait_for("the storage error in status", lambda: "cannot read storage" in status().get("message", ""))
    assert "check the credentials" in status()["message"] or "refused" in status()["message"], status()
    wait_for("the StorageUnavailable event", lambda: "StorageUnavailable" in surfaces(k8s, name, "")["events"])
    assert_clean(surfaces(k8s, name, operator.log), CANARY, CANARY_TOKEN)

    secret(
        k8s,
        f"{name}-s3",
        {
            "AWS_ACCESS_KEY_ID": s3_auth_server.access_key_id,
            "AWS_SECRET_ACCESS_KEY": s3_auth_server.secret_access_key,
            "EXTRA_CANARY": CANARY,
        },
    )
    wait_for("the first pod", lambda: k8s.get("pods", NS, f"{name}-attempt-1"), timeout=60)
    pod = k8s.get("pods", NS, f"{name}-attempt-1")
    refs = {e["name"]: e.get("valueFrom") for e in pod["spec"]["containers"][0]["env"] if e["name"].startswith("AWS_")}
    assert all(ref and "secretKeyRef" in ref for ref in refs.values()), refs
    assert_clean(surfaces(k8s, name, operator.log), CANARY, CANARY_TOKEN, s3_auth_server.secret_access_key)


@pytest.fixture
def debug_cluster(tmp_path: Path):
    """Its own control plane and operator, installed with the Helm value logLevel: DEBUG."""
    with SandboxCluster(
        tmp_path / "stack", namespaces=(NS,), pools=[], values=sandbox_values(log_level="DEBUG"), quiet=True
    ) as cluster:
        yield cluster.kube, cluster.operator


def test_operator_debug_log_never_shows_the_secret(debug_cluster, s3_server) -> None:
    """Found here: at DEBUG the kubernetes client logged response bodies, the Secret's data with them."""
    kube, op = debug_cluster
    name = f"dbg-{uuid.uuid4().hex[:6]}"
    secret(kube, f"{name}-s3", {"AWS_ACCESS_KEY_ID": "debug-id", "AWS_SECRET_ACCESS_KEY": CANARY})
    kube.create("loraresumes", lora_resume(name, "debug-bucket", s3_server.endpoint, f"{name}-s3"), NS)
    wait_for(
        "a status", lambda: ((kube.get("loraresumes", NS, name) or {}).get("status") or {}).get("message"), timeout=60
    )
    assert "DEBUG" in op.log  # the level took effect
    assert_clean(surfaces(kube, name, op.log), CANARY)


# -------------------------------------------------------------------------- in process: exceptions


def _refused_client(server: Any) -> Any:
    """The operator's S3 client, given the Secret's values as the operator reads them."""
    return s3_client(
        server.endpoint,
        None,
        {"AWS_ACCESS_KEY_ID": server.access_key_id, "AWS_SECRET_ACCESS_KEY": CANARY, "AWS_SESSION_TOKEN": CANARY_TOKEN},
    )


def test_exceptions_from_refused_credentials_hold_no_secret(s3_auth_server) -> None:
    """Messages, reprs, chained tracebacks and even tracebacks with local variables (as error
    reporters capture them) of what the operator's storage read raises."""
    spec = LoraResumeSpec.model_validate(
        {"baseModel": "m", "dataset": {"source": "/d"}, "storage": {"uri": f"s3://{s3_auth_server.bucket}/x/"}}
    )
    client = _refused_client(s3_auth_server)  # (this frame holds no secret: its locals are printed below)
    with pytest.raises(StorageAuthError) as info:
        read_storage(spec, client)
    exc = info.value
    texts = [
        str(exc),
        repr(exc),
        repr(exc.args),
        "".join(traceback.format_exception(exc)),
        "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format()),
    ]
    assert "s3://" in texts[0]
    assert leaks("\n".join(texts), CANARY, CANARY_TOKEN) == []

    # A bug of ours raised while botocore's error is being handled: the context is printed too.
    from botocore.exceptions import ClientError

    try:
        try:
            client.list_objects_v2(Bucket=s3_auth_server.bucket)
        except ClientError as inner:
            raise RuntimeError("unexpected trouble while listing") from inner
    except RuntimeError as outer:
        text = "".join(traceback.format_exception(outer))
    assert "SignatureDoesNotMatch" in text or "InvalidToken" in text or "InvalidClientTokenId" in text, text
    assert leaks(text, CANARY, CANARY_TOKEN) == []


def test_reconcile_with_refused_credentials_logs_and_writes_no_secret(
    s3_auth_server, caplog: pytest.LogCaptureFixture
) -> None:
    """The Reconciler itself (in process, INFO): status, events and log records of the storage error."""
    from tests.support.reconciler_harness import Cluster
    from tests.support.spec_strategies import resource

    spec = lora_resume("inproc", s3_auth_server.bucket, s3_auth_server.endpoint, "creds")["spec"]
    cluster = Cluster(
        resource(spec, name="inproc"),
        secrets={
            "creds": {
                "AWS_ACCESS_KEY_ID": s3_auth_server.access_key_id,
                "AWS_SECRET_ACCESS_KEY": CANARY,
                "AWS_SESSION_TOKEN": CANARY_TOKEN,
            }
        },
        defaults=OperatorDefaults(),
    )
    cluster.reconciler.s3_factory = s3_client
    with caplog.at_level(logging.INFO):
        cluster.reconcile()
    assert "cannot read storage" in cluster.status["message"]
    everything = (
        json.dumps(cluster.custom.status_writes)
        + json.dumps(cluster.core.events)
        + "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    )
    assert leaks(everything, CANARY, CANARY_TOKEN) == []


# ------------------------------------------------------------------------------ the trainer, in a pod

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def test_trainer_pod_with_refused_credentials_never_shows_them(tmp_path: Path, s3_auth_server) -> None:
    """A pod as the operator builds it, run by the node agent (env from the Secret), trainer at
    DEBUG with a session token: pod log, pod status and termination message stay clean."""
    entrypoints = {"*": [sys.executable, "-m", "loraresume_trainer.cli"]}
    with SandboxCluster(
        tmp_path / "stack",
        namespaces=(NS,),
        with_operator=False,
        entrypoints=entrypoints,
        extra_env={**OFFLINE, "LORARESUME_LOG_LEVEL": "DEBUG"},
        quiet=True,
    ) as cluster:
        kube, agent = cluster.kube, cluster.agent
        secret(
            kube,
            "canary-s3",
            {
                "AWS_ACCESS_KEY_ID": s3_auth_server.access_key_id,
                "AWS_SECRET_ACCESS_KEY": CANARY,
                "AWS_SESSION_TOKEN": CANARY_TOKEN,
            },
        )
        spec = LoraResumeSpec.model_validate(
            lora_resume("kp", s3_auth_server.bucket, s3_auth_server.endpoint, "canary-s3")["spec"]
        )
        pod = build_trainer_pod(
            Resource("kp", NS, "uid-kp", 1),
            spec,
            CreatePod("kp-attempt-1", 1, None, False, None),
            OperatorDefaults(trainer_image="trainer:test", grace_period_seconds=30),
        )
        pod["metadata"].pop("ownerReferences")  # no such owner: the garbage collector would delete the pod
        kube.create("pods", pod, NS)
        done = wait_for(
            "the trainer to exit",
            lambda: (
                (kube.get("pods", NS, "kp-attempt-1") or {}).get("status", {}).get("phase") in ("Succeeded", "Failed")
                and kube.get("pods", NS, "kp-attempt-1")
            ),
            timeout=120,
        )
        log = agent.read_log(NS, "kp-attempt-1", "trainer")
        terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
        message = json.loads(terminated["message"])
    assert terminated["exitCode"] == 78 and message["outcome"] == "config_error", (terminated, log[-2000:])
    assert "credentials" in message["reason"]
    assert "DEBUG" in log and "botocore" in log  # the trainer really logged at DEBUG
    assert leaks(log + json.dumps(done), CANARY, CANARY_TOKEN) == []
    assert leaks(json.dumps(done) + message["reason"], s3_auth_server.access_key_id) == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "endpoint_kind, level",
    [
        ("unreachable", "INFO"),
        ("auth-server", "DEBUG"),
        ("unreachable", "DEBUG"),  # found here: botocore's DEBUG tracebacks (exc_info) were not scrubbed
    ],
)
def test_trainer_process_with_secret_in_the_endpoint_url(
    tmp_path: Path, s3_auth_server, endpoint_kind: str, level: str
) -> None:
    """Endpoint URLs can carry user:password@, and botocore logs URLs and retried exceptions (with
    tracebacks) at DEBUG."""
    host = (
        f"127.0.0.1:{_closed_port()}"
        if endpoint_kind == "unreachable"
        else s3_auth_server.endpoint.removeprefix("http://")
    )
    endpoint = f"http://{s3_auth_server.access_key_id}:{CANARY}@{host}"
    config = job_config(
        tmp_path,
        endpoint=endpoint,
        storage_uri=f"s3://{s3_auth_server.bucket}/ep/",
        base_model="m",
        dataset_file=str(tmp_path / "none.jsonl"),
    )
    attempt = run_attempt(
        config,
        tmp_path,
        env={
            "LORARESUME_LOG_LEVEL": level,
            "AWS_SECRET_ACCESS_KEY": CANARY,
            "AWS_SESSION_TOKEN": CANARY_TOKEN,
            "AWS_ACCESS_KEY_ID": s3_auth_server.access_key_id,
        },
        timeout=120,
    )
    assert attempt.exit_code == (1 if endpoint_kind == "unreachable" else 78), attempt.stderr[-2000:]
    assert attempt.termination and attempt.termination["reason"]
    everything = attempt.stderr + json.dumps(attempt.events) + json.dumps(attempt.termination)
    assert (level == "DEBUG") == ("DEBUG" in attempt.stderr)
    assert leaks(everything, CANARY, CANARY_TOKEN) == []


def test_trainer_storage_error_messages_name_no_secret() -> None:
    """The classified errors the trainer prints are built from code, operation and URI only."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    from loraresume_trainer.s3client import classify_s3_error

    denied = ClientError(
        {
            "Error": {
                "Code": "SignatureDoesNotMatch",
                "Message": f"token {CANARY_TOKEN}",
                "CanonicalRequest": f"x-amz-security-token:{CANARY_TOKEN}",
            },
            "ResponseMetadata": {"HTTPStatusCode": 403},
        },
        "ListObjectsV2",
    )
    unreachable = EndpointConnectionError(endpoint_url=f"http://id:{CANARY}@127.0.0.1:9/bucket")
    for exc, kind in ((denied, StorageAuthError), (unreachable, StorageError)):
        error = classify_s3_error(exc, operation="listing", uri="s3://bucket/x/")
        assert isinstance(error, kind)
        assert leaks(str(error), CANARY, CANARY_TOKEN) == []

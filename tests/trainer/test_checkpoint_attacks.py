"""Malicious or broken checkpoint content in S3 (anyone with bucket write access can put it there).

- Pickles that would run code (rng_state.pth, optimizer.pt, scheduler.pt, scaler.pt), behind a
  manifest with the right sizes and hashes: refused without running anything; the trainer skips
  that checkpoint with a logged reason and resumes from the previous one.
- Manifests naming paths outside the checkpoint (.., absolute, backslashes, empty names,
  duplicates, a file that is also a directory, over-long names): refused before any request
  for the files, nothing written anywhere.
- Huge files: a manifest claiming more than the cap, an object larger than its manifest says, an
  object that grows between HEAD and GET, a server that streams more than it announced, a listing
  with a huge object: never downloaded blindly; the caps are configurable.
- Hostile JSON (deeply nested, odd timestamps) in manifests and progress.json: a reason to skip,
  never a crash of the trainer or the operator.

S3 is a moto server on loopback (tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import random
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import boto3
import pytest

from loraresume_trainer import checkpoint_store as cs
from loraresume_trainer.checkpoint_store import CheckpointStore, DownloadTooLarge
from loraresume_trainer.errors import ConfigError, DamagedCheckpoint
from loraresume_trainer.manifest import MANIFEST_NAME, FileEntry, Manifest
from loraresume_trainer.s3uri import S3Uri

FP = {"job": "attack-test"}
GOOD_FILES = ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json")
STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt")


# ------------------------------------------------------------------------------------ helpers


class Recording:
    """A boto3 client that records every object request (operation, key) and can tamper with GETs."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: list[tuple[str, str]] = []
        self.on_get: Any = None  # (key, response) -> response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def head_object(self, **kw: Any) -> Any:
        self.calls.append(("head", kw["Key"]))
        return self._client.head_object(**kw)

    def get_object(self, **kw: Any) -> Any:
        self.calls.append(("get", kw["Key"]))
        response = self._client.get_object(**kw)
        return self.on_get(kw["Key"], response) if self.on_get else response

    def download_file(self, bucket: str, key: str, *args: Any, **kw: Any) -> Any:
        self.calls.append(("get", key))
        return self._client.download_file(bucket, key, *args, **kw)

    def touched(self, prefix: str) -> list[tuple[str, str]]:
        """Requests for objects under `prefix` other than its manifest."""
        return [(op, key) for op, key in self.calls if key.startswith(prefix) and not key.endswith(MANIFEST_NAME)]


@pytest.fixture
def s3(s3_bucket: tuple[str, str]) -> tuple[Any, str]:
    endpoint, bucket = s3_bucket
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1"), bucket


@pytest.fixture
def store(s3: tuple[Any, str]) -> CheckpointStore:
    client, bucket = s3
    return CheckpointStore(Recording(client), S3Uri(bucket, f"jobs/{uuid.uuid4().hex[:8]}/"))


def state_bytes(name: str) -> bytes:
    """Plain state as HF writes it (tensors, dicts, numpy RNG state), via torch.save."""
    import numpy as np
    import torch

    state: Any = {
        "rng_state.pth": lambda: {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        },
        "optimizer.pt": lambda: {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
            "param_groups": [{"lr": 1e-4, "params": [0]}],
        },
        "scheduler.pt": lambda: {"base_lrs": [1e-4], "last_epoch": 3, "_step_count": 4},
        "scaler.pt": lambda: {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
    }[name]()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def checkpoint_files(**replace: bytes) -> dict[str, bytes]:
    files = {name: f"{name} content".encode() for name in GOOD_FILES}
    files["trainer_state.json"] = json.dumps({"global_step": 1}).encode()
    for name in STATE_FILES:
        files[name] = replace.get(name) or state_bytes(name)
    files.update({k: v for k, v in replace.items() if k not in files})
    return files


def put_manifest(store: CheckpointStore, step: int, doc: dict[str, Any] | bytes) -> None:
    uri = store.checkpoint_uri(step).child(MANIFEST_NAME)
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    store.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=body)


def publish(
    store: CheckpointStore, step: int, files: dict[str, bytes], *, entries: list[dict] | None = None, **manifest: Any
) -> None:
    """Objects plus a manifest with their true sizes and hashes (or the given entries), as an attacker would."""
    prefix = store.checkpoint_uri(step)
    for name, data in files.items():
        target = prefix.child(name)
        store.client.put_object(Bucket=target.bucket, Key=target.key, Body=data)
    if entries is None:
        entries = [{"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()]
    doc = {
        "format_version": 1,
        "kind": "checkpoint",
        "step": step,
        "created_at": "2026-11-28T12:00:00+00:00",
        "fingerprint": FP,
        "files": entries,
        **manifest,
    }
    put_manifest(store, step, doc)


def entry(path: str, data: bytes = b"x") -> dict[str, Any]:
    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ------------------------------------------------------------------------------ code-running pickles


class _RunsCode:
    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def evil_payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that would create `marker` when unpickled without restrictions."""
    import subprocess

    import torch

    zipped = io.BytesIO()
    torch.save({"state": {0: _RunsCode(os.system, f"touch {marker}")}, "param_groups": []}, zipped)
    return {
        "os-system-legacy-pickle": pickle.dumps(_RunsCode(os.system, f"touch {marker}"), protocol=2),
        "exec-builtin": pickle.dumps(_RunsCode(exec, f"open({str(marker)!r}, 'w').close()")),
        "subprocess-popen": pickle.dumps(_RunsCode(subprocess.Popen, ["touch", str(marker)])),
        "inside-torch-save-zip": zipped.getvalue(),
    }


def test_the_payloads_do_run_code_when_loaded_unsafely(tmp_path: Path) -> None:
    """Not vacuous: each payload creates the marker under a plain pickle.loads / weights_only=False."""
    import torch

    marker = tmp_path / "pwned"
    for name, data in evil_payloads(marker).items():
        marker.unlink(missing_ok=True)
        if name == "inside-torch-save-zip":
            torch.load(io.BytesIO(data), weights_only=False)
        else:
            obj = pickle.loads(data)
            if hasattr(obj, "wait"):
                obj.wait()
        assert marker.exists(), name


@pytest.mark.parametrize("name", STATE_FILES)
@pytest.mark.parametrize("force_unsafe_env", [False, True], ids=["env-default", "env-forces-no-weights-only"])
def test_code_running_pickle_is_refused_without_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, force_unsafe_env: bool
) -> None:
    from loraresume_trainer.checkpoint_store import check_pickles_safe

    if force_unsafe_env:  # a hostile or careless image env must not switch the check off
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / f"pwned-{uuid.uuid4().hex[:6]}"
    for payload, data in evil_payloads(marker).items():
        ckpt = tmp_path / f"ckpt-{payload}"
        ckpt.mkdir()
        for file, content in checkpoint_files(**{name: data}).items():
            (ckpt / file).write_bytes(content)
        with pytest.raises(DamagedCheckpoint, match=name):
            check_pickles_safe(ckpt)
        assert not marker.exists(), f"{payload} in {name} ran code"


def test_plain_state_files_pass_the_pickle_check(tmp_path: Path) -> None:
    from loraresume_trainer.checkpoint_store import check_pickles_safe

    for file, content in checkpoint_files().items():
        (tmp_path / file).write_bytes(content)
    check_pickles_safe(tmp_path)  # HF's own RNG/optimizer/scheduler state is not refused


@pytest.fixture
def pipeline(s3: tuple[Any, str], tmp_path: Path) -> Any:
    from loraresume_trainer.config import parse_job
    from loraresume_trainer.pipeline import Pipeline
    from loraresume_trainer.stop_signal import StopRequest

    client, bucket = s3
    endpoint = client.meta.endpoint_url
    job = parse_job(
        {
            "baseModel": "m",
            "dataset": {"source": "/d.jsonl"},
            "workDir": str(tmp_path / "work"),
            "storage": {"uri": f"s3://{bucket}/job-{uuid.uuid4().hex[:6]}/", "endpoint": endpoint},
        }
    )
    return Pipeline(job, StopRequest())


def candidates(pipe: Any) -> Any:
    from loraresume_trainer.resume_plan import Candidate, plan_resume

    complete = [
        Candidate(s, str(pipe.store.checkpoint_uri(s)), m.fingerprint) for s, m in pipe.store.complete_checkpoints()
    ]
    return plan_resume(complete, FP)


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt"])
def test_trainer_skips_a_code_running_checkpoint_for_the_previous(
    pipeline: Any, tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned-resume"
    publish(pipeline.store, 10, checkpoint_files())
    publish(pipeline.store, 20, checkpoint_files(**{name: evil_payloads(marker)["os-system-legacy-pickle"]}))
    with caplog.at_level(logging.WARNING):
        cand, path, _ = pipeline.fetch_candidate(candidates(pipeline))
    assert cand.step == 10 and path.name == "checkpoint-10"
    assert not marker.exists()
    [warning] = [r.getMessage() for r in caplog.records if "checkpoint-20" in r.getMessage()]
    assert "skipping damaged checkpoint" in warning and name in warning and "not a plain tensor/state file" in warning
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "checkpoint_damaged" and "checkpoint-20" in e["uri"] for e in events), events


def test_trainer_with_only_code_running_checkpoints_runs_none_of_them(pipeline: Any, tmp_path: Path) -> None:
    marker = tmp_path / "pwned-only"
    payloads = evil_payloads(marker)
    publish(pipeline.store, 10, checkpoint_files(**{"scheduler.pt": payloads["exec-builtin"]}))
    publish(pipeline.store, 20, checkpoint_files(**{"rng_state.pth": payloads["inside-torch-save-zip"]}))
    assert pipeline.fetch_candidate(candidates(pipeline)) is None  # no checkpoint to resume from
    assert not marker.exists()


# ------------------------------------------------------------------------------- paths in manifests

BAD_PATHS = {
    "parent-escape": ["../../x"],
    "absolute": ["/tmp/loraresume-escape"],
    "dotdot-inside": ["a/../../b"],
    "backslash": ["a\\..\\b"],
    "windows-absolute": ["C:\\x"],
    "empty": [""],
    "dot": ["./x"],
    "double-slash": ["a//b"],
    "trailing-slash": ["a/"],
    "nul": ["a\x00b"],
    "unicode": ["ﬁle"],
    "space": ["a b"],
    "own-manifest": [MANIFEST_NAME],
    "duplicate": ["a", "a"],
    "file-and-directory": ["x", "x/y"],
    "directory-then-file": ["x/y", "x"],
    "long-segment": ["a" * 256],
    "long-path": ["/".join(["d" * 100] * 11)],
}


@pytest.mark.parametrize("paths", list(BAD_PATHS.values()), ids=list(BAD_PATHS))
def test_manifest_with_unsafe_paths_is_refused_before_any_download(
    store: CheckpointStore, tmp_path: Path, paths: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    publish(store, 10, checkpoint_files())
    publish(store, 20, {}, entries=[entry(p) for p in paths])
    dest = tmp_path / "resume"
    escapes = [tmp_path / "x", tmp_path.parent / "x", Path("/tmp/loraresume-escape")]

    with pytest.raises(DamagedCheckpoint, match=r"manifest .*checkpoint-20.* is unusable"):
        store.read_manifest(20)
    with caplog.at_level(logging.WARNING):
        found = store.download_newest_complete(dest)
    assert found is not None and found[0] == 10
    assert any("skipping checkpoint-20" in r.getMessage() for r in caplog.records)
    assert store.client.touched(store.checkpoint_uri(20).key) == []  # not one HEAD or GET for its files
    assert tree(tmp_path) == {"resume", "resume/checkpoint-10"} | {
        f"resume/checkpoint-10/{name}" for name in checkpoint_files()
    }
    assert not any(p.exists() for p in escapes)


@pytest.mark.parametrize("paths", list(BAD_PATHS.values()), ids=list(BAD_PATHS))
def test_hand_built_manifest_is_refused_before_any_request(
    store: CheckpointStore, tmp_path: Path, paths: list[str]
) -> None:
    """download_tree re-checks what Manifest.from_bytes checks, all of it before the first request."""
    digest = hashlib.sha256(b"x").hexdigest()
    manifest = Manifest(
        "checkpoint", 20, tuple([FileEntry("ok.json", 1, digest)] + [FileEntry(p, 1, digest) for p in paths])
    )
    if paths == [MANIFEST_NAME]:
        pytest.skip("a hand-built manifest may list a file of that name; from_bytes refuses it")
    with pytest.raises(DamagedCheckpoint):
        store.download_tree(store.checkpoint_uri(20), manifest, tmp_path / "out")
    assert store.client.calls == []
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


FETCH_BAD_KEYS = {
    "dotdot": ["../x"],
    "double-slash": ["a//b"],
    "backslash": ["a\\b"],
    "file-and-directory": ["x", "x/y"],
}


@pytest.mark.parametrize("keys", list(FETCH_BAD_KEYS.values()), ids=list(FETCH_BAD_KEYS))
def test_fetch_without_manifest_refuses_unsafe_keys_before_any_download(
    store: CheckpointStore, tmp_path: Path, keys: list[str]
) -> None:
    prefix = store.root.child("model/")
    for key in ["config.json", *keys]:
        store.client.put_object(Bucket=prefix.bucket, Key=prefix.key + key, Body=b"{}")
    with pytest.raises(ConfigError, match="cannot fetch"):
        store.fetch_tree(prefix, tmp_path / "model")
    assert [c for c in store.client.calls if c[0] == "get" and not c[1].endswith(MANIFEST_NAME)] == []
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------- huge files


def test_manifest_claiming_more_than_the_cap_is_refused_without_a_request(
    store: CheckpointStore, tmp_path: Path
) -> None:
    publish(store, 10, checkpoint_files())
    publish(
        store, 20, checkpoint_files(), entries=[entry("adapter_config.json"), {**entry("optimizer.pt"), "size": 2**62}]
    )
    with pytest.raises(DownloadTooLarge, match=r"optimizer.pt has 4611686018427387904 bytes, over the limit"):
        store.download_checkpoint(20, store.read_manifest(20), tmp_path)
    assert store.client.touched(store.checkpoint_uri(20).key) == []
    found = store.download_newest_complete(tmp_path)
    assert found is not None and found[0] == 10  # too large is damaged: the previous checkpoint is used


@pytest.mark.parametrize("how", ["constructor", "environment"])
def test_the_caps_are_configurable(
    s3: tuple[Any, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    client, bucket = s3
    root = S3Uri(bucket, f"jobs/{uuid.uuid4().hex[:8]}/")
    files = checkpoint_files()
    publish(CheckpointStore(client, root), 10, files)
    biggest = max(len(d) for d in files.values())
    total = sum(len(d) for d in files.values())
    for file_cap, total_cap, words in ((biggest - 1, None, "per file"), (None, total - 1, "in all")):
        if how == "constructor":
            store = CheckpointStore(Recording(client), root, max_file_bytes=file_cap, max_download_bytes=total_cap)
        else:
            monkeypatch.delenv(cs.ENV_MAX_FILE_BYTES, raising=False)
            monkeypatch.delenv(cs.ENV_MAX_DOWNLOAD_BYTES, raising=False)
            if file_cap:
                monkeypatch.setenv(cs.ENV_MAX_FILE_BYTES, str(file_cap))
            if total_cap:
                monkeypatch.setenv(cs.ENV_MAX_DOWNLOAD_BYTES, str(total_cap))
            store = CheckpointStore(Recording(client), root)
        with pytest.raises(DownloadTooLarge, match=words) as info:
            store.download_checkpoint(10, store.read_manifest(10), tmp_path / "x")
        assert "LORARESUME_MAX_" in str(info.value) and "nothing was downloaded" in str(info.value)
        assert store.client.touched(store.checkpoint_uri(10).key) == []
    monkeypatch.setenv(cs.ENV_MAX_FILE_BYTES, "lots")
    with pytest.raises(ConfigError, match="LORARESUME_MAX_FILE_BYTES must be a whole number"):
        CheckpointStore(client, root)


def test_object_larger_than_its_manifest_says_is_not_fetched(store: CheckpointStore, tmp_path: Path) -> None:
    files = checkpoint_files()
    publish(store, 20, files)
    big = store.checkpoint_uri(20).child("optimizer.pt")
    store.client.put_object(Bucket=big.bucket, Key=big.key, Body=b"\0" * (5 << 20))  # manifest keeps the old size
    with pytest.raises(
        DamagedCheckpoint, match=rf"optimizer.pt has {5 << 20} bytes, expected {len(files['optimizer.pt'])}"
    ):
        store.download_checkpoint(20, store.read_manifest(20), tmp_path)
    assert [c for c in store.client.calls if c[0] == "get" and not c[1].endswith(MANIFEST_NAME)] == []
    assert list(tmp_path.iterdir()) == []


def test_object_that_grows_between_head_and_get_is_refused(store: CheckpointStore, tmp_path: Path) -> None:
    publish(store, 20, checkpoint_files())
    big = store.checkpoint_uri(20).child("rng_state.pth")
    swapped = []

    def swap(key: str, response: Any) -> Any:
        if key == big.key and not swapped:
            swapped.append(key)
            response["Body"].close()
            store.client._client.put_object(Bucket=big.bucket, Key=big.key, Body=b"\0" * (3 << 20))
            return store.client._client.get_object(Bucket=big.bucket, Key=big.key)
        return response

    store.client.on_get = swap
    with pytest.raises(DamagedCheckpoint, match=r"rng_state\.pth has 3145728 bytes, expected"):
        store.download_checkpoint(20, store.read_manifest(20), tmp_path)
    assert swapped and list(tmp_path.iterdir()) == []  # no partial directory left behind


class _Endless:
    """A body that streams far more than announced (and announces nothing)."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix, self.served = prefix, 0

    def iter_chunks(self, size: int) -> Any:
        yield self.prefix
        self.served += len(self.prefix)
        while self.served < (1 << 30):
            chunk = b"\0" * size
            self.served += len(chunk)
            yield chunk

    def close(self) -> None:
        pass


def test_stream_longer_than_the_manifest_stops_at_the_cap(store: CheckpointStore, tmp_path: Path) -> None:
    files = checkpoint_files()
    publish(store, 20, files)
    target = store.checkpoint_uri(20).child("optimizer.pt")
    bodies: list[_Endless] = []

    def endless(key: str, response: Any) -> Any:
        if key != target.key:
            return response
        response["Body"].close()
        bodies.append(_Endless(files["optimizer.pt"]))
        return {"Body": bodies[-1]}  # no ContentLength: only the stream cap can stop it

    store.client.on_get = endless
    with pytest.raises(DamagedCheckpoint, match=r"optimizer\.pt is longer than the expected"):
        store.download_checkpoint(20, store.read_manifest(20), tmp_path)
    assert bodies[0].served <= len(files["optimizer.pt"]) + 2 * cs._CHUNK  # stopped, not read to the end
    assert list(tmp_path.iterdir()) == []


def test_fetch_without_manifest_refuses_a_huge_listing(s3: tuple[Any, str], tmp_path: Path) -> None:
    client, bucket = s3
    root = S3Uri(bucket, f"models/{uuid.uuid4().hex[:8]}/")
    store = CheckpointStore(Recording(client), root, max_file_bytes=1 << 20)
    client.put_object(Bucket=bucket, Key=root.key + "config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key=root.key + "model.safetensors", Body=b"\0" * (2 << 20))
    with pytest.raises(ConfigError, match=r"model.safetensors has 2097152 bytes, over the limit of 1048576"):
        store.fetch_tree(root, tmp_path / "model")
    assert [c for c in store.client.calls if c[0] == "get" and not c[1].endswith(MANIFEST_NAME)] == []


def test_oversized_manifest_is_read_only_up_to_its_limit(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cs, "MAX_MANIFEST_BYTES", 4096)
    publish(store, 10, checkpoint_files())
    put_manifest(store, 20, b" " * (1 << 20) + b"{}")
    with pytest.raises(DamagedCheckpoint, match="larger than the limit of 4096 bytes"):
        store.read_manifest(20)
    with caplog.at_level(logging.WARNING):
        assert [s for s, _ in store.complete_checkpoints()] == [10]


# ------------------------------------------------------------------------------------ hostile JSON

DEEP = b"[" * 200_000 + b"]" * 200_000


@pytest.mark.parametrize(
    "body",
    [
        DEEP,
        b'{"format_version": 1, "kind": "checkpoint", "step": 20, "files": [], "fingerprint": {"a": ' + DEEP + b"}}",
        b'{"format_version": 1, "kind": "checkpoint", "step": 20, '
        b'"files": [{"path": "a", "size": 1e400, "sha256": "0"}]}',
        b'{"format_version": 1, "kind": "checkpoint", "step": 20, "files": [{"path": "a", "size": '
        + b"9" * 5000
        + b"}]}",
        b'{"format_version": 1, "kind": "checkpoint", "step": NaN, "files": []}',
        b"\xff\xfe{}",
    ],
    ids=["deep-array", "deep-fingerprint", "huge-float", "huge-int", "nan", "bad-utf8"],
)
def test_hostile_manifest_json_is_skipped_not_a_crash(
    store: CheckpointStore, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    publish(store, 10, checkpoint_files())
    put_manifest(store, 20, body)
    with pytest.raises(DamagedCheckpoint):
        store.read_manifest(20)
    with caplog.at_level(logging.WARNING):
        assert [s for s, _ in store.complete_checkpoints()] == [10]
    assert store.apply_retention(1, FP) == []  # retention leaves what it cannot read alone


def test_hostile_progress_json_is_ignored(store: CheckpointStore) -> None:
    for body in (DEEP, b"[1, 2]", b"\xff", b'{"step": ' + b"9" * 5000 + b"}"):
        uri = store.root.child("progress.json")
        store.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=body)
        assert store.get_json("progress.json") is None


@pytest.mark.parametrize("created_at", ["2026-11-28T12:00:00", "yesterday", "9999-12-31T23:59:59+00:00", ""])
def test_manifest_timestamps_cannot_crash_the_operator(s3: tuple[Any, str], created_at: str) -> None:
    """The operator reads the newest manifest (its age is a metric) in every reconcile."""
    from tests.support.reconciler_harness import Cluster
    from tests.support.spec_strategies import resource

    client, bucket = s3
    name = f"ts-{uuid.uuid4().hex[:6]}"
    store = CheckpointStore(client, S3Uri(bucket, f"{name}/"))
    publish(store, 10, checkpoint_files(), created_at=created_at)
    store.put_json("progress.json", {"step": 12, "max_steps": 30, "attempt": 1, "loss": 1.25})
    spec = {
        "baseModel": "m",
        "dataset": {"source": "/d.jsonl"},
        "storage": {"uri": f"s3://{bucket}/{name}/", "endpoint": client.meta.endpoint_url},
    }
    cluster = Cluster(resource(spec, name=name))
    cluster.reconciler.s3_factory = lambda *args: client
    cluster.reconcile()
    status = cluster.status
    assert status["latestCheckpoint"]["step"] == 10 and status["progress"] == "12/30"
    manifest = store.read_manifest(10)
    assert manifest.created_at in ("", "9999-12-31T23:59:59+00:00")


def test_counts_nothing_twice() -> None:
    """The Recording helper counts each request once (guards the 'no request' assertions above)."""

    class Fake:
        def head_object(self, **kw: Any) -> dict:
            return {"ContentLength": 1}

    rec = Recording(Fake())
    rec.head_object(Bucket="b", Key="k")
    assert Counter(rec.calls) == Counter({("head", "k"): 1})

"""The checkpoint store against a real S3 server (moto over HTTP on loopback)."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

from loraresume_trainer.checkpoint_store import CheckpointListing, CheckpointStore
from loraresume_trainer.errors import ConfigError, DamagedCheckpoint, StorageAuthError, StorageError
from loraresume_trainer.manifest import MANIFEST_NAME, FileEntry, Manifest
from loraresume_trainer.s3client import classify_s3_error, make_s3_client, s3_errors
from loraresume_trainer.s3uri import S3Uri

FP = {"base_model": "tiny-llama", "dataset": "s3://data/a.jsonl", "lora_r": 8}
OTHER_FP = {"base_model": "other", "dataset": "s3://data/b.jsonl", "lora_r": 8}
CANARY = "CANARY-wJalrXUtnFEMI-K7MDENG-bPxRfiCY-SECRET"


class Recorder:
    """Client proxy that records the mutating calls, in order."""

    MUTATING = ("put_object", "upload_file", "delete_object", "delete_objects")

    def __init__(self, client: Any):
        self._client = client
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in self.MUTATING:
            return attr

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if name == "upload_file":
                target = args[2] if len(args) > 2 else kwargs["Key"]
            elif name == "delete_objects":
                target = [o["Key"] for o in kwargs["Delete"]["Objects"]]
            else:
                target = kwargs["Key"]
            self.calls.append((name, target))
            return attr(*args, **kwargs)

        return wrapped


@pytest.fixture
def store(s3_bucket: tuple[str, str]) -> CheckpointStore:
    endpoint, bucket = s3_bucket
    return CheckpointStore(make_s3_client(endpoint), S3Uri.parse(f"s3://{bucket}/jobs/run-1"))


def make_checkpoint(parent: Path, step: int, files: dict[str, bytes] | None = None) -> Path:
    path = parent / f"local-checkpoint-{step}-{os.urandom(3).hex()}"
    path.mkdir(parents=True)
    files = files or {
        "adapter_config.json": b"{}",
        "adapter_model.safetensors": os.urandom(4096),
        "optimizer.pt": os.urandom(8192),
        "scheduler.pt": os.urandom(64),
        "rng_state.pth": os.urandom(100),
        "trainer_state.json": json.dumps({"global_step": step}).encode(),
        "sub/rng_state.pth": os.urandom(100),
        "training_args.bin": b"an arbitrary pickle",
    }
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def keys_under(store: CheckpointStore, prefix: S3Uri) -> set[str]:
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=prefix.bucket, Prefix=prefix.key)
    return {obj["Key"][len(prefix.key) :] for page in pages for obj in page.get("Contents", [])}


def put_raw(store: CheckpointStore, uri: S3Uri, body: bytes) -> None:
    store.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=body)


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------- upload, list


def test_upload_list_download(store: CheckpointStore, tmp_path: Path) -> None:
    local10 = make_checkpoint(tmp_path, 10)
    local20 = make_checkpoint(tmp_path, 20)
    m10 = store.upload_checkpoint(local10, 10, FP)
    m20 = store.upload_checkpoint(local20, 20, FP)

    assert store.list_checkpoints() == [CheckpointListing(20, True), CheckpointListing(10, True)]
    assert [(s, m) for s, m in store.complete_checkpoints()] == [(20, m20), (10, m10)]
    assert store.read_manifest(20) == m20
    assert store.read_manifest(99) is None
    assert "training_args.bin" not in {f.path for f in m20.files}
    assert keys_under(store, store.checkpoint_uri(20)) == {f.path for f in m20.files} | {MANIFEST_NAME}
    assert str(store.checkpoint_uri(20)) == f"s3://{store.root.bucket}/jobs/run-1/checkpoints/checkpoint-20/"

    dest = store.download_checkpoint(20, m20, tmp_path / "restore")
    assert dest == tmp_path / "restore" / "checkpoint-20"
    expected = tree(local20)
    del expected["training_args.bin"]
    assert tree(dest) == expected
    assert sorted(os.listdir(tmp_path / "restore")) == ["checkpoint-20"]  # no temp dirs left


def test_manifest_deleted_first_and_written_last(store: CheckpointStore, tmp_path: Path) -> None:
    store.upload_checkpoint(make_checkpoint(tmp_path, 10), 10, FP)
    put_raw(store, store.checkpoint_uri(10).child("stale.bin"), b"old")
    recorder = Recorder(store.client)
    recording = CheckpointStore(recorder, store.root)
    manifest = recording.upload_checkpoint(make_checkpoint(tmp_path, 10), 10, FP)

    manifest_key = store.checkpoint_uri(10).child(MANIFEST_NAME).key
    names = [name for name, _ in recorder.calls]
    assert recorder.calls[0] == ("delete_object", manifest_key)
    assert recorder.calls[-1] == ("put_object", manifest_key)
    assert names.count("upload_file") == len(manifest.files)
    assert names.index("delete_objects") < names.index("upload_file")  # stale removal before uploads

    # And S3 agrees: nothing under the prefix is newer than the manifest.
    prefix = store.checkpoint_uri(10)
    contents = store.client.list_objects_v2(Bucket=prefix.bucket, Prefix=prefix.key)["Contents"]
    newest = max(contents, key=lambda o: o["LastModified"])["LastModified"]
    assert next(o for o in contents if o["Key"] == manifest_key)["LastModified"] == newest


def test_reupload_replaces_stale_files(store: CheckpointStore, tmp_path: Path) -> None:
    store.upload_checkpoint(make_checkpoint(tmp_path, 10, {"a": b"1", "b": b"2", "c": b"3"}), 10, FP)
    manifest = store.upload_checkpoint(make_checkpoint(tmp_path, 10, {"a": b"new", "d": b"4"}), 10, FP)
    assert keys_under(store, store.checkpoint_uri(10)) == {"a", "d", MANIFEST_NAME}
    assert tree(store.download_checkpoint(10, manifest, tmp_path / "out")) == {"a": b"new", "d": b"4"}


def test_download_replaces_existing_destination(store: CheckpointStore, tmp_path: Path) -> None:
    manifest = store.upload_checkpoint(make_checkpoint(tmp_path, 3, {"a": b"x"}), 3, FP)
    old = tmp_path / "out" / "checkpoint-3"
    old.mkdir(parents=True)
    (old / "leftover").write_bytes(b"old")
    store.download_checkpoint(3, manifest, tmp_path / "out")
    assert tree(old) == {"a": b"x"}
    assert os.listdir(tmp_path / "out") == ["checkpoint-3"]


# ------------------------------------------------------------ damaged checkpoints


def _delete_file(store: CheckpointStore, prefix: S3Uri) -> str:
    store.client.delete_object(Bucket=prefix.bucket, Key=prefix.child("optimizer.pt").key)
    return "optimizer.pt"


def _overwrite_same_size(store: CheckpointStore, prefix: S3Uri) -> str:
    put_raw(store, prefix.child("optimizer.pt"), b"\0" * 8192)
    return "optimizer.pt"


def _truncate(store: CheckpointStore, prefix: S3Uri) -> str:
    put_raw(store, prefix.child("adapter_model.safetensors"), os.urandom(1000))
    return "adapter_model.safetensors"


def _grow(store: CheckpointStore, prefix: S3Uri) -> str:
    put_raw(store, prefix.child("sub/rng_state.pth"), os.urandom(5000))
    return "sub/rng_state.pth"


@pytest.mark.parametrize(
    "damage",
    [_delete_file, _overwrite_same_size, _truncate, _grow],
    ids=["missing file", "wrong hash", "truncated", "longer"],
)
def test_damaged_newest_falls_back_to_previous(store: CheckpointStore, tmp_path: Path, damage: Any) -> None:
    local10 = make_checkpoint(tmp_path, 10)
    store.upload_checkpoint(local10, 10, FP)
    m20 = store.upload_checkpoint(make_checkpoint(tmp_path, 20), 20, FP)
    bad_file = damage(store, store.checkpoint_uri(20))

    dest_parent = tmp_path / "restore"
    with pytest.raises(DamagedCheckpoint) as info:
        store.download_checkpoint(20, m20, dest_parent)
    assert "checkpoint-20" in str(info.value) and bad_file in str(info.value)
    assert not dest_parent.exists() or os.listdir(dest_parent) == []  # nothing partial left

    step, _, path = store.download_newest_complete(dest_parent)
    assert step == 10
    expected = tree(local10)
    del expected["training_args.bin"]
    assert tree(path) == expected
    assert os.listdir(dest_parent) == ["checkpoint-10"]


def test_hash_mismatch_found_after_download_leaves_nothing(store: CheckpointStore, tmp_path: Path) -> None:
    """A wrong hash is only detectable after the bytes arrived: the temp dir must go away."""
    m = store.upload_checkpoint(make_checkpoint(tmp_path, 5), 5, FP)
    _overwrite_same_size(store, store.checkpoint_uri(5))
    existing = tmp_path / "restore" / "checkpoint-5"
    existing.mkdir(parents=True)
    (existing / "keep-me").write_bytes(b"previous download")
    with pytest.raises(DamagedCheckpoint, match="sha256"):
        store.download_checkpoint(5, m, tmp_path / "restore")
    assert os.listdir(tmp_path / "restore") == ["checkpoint-5"]
    assert tree(existing) == {"keep-me": b"previous download"}  # untouched by the failed attempt


def test_missing_or_garbage_manifest_is_not_complete(store: CheckpointStore, tmp_path: Path, caplog: Any) -> None:
    store.upload_checkpoint(make_checkpoint(tmp_path, 10), 10, FP)
    store.upload_checkpoint(make_checkpoint(tmp_path, 20), 20, FP)
    store.upload_checkpoint(make_checkpoint(tmp_path, 30), 30, FP)
    store.client.delete_object(Bucket=store.root.bucket, Key=store.checkpoint_uri(30).child(MANIFEST_NAME).key)
    put_raw(store, store.checkpoint_uri(20).child(MANIFEST_NAME), b"{ truncated")

    assert store.list_checkpoints() == [
        CheckpointListing(30, False),
        CheckpointListing(20, True),
        CheckpointListing(10, True),
    ]
    with pytest.raises(DamagedCheckpoint, match="checkpoint-20"):
        store.read_manifest(20)
    with caplog.at_level(logging.WARNING):
        assert [s for s, _ in store.complete_checkpoints()] == [10]
    assert "checkpoint-20" in caplog.text
    step, _, _ = store.download_newest_complete(tmp_path / "restore")
    assert step == 10


def test_manifest_with_escaping_path_is_refused(store: CheckpointStore, tmp_path: Path) -> None:
    store.upload_checkpoint(make_checkpoint(tmp_path, 10), 10, FP)
    evil = {
        "format_version": 1,
        "kind": "checkpoint",
        "step": 30,
        "created_at": "",
        "fingerprint": FP,
        "files": [{"path": "../x", "size": 1, "sha256": "0" * 64}],
    }
    put_raw(store, store.checkpoint_uri(30).child(MANIFEST_NAME), json.dumps(evil).encode())
    with pytest.raises(DamagedCheckpoint, match=r"\.\./x"):
        store.read_manifest(30)
    assert [s for s, _ in store.complete_checkpoints()] == [10]

    # A manifest for another step is not trusted either.
    copied = json.loads(json.dumps(evil))
    copied["files"] = [{"path": "a", "size": 1, "sha256": "0" * 64}]
    put_raw(store, store.checkpoint_uri(40).child(MANIFEST_NAME), json.dumps(copied).encode())
    with pytest.raises(DamagedCheckpoint, match="not checkpoint step 40"):
        store.read_manifest(40)

    # Even a hand-built Manifest cannot make download_tree write outside dest.
    forged = Manifest(kind="checkpoint", step=30, files=(FileEntry("../x", 1, "0" * 64),), fingerprint={})
    with pytest.raises(DamagedCheckpoint):
        store.download_checkpoint(30, forged, tmp_path / "restore" / "deep")
    assert not (tmp_path / "restore" / "x").exists()


def test_listing_ignores_junk_prefixes(store: CheckpointStore, tmp_path: Path, caplog: Any) -> None:
    store.upload_checkpoint(make_checkpoint(tmp_path, 5, {"a": b"1"}), 5, FP)
    base = store.root.child("checkpoints/")
    for junk in [
        "../evil/x",
        "checkpoint-abc/x",
        "checkpoint-007/_COMPLETE.json",
        "checkpoint-5 /x",
        "checkpoint-1\\2/x",
        "./x",
        "stray.txt",
        "checkpoint-9/",
        "Checkpoint-3/x",
    ]:
        store.client.put_object(Bucket=base.bucket, Key=base.key + junk, Body=b"junk")
    with caplog.at_level(logging.WARNING):
        listing = store.list_checkpoints()
    # checkpoint-9/ is a directory marker of a valid name: it shows up, incomplete.
    assert listing == [CheckpointListing(9, False), CheckpointListing(5, True)]
    assert "../" in caplog.text and "checkpoint-abc" in caplog.text
    assert [s for s, _ in store.complete_checkpoints()] == [5]


# -------------------------------------------------------------------- retention


def test_retention(store: CheckpointStore, tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        store.upload_checkpoint(make_checkpoint(tmp_path, step, {"a": b"%d" % step}), step, FP)
    store.upload_checkpoint(make_checkpoint(tmp_path, 5, {"a": b"b"}), 5, OTHER_FP)
    for step in (15, 25, 50):  # killed uploads: files, no manifest
        put_raw(store, store.checkpoint_uri(step).child("a"), b"partial")

    recorder = Recorder(store.client)
    deleted = CheckpointStore(recorder, store.root).apply_retention(2, FP, protect=frozenset({25}))
    assert deleted == [10, 15, 20]
    assert [(c.step, c.complete) for c in store.list_checkpoints()] == [
        (50, False),
        (40, True),
        (30, True),
        (25, False),
        (5, True),
    ]
    # Manifest of a deleted checkpoint goes before its files.
    manifest10 = store.checkpoint_uri(10).child(MANIFEST_NAME).key
    first = recorder.calls.index(("delete_object", manifest10))
    files10 = next(
        i
        for i, (name, keys) in enumerate(recorder.calls)
        if name == "delete_objects" and store.checkpoint_uri(10).child("a").key in keys
    )
    assert first < files10

    assert store.apply_retention(1, FP) == [25, 30]
    assert [s for s, _ in store.complete_checkpoints()] == [40, 5]
    assert store.apply_retention(1, FP) == []  # never the newest
    assert store.apply_retention(1, OTHER_FP) == []  # 5 is OTHER_FP's newest
    with pytest.raises(ValueError):
        store.apply_retention(0, FP)


def test_retention_fingerprint_compares_as_json(store: CheckpointStore, tmp_path: Path) -> None:
    fp = {"target_modules": ("q_proj", "v_proj")}  # a tuple reads back from JSON as a list
    for step in (1, 2):
        store.upload_checkpoint(make_checkpoint(tmp_path, step, {"a": b"x"}), step, fp)
    assert store.apply_retention(1, fp) == [1]


# ------------------------------------------------------------------- fetch_tree


def test_fetch_tree_with_manifest(store: CheckpointStore, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path, 0, {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w" * 300})
    manifest = store.upload_adapter(local, FP)
    assert manifest.kind == "adapter" and store.read_adapter_manifest() == manifest
    adapter = store.adapter_uri()
    put_raw(store, adapter.child("not-in-manifest.bin"), b"ignored")
    dest = store.fetch_tree(S3Uri.parse(str(adapter).rstrip("/")), tmp_path / "adapter")
    assert tree(dest) == tree(local)

    _overwrite = adapter.child("adapter_model.safetensors")
    put_raw(store, _overwrite, b"v" * 300)
    with pytest.raises(DamagedCheckpoint, match=r"adapter_model\.safetensors"):
        store.fetch_tree(adapter, tmp_path / "adapter2")
    assert not (tmp_path / "adapter2").exists()


def test_fetch_tree_without_manifest(store: CheckpointStore, tmp_path: Path) -> None:
    bucket = store.root.bucket
    objects = {
        "models/tiny/config.json": b"{}",
        "models/tiny/sub/w.bin": b"w" * 2000,
        "models/tiny-2/other.bin": b"not mine",
    }
    for key, body in objects.items():
        store.client.put_object(Bucket=bucket, Key=key, Body=body)
    store.client.put_object(Bucket=bucket, Key="models/tiny/sub/", Body=b"")  # directory marker
    dest = store.fetch_tree(S3Uri(bucket, "models/tiny"), tmp_path / "model")
    assert tree(dest) == {"config.json": b"{}", "sub/w.bin": b"w" * 2000}

    with pytest.raises(ConfigError, match=f"s3://{bucket}/models/none/"):
        store.fetch_tree(S3Uri(bucket, "models/none/"), tmp_path / "none")
    store.client.put_object(Bucket=bucket, Key="models/odd/we ird.txt", Body=b"x")
    with pytest.raises(ConfigError, match="we ird"):
        store.fetch_tree(S3Uri(bucket, "models/odd/"), tmp_path / "odd")
    assert not (tmp_path / "none").exists() and not (tmp_path / "odd").exists()


# ---------------------------------------------------------- progress and logs


def test_json_and_plain_files(store: CheckpointStore, tmp_path: Path) -> None:
    assert store.get_json("progress.json") is None
    store.put_json("progress.json", {"step": 3, "loss": 1.5})
    assert store.get_json("progress.json") == {"step": 3, "loss": 1.5}
    put_raw(store, store.root.child("progress.json"), b"[1]")
    assert store.get_json("progress.json") is None
    with pytest.raises(ValueError):
        store.put_json("../x.json", {})

    logs = tmp_path / "tb"
    (logs / "run").mkdir(parents=True)
    (logs / "run" / "events.out.tfevents.1.host").write_bytes(b"e1")
    assert store.upload_files(logs, store.logs_uri()) == 1
    assert store.upload_files(logs, store.logs_uri()) == 0  # unchanged: skipped
    (logs / "run" / "events.out.tfevents.1.host").write_bytes(b"e1e2")
    assert store.upload_files(logs, store.logs_uri()) == 1
    assert keys_under(store, store.logs_uri()) == {"run/events.out.tfevents.1.host"}


# --------------------------------------------------------------- error mapping


def _secret_free(exc: BaseException, *secrets: str) -> None:
    text = "".join(traceback.format_exception(exc))
    for secret in secrets:
        assert secret not in str(exc)
        assert secret not in text


def test_wrong_credentials_are_permanent_and_secret_free(
    s3_auth_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = s3_auth_server
    root = S3Uri(srv.bucket, f"jobs/{os.urandom(4).hex()}/")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", srv.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", srv.secret_access_key)
    good = CheckpointStore(make_s3_client(srv.endpoint), root)
    good.upload_checkpoint(make_checkpoint(tmp_path, 1, {"a": b"1"}), 1, FP)
    assert [s for s, _ in good.complete_checkpoints()] == [1]

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    bad = CheckpointStore(make_s3_client(srv.endpoint, max_attempts=1), root)
    for action in (
        bad.list_checkpoints,
        lambda: bad.read_manifest(1),
        lambda: bad.put_json("progress.json", {}),
        lambda: bad.upload_checkpoint(make_checkpoint(tmp_path, 2, {"a": b"2"}), 2, FP),
        lambda: bad.fetch_tree(root, tmp_path / "f"),
    ):
        with pytest.raises(StorageAuthError) as info:
            action()
        assert info.value.permanent
        assert "check the credentials" in str(info.value) and "s3://" in str(info.value)
        _secret_free(info.value, CANARY)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    wrong_id = CheckpointStore(make_s3_client(srv.endpoint, max_attempts=1), root)
    with pytest.raises(StorageAuthError, match="InvalidAccessKeyId") as info:
        wrong_id.list_checkpoints()
    _secret_free(info.value, CANARY)

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageAuthError, match="NoCredentialsError"):
        CheckpointStore(make_s3_client(srv.endpoint, max_attempts=1), root).list_checkpoints()


def test_missing_bucket_is_permanent(s3_server: Any) -> None:
    store = CheckpointStore(make_s3_client(s3_server.endpoint), S3Uri("no-such-bucket-here", "x/"))
    with pytest.raises(StorageAuthError, match="NoSuchBucket"):
        store.list_checkpoints()


def test_unreachable_endpoint_is_transient_and_quick() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    client = make_s3_client(f"http://someone:{CANARY}@127.0.0.1:{port}", max_attempts=2)
    store = CheckpointStore(client, S3Uri("bkt", "run/"))
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.list_checkpoints()
    assert time.monotonic() - started < 10
    assert not isinstance(info.value, StorageAuthError) and not info.value.permanent
    assert f"127.0.0.1:{port}" in str(info.value)
    _secret_free(info.value, CANARY)


def _client_error(code: str, status: int, message: str = f"details {CANARY}") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "ListObjectsV2",
    )


@pytest.mark.parametrize(
    "exc, expected",
    [
        (_client_error("InvalidAccessKeyId", 403), StorageAuthError),
        (_client_error("SignatureDoesNotMatch", 403), StorageAuthError),
        (_client_error("AccessDenied", 403), StorageAuthError),
        (_client_error("NoSuchBucket", 404), StorageAuthError),
        (_client_error("InvalidToken", 400), StorageAuthError),
        (_client_error("ExpiredToken", 400), StorageAuthError),
        (_client_error("AllAccessDisabled", 403), StorageAuthError),
        (_client_error("403", 403), StorageAuthError),
        (_client_error("AuthorizationHeaderMalformed", 400), StorageAuthError),
        (_client_error("SlowDown", 503), StorageError),
        (_client_error("InternalError", 500), StorageError),
        (_client_error("ServiceUnavailable", 503), StorageError),
        (_client_error("WeirdGatewayThing", 502), StorageError),
        (NoCredentialsError(), StorageAuthError),
        (EndpointConnectionError(endpoint_url=f"http://u:{CANARY}@h:1/x"), StorageError),
        (ReadTimeoutError(endpoint_url=f"http://u:{CANARY}@h:1/x"), StorageError),
    ],
)
def test_classify_table(exc: Exception, expected: type) -> None:
    err = classify_s3_error(exc, operation="listing", uri="s3://b/p/")
    assert type(err) is expected
    assert "s3://b/p/" in str(err)
    assert CANARY not in str(err)


def test_classify_unwraps_upload_failed_error() -> None:
    from boto3.exceptions import S3UploadFailedError

    try:
        try:
            raise _client_error("InvalidAccessKeyId", 403)
        except ClientError as inner:
            raise S3UploadFailedError(f"Failed to upload x to b/k: {inner}") from inner
    except S3UploadFailedError as outer:
        err = classify_s3_error(outer, operation="uploading to", uri="s3://b/k")
    assert isinstance(err, StorageAuthError) and "InvalidAccessKeyId" in str(err)
    assert CANARY not in str(err)


def test_s3_errors_context_manager_does_not_chain() -> None:
    with pytest.raises(StorageError) as info, s3_errors("reading", "s3://b/k"):
        raise _client_error("InternalError", 500)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    _secret_free(info.value, CANARY)


def test_store_modules_stay_light() -> None:
    """The operator imports these; they must not pull in the training stack."""
    import subprocess
    import sys

    code = (
        "import sys, loraresume_trainer.checkpoint_store, loraresume_trainer.uploader, "
        "loraresume_trainer.s3client, loraresume_trainer.manifest, loraresume_trainer.s3uri\n"
        "heavy = [m for m in ('torch', 'transformers', 'unsloth') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

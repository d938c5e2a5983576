"""Manifest parsing is strict (it comes from a bucket anyone with access can write)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from loraresume_trainer.errors import DamagedCheckpoint, TrainerError
from loraresume_trainer.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    build_manifest,
    parse_checkpoint_name,
    safe_join,
    sha256_file,
)
from loraresume_trainer.s3uri import S3Uri, redact_url

SHA = "a" * 64


def doc(**overrides: object) -> dict:
    base = {
        "format_version": 1,
        "kind": "checkpoint",
        "step": 10,
        "created_at": "2026-01-01T00:00:00+00:00",
        "fingerprint": {"base_model": "tiny"},
        "files": [{"path": "adapter_model.safetensors", "size": 3, "sha256": SHA}],
    }
    base.update(overrides)
    return base


def file_doc(path: object = "a.bin", size: object = 1, sha256: object = SHA) -> dict:
    return doc(files=[{"path": path, "size": size, "sha256": sha256}])


BAD_MANIFESTS = {
    "not json": b"{nope",
    "not utf8": b"\xff\xfe\x00",
    "top level list": json.dumps([1, 2]).encode(),
    "unknown version": json.dumps(doc(format_version=2)).encode(),
    "version missing": json.dumps({k: v for k, v in doc().items() if k != "format_version"}).encode(),
    "version is bool": json.dumps(doc(format_version=True)).encode(),
    "unknown kind": json.dumps(doc(kind="weights")).encode(),
    "checkpoint without step": json.dumps(doc(step=None)).encode(),
    "negative step": json.dumps(doc(step=-1)).encode(),
    "step is string": json.dumps(doc(step="10")).encode(),
    "fingerprint not object": json.dumps(doc(fingerprint=[1])).encode(),
    "created_at not string": json.dumps(doc(created_at=5)).encode(),
    "files missing": json.dumps({k: v for k, v in doc().items() if k != "files"}).encode(),
    "files not list": json.dumps(doc(files={"a": 1})).encode(),
    "entry not object": json.dumps(doc(files=["a.bin"])).encode(),
    "absolute path": json.dumps(file_doc(path="/etc/passwd")).encode(),
    "dotdot path": json.dumps(file_doc(path="../x")).encode(),
    "inner dotdot": json.dumps(file_doc(path="a/../../x")).encode(),
    "dot segment": json.dumps(file_doc(path="./x")).encode(),
    "backslash": json.dumps(file_doc(path="a\\b")).encode(),
    "empty segment": json.dumps(file_doc(path="a//b")).encode(),
    "trailing slash": json.dumps(file_doc(path="a/")).encode(),
    "empty path": json.dumps(file_doc(path="")).encode(),
    "space in name": json.dumps(file_doc(path="a b")).encode(),
    "unicode name": json.dumps(file_doc(path="\u00e9.bin")).encode(),
    "newline in name": json.dumps(file_doc(path="a\nb")).encode(),
    "path not string": json.dumps(file_doc(path=5)).encode(),
    "own name": json.dumps(file_doc(path=MANIFEST_NAME)).encode(),
    "negative size": json.dumps(file_doc(size=-1)).encode(),
    "float size": json.dumps(file_doc(size=1.5)).encode(),
    "bool size": json.dumps(file_doc(size=True)).encode(),
    "uppercase sha": json.dumps(file_doc(sha256="A" * 64)).encode(),
    "short sha": json.dumps(file_doc(sha256="a" * 63)).encode(),
    "sha not string": json.dumps(file_doc(sha256=None)).encode(),
    "duplicate path": json.dumps(
        doc(files=[{"path": "a", "size": 1, "sha256": SHA}, {"path": "a", "size": 1, "sha256": SHA}])
    ).encode(),
    "too many files": json.dumps(
        doc(files=[{"path": f"f{i}", "size": 0, "sha256": SHA} for i in range(10_001)])
    ).encode(),
}


@pytest.mark.parametrize("data", list(BAD_MANIFESTS.values()), ids=list(BAD_MANIFESTS))
def test_bad_manifest_is_damaged_and_names_source(data: bytes) -> None:
    with pytest.raises(DamagedCheckpoint, match=re.escape("s3://bkt/run/checkpoints/checkpoint-10/_COMPLETE.json")):
        Manifest.from_bytes(data, source="s3://bkt/run/checkpoints/checkpoint-10/_COMPLETE.json")


def test_round_trip_and_sorted_keys() -> None:
    manifest = Manifest(
        kind="adapter",
        step=None,
        files=(FileEntry("sub/b.bin", 0, SHA), FileEntry("a.json", 12, "0" * 64)),
        fingerprint={"z": 1, "a": [1, 2]},
        created_at="2026-01-01T00:00:00+00:00",
    )
    data = manifest.to_bytes()
    assert Manifest.from_bytes(data, source="x") == manifest
    parsed = json.loads(data)
    assert list(parsed) == sorted(parsed)
    assert manifest.total_bytes == 12


def test_unknown_top_level_keys_are_tolerated() -> None:
    data = json.dumps(doc(extra="later versions may add fields")).encode()
    assert Manifest.from_bytes(data, source="x").step == 10


@pytest.mark.parametrize(
    "name, expected",
    [
        ("checkpoint-0", 0),
        ("checkpoint-10", 10),
        ("checkpoint-999999999999", 999999999999),
        ("checkpoint-007", None),
        ("checkpoint-", None),
        ("checkpoint-1e3", None),
        ("checkpoint--1", None),
        ("checkpoint-1 ", None),
        ("checkpoint-1/", None),
        ("checkpoint-1234567890123", None),
        ("checkpoint-abc", None),
        ("..", None),
        ("Checkpoint-1", None),
        ("checkpoint-\u0661", None),  # Arabic-Indic digit: \d would accept it, [0-9] does not
    ],
)
def test_parse_checkpoint_name(name: str, expected: int | None) -> None:
    assert parse_checkpoint_name(name) == expected


def test_build_manifest_walks_sorted_regular_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.bin").write_bytes(b"bbb")
    (tmp_path / "a.json").write_bytes(b"{}")
    (tmp_path / "sub" / "c.pt").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    (tmp_path / "training_args.bin").write_bytes(b"pickle")
    (tmp_path / MANIFEST_NAME).write_bytes(b"old")
    (tmp_path / "empty").mkdir()

    manifest = build_manifest(
        tmp_path, kind="checkpoint", step=5, fingerprint={"f": 1}, exclude=frozenset({"training_args.bin"})
    )
    assert [f.path for f in manifest.files] == ["a.json", "b.bin", "sub/c.pt"]
    for entry in manifest.files:
        content = (tmp_path / entry.path).read_bytes()
        assert entry.size == len(content)
        assert entry.sha256 == hashlib.sha256(content).hexdigest()
    assert manifest.step == 5 and manifest.kind == "checkpoint" and manifest.fingerprint == {"f": 1}
    assert Manifest.from_bytes(manifest.to_bytes(), source="x") == manifest


def test_build_manifest_refuses_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(TrainerError, match="symlink"):
        build_manifest(tmp_path, kind="adapter", step=None, fingerprint={})


def test_build_manifest_refuses_unpublishable_names(tmp_path: Path) -> None:
    (tmp_path / "bad name.txt").write_bytes(b"x")
    with pytest.raises(TrainerError, match="bad name"):
        build_manifest(tmp_path, kind="adapter", step=None, fingerprint={})


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(2 * 1024 * 1024 + 17)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/abs", "a\\b", "", "a//b", "."])
def test_safe_join_refuses_escapes(tmp_path: Path, rel: str) -> None:
    with pytest.raises(DamagedCheckpoint):
        safe_join(tmp_path, rel)


def test_safe_join_refuses_symlinked_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "out").symlink_to(tmp_path)
    with pytest.raises(DamagedCheckpoint, match="escapes"):
        safe_join(root, "out/x")


def test_safe_join_ok(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "sub/a.bin") == tmp_path / "sub" / "a.bin"


# S3 URIs are tiny and pure; their table lives here with the other path rules.


@pytest.mark.parametrize(
    "text, bucket, key",
    [
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
        ("s3://my.bucket-1/a/b/", "my.bucket-1", "a/b/"),
        ("s3://bkt/a/b", "bkt", "a/b"),
    ],
)
def test_s3uri_parse(text: str, bucket: str, key: str) -> None:
    uri = S3Uri.parse(text)
    assert (uri.bucket, uri.key) == (bucket, key)
    assert str(uri) == f"s3://{bucket}/{key}"


@pytest.mark.parametrize(
    "text",
    [
        "bucket/a",
        "http://bucket/a",
        "s3://",
        "s3:///a",
        "s3://ab",
        "s3://Bucket",
        "s3://b_ucket",
        "s3://-bucket",
        "s3://a..b",
        "s3://192.168.1.1",
        "s3://" + "a" * 64,
        "s3://bkt//a",
        "s3://bkt/a/../b",
        "s3://bkt/./a",
        "s3://bkt/a\nb",
    ],
)
def test_s3uri_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        S3Uri.parse(text)


def test_s3uri_child_and_as_dir() -> None:
    root = S3Uri.parse("s3://bkt/run")
    assert str(root.as_dir()) == "s3://bkt/run/"
    assert root.child("checkpoints", "checkpoint-5/").key == "run/checkpoints/checkpoint-5/"
    assert root.child("progress.json").key == "run/progress.json"
    assert S3Uri.parse("s3://bkt").child("a").key == "a"
    assert root.child("x/").is_dir and not root.child("x").is_dir
    assert root.child("x/y").name == "y"
    with pytest.raises(ValueError):
        root.child("..")
    with pytest.raises(ValueError):
        root.child("/abs")


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://user:pa55@minio:9000/x", "http://minio:9000/x"),
        ("https://AKIA:sec%2Fret@s3.example.com", "https://s3.example.com"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
        ("", ""),
        (None, ""),
    ],
)
def test_redact_url(url: str | None, expected: str) -> None:
    assert redact_url(url) == expected

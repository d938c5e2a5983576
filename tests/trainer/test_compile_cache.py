"""Compile caches survive attempts: saved under the job's storage, restored verified, never fatal.

Against moto's S3 server over HTTP. The CPU compiles nothing, so the caches hold stand-in files laid
out as the libraries lay theirs out; what is checked is the trainer's part: key, archive, manifest,
verification, extraction, the image's seed, and (slow) the trainer doing it between two attempts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

from loraresume_trainer import compile_cache
from loraresume_trainer.checkpoint_store import CheckpointStore
from loraresume_trainer.compile_cache import (
    CACHES,
    ENV_DEFAULTS,
    ENV_SEED,
    PTXAS_VAR,
    CompileCache,
    TritonCompiles,
    cache_key,
    export,
    key_inputs,
    lookup_counts,
    pin_ptxas,
    watch_triton_compiles,
)
from loraresume_trainer.config import parse_job
from loraresume_trainer.manifest import MANIFEST_NAME, Manifest
from loraresume_trainer.s3uri import S3Uri
from tests.support.trainer_runs import run_attempt

JOB = {"baseModel": "s3://bkt/models/llama/", "dataset": {"source": "d.jsonl"}, "storage": {"uri": "s3://bkt/j/"}}
VERSIONS = {"python": "3.12.1", "torch": "2.11.0", "triton": "3.6.0", "unsloth": "2026.10.9"}


def inputs(**job: Any) -> dict[str, Any]:
    return key_inputs(parse_job({**JOB, **job}), gpu="NVIDIA H200", versions=VERSIONS)


@pytest.fixture
def store(s3) -> CheckpointStore:
    _, bucket, client = s3
    return CheckpointStore(client, S3Uri(bucket, f"jobs/{uuid.uuid4().hex[:8]}/"))


@pytest.fixture(autouse=True)
def _cache_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """point_env() sets the libraries' variables: give each test its own copy of the environment."""
    for var in [*CACHES.values(), *ENV_DEFAULTS, ENV_SEED]:
        monkeypatch.delenv(var, raising=False)


def fill(cache: CompileCache) -> dict[str, bytes]:
    """Files as Triton, inductor and Unsloth lay them out (binary kernels, nested hashes, sources)."""
    files = {
        "triton/ABCDEFGHIJKLMNOP234567ABCDEF/matmul_kernel.cubin": os.urandom(3000),
        "triton/ABCDEFGHIJKLMNOP234567ABCDEF/__grp__matmul_kernel.json": b'{"child_paths": {}}',
        "inductor/fxgraph/ab/fabcdef0123/entry": os.urandom(500),
        "inductor/triton/0/XYZ/triton_poi_fused_0.py": b"# kernel source\n",
        "unsloth/UnslothSFTTrainer.py": b"class UnslothSFTTrainer: ...\n",
        "unsloth/__pycache__/UnslothSFTTrainer.cpython-312.pyc": os.urandom(200),
    }
    for rel, data in files.items():
        path = cache.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (cache.root / "triton" / "ABCDEFGHIJKLMNOP234567ABCDEF" / "x.lock").write_bytes(b"")  # never archived
    os.symlink("/etc/passwd", cache.root / "unsloth" / "link.py")  # never archived
    return files


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def events(capsys: pytest.CaptureFixture[str], kind: str) -> list[dict[str, Any]]:
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return [e for e in out if e["event"] == kind]


# ------------------------------------------------------------------------------------------- the key


@pytest.mark.parametrize(
    ("change", "same"),
    [
        pytest.param({"gpu": "NVIDIA A100-SXM4-80GB"}, False, id="gpu-model"),
        pytest.param({"versions": {**VERSIONS, "torch": "2.11.1"}}, False, id="torch-version"),
        pytest.param({"versions": {**VERSIONS, "unsloth": "2026.11.1"}}, False, id="unsloth-version"),
        pytest.param({"job": {"maxSeqLength": 4096}}, False, id="sequence-length"),
        pytest.param({"job": {"baseModel": "s3://bkt/models/other/"}}, False, id="model"),
        pytest.param({"job": {"lora": {"r": 32}}}, False, id="lora-rank"),
        pytest.param({"job": {"training": {"per_device_train_batch_size": 4}}}, False, id="batch-shape"),
        pytest.param({"job": {"gradientCheckpointing": "false"}}, False, id="checkpointing-mode"),
        pytest.param({"job": {"training": {"padding_free": True}}}, False, id="padding-free"),
        pytest.param({"job": {"training": {"logging_steps": 5, "save_steps": 50}}}, True, id="cadence-is-not-shape"),
        pytest.param({"job": {"training": {"learning_rate": 1e-5}}}, True, id="learning-rate-is-not-shape"),
        pytest.param({"job": {"dataset": {"source": "other.jsonl"}}}, True, id="data-is-not-shape"),
    ],
)
def test_the_key_covers_what_compiled_code_depends_on(change: dict[str, Any], same: bool) -> None:
    base = key_inputs(parse_job(JOB), gpu="NVIDIA H200", versions=VERSIONS)
    other = key_inputs(
        parse_job({**JOB, **change.get("job", {})}),
        gpu=change.get("gpu", "NVIDIA H200"),
        versions=change.get("versions", VERSIONS),
    )
    assert (cache_key(base) == cache_key(other)) is same


def test_key_inputs_need_no_heavy_import() -> None:
    """They are computed before the imports the cache must precede."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from loraresume_trainer.compile_cache import key_inputs\n"
        "from loraresume_trainer.config import parse_job\n"
        f"key_inputs(parse_job({JOB!r}))\n"
        "print(sorted(m for m in ('torch', 'unsloth', 'transformers', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------- save and restore


def test_round_trip_restores_every_file_bitwise_and_saves_once(store, tmp_path, capsys) -> None:
    first = CompileCache(store, tmp_path / "node-a" / "compile-cache", inputs())
    first.point_env()
    assert {var: os.environ[var] for var in CACHES.values()} == {
        var: str(first.root / name) for name, var in CACHES.items()
    }
    assert first.restore() == "miss" and first.should_save
    files = fill(first)
    assert first.save() is True and not first.should_save
    (saved,) = events(capsys, "compile_cache_saved")
    assert saved["files"] == len(files) and saved["uri"] == str(store.compile_cache_uri(first.key))

    manifest = store.read_tree_manifest(first.uri)
    assert manifest is not None and manifest.kind == "compile-cache"
    assert manifest.fingerprint == json.loads(json.dumps(inputs()))
    assert sorted(f.path for f in manifest.files) == ["inductor.tar", "triton.tar", "unsloth.tar"]

    second = CompileCache(store, tmp_path / "node-b" / "compile-cache", inputs())
    second.point_env()
    assert second.restore() == "storage"
    assert tree(second.root) == files  # bitwise, without the lock file and the symlink
    assert not second.should_save and second.save() is False  # already in storage: not uploaded again
    (restored,) = events(capsys, "compile_cache")
    assert restored["result"] == "storage" and restored["files"] == len(files)


@pytest.mark.parametrize(
    ("pod_sets", "expected"),
    [
        (None, "1"),  # AOTAutograd caches Unsloth's blocks (custom autograd.Functions): the relaunch skips tracing
        ("0", "0"),  # a pod's own setting wins
    ],
)
def test_point_env_allows_aotautograd_to_cache_custom_functions_unless_the_pod_says(
    store, tmp_path, monkeypatch, pod_sets, expected
) -> None:
    var = "TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD"
    assert var in ENV_DEFAULTS
    if pod_sets is not None:
        monkeypatch.setenv(var, pod_sets)
    CompileCache(store, tmp_path / "c", inputs()).point_env()
    assert os.environ[var] == expected


def test_repoint_points_back_what_an_import_changed(store, tmp_path, monkeypatch) -> None:
    """`import unsloth` drops TORCHINDUCTOR_CACHE_DIR: inductor's caches then went to the node's /tmp,
    outside what is saved and restored."""
    cache = CompileCache(store, tmp_path / "c", inputs())
    cache.point_env()
    assert cache.repoint() == []
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")  # as unsloth_zoo's patch_torch_compile does
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache.repoint() == ["TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"]
    assert {var: os.environ[var] for var in CACHES.values()} == {
        var: str(cache.root / name) for name, var in CACHES.items()
    }


def test_lookup_counts_reports_torchs_cache_outcomes_and_nothing_before_torch_compiled(monkeypatch) -> None:
    import collections
    import sys
    import types

    monkeypatch.delitem(sys.modules, "torch._dynamo.utils", raising=False)
    assert lookup_counts() == {}
    fake = types.ModuleType("torch._dynamo.utils")
    counters: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    counters["inductor"].update(fxgraph_cache_hit=4, fxgraph_cache_miss=0, pattern_matcher_count=9)
    counters["aot_autograd"].update(autograd_cache_bypass=2, autograd_cache_hit=1, total=3)
    fake.counters = counters  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch._dynamo.utils", fake)
    monkeypatch.setattr(compile_cache, "TRITON_COMPILES", TritonCompiles())
    assert lookup_counts() == {"fxgraph_cache_hit": 4, "autograd_cache_bypass": 2, "autograd_cache_hit": 1}
    compile_cache.TRITON_COMPILES(src=None, metadata={}, metadata_group={}, times=None, cache_hit=False)
    assert lookup_counts()["triton_compiled"] == 1


def test_triton_builds_are_counted_as_triton_reports_them() -> None:
    """Triton calls its compilation listener once per build: cache_hit True when the kernel came from its
    cache (keyword arguments as Triton 3.6 passes them)."""
    compiles = TritonCompiles()
    assert compiles.snapshot() == {}
    for hit in (True, True, False):
        compiles(src=object(), metadata={}, metadata_group={}, times=None, cache_hit=hit)
    assert compiles.snapshot() == {"triton_cache_hit": 2, "triton_compiled": 1}


def test_watch_triton_compiles_listens_unless_another_listener_is_set(monkeypatch) -> None:
    from triton import knobs

    monkeypatch.setattr(knobs.compilation, "listener", None)
    assert watch_triton_compiles() is True
    assert knobs.compilation.listener is compile_cache.TRITON_COMPILES
    assert watch_triton_compiles() is True  # again: still ours

    def someone_elses(**_: Any) -> None:
        return None

    monkeypatch.setattr(knobs.compilation, "listener", someone_elses)
    assert watch_triton_compiles() is False
    assert knobs.compilation.listener is someone_elses


def test_a_cache_of_another_key_is_not_used(store, tmp_path) -> None:
    first = CompileCache(store, tmp_path / "a", inputs())
    first.point_env()
    fill(first)
    assert first.save()
    other = CompileCache(store, tmp_path / "b", {**inputs(), "versions": {**VERSIONS, "torch": "2.12.0"}})
    other.point_env()
    assert other.key != first.key
    assert other.restore() == "miss" and other.file_count() == 0 and other.should_save


def test_a_manifest_recording_other_key_inputs_is_ignored(store, tmp_path, capsys) -> None:
    """A cache copied under the wrong key (by hand, or a key collision) does not pass for this one."""
    first = CompileCache(store, tmp_path / "a", inputs())
    first.point_env()
    fill(first)
    assert first.save()
    manifest = store.read_tree_manifest(first.uri)
    forged = Manifest("compile-cache", None, manifest.files, {**manifest.fingerprint, "gpu": "NVIDIA A100"})
    uri = first.uri.child(MANIFEST_NAME)
    store.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=forged.to_bytes())
    second = CompileCache(store, tmp_path / "b", inputs())
    second.point_env()
    assert second.restore() == "miss" and second.file_count() == 0
    damaged = [e for e in events(capsys, "compile_cache") if e["result"] == "damaged"]
    assert damaged and "other key inputs" in damaged[0]["reason"]


def _replace_object(store: CheckpointStore, uri: S3Uri, data: bytes) -> None:
    store.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data)


def _evil_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"escaped"
        info = tarfile.TarInfo("../../escaped.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated", "missing", "escaping-member", "garbage-manifest"])
def test_a_damaged_cache_is_ignored_with_a_warning_never_fatal(store, tmp_path, capsys, caplog, damage) -> None:
    first = CompileCache(store, tmp_path / "a", inputs())
    first.point_env()
    fill(first)
    assert first.save()
    target = first.uri.child("triton.tar")
    body = store.client.get_object(Bucket=target.bucket, Key=target.key)["Body"].read()
    if damage == "flipped-byte":
        _replace_object(store, target, body[:100] + bytes([body[100] ^ 1]) + body[101:])
    elif damage == "truncated":
        _replace_object(store, target, body[:-10])
    elif damage == "missing":
        store.client.delete_object(Bucket=target.bucket, Key=target.key)
    elif damage == "escaping-member":  # a well-formed manifest over a tar that tries to leave its directory
        evil = _evil_tar()
        _replace_object(store, target, evil)
        manifest = store.read_tree_manifest(first.uri)
        files = tuple(
            f if f.path != "triton.tar" else type(f)(f.path, len(evil), hashlib.sha256(evil).hexdigest())
            for f in manifest.files
        )
        fixed = Manifest("compile-cache", None, files, manifest.fingerprint, manifest.created_at)
        _replace_object(store, first.uri.child(MANIFEST_NAME), fixed.to_bytes())
    else:
        _replace_object(store, first.uri.child(MANIFEST_NAME), b"{not json")
    capsys.readouterr()

    second = CompileCache(store, tmp_path / "node-b" / "cc", inputs())
    second.point_env()
    assert second.restore() == "miss"  # and no exception
    assert second.file_count() == 0  # nothing half restored
    assert not (tmp_path / "node-b" / "escaped.py").exists() and not (tmp_path / "escaped.py").exists()
    (event,) = [e for e in events(capsys, "compile_cache") if e["result"] == "damaged"]
    assert event["key"] == second.key
    assert "compile cache" in caplog.text and "not used" in caplog.text


def test_a_new_cache_keeps_the_newest_others_and_deletes_older_ones(store, tmp_path, capsys) -> None:
    made = []
    for i, torch_version in enumerate(["2.10.0", "2.11.0", "2.12.0", "2.13.0"]):
        cache = CompileCache(store, tmp_path / f"n{i}", {**inputs(), "versions": {**VERSIONS, "torch": torch_version}})
        cache.point_env()
        fill(cache)
        assert cache.save()
        made.append(cache.key)
        if i < 3:
            time.sleep(1.05)  # created_at has a resolution of a second: the order must show in it
    saved = events(capsys, "compile_cache_saved")
    assert [e["pruned"] for e in saved] == [[], [], [], [made[0]]]
    assert [k for k, _ in store.compile_cache_keys()] == made[:0:-1]  # the newest three, newest first
    assert store.read_tree_manifest(store.compile_cache_uri(made[0])) is None
    listed = store.client.list_objects_v2(Bucket=store.root.bucket, Prefix=store.compile_cache_uri(made[0]).key)
    assert listed.get("KeyCount", 0) == 0


def test_deleting_the_jobs_compile_caches_takes_complete_and_half_saved_ones_and_nothing_else(store, tmp_path) -> None:
    for i, torch_version in enumerate(["2.10.0", "2.11.0"]):
        cache = CompileCache(store, tmp_path / f"n{i}", {**inputs(), "versions": {**VERSIONS, "torch": torch_version}})
        cache.point_env()
        fill(cache)
        assert cache.save()
    half = store.compile_cache_uri("ab" * 16).child("triton.tar")  # a save a preemption cut short
    store.client.put_object(Bucket=half.bucket, Key=half.key, Body=b"partial")
    store.put_json("progress.json", {"step": 1})
    assert len(store.compile_cache_keys()) == 2

    store.delete_compile_caches()

    bucket = store.root.bucket
    left = [o["Key"] for o in store.client.list_objects_v2(Bucket=bucket, Prefix=store.root.key).get("Contents", [])]
    assert left == [store.root.child("progress.json").key]


def test_nothing_compiled_nothing_saved(store, tmp_path) -> None:
    cache = CompileCache(store, tmp_path / "a", inputs())
    cache.point_env()
    assert cache.save() is False
    assert store.read_tree_manifest(cache.uri) is None


# ------------------------------------------------------------------------------ baked into the image


def test_export_writes_a_seed_that_restores_only_for_its_key(store, tmp_path, monkeypatch) -> None:
    first = CompileCache(store, tmp_path / "a", inputs())
    first.point_env()
    files = fill(first)
    assert first.save()
    seed = export(store, first.uri, tmp_path / "image" / "compile-cache")
    assert json.loads((seed / "key.json").read_text()) == json.loads(json.dumps(inputs()))
    assert tree(seed) == {**files, "key.json": (seed / "key.json").read_bytes()}

    monkeypatch.setenv(ENV_SEED, str(seed))
    elsewhere = CheckpointStore(store.client, S3Uri(store.root.bucket, f"other-{uuid.uuid4().hex[:6]}/"))
    fresh = CompileCache(elsewhere, tmp_path / "b", inputs())  # a new job: nothing in its storage
    fresh.point_env()
    assert fresh.restore() == "seed" and tree(fresh.root) == files
    assert fresh.should_save  # its storage has none yet: the first steps upload it

    mismatched = CompileCache(elsewhere, tmp_path / "c", inputs(maxSeqLength=8192))
    mismatched.point_env()
    assert mismatched.restore() == "miss" and mismatched.file_count() == 0


def test_the_export_command(store, tmp_path, s3) -> None:
    endpoint, _, _ = s3
    first = CompileCache(store, tmp_path / "a", inputs())
    first.point_env()
    files = fill(first)
    assert first.save()
    assert compile_cache.main(["export", "--endpoint", endpoint, str(first.uri), str(tmp_path / "seed")]) == 0
    assert {k: v for k, v in tree(tmp_path / "seed").items() if k != "key.json"} == files
    assert compile_cache.main(["export", "--endpoint", endpoint, str(first.uri), str(tmp_path / "seed")]) == 1


# ------------------------------------------------------------------------------------- in the trainer


@pytest.mark.slow
def test_the_trainer_saves_its_caches_after_the_first_steps_and_a_relaunch_restores_them(make_job, tmp_path):
    config, work = make_job(training={"max_steps": 8, "save_steps": 4})
    seed = tmp_path / "image-seed"
    files = {
        "triton/KERNELHASH/kernel.cubin": os.urandom(2048),
        "inductor/fxgraph/aa/graph/entry": os.urandom(256),
        "unsloth/UnslothSFTTrainer.py": b"# generated\n",
    }
    for rel, data in files.items():
        (seed / rel).parent.mkdir(parents=True, exist_ok=True)
        (seed / rel).write_bytes(data)
    (seed / "key.json").write_text(json.dumps(key_inputs(parse_job(config))))  # this machine, this job

    first = run_attempt(config, work, env={ENV_SEED: str(seed)})
    assert first.exit_code == 0, first.stderr[-3000:]
    (restored,) = first.of("compile_cache")
    assert restored["result"] == "seed" and restored["files"] == len(files)
    (saved,) = first.of("compile_cache_saved")
    assert saved["files"] == len(files)
    saved_after = next(e for e in first.of("log") if e["step"] == 3)["_t"]
    assert saved["_t"] >= saved_after  # after the first steps, not before
    phases = [e["phase"] for e in first.of("startup")]
    assert phases[0] == "compile_cache_restored" and phases[1] == "imports_done"

    # A relaunch on a new node (empty work dir, no seed in its image) finds them in storage (this job is
    # done, so it stops right after its start-up: the restore comes before everything else).
    second = run_attempt({**config, "workDir": str(tmp_path / "new-node")}, tmp_path / "relaunch", attempt=2)
    assert second.exit_code == 0, second.stderr[-3000:]
    (restored,) = second.of("compile_cache")
    assert restored["result"] == "storage" and restored["uri"] == saved["uri"]
    assert not second.of("compile_cache_saved")  # already there
    assert tree(tmp_path / "new-node" / "compile-cache") == files
    assert [e["phase"] for e in second.of("startup")][:2] == ["compile_cache_restored", "imports_done"]


class _DropsInductorsDirAtImport:
    """An engine whose imports drop TORCHINDUCTOR_CACHE_DIR as `import unsloth` does; it records the
    environment the training would compile under, then stops the attempt."""

    fetches_inputs = False
    compiles = True

    def __init__(self) -> None:
        self.event_fields: dict[str, Any] = {}
        self.seen: dict[str, str | None] = {}
        self.listening = False

    def load_stack(self, run: Any) -> None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)  # unsloth_zoo's patch_torch_compile

    def prepare(self, run: Any, inputs: Any, view: Any) -> Any:
        from triton import knobs

        from loraresume_trainer.errors import ConfigError

        self.seen = {var: os.environ.get(var) for var in [*CACHES.values(), *ENV_DEFAULTS, PTXAS_VAR]}
        self.listening = knobs.compilation.listener is compile_cache.TRITON_COMPILES
        raise ConfigError("stopped by the test once the imports were done", field="training")


def test_the_caches_are_pointed_back_after_imports_that_changed_them(make_job, tmp_path, monkeypatch) -> None:
    import yaml

    from loraresume_trainer import cli

    for var in [*CACHES.values(), *ENV_DEFAULTS, PTXAS_VAR]:  # what the attempt sets is undone at teardown
        monkeypatch.setenv(var, "unset-by-the-test")
        monkeypatch.delenv(var)
    monkeypatch.setitem(sys.modules, _INDUCTOR_RULE, _inductor_rule("/torch/bin/ptxas"))
    from triton import knobs

    monkeypatch.setattr(knobs.compilation, "listener", None)  # and back at teardown
    config, work = make_job(training={"max_steps": 2})
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.yaml").write_text(yaml.safe_dump(config))
    engine = _DropsInductorsDirAtImport()
    code = cli.main(["--config", str(work / "job.yaml"), "--termination-log", str(tmp_path / "term")], engine=engine)
    assert code == 78
    root = Path(config["workDir"]) / "compile-cache"
    assert engine.seen == {
        **{var: str(root / name) for name, var in CACHES.items()},
        **ENV_DEFAULTS,
        PTXAS_VAR: "/torch/bin/ptxas",  # pinned before the first kernel, as inductor would later
    }
    assert engine.listening  # Triton's builds are counted from the first kernel on


_INDUCTOR_RULE = "torch._inductor.runtime.compile_tasks"


def _inductor_rule(bundled: str | None) -> types.ModuleType:
    """Inductor's rule as torch writes it: the pod's TRITON_PTXAS_PATH, else torch's bundled ptxas if any."""
    module = types.ModuleType(_INDUCTOR_RULE)

    def _set_triton_ptxas_path() -> None:
        if os.environ.get(PTXAS_VAR) is None and bundled is not None:
            os.environ[PTXAS_VAR] = bundled

    module._set_triton_ptxas_path = _set_triton_ptxas_path  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize(
    ("pod_sets", "bundled", "expected"),
    [
        (None, "/torch/bin/ptxas", "/torch/bin/ptxas"),  # inductor's choice, from the first kernel on
        ("/opt/cuda/bin/ptxas", "/torch/bin/ptxas", "/opt/cuda/bin/ptxas"),  # the pod's own wins
        (None, None, None),  # torch bundles none: Triton's own, in every attempt alike
    ],
)
def test_pin_ptxas_applies_inductors_rule_before_anything_compiles(monkeypatch, pod_sets, bundled, expected) -> None:
    monkeypatch.delenv(PTXAS_VAR, raising=False)
    if pod_sets is not None:
        monkeypatch.setenv(PTXAS_VAR, pod_sets)
    monkeypatch.setitem(sys.modules, _INDUCTOR_RULE, _inductor_rule(bundled))
    assert pin_ptxas() == expected
    assert os.environ.get(PTXAS_VAR) == expected


def test_pin_ptxas_survives_a_torch_whose_rule_changed(monkeypatch, caplog) -> None:
    monkeypatch.delenv(PTXAS_VAR, raising=False)
    changed = types.ModuleType(_INDUCTOR_RULE)
    changed._set_triton_ptxas_path = lambda device: None  # type: ignore[attr-defined]  # a new signature
    monkeypatch.setitem(sys.modules, _INDUCTOR_RULE, changed)
    assert pin_ptxas() is None
    assert "not pinned" in caplog.text


def test_pin_ptxas_without_inductor_leaves_the_choice_to_triton(monkeypatch) -> None:
    monkeypatch.delenv(PTXAS_VAR, raising=False)
    monkeypatch.setitem(sys.modules, _INDUCTOR_RULE, None)  # import fails: ImportError
    assert pin_ptxas() is None


def test_the_inductor_rule_pin_ptxas_calls_exists_in_this_torch() -> None:
    """pin_ptxas calls a private torch function; a torch that renames it would silently bring back the
    relaunch's recompiles, so the tested torch must still have it."""
    from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path

    assert callable(_set_triton_ptxas_path)

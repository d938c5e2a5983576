"""The seed's workflows and the resume guards, as real trainer processes against S3 on loopback."""

from __future__ import annotations

import json
import pickle
import signal

import pytest
from safetensors.torch import load

from loraresume_trainer.fingerprint import tensors_sha256
from loraresume_trainer.manifest import MANIFEST_NAME, Manifest
from tests.support.trainer_runs import Kill, run_attempt, run_story
from tests.trainer.conftest import read_object

pytestmark = pytest.mark.slow


def split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def weights_sha(client, uri: str) -> str:
    return tensors_sha256(load(read_object(client, uri + "adapter_model.safetensors")))


def copy_prefix(client, src: str, dst: str) -> None:
    sb, sk = split(src)
    db, dk = split(dst)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=sb, Prefix=sk):
        for obj in page.get("Contents", []):
            client.copy_object(Bucket=db, Key=dk + obj["Key"][len(sk) :], CopySource={"Bucket": sb, "Key": obj["Key"]})


def test_seed_workflow_second_job_continues_first_adapter(make_job, s3, alpaca_file, alpaca_file_new, tiny_base):
    """Job 1 trains an adapter; job 2 continues it on new data, starting from job 1's weights.

    Job 1 reads its base model and dataset from S3, as a cluster job would.
    """
    _, bucket, client = s3
    for path in tiny_base.iterdir():
        client.upload_file(str(path), bucket, f"models/tiny/{path.name}")
    client.upload_file(str(alpaca_file), bucket, "data/train.jsonl")
    cfg1, work1 = make_job(
        training={"max_steps": 10},
        tensorboard=True,
        baseModel=f"s3://{bucket}/models/tiny/",
        dataset={"source": f"s3://{bucket}/data/train.jsonl"},
    )
    first = run_story(cfg1, work1).final
    adapter_uri = cfg1["storage"]["uri"] + "adapter/"
    saved = json.loads(read_object(client, adapter_uri + "adapter_config.json"))
    assert saved["base_model_name_or_path"] == cfg1["baseModel"]
    manifest = Manifest.from_bytes(read_object(client, adapter_uri + MANIFEST_NAME), source=adapter_uri)
    assert manifest.kind == "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {f.path for f in manifest.files}
    progress = json.loads(read_object(client, cfg1["storage"]["uri"] + "progress.json"))
    assert progress["step"] == 10 and progress["phase"] == "Succeeded" and progress["max_steps"] == 10
    bucket, key = split(cfg1["storage"]["uri"] + "logs/")
    logs = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])]
    assert any("events.out.tfevents" in k for k in logs), logs

    cfg2, work2 = make_job(adapter=adapter_uri, dataset={"source": str(alpaca_file_new)}, training={"max_steps": 8})
    second = run_story(cfg2, work2).final
    (ready,) = second.of("model_ready")
    assert ready["lora_sha256"] == weights_sha(client, adapter_uri)
    assert weights_sha(client, cfg2["storage"]["uri"] + "adapter/") != ready["lora_sha256"]
    assert first.of("model_ready")[0]["lora_sha256"] != ready["lora_sha256"]  # job 1 started from a new LoRA


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory):
    """Filled lazily by `interrupted`: a run stopped by SIGTERM at ~step 13 (checkpoints every 5 steps,
    plus the JIT one; how far it got before the signal landed depends on the machine's speed)."""
    return {}


@pytest.fixture
def interrupted(make_job, s3, preempted_run):
    """A fresh storage prefix holding a copy of the preempted run's checkpoints, plus the baseline."""
    _, _bucket, client = s3
    if not preempted_run:
        base_cfg, base_work = make_job()
        preempted_run["baseline"] = (base_cfg, run_story(base_cfg, base_work).final)
        cfg, work = make_job()
        stopped = run_attempt(cfg, work, kill=Kill(signal.SIGTERM, 12))
        assert stopped.exit_code == 75, stopped.stderr[-2000:]
        preempted_run["source"] = (cfg["storage"]["uri"], stopped.termination["durable_step"])
    source, newest = preempted_run["source"]

    def copy(**overrides):
        cfg, work = make_job(**overrides)
        copy_prefix(client, source, cfg["storage"]["uri"])
        return cfg, work

    copy.source_uri = source  # type: ignore[attr-defined]
    return copy, newest, preempted_run["baseline"]


def interrupted_source_uri(interrupted) -> str:
    return interrupted[0].source_uri


def complete_checkpoint_steps(client, storage_uri: str) -> list[int]:
    """Steps of the checkpoints under `storage_uri` that have a manifest, ascending."""
    bucket, prefix = split(storage_uri + "checkpoints/")
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    names = {obj["Key"][len(prefix) :].split("/")[0] for obj in listed if obj["Key"].endswith(MANIFEST_NAME)}
    return sorted(int(name.removeprefix("checkpoint-")) for name in names)


def _evil_pickle() -> bytes:
    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    return pickle.dumps(Evil())


DAMAGES = {
    "missing-file": lambda c, b, k: c.delete_object(Bucket=b, Key=k + "optimizer.pt"),
    "wrong-hash": lambda c, b, k: _overwrite_same_size(c, b, k + "adapter_model.safetensors"),
    "no-manifest": lambda c, b, k: c.delete_object(Bucket=b, Key=k + MANIFEST_NAME),
    "truncated": lambda c, b, k: _truncate(c, b, k + "rng_state.pth"),
    "unsafe-pickle": lambda c, b, k: _replace_with_manifest_update(c, b, k, "rng_state.pth", _evil_pickle()),
}


def _overwrite_same_size(client, bucket, key):
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=bytes(len(body)))


def _truncate(client, bucket, key):
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=body[: len(body) // 2])


def _replace_with_manifest_update(client, bucket, prefix, name, data):
    """A consistent manifest over a malicious file: only content checks can catch it."""
    import hashlib

    client.put_object(Bucket=bucket, Key=prefix + name, Body=data)
    manifest = json.loads(client.get_object(Bucket=bucket, Key=prefix + MANIFEST_NAME)["Body"].read())
    for entry in manifest["files"]:
        if entry["path"] == name:
            entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    client.put_object(Bucket=bucket, Key=prefix + MANIFEST_NAME, Body=json.dumps(manifest).encode())


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_previous(damage, interrupted, s3):
    _, _, client = s3
    copy, newest, (base_cfg, baseline) = interrupted
    cfg, work = copy()
    complete = complete_checkpoint_steps(client, cfg["storage"]["uri"])
    assert complete[-1] == newest and len(complete) >= 2, complete
    bucket, key = split(cfg["storage"]["uri"] + f"checkpoints/checkpoint-{newest}/")
    DAMAGES[damage](client, bucket, key)

    story = run_story(cfg, work)
    attempt = story.final
    (start,) = attempt.of("start")
    assert start["mode"] == "exact"
    assert start["step"] == complete[-2]  # the newest one left intact
    if damage != "no-manifest":  # without a manifest it was never a candidate
        (warning,) = attempt.of("checkpoint_damaged")
        assert f"checkpoint-{newest}" in warning["uri"]
    assert "pickle code ran" not in attempt.stderr + json.dumps(attempt.events)
    assert read_object(client, cfg["storage"]["uri"] + "adapter/adapter_model.safetensors") == read_object(
        client, base_cfg["storage"]["uri"] + "adapter/adapter_model.safetensors"
    )
    want = baseline.losses()
    assert {s: want[s] for s in attempt.losses()} == attempt.losses()


def test_no_verifiable_checkpoint_is_a_retryable_failure_not_a_fresh_start(interrupted, s3):
    """All complete checkpoints damaged: the attempt fails (exit 1, retried by the operator up to
    its backoff limit) and leaves them as they are, instead of training from step 0 over them."""
    _, _, client = s3
    copy, _, _ = interrupted
    cfg, work = copy()
    bucket, prefix = split(cfg["storage"]["uri"] + "checkpoints/")
    steps = complete_checkpoint_steps(client, cfg["storage"]["uri"])
    assert len(steps) >= 2, steps
    for step in steps:
        _overwrite_same_size(client, bucket, f"{prefix}checkpoint-{step}/adapter_model.safetensors")
    before = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}

    attempt = run_attempt(cfg, work)

    assert attempt.exit_code == 1, attempt.stderr[-2000:]
    assert attempt.termination["outcome"] == "failed"
    assert f"none of the {len(steps)} complete checkpoints" in attempt.termination["reason"]
    assert len(attempt.of("checkpoint_damaged")) == len(steps)
    assert not attempt.of("log")  # not one step trained
    after = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert after == before


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"training": {"max_steps": 30}}, "max_steps: 24 -> 30"),
        ("new-data", "dataset content"),
        (
            {
                "training": {"learning_rate": 2e-3, "max_grad_norm": 0.5, "lr_scheduler_type": "cosine"},
                "lora": {"dropout": 0.1},
            },
            "(lora.dropout: 0.0 -> 0.1; training.learning_rate: 0.001 -> 0.002; "
            "training.lr_scheduler_type: 'linear' -> 'cosine'; training.max_grad_norm: (not set) -> 0.5)",
        ),
    ],
    ids=["max_steps", "dataset", "every-difference"],
)
def test_changed_job_is_refused_with_the_diff(change, expected, interrupted, alpaca_file_new):
    copy, newest, _ = interrupted
    overrides = {"dataset": {"source": str(alpaca_file_new)}} if change == "new-data" else change
    cfg, work = copy(**overrides)
    attempt = run_attempt(cfg, work)
    assert attempt.exit_code == 78
    reason = attempt.termination["reason"]
    assert expected in reason and f"checkpoint-{newest}" in reason and "resume.warmStart" in reason
    assert attempt.termination["outcome"] == "config_error"


def test_warm_start_takes_the_checkpoint_adapter_and_starts_a_new_schedule(interrupted, make_job, s3, alpaca_file_new):
    """A changed job under a new storage.uri, starting from the old run's checkpoint's adapter."""
    _, _, client = s3
    _, newest, _ = interrupted
    checkpoint = interrupted_source_uri(interrupted) + f"checkpoints/checkpoint-{newest}/"
    cfg, work = make_job(
        dataset={"source": str(alpaca_file_new)},
        training={"max_steps": 12},
        resume={"fromCheckpoint": checkpoint, "warmStart": True},
    )
    start_weights = weights_sha(client, checkpoint)

    attempt = run_story(cfg, work).final
    (start,) = attempt.of("start")
    assert start["mode"] == "warm" and start["checkpoint"] == checkpoint
    (ready,) = attempt.of("model_ready")
    assert ready["lora_sha256"] == start_weights
    assert min(attempt.losses()) >= 1 and max(attempt.losses()) == 12  # steps 1..12: a new schedule
    assert attempt.exit_code == 0


def checkpoint_etags(client, storage_uri: str) -> dict[str, str]:
    bucket, prefix = split(storage_uri + "checkpoints/")
    return {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}


def test_warm_start_in_place_never_writes_over_the_old_runs_checkpoints(interrupted, s3):
    """A warm start under the same storage.uri whose steps reach the old run's checkpoint names is
    refused naming them; one that ends before them runs, reports them, and leaves them intact."""
    _, _, client = s3
    copy, _, _ = interrupted
    cfg, work = copy(training={"learning_rate": 2e-3, "max_steps": 12}, resume={"warmStart": True})
    old = complete_checkpoint_steps(client, cfg["storage"]["uri"])
    before = checkpoint_etags(client, cfg["storage"]["uri"])

    refused = run_attempt(cfg, work)
    assert refused.exit_code == 78, refused.stderr[-2000:]
    names = ", ".join(f"checkpoint-{s}" for s in old if s <= 12)
    assert f"would overwrite {names} made by a different job" in refused.termination["reason"]
    assert checkpoint_etags(client, cfg["storage"]["uri"]) == before

    cfg["training"]["max_steps"] = min(old) - 1
    short = run_story(cfg, work).final
    assert short.exit_code == 0, short.stderr[-2000:]
    (report,) = short.of("foreign_checkpoints")
    assert report["steps"] == old
    progress = json.loads(read_object(client, cfg["storage"]["uri"] + "progress.json"))
    assert progress["foreign_checkpoints"] == old and progress["phase"] == "Succeeded"
    assert {k: v for k, v in checkpoint_etags(client, cfg["storage"]["uri"]).items() if k in before} == before


def test_trajectory_neutral_changes_resume_exactly(interrupted, s3):
    """Logging and save cadence may change between attempts: the resume is exact, the adapter bitwise equal."""
    _, _, client = s3
    copy, newest, (base_cfg, _) = interrupted
    cfg, work = copy(training={"logging_steps": 2, "save_steps": 4})
    attempt = run_story(cfg, work).final
    (start,) = attempt.of("start")
    assert (start["mode"], start["step"]) == ("exact", newest)
    assert read_object(client, cfg["storage"]["uri"] + "adapter/adapter_model.safetensors") == read_object(
        client, base_cfg["storage"]["uri"] + "adapter/adapter_model.safetensors"
    )


def test_checkpoints_saved_before_training_was_fingerprinted_resume_with_a_warning(interrupted, s3):
    """Manifests of an older trainer lack the `training` key: resumed (an upgrade must not refuse
    every running job), with the unchecked keys named."""
    _, _, client = s3
    copy, newest, (base_cfg, _) = interrupted
    cfg, work = copy()
    bucket, prefix = split(cfg["storage"]["uri"] + "checkpoints/")
    for step in complete_checkpoint_steps(client, cfg["storage"]["uri"]):
        key = f"{prefix}checkpoint-{step}/{MANIFEST_NAME}"
        manifest = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        del manifest["fingerprint"]["training"]
        client.put_object(Bucket=bucket, Key=key, Body=json.dumps(manifest).encode())

    attempt = run_story(cfg, work).final
    (start,) = attempt.of("start")
    assert (start["mode"], start["step"]) == ("exact", newest)
    (unchecked,) = attempt.of("fingerprint_unchecked")
    assert unchecked["keys"] == ["training"] and f"checkpoint-{newest}" in unchecked["uri"]
    assert "did not record training" in attempt.stderr
    assert read_object(client, cfg["storage"]["uri"] + "adapter/adapter_model.safetensors") == read_object(
        client, base_cfg["storage"]["uri"] + "adapter/adapter_model.safetensors"
    )


def test_explicit_checkpoint_from_another_job_resumes_exactly(interrupted, make_job, s3):
    """resume.fromCheckpoint pointing at another job's checkpoint continues that run exactly."""
    _, _, client = s3
    _, _newest, (base_cfg, _baseline) = interrupted
    source_uri = interrupted_source_uri(interrupted)
    cfg, work = make_job(resume={"fromCheckpoint": source_uri + "checkpoints/checkpoint-10/"})
    attempt = run_story(cfg, work).final
    (start,) = attempt.of("start")
    assert start["mode"] == "exact" and start["step"] == 10
    assert start["checkpoint"] == source_uri + "checkpoints/checkpoint-10/"
    assert read_object(client, cfg["storage"]["uri"] + "adapter/adapter_model.safetensors") == read_object(
        client, base_cfg["storage"]["uri"] + "adapter/adapter_model.safetensors"
    )


def test_lost_adapter_after_the_final_checkpoint_is_saved_again_identically(make_job, s3):
    """Killed after the last checkpoint was durable but before the adapter upload: resume at max_steps."""
    _, _, client = s3
    cfg, work = make_job(training={"max_steps": 10})
    run_story(cfg, work)
    adapter = cfg["storage"]["uri"] + "adapter/"
    before = read_object(client, adapter + "adapter_model.safetensors")
    bucket, key = split(adapter)
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]:
        client.delete_object(Bucket=bucket, Key=obj["Key"])

    again = run_story(cfg, work).final
    (start,) = again.of("start")
    assert start["mode"] == "exact" and start["step"] == 10
    assert not again.losses()  # no step trained twice
    assert read_object(client, adapter + "adapter_model.safetensors") == before


def test_finished_job_is_not_trained_again(make_job, s3):
    """The same job finds its adapter and succeeds; a different one under the same storage.uri (a
    deleted resource re-applied with other values) is refused, and the adapter stays as it was."""
    _, _, client = s3
    cfg, work = make_job(training={"max_steps": 5})
    run_story(cfg, work)
    again = run_story(cfg, work).final
    assert again.exit_code == 0 and not again.of("start")
    assert again.termination["outcome"] == "succeeded"

    adapter = cfg["storage"]["uri"] + "adapter/"
    bucket, key = split(adapter)
    before = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]}
    other = run_attempt({**cfg, "training": {**cfg["training"], "learning_rate": 5e-4}}, work)
    assert other.exit_code == 78, other.stderr[-2000:]
    reason = other.termination["reason"]
    assert f"{adapter} already holds the finished adapter of a different job" in reason
    assert "training.learning_rate: 0.001 -> 0.0005" in reason and not other.of("start")
    assert {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]} == before


def test_epoch_based_training_runs_and_resumes_by_epochs(make_job, s3):
    """num_train_epochs without max_steps trains by epochs (the default step count used to win):
    40 rows, 2 per step, 1 epoch = 20 steps; a SIGTERM at step 8 resumes to the same end."""
    _, _, client = s3
    cfg, work = make_job(training={"num_train_epochs": 1})
    del cfg["training"]["max_steps"]
    story = run_story(cfg, work, [Kill(signal.SIGTERM, at_step=8)])
    assert [a.exit_code for a in story.attempts] == [75, 0]
    (start,) = story.final.of("start")
    assert start["mode"] == "exact" and start["step"] >= 8
    assert max(e["step"] for e in story.final.of("log")) == 20
    progress = json.loads(read_object(client, cfg["storage"]["uri"] + "progress.json"))
    assert (progress["step"], progress["max_steps"]) == (20, 20)

"""The stand-in trainer honours the trainer's contract, as the operator reads it.

Each test runs `python -m loraresume_sandbox.stand_in_trainer` as a process against a moto
S3 server with a job config shaped like the one the operator puts in a pod, then reads the
result the way the operator does: `s3_view.read_storage` (newest complete checkpoint,
progress.json, adapter manifest) and `observed.classify_end` (exit code + termination message).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest

from loraresume_operator.observed import EndKind, ObservedPod, classify_end
from loraresume_operator.s3_view import read_storage
from loraresume_operator.spec import LoraResumeSpec
from loraresume_sandbox.stand_in_trainer import ENV_FAIL_AT_STEP, ENV_LOAD_SECONDS, ENV_STEP_SECONDS
from loraresume_trainer.checkpoint_store import REQUIRED_CHECKPOINT_FILES, CheckpointStore
from loraresume_trainer.progress import STARTUP_PHASES
from loraresume_trainer.s3uri import S3Uri
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

# Runs the stand-in and reports, after it ends, whether torch was ever imported.
_WRAPPER = (
    "import sys\n"
    "from loraresume_sandbox.stand_in_trainer import main\n"
    "code = main()\n"
    "sys.stderr.write('TORCH_IMPORTED=%s\\n' % ('torch' in sys.modules))\n"
    "sys.exit(code)\n"
)


class Run:
    def __init__(self, tmp: Path, endpoint: str, bucket: str, name: str, **training: Any) -> None:
        self.tmp, self.endpoint, self.bucket, self.name = tmp, endpoint, bucket, name
        self.spec = LoraResumeSpec.model_validate(
            {
                "baseModel": "s3://models/tiny/",
                "dataset": {"source": f"s3://{bucket}/data.jsonl"},
                "training": {"maxSteps": 12, "saveSteps": 5, **training},
                "storage": {"uri": f"s3://{bucket}/{name}/", "endpoint": endpoint, "keepCheckpoints": 3},
            }
        )
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.store = CheckpointStore(self.client, S3Uri(bucket, f"{name}/"))

    def job(self, attempt: int, resume_from: str | None = None, **over: Any) -> dict[str, Any]:
        """The job config as the operator builds it (pods.job_config), with the kubelet's path rewrites."""
        spec = self.spec
        job = {
            "name": f"{self.name}-attempt-{attempt}",
            "baseModel": spec.base_model,
            "maxSeqLength": spec.max_seq_length,
            "loadIn4bit": spec.load_in_4bit,
            "dtype": spec.dtype,
            "adapter": None,
            "lora": spec.lora.model_dump(by_alias=True, mode="json"),
            "dataset": spec.dataset.model_dump(by_alias=True, mode="json", exclude_none=True),
            "training": spec.training.sft_config(),
            "storage": {
                "uri": spec.storage.uri,
                "endpoint": self.endpoint,
                "region": None,
                "keepCheckpoints": spec.storage.keep_checkpoints,
            },
            "resume": {"fromCheckpoint": resume_from, "warmStart": False},
            "tensorboard": False,
            "attempt": attempt,
            "workDir": str(self.tmp / f"work-{attempt}"),
            "terminationLog": str(self.termination_log(attempt)),
        }
        job.update(over)
        return job

    def termination_log(self, attempt: int) -> Path:
        return self.tmp / f"termination-log-{attempt}"

    def start(
        self,
        attempt: int,
        env: dict[str, str] | None = None,
        job: dict[str, Any] | None = None,
        resume_from: str | None = None,
        args: tuple[str, ...] = (),
    ) -> subprocess.Popen[str]:
        full_env = {
            **os.environ,
            "LORARESUME_JOB": json.dumps(job or self.job(attempt, resume_from)),
            "LORARESUME_ATTEMPT": str(attempt),
            ENV_STEP_SECONDS: "0.02",
            **(env or {}),
        }
        return subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, *args],
            env=full_env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def finish(self, proc: subprocess.Popen[str], attempt: int) -> tuple[int, dict[str, Any], list[dict], str]:
        out, err = proc.communicate(timeout=60)
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        message = self.termination_log(attempt).read_text()
        return proc.returncode, json.loads(message), events, err

    def end(self, code: int, message: dict[str, Any], **pod: Any) -> Any:
        """How the operator classifies this ended pod."""
        observed = ObservedPod(
            name="p", phase="Succeeded" if code == 0 else "Failed", exit_code=code, termination=message, **pod
        )
        return classify_end(observed, adapter_complete=self.view().adapter_complete)

    def view(self) -> Any:
        return read_storage(self.spec, self.client)


@pytest.fixture
def run(s3_bucket, tmp_path) -> Run:
    endpoint, bucket = s3_bucket
    return Run(tmp_path, endpoint, bucket, f"job-{uuid.uuid4().hex[:6]}")


def test_full_run_writes_what_the_operator_reads(run):
    code, message, events, err = run.finish(run.start(1), 1)
    assert code == 0, err
    assert "TORCH_IMPORTED=False" in err
    assert message["outcome"] == "succeeded" and message["exit_code"] == 0
    assert message["adapter"] == f"s3://{run.bucket}/{run.name}/adapter/"
    view = run.view()
    assert view.adapter_complete
    assert view.checkpoint is not None and view.checkpoint.step == 12  # saves at 5, 10 and the end (as HF)
    assert view.checkpoint.uri == f"s3://{run.bucket}/{run.name}/checkpoints/checkpoint-12/"
    assert view.checkpoint_created_at
    assert view.progress["step"] == 12 and view.progress["max_steps"] == 12
    assert view.progress["phase"] == "Succeeded" and view.progress["attempt"] == 1
    assert view.progress["durable_step"] == 12 and view.progress["loss"] > 0
    # The start-up split, through the trainer's executor (the stand-in has no compile cache to restore).
    startup = run.store.get_json("progress.json")["startup"]
    phases = [p for p in STARTUP_PHASES if p != "compile_cache_restored"]
    assert set(startup) == set(phases)
    assert [startup[p] for p in phases] == sorted(startup.values()) and startup["first_step"] > 0
    assert [s for s, _ in run.store.complete_checkpoints()] == [12, 10, 5]
    manifest = run.store.read_manifest(10)
    assert set(REQUIRED_CHECKPOINT_FILES) <= {f.path for f in manifest.files}
    assert manifest.fingerprint["stand_in"] is True and manifest.fingerprint["max_steps"] == 12
    assert run.store.read_adapter_manifest().fingerprint == manifest.fingerprint
    kinds = [e["event"] for e in events if e["event"] not in ("prefetch", "prefetch_done", "startup")]
    assert kinds[0] == "start" and kinds.count("checkpoint_durable") == 3 and kinds[-1] == "adapter_saved"
    assert run.end(code, message).kind is EndKind.SUCCEEDED


def test_sigterm_saves_a_checkpoint_off_the_grid_exits_75_and_the_relaunch_resumes_there(run):
    proc = run.start(
        1, env={ENV_STEP_SECONDS: "0.25"}, job=run.job(1, training={**run.spec.training.sft_config(), "max_steps": 40})
    )
    run.spec = run.spec.model_copy(update={"training": run.spec.training.model_copy(update={"max_steps": 40})})
    wait_for(lambda: (run.store.get_json("progress.json") or {}).get("step", 0) >= 7, 30, "step 7")
    proc.send_signal(signal.SIGTERM)
    code, message, events, err = run.finish(proc, 1)
    assert code == 75, err
    stopped = message["durable_step"]
    assert message["outcome"] == "preempted" and stopped == message["step"] and stopped >= 7
    assert message["checkpoint"] == f"s3://{run.bucket}/{run.name}/checkpoints/checkpoint-{stopped}/"
    assert f"checkpoint-{stopped} is durable" in message["reason"] and "trained" not in message
    view = run.view()
    assert view.checkpoint.step == stopped and view.progress["phase"] == "Preempted" and not view.adapter_complete
    assert next(e for e in events if e["event"] == "preempted")["durable_step"] == stopped
    end = run.end(code, message)
    assert end.kind is EndKind.PREEMPTED and end.reason == "SigtermCheckpointSaved"

    # The operator relaunches with the newest complete checkpoint it saw; the stand-in resumes there.
    proc = run.start(
        2, job=run.job(2, resume_from=view.checkpoint.uri, training={**run.spec.training.sft_config(), "max_steps": 40})
    )
    code, message, events, err = run.finish(proc, 2)
    assert code == 0, err
    start = next(e for e in events if e["event"] == "start")
    assert (start["event"], start["mode"], start["step"], start["attempt"]) == ("start", "exact", stopped, 2)
    assert run.view().progress["step"] == 40 and run.view().progress["attempt"] == 2
    assert run.end(code, message).kind is EndKind.SUCCEEDED


def test_sigterm_while_loading_exits_75_at_once(run):
    proc = run.start(1, env={ENV_LOAD_SECONDS: "30"})
    wait_for(lambda: (run.tmp / "work-1").is_dir(), 20, "the work dir")
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, message, _, err = run.finish(proc, 1)
    assert code == 75, err
    assert time.monotonic() - t0 < 5
    assert message["outcome"] == "preempted" and "before training started" in message["reason"]
    assert message["trained"] is False  # what the operator counts on: no checkpoint written, no step lost
    assert run.end(code, message).kind is EndKind.PREEMPTED


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("s3://{bucket}/elsewhere/model/", "is not a checkpoint URI"),
        ("s3://{bucket}/other-job/checkpoints/checkpoint-10/", "is not a complete checkpoint (no manifest)"),
        # the job's own, and it has none complete: nothing to fall back to
        ("s3://{bucket}/{name}/checkpoints/checkpoint-10/", "is not a complete checkpoint (no manifest)"),
    ],
)
def test_an_unusable_from_checkpoint_is_refused_before_loading(run, ref, reason):
    """Before the slow part of the start-up (the trainer's imports; the stand-in's loading time)."""
    started = time.monotonic()
    proc = run.start(1, env={ENV_LOAD_SECONDS: "30"}, resume_from=ref.format(bucket=run.bucket, name=run.name))
    code, message, events, err = run.finish(proc, 1)
    assert code == 78 and message["field"] == "resume.fromCheckpoint" and reason in message["reason"], err
    assert time.monotonic() - started < 20
    assert not [e for e in events if e["event"] == "prefetch"]  # nothing downloaded either


def test_a_relaunch_from_an_own_checkpoint_that_is_not_complete_resumes_from_the_newest_complete(run):
    """The operator relaunches a preempted attempt from the checkpoint its trainer said was durable, without
    reading S3 (decide.counted_on_its_word). Should that checkpoint not be complete after all, the relaunch
    resumes from the job's newest complete checkpoint, as from a damaged one, instead of failing the job."""
    code, _, _, err = run.finish(run.start(1, env={ENV_FAIL_AT_STEP: "7"}), 1)
    assert code == 1, err
    assert [s for s, _ in run.store.complete_checkpoints()] == [5]
    said = f"s3://{run.bucket}/{run.name}/checkpoints/checkpoint-7/"
    code, _, events, err = run.finish(run.start(2, resume_from=said), 2)
    assert code == 0, err
    start = next(e for e in events if e["event"] == "start")
    assert (start["mode"], start["step"]) == ("exact", 5)
    assert "is not a complete checkpoint (no manifest); resuming from this job's newest complete" in err


def test_crash_is_a_failure_and_a_bad_config_is_permanent(run):
    code, message, _, err = run.finish(run.start(1, env={ENV_FAIL_AT_STEP: "3"}), 1)
    assert code == 1 and message["outcome"] == "failed" and "simulated crash" in message["reason"], err
    assert run.end(code, message).kind is EndKind.FAILED
    assert run.view().progress["step"] == 3

    # An invalid job cannot name its termination log: the pod's path comes from the command line here.
    bad = run.job(2, training={"max_steps": 5, "output_dir": "/elsewhere"})
    proc = run.start(2, job=bad, args=("--termination-log", str(run.termination_log(2))))
    code, message, _, err = run.finish(proc, 2)
    assert code == 78 and message["outcome"] == "config_error" and "output_dir" in message["reason"], err
    assert run.end(code, message).kind is EndKind.PERMANENT


def test_extend_continues_a_finished_run_exactly_under_a_new_prefix(run, s3_bucket, tmp_path):
    """resume.extend, as the trainer decides it (plan_resume): the finished run's checkpoint resumes
    exactly in a longer job under another prefix; one no longer than the checkpoint is refused (78)."""
    code, _, _, err = run.finish(run.start(1), 1)
    assert code == 0, err
    source = f"s3://{run.bucket}/{run.name}/checkpoints/checkpoint-12/"
    endpoint, bucket = s3_bucket
    longer = Run(tmp_path / "longer", endpoint, bucket, f"{run.name}-longer")
    (tmp_path / "longer").mkdir()
    training = {**run.spec.training.sft_config(), "max_steps": 20}

    def extend(attempt: int, max_steps: int) -> tuple[int, dict[str, Any], list[dict], str]:
        job = longer.job(attempt, training={**training, "max_steps": max_steps})
        job["resume"] = {"fromCheckpoint": source, "extend": True}
        return longer.finish(longer.start(attempt, job=job), attempt)

    code, message, _, err = extend(1, 12)
    assert code == 78 and message["outcome"] == "config_error", err
    assert "resume.extend: the job's max_steps 12 does not go past" in message["reason"]
    assert "set max_steps above 12" in message["reason"]

    code, message, events, err = extend(2, 20)
    assert code == 0, err
    start = next(e for e in events if e["event"] == "start")
    assert (start["event"], start["mode"], start["step"], start["checkpoint"]) == ("start", "exact", 12, source)
    assert [e["step"] for e in events if e["event"] == "log"] == list(range(13, 21))
    view = longer.view()
    assert view.adapter_complete and view.progress["step"] == 20 and view.progress["max_steps"] == 20
    assert longer.store.read_adapter_manifest().fingerprint["max_steps"] == 20

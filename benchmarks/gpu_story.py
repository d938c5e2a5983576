"""GPU proof of the trainer: train, preempt, kill, resume, finish, on an H200 with Unsloth.

Runs the package's own `loraresume-train` processes against a moto S3 server started on
the same machine, with a random-init Llama-3.2-1B-shaped model (4-bit, LoRA r=16 on all
projections, adamw_8bit, bf16): one uninterrupted run, and one run stopped by SIGTERM,
then SIGKILLed, then resumed until done. Prints a JSON summary (and writes it to $OUT).

`--continue`: the adapter paths on the 4-bit base. A seed job trains a new LoRA on data A; a
second job continues that saved adapter on new data B (SIGTERM-preempted once, then resumed); a
curriculum stage continues the second job's adapter on data C; last, if time allows, the second
job again uninterrupted, to compare losses and adapters bitwise. Checks that each job starts
from exactly the adapter it names (the loaded LoRA's weight hash against the saved file's) and
writes `gpu_continue.json`.

    python benchmarks/gpu_story.py              # on the GPU machine, see benchmarks/README.md
    python benchmarks/gpu_story.py --continue
    python benchmarks/gpu_story.py --continue --cpu-smoke     # here: the same flow on a tiny fp32 model
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "trainer_image"), str(ROOT / "sandbox")]

from tests.support.tiny_model import alpaca_rows, write_jsonl  # noqa: E402
from tests.support.trainer_runs import Kill, job_config, run_story  # noqa: E402
from tests.support.waiting import free_port  # noqa: E402


def build_1b(out: Path) -> Path:
    """Llama-3.2-1B shape (hidden 2048, 16 layers, GQA 32/8, MLP 8192), random init, bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.support.tiny_model import build_tiny_llama

    build_tiny_llama(out)  # tokenizer (+ a tiny model we overwrite)
    config = LlamaConfig.from_pretrained(out)
    config.update(
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            torch_dtype="bfloat16",
        )
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


def main() -> int:
    if "--continue" in sys.argv[1:]:
        return continue_main()
    out = Path(os.environ.get("OUT", "/tmp/gpu-story-out"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/gpu-story")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(AWS_ACCESS_KEY_ID="gpu", AWS_SECRET_ACCESS_KEY="gpu-secret", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(work / "moto.log", "w"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(50):
        try:
            client.create_bucket(Bucket="gpu-story")
            break
        except Exception:
            time.sleep(0.2)

    t0 = time.monotonic()
    base = build_1b(work / "base-1b")
    data = write_jsonl(work / "train.jsonl", alpaca_rows(400))
    build_seconds = time.monotonic() - t0

    def job(name: str):
        cfg = job_config(
            work / name,
            endpoint=endpoint,
            storage_uri=f"s3://gpu-story/{name}/",
            base_model=str(base),
            dataset_file=str(data),
            training={
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 4,
                "warmup_steps": 5,
                "max_steps": 30,
                "learning_rate": 1e-4,
                "optim": "adamw_8bit",
                "save_steps": 10,
                "seed": 3407,
            },
            lora={"r": 16, "alpha": 16, "dropout": 0.0},
        )
        cfg.update(loadIn4bit=True, maxSeqLength=512, dtype="auto")
        return cfg, work / name

    summary: dict = {"build_seconds": round(build_seconds, 1)}
    try:
        cfg_a, work_a = job("uninterrupted")
        baseline = run_story(cfg_a, work_a).final
        cfg_b, work_b = job("interrupted")
        story = run_story(cfg_b, work_b, [Kill(signal.SIGTERM, 13), Kill(signal.SIGKILL, 23)])
        report(summary, client, cfg_a, baseline, cfg_b, story, out)
    finally:
        moto.terminate()
    return 0


def report(summary, client, cfg_a, baseline, cfg_b, story, out: Path) -> None:

    def adapter(cfg):
        key = cfg["storage"]["uri"].removeprefix("s3://gpu-story/") + "adapter/adapter_model.safetensors"
        return client.get_object(Bucket="gpu-story", Key=key)["Body"].read()

    want = baseline.losses()
    resumed = story.losses_after_resume()
    diffs = [abs(resumed[s] - want[s]) for s in resumed]
    term = story.attempts[0]
    summary.update(
        attempts=[
            {
                "exit_code": a.exit_code,
                "killed_with": a.killed_with,
                "seconds": round(a.seconds, 1),
                "start": (a.of("start") or [{}])[0],
                "first_step_seconds": a.first_seconds("log"),
                "termination": a.termination,
            }
            for a in story.attempts
        ],
        baseline_seconds=round(baseline.seconds, 1),
        baseline_first_step_seconds=baseline.first_seconds("log"),
        sigterm_to_durable_seconds=(term.of("preempted") or [{}])[0].get("seconds"),
        adapter_bitwise_equal=adapter(cfg_a) == adapter(cfg_b),
        resumed_steps=sorted(resumed),
        max_abs_loss_diff_after_resume=max(diffs) if diffs else None,
        losses_equal_after_resume=all(d == 0 for d in diffs),
        baseline_losses={s: want[s] for s in sorted(want)},
        resumed_losses={s: resumed[s] for s in sorted(resumed)},
        stderr_tail_first_attempt=term.stderr[-3000:],
    )
    (out / "gpu_story.json").write_text(json.dumps(summary, indent=2, default=str))
    brief = {
        k: v for k, v in summary.items() if k not in ("baseline_losses", "resumed_losses", "stderr_tail_first_attempt")
    }
    print(json.dumps(brief, indent=2, default=str))


def start_s3(work: Path) -> tuple[subprocess.Popen, str, object]:
    os.environ.update(AWS_ACCESS_KEY_ID="gpu", AWS_SECRET_ACCESS_KEY="gpu-secret", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(work / "moto.log", "w"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(50):
        try:
            client.create_bucket(Bucket="gpu-story")
            break
        except Exception:
            time.sleep(0.2)
    return moto, endpoint, client


def continue_main() -> int:
    """Seed adapter -> continued on new data (preempted, resumed) -> curriculum stage, 4-bit base."""
    from safetensors.torch import load

    from loraresume_trainer.fingerprint import tensors_sha256

    # Every attempt a fresh process (as a relaunched pod), not a child of the tests' warm fork server.
    os.environ.setdefault("LORARESUME_TEST_TRAINER_LAUNCH", "spawn")
    started = time.monotonic()
    budget = float(os.environ.get("GPU_STORY_BUDGET_S", "480"))
    out = Path(os.environ.get("OUT", "/tmp/gpu-story-out"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/gpu-continue")
    work.mkdir(parents=True, exist_ok=True)
    moto, endpoint, client = start_s3(work)
    smoke = "--cpu-smoke" in sys.argv[1:]
    if smoke:  # here, without a GPU: the tiny fp32 model, no 4-bit, torch's AdamW
        from tests.support.tiny_model import build_tiny_llama

        base = build_tiny_llama(work / "base-tiny")
    else:
        base = build_1b(work / "base-1b")
    data = {
        stage: write_jsonl(work / f"{stage}.jsonl", alpaca_rows(400, offset=offset))
        for stage, offset in (("a", 0), ("b", 1000), ("c", 2000))
    }
    summary: dict = {"build_seconds": round(time.monotonic() - started, 1), "stages": {}}

    def job(name: str, dataset: str, max_steps: int, adapter: str | None = None):
        cfg = job_config(
            work / name,
            endpoint=endpoint,
            storage_uri=f"s3://gpu-story/{name}/",
            base_model=str(base),
            dataset_file=str(data[dataset]),
            training={
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 4,
                "warmup_steps": 2,
                "max_steps": max_steps,
                "learning_rate": 1e-4,
                "optim": "adamw_8bit",
                "save_steps": 5,
                "seed": 3407,
            },
            lora={"r": 16, "alpha": 16, "dropout": 0.0},
        )
        cfg.update(loadIn4bit=True, maxSeqLength=512, dtype="auto")
        if smoke:
            cfg.update(loadIn4bit=False, maxSeqLength=128, dtype="float32")
            cfg["training"].update(optim="adamw_torch", per_device_train_batch_size=1, gradient_accumulation_steps=1)
        if adapter:
            cfg["adapter"] = adapter
        return cfg, work / name

    def adapter_uri(cfg) -> str:
        return cfg["storage"]["uri"] + "adapter/"

    def adapter_file(uri: str, name: str) -> bytes:
        key = uri.removeprefix("s3://gpu-story/") + name
        return client.get_object(Bucket="gpu-story", Key=key)["Body"].read()

    def weights_sha(uri: str) -> str:
        return tensors_sha256(load(adapter_file(uri, "adapter_model.safetensors")))

    def record(name: str, cfg, story, starts_from: str | None) -> dict:
        attempts = []
        for a in story.attempts:
            ready = (a.of("model_ready") or [{}])[0]
            losses = a.losses()
            attempts.append(
                {
                    "exit_code": a.exit_code,
                    "killed_with": a.killed_with,
                    "seconds": round(a.seconds, 1),
                    "first_step_seconds": a.first_seconds("log"),
                    "loaded_lora_sha256": ready.get("lora_sha256"),
                    "resume_from": ready.get("resume_from"),
                    "steps": [min(losses), max(losses)] if losses else None,
                    "termination": a.termination,
                    "unsloth_skipped_lora_patching": "Already have LoRA adapters" in a.stderr,
                    "stderr_tail": a.stderr[-1500:] if a.exit_code not in (0, 75) else "",
                }
            )
        final = story.final
        entry: dict = {
            "adapter": cfg.get("adapter"),
            "dataset": cfg["dataset"]["source"],
            "max_steps": cfg["training"]["max_steps"],
            "succeeded": final.exit_code == 0,
            "attempts": attempts,
            "losses": {s: v for s, v in sorted(merged_losses(story).items())},
        }
        if final.exit_code == 0:
            saved = json.loads(adapter_file(adapter_uri(cfg), "adapter_config.json"))
            entry["saved_adapter"] = {
                "sha256": weights_sha(adapter_uri(cfg)),
                "r": saved.get("r"),
                "base_model_name_or_path": saved.get("base_model_name_or_path"),
            }
        if starts_from:
            want = weights_sha(starts_from)
            entry["starts_from_adapter_sha256"] = want
            entry["first_attempt_loaded_that_adapter"] = attempts[0]["loaded_lora_sha256"] == want
            if "saved_adapter" in entry:
                entry["trained_away_from_it"] = entry["saved_adapter"]["sha256"] != want
        summary["stages"][name] = entry
        write(out, summary)
        return entry

    try:
        cfg_seed, work_seed = job("seed", "a", 10)
        seed = record("seed", cfg_seed, run_story(cfg_seed, work_seed), None)
        if not seed["succeeded"]:
            return 1
        cfg_cont, work_cont = job("continue", "b", 20, adapter=adapter_uri(cfg_seed))
        cont_story = run_story(cfg_cont, work_cont, [Kill(signal.SIGTERM, 8)])
        cont = record("continue", cfg_cont, cont_story, adapter_uri(cfg_seed))
        if not cont["succeeded"]:
            return 1
        cfg_cur, work_cur = job("curriculum", "c", 10, adapter=adapter_uri(cfg_cont))
        record("curriculum", cfg_cur, run_story(cfg_cur, work_cur), adapter_uri(cfg_cont))
        if time.monotonic() - started < budget:
            cfg_twin, work_twin = job("continue-uninterrupted", "b", 20, adapter=adapter_uri(cfg_seed))
            twin = record("continue-uninterrupted", cfg_twin, run_story(cfg_twin, work_twin), adapter_uri(cfg_seed))
            resumed = cont_story.losses_after_resume()
            want = {int(s): v for s, v in twin["losses"].items()}
            diffs = [abs(resumed[s] - want[s]) for s in resumed if s in want]
            summary["preempted_continuation_vs_uninterrupted"] = {
                "resumed_steps": sorted(resumed),
                "max_abs_loss_diff_after_resume": max(diffs) if diffs else None,
                "adapter_bitwise_equal": twin.get("saved_adapter", {}).get("sha256")
                == cont.get("saved_adapter", {}).get("sha256"),
            }
        else:
            summary["preempted_continuation_vs_uninterrupted"] = "skipped: over GPU_STORY_BUDGET_S"
    finally:
        moto.terminate()
        summary["total_seconds"] = round(time.monotonic() - started, 1)
        write(out, summary)
        print(json.dumps(summary, indent=1, default=str))
    return 0


def merged_losses(story) -> dict[int, float]:
    merged: dict[int, float] = {}
    for attempt in story.attempts:
        merged.update(attempt.losses())
    return merged


def write(out: Path, summary: dict) -> None:
    (out / "gpu_continue.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())

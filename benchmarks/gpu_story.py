"""GPU proof of the trainer: train, preempt, kill, resume, finish, on an H200 with Unsloth.

Runs the package's own `loraresume-train` processes against a moto S3 server started on
the same machine, with a random-init Llama-3.2-1B-shaped model (4-bit, LoRA r=16 on all
projections, adamw_8bit, bf16): one uninterrupted run, and one run stopped by SIGTERM,
then SIGKILLed, then resumed until done. Prints a JSON summary (and writes it to $OUT).

    python benchmarks/gpu_story.py            # on the GPU machine, see benchmarks/README.md
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


if __name__ == "__main__":
    sys.exit(main())

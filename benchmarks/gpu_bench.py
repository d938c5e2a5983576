"""GPU benchmark of the trainer (issue 6): speed, memory, checkpoint cost, SIGTERM, resume start-up.

One command on an H200 builds random-init Llama-3-8B (and Llama-3.2-1B) shaped models offline
and measures, side by side in one run:

* tokens/s, MFU and peak GPU memory of the project's trainer path (`loraresume-train`: Unsloth
  4-bit, LoRA r=16 on all 7 projections, the seed's SFTConfig) against a plain transformers +
  peft + bitsandbytes QLoRA baseline (TRL SFTTrainer), each in its own process;
* checkpoint cost: one save, its background upload to an S3 server on the machine (moto),
  and the training slowdown with uploads on against off (A/B cycles inside one run);
* SIGTERM -> checkpoint durable in S3;
* resume start-up (process start -> first resumed optimizer step), split into phases, from an
  early and a late checkpoint, to show the data fast-forward does not grow with the step.

The trainer runs unmodified; a thin wrapper (`--child trainer`) watches it through the executor's
seam (`loraresume_trainer.seams.Hooks`: timed phases, the built Trainer, which checkpoints to
upload), emits JSON lines, and can leave chosen checkpoints un-uploaded (the "uploads off" cycles).
Results go to $OUT/gpu_bench.json;
`--report FILE.json` turns such a file into the `## GPU (issue 6)` section of
benchmarks/RESULTS.md and prints the table.

    source benchmarks/gpu_env.sh && python3 benchmarks/gpu_bench.py          # H200, full run
    source benchmarks/gpu_env.sh && python3 benchmarks/gpu_bench.py --smoke  # H200, ~3 min
    python benchmarks/gpu_bench.py --cpu-smoke                               # CPU, every path but 4-bit/Unsloth GPU
    python benchmarks/gpu_bench.py --report benchmarks/results/gpu_bench-DATE.json

`--speed full,var` (issue 16) runs another comparison instead: the trainer in each gradient-checkpointing
mode, with padding_free on and off, against the baseline with and without checkpointing, on full and on
variable-length rows, one process each, printing tokens/s ratios, LoRA-MFU, peak memory beside the trainer's
estimate and first-step time; `--report-speed FILES` writes RESULTS.md's issue 16 section (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
GiB = float(1 << 30)
MiB = float(1 << 20)
BUCKET = "gpu-bench"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
H200_DENSE_BF16_TFLOPS = 989.0  # vendor datasheet, dense (no sparsity)

# Model shapes. vocab None: the trained tokenizer's size. The tokenizer is trained on the fly with
# 8,000 tokens; the embedding/lm_head keep the real 128,256 rows so lm_head FLOPs and memory match.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=None, tie=False, rope=10000.0),
    "1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tie=True, rope=500000.0),
    "8b": dict(
        hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, tie=False, rope=500000.0
    ),
}
SHAPE_NAMES = {"tiny": "tiny Llama (CPU smoke)", "1b": "Llama-3.2-1B shape", "8b": "Llama-3-8B shape"}


@dataclass
class Plan:
    """What one model size runs.

    Checkpoint k is saved at step k*save_steps; the save_steps steps after it form cycle k.
    Checkpoint 1 is uploaded (the early resume point) and cycle 1 is warm-up. Cycles 2..cycles+1
    are compared, checkpoints alternating not uploaded / uploaded in ABBA order (off, on, on, off,
    ...) so a drift over the run cancels. Checkpoint cycles+2 is not uploaded, and SIGTERM is sent
    once step (cycles+2)*save_steps+1 is logged, so the preemption checkpoint uploads alone.
    """

    size: str
    seq: int = 2048
    batch: int = 2
    grad_accum: int = 4
    save_steps: int = 4
    cycles: int = 4
    max_steps: int = 30
    bl_warmup: int = 2
    bl_steps: int = 5
    q4: bool = True
    phases: tuple[str, ...] = ("build", "unsloth", "baseline", "resume_early", "resume_late")
    # seconds each phase is expected to need (time guard); the phase is skipped when less is left
    est: dict[str, float] = field(default_factory=dict)
    tokenizer_vocab: int = 8000
    # resume runs get empty Triton/inductor/Unsloth compile caches, as a new pod on a new node would
    cold_caches: bool = True

    @property
    def sigterm_step(self) -> int:
        return (self.cycles + 2) * self.save_steps + 1

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.grad_accum * self.seq

    @property
    def rows(self) -> int:
        return self.max_steps * self.batch * self.grad_accum

    def uploaded(self, step: int) -> bool:
        """Whether the regular checkpoint at `step` is uploaded (the SIGTERM one always is)."""
        if step % self.save_steps:
            return True
        k = step // self.save_steps
        if k == 1 or k > self.cycles + 2:  # warm-up / past the SIGTERM (its checkpoint may land on the grid)
            return True
        if k == self.cycles + 2:  # the SIGTERM cycle: its checkpoint's upload runs alone
            return False
        return (k - 2) % 4 in (1, 2)  # compared cycles: off, on, on, off, ...

    def compared(self, k: int) -> bool:
        return 2 <= k <= self.cycles + 1


def upload_ab_plan(plan: Plan, cycles: int) -> Plan:
    """`plan` narrowed to the upload A/B: the build and the trainer run only, with up to `cycles` compared
    cycles (the time guard stops the run earlier where the budget ends; whole ABBA blocks are kept)."""
    return replace(plan, cycles=cycles, max_steps=(cycles + 3) * plan.save_steps, phases=("build", "unsloth"))


def plans(mode: str) -> list[Plan]:
    if mode == "cpu-smoke":
        return [
            Plan(
                "tiny",
                seq=128,
                save_steps=2,
                cycles=4,
                max_steps=16,
                bl_warmup=1,
                bl_steps=2,
                q4=False,
                tokenizer_vocab=600,
                est=dict(build=30, unsloth=90, baseline=60, resume_early=60, resume_late=60),
            )
        ]
    if mode == "smoke":
        return [
            Plan(
                "1b",
                save_steps=3,
                cycles=2,
                max_steps=16,
                bl_warmup=2,
                bl_steps=4,
                est=dict(build=60, unsloth=70, baseline=50, resume_early=70, resume_late=70),
            )
        ]
    return [
        Plan(
            "8b",
            save_steps=4,
            cycles=12,
            max_steps=64,
            bl_warmup=2,
            bl_steps=10,
            est=dict(build=90, unsloth=175, baseline=70, resume_early=75, resume_late=75),
        ),
        Plan(
            "1b",
            save_steps=4,
            cycles=12,
            max_steps=64,
            bl_warmup=2,
            bl_steps=10,
            phases=("build", "unsloth", "baseline"),
            est=dict(build=35, unsloth=85, baseline=40),
        ),
    ]


# ----------------------------------------------------------------------------------- FLOPs model


def shape_counts(size: str, vocab: int, r: int = 16) -> dict[str, float]:
    s = SHAPES[size]
    h, inter, layers, heads, kv = s["hidden"], s["intermediate"], s["layers"], s["heads"], s["kv_heads"]
    hd = h // heads
    linears = {  # (in, out) of each adapted projection
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    n_layers_lin = layers * sum(i * o for i, o in linears.values())
    n_lm_head = h * vocab
    n_embed = h * vocab
    n_lora = layers * sum(r * (i + o) for i, o in linears.values())
    n_norm = layers * 2 * h + h
    total = n_layers_lin + n_embed + (0 if s["tie"] else n_lm_head) + n_norm
    return dict(
        n_matmul=float(n_layers_lin + n_lm_head),
        n_layers_linear=float(n_layers_lin),
        n_lm_head=float(n_lm_head),
        n_lora=float(n_lora),
        n_params=float(total),
        layers=layers,
        attn_width=heads * hd,
    )


def flops_per_token(size: str, vocab: int, seq: int) -> dict[str, float]:
    """Training FLOPs per token for LoRA on a frozen base (stated in RESULTS.md).

    N = parameters in matmuls (all decoder linears + lm_head; the embedding lookup is free).
    Attention scores+values, causal, forward: A = 2 * layers * seq * width (4*layers*seq*width
    non-causal, halved). Frozen base: forward 2N + A, backward input-gradients 2N + 2A, no weight
    gradients; LoRA adds 6 * N_lora. Gradient checkpointing recomputes the forward: +2N + A.
    """
    c = shape_counts(size, vocab)
    n, attn = c["n_matmul"], 2.0 * c["layers"] * seq * c["attn_width"]
    useful = 4 * n + 3 * attn + 6 * c["n_lora"]
    return dict(
        useful=useful,  # model FLOPs of LoRA training (no recompute)
        hardware=useful + 2 * n + attn + 2 * c["n_lora"],  # + recompute of the forward
        six_n=6 * n,  # the pre-training convention, which counts weight gradients LoRA never computes
        **c,
    )


# ---------------------------------------------------------------------------------- child helpers


def bench_event(name: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": "bench", "name": name, **fields}, default=str) + "\n")
    sys.stdout.flush()


def cuda_mem() -> dict[str, float]:
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    return {
        "alloc_gib": torch.cuda.memory_allocated() / GiB,
        "max_alloc_gib": torch.cuda.max_memory_allocated() / GiB,
        "reserved_gib": torch.cuda.memory_reserved() / GiB,
        "max_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
    }


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def wait_gate(gate: str | None) -> None:
    if not gate:
        return
    t0 = time.monotonic()
    while not Path(gate).exists():
        if Path(gate + ".abort").exists():
            bench_event("gate_abort")
            sys.exit(3)
        time.sleep(0.1)
    bench_event("gate_open", t0=t0, t1=time.monotonic())


def timed(
    owner: Any,
    name: str,
    label: str | None = None,
    *,
    before: Callable[..., None] | None = None,
    extra: Callable[..., dict[str, Any]] | None = None,
) -> None:
    """Replace owner.name by a wrapper that emits {"name": label, "t0", "t1", "n"} per call."""
    orig = getattr(owner, name)
    calls = [0]

    @functools.wraps(orig)
    def wrapper(*a: Any, **k: Any) -> Any:
        if before is not None:
            before(*a, **k)
        t0 = time.monotonic()
        ok = False
        try:
            result = orig(*a, **k)
            ok = True
            return result
        finally:
            calls[0] += 1
            fields = {}
            if extra is not None:
                try:
                    fields = extra(*a, **k)
                except Exception as exc:
                    fields = {"extra_error": repr(exc)}
            bench_event(label or name, t0=t0, t1=time.monotonic(), n=calls[0], ok=ok, **fields)

    setattr(owner, name, wrapper)


# The executor's timed parts (Pipeline.timed -> Hooks.phase) under the names this script's analysis reads.
PHASE_NAMES = {"observe": "complete_checkpoints", "load_stack": "imports", "fetch_inputs": "fetch_dir"}


def child_trainer(ns: argparse.Namespace) -> int:
    """`loraresume-train` in this process, watched through the executor's seam (seams.Hooks): timed
    phases, an instrumented Trainer, and optionally checkpoints left un-uploaded (uploads-off cycles)."""
    bench_event("child_start", t=time.monotonic(), spawn=ns.spawn)
    sys.path[:0] = [str(ROOT / "trainer_image")]
    from loraresume_trainer import cli
    from loraresume_trainer.seams import Hooks

    bench_event("pipeline_imported", t=time.monotonic())
    skip_steps = {int(s) for s in ns.skip_upload.split(",") if s}

    class BenchHooks(Hooks):
        def phase(self, name: str, t0: float, t1: float, **fields: Any) -> None:
            bench_event(PHASE_NAMES.get(name, name), t0=t0, t1=t1, ok=True, **fields)

        def before_inputs(self) -> None:  # on the download thread, while the imports run
            wait_gate(ns.gate)

        def before_model_load(self) -> None:  # after the imports (Unsloth must come before transformers)
            install_hf_hooks()

        def model_loaded(self, model: Any) -> None:
            bench_event("model_mem", t=time.monotonic(), mem=cuda_mem())

        def trainer_ready(self, trainer: Any) -> None:
            instrument_trainer(trainer)
            instrument_train(trainer)

        def upload_checkpoint(self, step: int) -> bool:
            if step in skip_steps:
                bench_event("upload_skipped", step=step, t=time.monotonic())
                return False
            return True

    return cli.main(["--config", ns.config, "--termination-log", ns.termination_log], hooks=BenchHooks())


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def install_hf_hooks() -> None:
    """Called once Unsloth is imported (it must come before transformers): time HF's data fast-forward."""
    import transformers.trainer as tt

    if getattr(tt, "_gpu_bench_hooked", False):
        return
    tt._gpu_bench_hooked = True
    orig_skip = tt.skip_first_batches

    def skip_first_batches(dataloader: Any, num_batches: int = 0) -> Any:
        t0 = time.monotonic()
        out = orig_skip(dataloader, num_batches)
        bench_event("skip_first_batches", t0=t0, t1=time.monotonic(), batches=num_batches)
        return out

    tt.skip_first_batches = skip_first_batches


STEP_EVENTS_ENV = "GPU_BENCH_STEP_EVENTS"  # set by --speed: per-step tokens and memory events


def batch_tokens(batch_samples: list[Any]) -> dict[str, int]:
    """Tokens in one optimizer step's micro-batches: real (attention mask, or every position of a
    padding-free batch), positions (incl. padding) and positions with a label."""
    real = positions = labelled = rows = 0
    for b in batch_samples:
        ids = b.get("input_ids") if hasattr(b, "get") else None
        if ids is None:
            continue
        positions += int(ids.numel())
        mask = b.get("attention_mask")
        real += int(mask.sum()) if mask is not None else int(ids.numel())
        labels = b.get("labels")
        if labels is not None:
            labelled += int((labels != -100).sum())
        pos = b.get("position_ids")
        rows += int((pos == 0).sum()) if pos is not None and mask is None else int(ids.shape[0])
    return {"tokens": real, "positions": positions, "label_tokens": labelled, "rows": rows}


def add_step_events(trainer: Any) -> None:
    """Per optimizer step: its tokens (from get_batch_samples) and the GPU memory peak so far."""
    from transformers import TrainerCallback

    orig = trainer.get_batch_samples

    @functools.wraps(orig)
    def get_batch_samples(*a: Any, **k: Any) -> Any:
        out = orig(*a, **k)
        try:
            bench_event("step_tokens", **batch_tokens(out[0]))
        except Exception as exc:  # never break the run being measured
            bench_event("step_tokens", error=repr(exc))
        return out

    trainer.get_batch_samples = get_batch_samples

    class StepMem(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            bench_event("step_mem", step=state.global_step, mem=cuda_mem())

    trainer.add_callback(StepMem())


def train_settings(trainer: Any) -> dict[str, Any]:
    """What the run actually trains with (after Unsloth's and TRL's own choices)."""
    model = trainer.model
    layers_gc = [getattr(m, "gradient_checkpointing", None) for m in model.modules()]
    collator = trainer.data_collator
    return {
        "args_padding_free": getattr(trainer.args, "padding_free", None),
        "args_gradient_checkpointing": getattr(trainer.args, "gradient_checkpointing", None),
        "collator": type(collator).__name__,
        "collator_padding_free": getattr(collator, "padding_free", None),
        "unsloth_gradient_checkpointing": str(getattr(model, "_unsloth_gradient_checkpointing", None)),
        "modules_with_gc_on": sum(1 for v in layers_gc if v is True),
        "is_gradient_checkpointing": getattr(model, "is_gradient_checkpointing", None),
    }


def instrument_trainer(trainer: Any) -> None:
    if getattr(trainer, "_gpu_bench", False):
        return
    trainer._gpu_bench = True
    if os.environ.get(STEP_EVENTS_ENV):
        add_step_events(trainer)
    for name in ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_rng_state", "get_batch_samples"):
        if hasattr(trainer, name):
            timed(trainer, name, name.lstrip("_"))
    timed(
        trainer,
        "_save_checkpoint",
        "save_checkpoint",
        extra=lambda *a, **k: {"step": trainer.state.global_step, "mem": cuda_mem()},
    )


def instrument_train(trainer: Any) -> None:
    if getattr(trainer, "_gpu_bench_train", False):
        return
    trainer._gpu_bench_train = True
    orig_train = trainer.train

    @functools.wraps(orig_train)
    def train(*a: Any, **k: Any) -> Any:
        load_mem = cuda_mem()
        reset_peak()
        if os.environ.get(STEP_EVENTS_ENV):
            try:
                bench_event("train_settings", **train_settings(trainer))
            except Exception as exc:
                bench_event("train_settings", error=repr(exc))
        bench_event("hf_train_start", t=time.monotonic(), mem=load_mem)
        try:
            return orig_train(*a, **k)
        finally:
            bench_event("hf_train_end", t=time.monotonic(), mem=cuda_mem())

    trainer.train = train


def child_baseline(ns: argparse.Namespace) -> int:
    """Plain transformers + peft + bitsandbytes QLoRA (TRL SFTTrainer on a GPU), same data and batch."""
    bench_event("child_start", t=time.monotonic(), spawn=ns.spawn)
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    sys.path[:0] = [str(ROOT / "trainer_image")]
    from loraresume_trainer.config import DatasetSettings
    from loraresume_trainer.dataset_prep import load_rows, to_texts

    on_gpu = torch.cuda.is_available()
    use_sft = on_gpu  # TRL 1.15's SFTTrainer cannot take a step on a CPU (Triton fused LM head)
    if use_sft:
        from trl import SFTConfig, SFTTrainer
    bench_event("imported", t=time.monotonic())
    wait_gate(ns.gate)
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(ns.base)
    if ns.q4:
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            ns.base, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": 0}
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=not ns.no_gc)
    else:
        model = AutoModelForCausalLM.from_pretrained(ns.base, dtype=torch.bfloat16 if on_gpu else torch.float32)
        if on_gpu:
            model.to("cuda")
        if not ns.no_gc:
            model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGET_MODULES, bias="none", task_type="CAUSAL_LM"
    )
    transformers.set_seed(3407)
    bench_event("model_loaded", t0=t0, t1=time.monotonic(), mem=cuda_mem())
    rows = load_rows(DatasetSettings(source=ns.data, template="alpaca"), Path(ns.data), Path(ns.work) / "ds-cache")
    texts = to_texts(rows, DatasetSettings(source=ns.data, template="alpaca"), tokenizer)

    class Events(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                print(
                    json.dumps(
                        {
                            "event": "log",
                            "step": state.global_step,
                            **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
                        }
                    ),
                    flush=True,
                )

    common = dict(
        output_dir=str(Path(ns.work) / "baseline-out"),
        per_device_train_batch_size=ns.batch,
        gradient_accumulation_steps=ns.grad_accum,
        warmup_steps=5,
        max_steps=ns.steps,
        learning_rate=2e-4,
        optim="adamw_8bit" if on_gpu else "adamw_torch",
        weight_decay=0.01,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        seed=3407,
        report_to="none",
        disable_tqdm=True,
        bf16=on_gpu,
        gradient_checkpointing=not ns.no_gc,
    )
    t1 = time.monotonic()
    if use_sft:
        args = SFTConfig(max_length=ns.seq, dataset_text_field="text", **common)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=texts,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[Events()],
        )
    else:
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

        model = get_peft_model(model, lora)
        tokenized = texts.map(
            lambda r: tokenizer(r["text"] + tokenizer.eos_token, truncation=True, max_length=ns.seq),
            remove_columns=["text"],
        )
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=tokenized,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[Events()],
        )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    bench_event("trainer_ready", t0=t1, t1=time.monotonic(), trainable=trainable, trainer=type(trainer).__name__)
    if os.environ.get(STEP_EVENTS_ENV):
        add_step_events(trainer)
        bench_event("train_settings", **train_settings(trainer))
    load_mem = cuda_mem()
    reset_peak()
    bench_event("hf_train_start", t=time.monotonic(), mem=load_mem)
    trainer.train()
    bench_event("hf_train_end", t=time.monotonic(), mem=cuda_mem())
    return 0


def child_build(ns: argparse.Namespace) -> int:
    """Tokenizer trained on the fly, long alpaca rows, random-init model (bf16 save, then a 4-bit save)."""
    bench_event("child_start", t=time.monotonic(), spawn=ns.spawn)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    on_gpu = torch.cuda.is_available()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    if ns.matmul and on_gpu:
        bench_event("matmul", **matmul_rate())

    # Data: alpaca rows whose outputs are longer than seq tokens, so every row is truncated to
    # exactly seq tokens and tokens/step = batch * grad_accum * seq.
    t0 = time.monotonic()
    rng = random.Random(1234)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    n_words = int(ns.seq * 1.3) + 64

    def row(i: int) -> dict[str, str]:
        return {
            "instruction": f"Continue the text number {i}.",
            "input": "",
            "output": " ".join(rng.choice(words) for _ in range(n_words)),
        }

    rows = [row(i) for i in range(ns.rows)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [r["output"] for r in rows[:64]] + [" ".join(words)],
        trainers.BpeTrainer(
            vocab_size=ns.tokenizer_vocab,
            special_tokens=["<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=ns.seq
    )
    tokenizer.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    lengths = [
        len(tokenizer(f"### Instruction:\n{r['instruction']}\n\n### Response:\n{r['output']}")["input_ids"])
        for r in rows[:16]
    ]
    if min(lengths) <= ns.seq:
        raise SystemExit(f"rows too short: {min(lengths)} tokens <= seq {ns.seq}")
    data = Path(ns.data)
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench_event(
        "data",
        t0=t0,
        t1=time.monotonic(),
        rows=len(rows),
        min_tokens=min(lengths),
        tokenizer_vocab=len(tokenizer),
        bytes=data.stat().st_size,
    )
    if ns.var_data:
        # Variable-length rows: outputs of 8 .. n_words words, so rows run from a few dozen tokens
        # to longer than seq (truncated); what padding costs and padding-free saves.
        vrng = random.Random(4321)
        vrows = [
            {
                "instruction": f"Continue the text number {i}.",
                "input": "",
                "output": " ".join(vrng.choice(words) for _ in range(vrng.randint(8, n_words))),
            }
            for i in range(ns.rows)
        ]
        vlen = [
            min(
                ns.seq,
                len(tokenizer(f"### Instruction:\n{r['instruction']}\n\n### Response:\n{r['output']}")["input_ids"])
                + 1,
            )
            for r in vrows
        ]
        vdata = Path(ns.var_data)
        vdata.write_text("".join(json.dumps(r) + "\n" for r in vrows))
        bench_event(
            "var_data",
            rows=len(vrows),
            mean_tokens=round(statistics.fmean(vlen), 1),
            min_tokens=min(vlen),
            max_tokens=max(vlen),
            full_rows=sum(1 for x in vlen if x >= ns.seq),
            # attention FLOPs per token grow with the row's length: the token-weighted mean length
            attention_seq=round(sum(x * x for x in vlen) / sum(vlen), 1),
        )

    s = SHAPES[ns.size]
    vocab = s["vocab"] or len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=max(8192, ns.seq),
        rope_theta=s["rope"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=s["tie"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if on_gpu else torch.float32
    t0 = time.monotonic()
    torch.manual_seed(0)
    with torch.device("cuda" if on_gpu else "cpu"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    if on_gpu:
        torch.cuda.synchronize()
    bench_event("init", t0=t0, t1=time.monotonic(), params=n_params, vocab=vocab)
    full = out / "bf16" if ns.q4 else out / "model"
    t0 = time.monotonic()
    model.save_pretrained(full)
    tokenizer.save_pretrained(full)
    del model
    if on_gpu:
        torch.cuda.empty_cache()
    bench_event("save_full", t0=t0, t1=time.monotonic(), bytes=_dir_bytes(full), dtype=str(dtype))
    final = full
    if ns.q4:
        # Quantize once and save a pre-quantized bitsandbytes checkpoint (as `unsloth/...-bnb-4bit`
        # hub models are): every later process loads ~30% of the bytes and skips quantization.
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        t0 = time.monotonic()
        q = AutoModelForCausalLM.from_pretrained(
            full, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": 0}
        )
        t1 = time.monotonic()
        final = out / "bnb4"
        q.save_pretrained(final)
        tokenizer.save_pretrained(final)
        bench_event("quantize", t0=t0, t1=t1, t2=time.monotonic(), bytes=_dir_bytes(final))
        del q
        shutil.rmtree(full, ignore_errors=True)  # 16 GB at 8B: free the disk and page cache
    bench_event("built", path=str(final), t=time.monotonic())
    return 0


def matmul_rate() -> dict[str, Any]:
    """Measured dense bf16 matmul rate (the MFU denominator), best of a few square sizes."""
    import torch

    best: dict[str, Any] = {}
    for n in (4096, 8192, 16384):
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        iters = max(5, int(2e14 // (2 * n**3)))
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        tflops = 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12
        if tflops > best.get("tflops", 0):
            best = {"tflops": round(tflops, 1), "n": n, "iters": iters}
        del a, b
    torch.cuda.empty_cache()
    return best


# ---------------------------------------------------------------------------------------- parent


class Child:
    """A subprocess whose stdout JSON lines are collected with arrival times (monotonic clock)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        ctx: Ctx,
        on_event: Callable[[Child, dict[str, Any]], None] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.signals: list[tuple[str, float]] = []
        self.on_event = on_event
        self.stderr_path = ctx.work / f"{name}.stderr"
        self.stdout_path = ctx.work / f"{name}.stdout"
        ctx.logs.extend([self.stderr_path, self.stdout_path])
        self.t_spawn = time.monotonic()
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [*argv, "--spawn", repr(self.t_spawn)],
            stdout=subprocess.PIPE,
            stderr=open(self.stderr_path, "w"),
            text=True,
            cwd=cwd or ctx.work,
            env=full_env,
        )
        self.t_end: float | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        ctx.log(f"started {name} (pid {self.proc.pid})")

    def _read(self) -> None:
        with open(self.stdout_path, "w") as raw:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                now = time.monotonic()
                raw.write(line)
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(event, dict) or "event" not in event:
                    continue
                event["_t"] = now
                self.events.append(event)
                if self.on_event is not None:
                    try:
                        self.on_event(self, event)
                    except Exception as exc:
                        print(f"on_event error in {self.name}: {exc!r}", flush=True)

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.signals.append((sig.name, time.monotonic()))
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            rc = None
            self.proc.wait(timeout=30)
        self.reader.join(timeout=30)
        self.t_end = time.monotonic()
        return rc

    def bench(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "bench" and e.get("name") == name]

    def first(self, name: str) -> dict[str, Any] | None:
        found = self.bench(name)
        return found[0] if found else None

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    def stderr_tail(self, n: int = 4000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class GpuMonitor:
    """nvidia-smi every 2 s (SM clock, temperature, power, utilisation), to explain drifting step times."""

    FIELDS = ("clocks.sm", "temperature.gpu", "power.draw", "utilization.gpu")

    def __init__(self) -> None:
        self.samples: list[tuple[float, list[float]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        if shutil.which("nvidia-smi"):
            self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(2.0):
            try:
                out = subprocess.run(
                    ["nvidia-smi", f"--query-gpu={','.join(self.FIELDS)}", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                self.samples.append((time.monotonic(), [float(x) for x in out.strip().split(",")]))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                continue

    def summary(self, t0: float | None, t1: float | None) -> dict[str, Any]:
        if t0 is None or t1 is None:
            return {}
        rows = [v for t, v in self.samples if t0 <= t <= t1]
        if not rows:
            return {}
        cols = list(zip(*rows, strict=True))
        return {
            f: {"min": min(c), "mean": rnd(mean(list(c)), 1), "max": max(c)}
            for f, c in zip(self.FIELDS, cols, strict=False)
        }


def gpu_during(ctx: Ctx, t0: float | None, t1: float | None) -> dict[str, Any]:
    return ctx.gpu.summary(t0, t1) if ctx.gpu is not None else {}


class Ctx:
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.t0 = time.monotonic()
        self.deadline = self.t0 + ns.budget_s
        self.out = Path(ns.out or os.environ.get("OUT") or "/tmp/gpu-bench-out")
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(ns.work)
        if self.work.exists() and not ns.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs: list[Path] = []
        self.lines: list[str] = []
        self.results: dict[str, Any] = {"meta": {}, "sizes": {}, "skipped": [], "errors": []}
        self.endpoint = ""
        self.s3: Any = None
        self.gpu: GpuMonitor | None = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {msg}"
        self.lines.append(line)
        print(line, flush=True)

    def save(self) -> None:
        self.results["meta"]["wall_seconds"] = round(time.monotonic() - self.t0, 1)
        path = self.out / "gpu_bench.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        os.replace(tmp, path)

    def skip(self, size: str, phase: str, why: str) -> None:
        self.results["skipped"].append({"size": size, "phase": phase, "why": why})
        self.log(f"SKIP {size}/{phase}: {why}")
        self.save()

    def error(self, size: str, phase: str, child: Child | None, why: str) -> None:
        entry = {"size": size, "phase": phase, "why": why}
        if child is not None:
            entry["stderr_tail"] = child.stderr_tail(3000)
        self.results["errors"].append(entry)
        self.log(f"ERROR {size}/{phase}: {why}")
        self.save()


def py(*args: str) -> list[str]:
    return [sys.executable, str(HERE), *args]


def trainer_env(ctx: Ctx, attempt: int) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "UNSLOTH_DISABLE_STATISTICS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LORARESUME_ATTEMPT": str(attempt),
        # This script sets the compile caches itself (cold: empty per run; warm: the machine's), so the
        # trainer neither points them into its work dir nor restores them (goodput.py measures that).
        "LORARESUME_COMPILE_CACHE": "off",
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "trainer_image"), str(ROOT / "sandbox"), str(ROOT), os.environ.get("PYTHONPATH", "")]
        ),
    }


def job(
    ctx: Ctx, plan: Plan, base: Path, data: Path, name: str, *, prefix: str, from_checkpoint: str | None = None
) -> Path:
    import yaml

    cfg: dict[str, Any] = {
        "name": f"bench-{plan.size}-{name}",
        "baseModel": str(base),
        "maxSeqLength": plan.seq,
        "loadIn4bit": plan.q4,
        "dtype": "auto",
        "dataset": {"source": str(data), "template": "alpaca"},
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0},
        "training": {
            "per_device_train_batch_size": plan.batch,
            "gradient_accumulation_steps": plan.grad_accum,
            "warmup_steps": 5,
            "max_steps": plan.max_steps,
            "learning_rate": 2e-4,
            "optim": "adamw_8bit",
            "logging_steps": 1,
            "save_steps": plan.save_steps,
            "seed": 3407,
        },
        "storage": {"uri": f"s3://{BUCKET}/{prefix}/", "endpoint": ctx.endpoint, "keepCheckpoints": 100},
        "workDir": str(ctx.work / plan.size / name / "work"),
        "terminationLog": str(ctx.work / plan.size / name / "termination-log"),
    }
    if from_checkpoint:
        cfg["resume"] = {"fromCheckpoint": from_checkpoint}
    path = ctx.work / plan.size / name / "job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def trainer_child(
    ctx: Ctx,
    plan: Plan,
    name: str,
    cfg: Path,
    *,
    attempt: int = 1,
    gate: str | None = None,
    skip_upload: str = "",
    on_event: Callable[[Child, dict[str, Any]], None] | None = None,
    cold: bool = False,
) -> Child:
    argv = py(
        "--child",
        "trainer",
        "--config",
        str(cfg),
        "--termination-log",
        str(cfg.parent / "termination-log"),
        "--skip-upload",
        skip_upload,
    )
    if gate:
        argv += ["--gate", gate]
    env = trainer_env(ctx, attempt)
    cwd = None
    if cold:  # a new pod: no compiled kernels from the earlier runs on this machine
        cache = cfg.parent / "caches"
        env.update(
            TRITON_CACHE_DIR=str(cache / "triton"),
            TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
            UNSLOTH_COMPILE_LOCATION="unsloth_compiled_cache",
        )
        cwd = cache
        cache.mkdir(parents=True, exist_ok=True)
    return Child(f"{plan.size}-{name}", argv, ctx, on_event=on_event, env=env, cwd=cwd)


def start_moto(ctx: Ctx) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(ctx.work / "moto.log", "w"),
        stderr=subprocess.STDOUT,
    )
    ctx.endpoint = f"http://127.0.0.1:{port}"
    import boto3

    ctx.s3 = boto3.client("s3", endpoint_url=ctx.endpoint)
    for _ in range(100):
        try:
            ctx.s3.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            time.sleep(0.2)
    return proc


def meta(ctx: Ctx) -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for name in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "bitsandbytes",
        "unsloth",
        "unsloth_zoo",
        "datasets",
        "triton",
        "moto",
        "boto3",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = None
    try:
        gpu = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {
        "date": time.strftime("%Y-%m-%d"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": ctx.ns.mode,
        "gpu": gpu,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "budget_s": ctx.ns.budget_s,
    }


# ------------------------------------------------------------------------------------- analysis


def rel(child: Child, t: float | None) -> float | None:
    return None if t is None else round(t - child.t_spawn, 3)


def dur(e: dict[str, Any] | None) -> float | None:
    return None if e is None else round(e["t1"] - e["t0"], 3)


def losses(events: list[dict[str, Any]], upto: int = 8) -> dict[int, list[float | None]]:
    """Step -> [loss, grad_norm] of the first `upto` logged steps (to compare the two stacks' numerics)."""
    out: dict[int, list[float | None]] = {}
    for e in events:
        if e.get("event") == "log" and "loss" in e and int(e.get("step", 0)) <= upto:
            out.setdefault(int(e["step"]), [e.get("loss"), e.get("grad_norm")])
    return out


def log_times(child: Child) -> dict[int, float]:
    out: dict[int, float] = {}
    for e in child.of("log"):
        if "loss" in e and "step" in e:
            out.setdefault(int(e["step"]), e["_t"])
    return out


def mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def rnd(x: float | None, n: int = 3) -> float | None:
    return None if x is None else round(x, n)


def peak_mem(child: Child) -> dict[str, Any]:
    start, end = child.first("hf_train_start"), child.first("hf_train_end")
    saves = [e.get("mem") or {} for e in child.bench("save_checkpoint")]
    load = (start or {}).get("mem") or {}
    train_mems = [m for m in [(end or {}).get("mem") or {}, *saves] if m]
    if not load and not train_mems:
        return {}
    train_alloc = max((m.get("max_alloc_gib", 0) for m in train_mems), default=None)
    train_res = max((m.get("max_reserved_gib", 0) for m in train_mems), default=None)
    return {
        "load_peak_alloc_gib": rnd(load.get("max_alloc_gib")),
        "load_peak_reserved_gib": rnd(load.get("max_reserved_gib")),
        "after_load_alloc_gib": rnd(load.get("alloc_gib")),
        "train_peak_alloc_gib": rnd(train_alloc),
        "train_peak_reserved_gib": rnd(train_res),
        "process_peak_alloc_gib": rnd(max(load.get("max_alloc_gib", 0), train_alloc or 0)),
        "process_peak_reserved_gib": rnd(max(load.get("max_reserved_gib", 0), train_res or 0)),
        "complete": end is not None,
    }


def throughput(
    plan: Plan, intervals: dict[int, float], steps: list[int], fl: dict[str, float], peak_tflops: float | None
) -> dict[str, Any]:
    xs = [intervals[s] for s in steps if s in intervals]
    if not xs:
        return {}
    med, avg = median(xs), mean(xs)
    tps = plan.tokens_per_step / med
    out = {
        "steps_timed": len(xs),
        "s_per_step_median": rnd(med),
        "s_per_step_mean": rnd(avg),
        "s_per_step_min": rnd(min(xs)),
        "s_per_step_max": rnd(max(xs)),
        "tokens_per_step": plan.tokens_per_step,
        "tokens_per_s": round(tps, 1),
    }
    for key, peak in (("measured", peak_tflops), ("datasheet", H200_DENSE_BF16_TFLOPS)):
        if peak:
            out[f"mfu_lora_{key}"] = rnd(fl["useful"] * tps / (peak * 1e12), 4)
            out[f"hfu_recompute_{key}"] = rnd(fl["hardware"] * tps / (peak * 1e12), 4)
            out[f"mfu_6n_{key}"] = rnd(fl["six_n"] * tps / (peak * 1e12), 4)
    out["achieved_tflops_lora"] = rnd(fl["useful"] * tps / 1e12, 1)
    return out


def analyze_unsloth(ctx: Ctx, plan: Plan, child: Child, rc: int | None, fl: dict[str, float]) -> dict[str, Any]:
    t = log_times(child)
    steps = sorted(t)
    intervals = {s: t[s] - t[s - 1] for s in steps if s - 1 in t}
    S, C = plan.save_steps, plan.cycles
    saves = {e.get("step"): e for e in child.bench("save_checkpoint")}
    uploads = {e.get("step"): e for e in child.bench("upload_checkpoint")}
    durable = {e["step"]: e["_t"] for e in child.of("checkpoint_durable")}
    submits = {e.get("step"): e for e in child.bench("upload_submitted")}
    cycles = []
    for k in range(2, C + 2):
        cyc_steps = list(range(k * S + 1, (k + 1) * S + 1))
        if not all(s in intervals for s in cyc_steps):
            break  # stopped early (the time guard): the compared cycles are the complete ABBA blocks before it
        ckpt = k * S
        up = uploads.get(ckpt)
        cycles.append(
            {
                "after_checkpoint": ckpt,
                "uploads": plan.uploaded(ckpt),
                "seconds": rnd(sum(intervals[s] for s in cyc_steps)),
                "seconds_without_save_interval": rnd(sum(intervals[s] for s in cyc_steps[1:])),
                "save_seconds": dur(saves.get(ckpt)),
                "submit_seconds": dur(submits.get(ckpt)),
                "step_seconds": [rnd(intervals[s]) for s in cyc_steps],
                "upload_seconds": dur(up),
                "upload_bytes": (up or {}).get("bytes"),
                "upload_done_within_cycle": (up is not None and up["t1"] <= t.get((k + 1) * S, 0)) if up else None,
            }
        )
    if len(cycles) < C:
        cycles = cycles[: len(cycles) // 4 * 4]
    on = [c for c in cycles if c["uploads"]]
    off = [c for c in cycles if not c["uploads"]]
    res: dict[str, Any] = {
        "exit_code": rc,
        "signals": [(n, rel(child, s)) for n, s in child.signals],
        "steps_logged": len(steps),
        "last_step": steps[-1] if steps else None,
        "step_seconds": {s: rnd(v) for s, v in sorted(intervals.items())},
        "losses": losses(child.events),
        "gpu": gpu_during(ctx, t.get(S + 1), t.get((C + 2) * S)),
    }
    tok = [e.get("num_tokens") for e in child.of("log") if e.get("num_tokens") is not None]
    if len(tok) >= 2:
        res["num_tokens_per_step_logged"] = rnd((tok[-1] - tok[0]) / (len(tok) - 1), 1)
    if on and off and len(on) == len(off):
        a, b = mean([c["seconds"] for c in on]), mean([c["seconds"] for c in off])
        a2, b2 = (
            mean([c["seconds_without_save_interval"] for c in on]),
            mean([c["seconds_without_save_interval"] for c in off]),
        )
        # each ABBA block (off, on, on, off) is one estimate with a linear drift cancelled
        blocks = [
            100
            * (
                (cycles[i + 1]["seconds"] + cycles[i + 2]["seconds"])
                / (cycles[i]["seconds"] + cycles[i + 3]["seconds"])
                - 1
            )
            for i in range(0, len(cycles) - 3, 4)
        ]
        se = statistics.stdev(blocks) / math.sqrt(len(blocks)) if len(blocks) >= 2 else None
        # the same in seconds per uploaded checkpoint (what the upload adds, whatever the cycle length)
        extra = [
            (cycles[i + 1]["seconds"] + cycles[i + 2]["seconds"] - cycles[i]["seconds"] - cycles[i + 3]["seconds"]) / 2
            for i in range(0, len(cycles) - 3, 4)
        ]
        res["upload_slowdown"] = {
            "cycles": cycles,
            "cycle_steps": S,
            "mean_cycle_on_s": rnd(a),
            "mean_cycle_off_s": rnd(b),
            "slowdown_pct": rnd(100 * (a / b - 1), 2),
            "slowdown_pct_excluding_save_interval": rnd(100 * (a2 / b2 - 1), 2),
            "abba_blocks_pct": [rnd(x, 2) for x in blocks],
            "abba_mean_pct": rnd(mean(blocks), 2) if blocks else None,
            "abba_standard_error_pct": rnd(se, 2),
            "abba_median_pct": rnd(statistics.median(blocks), 2) if blocks else None,
            "abba_blocks": len(blocks),
            "extra_seconds_per_uploaded_checkpoint": rnd(mean(extra)) if extra else None,
            "extra_seconds_standard_error": rnd(statistics.stdev(extra) / math.sqrt(len(extra)))
            if len(extra) >= 2
            else None,
            "method": "one process; after each checkpoint, the next save_steps steps are timed; checkpoints "
            "alternate (ABBA) uploaded by the BackgroundUploader / not submitted at all; all save locally",
        }
    else:
        res["upload_slowdown"] = {"cycles": cycles, "incomplete": True}
    # training speed: intervals of steps after the warm-up that contain no save, in cycles without uploads
    in_cycles = [s for s in intervals if plan.compared((s - 1) // S) and (s - 1) % S != 0]
    clean = [s for s in in_cycles if not plan.uploaded(((s - 1) // S) * S)]
    all_clean = in_cycles
    res["throughput"] = throughput(plan, intervals, clean, fl, ctx.results["meta"].get("matmul_tflops"))
    res["throughput_all_nonsave_steps"] = throughput(
        plan, intervals, all_clean, fl, ctx.results["meta"].get("matmul_tflops")
    )
    res["memory"] = peak_mem(child)
    regular = [dur(e) for s, e in saves.items() if s is not None and s % S == 0]
    res["save_seconds"] = {
        "mean": rnd(mean([x for x in regular if x is not None])),
        "each": {s: dur(e) for s, e in saves.items()},
    }
    res["uploads"] = {
        s: {
            "seconds": dur(e),
            "bytes": e.get("bytes"),
            "durable_after_save_s": rnd(durable[s] - saves[s]["t1"]) if s in durable and s in saves else None,
        }
        for s, e in uploads.items()
    }
    first_up = next(iter(uploads.values()), None)
    if first_up:
        res["checkpoint_mb"] = rnd(first_up.get("bytes", 0) / MiB, 1)
        res["upload_mb_per_s"] = rnd(first_up.get("bytes", 0) / MiB / max(1e-6, first_up["t1"] - first_up["t0"]), 1)
    # SIGTERM
    term = next(((n, s) for n, s in child.signals if n == "SIGTERM"), None)
    pre = child.of("preempted")
    if term:
        sig_t = term[1]
        after = sorted(s for s, ts in t.items() if ts > sig_t)
        ckpt_step = pre[0].get("durable_step") if pre else None
        res["sigterm"] = {
            "sent_after_step": max((s for s, ts in t.items() if ts <= sig_t), default=None),
            "stopped_at_step": pre[0].get("step") if pre else None,
            "durable_step": ckpt_step,
            "trainer_reported_s": pre[0].get("seconds") if pre else None,
            "signal_to_durable_s": rnd(pre[0]["_t"] - sig_t) if pre else None,
            "finish_step_s": rnd(t[after[0]] - sig_t) if after else None,
            "save_s": dur(saves.get(ckpt_step)) if ckpt_step else None,
            "upload_s": dur(uploads.get(ckpt_step)) if ckpt_step else None,
            "signal_to_exit_s": rnd(child.t_end - sig_t) if child.t_end else None,
        }
    res["startup"] = startup_split(child)
    res["first_step_s"] = rel(child, t[steps[0]]) if steps else None
    return res


def startup_split(child: Child) -> dict[str, Any]:
    """Process start -> first optimizer step, from the wrapper's timestamps (see module docstring)."""
    b = child.first
    t = log_times(child)
    if not t:
        return {}
    first_log = t[min(t)]
    cs_ = child.first("child_start")
    pi = child.first("pipeline_imported")
    listing = b("complete_checkpoints")
    fetch_dir = b("fetch_dir")
    gate = b("gate_open")
    load = b("load_model")
    train_start = b("hf_train_start")
    start_ev = (child.of("start") or [None])[0]
    ready_ev = (child.of("model_ready") or [None])[0]
    gb = child.bench("get_batch_samples")
    skip = b("skip_first_batches")
    restore = [b("load_from_checkpoint"), b("load_optimizer_and_scheduler"), b("load_rng_state")]
    t0 = child.t_spawn
    phases: dict[str, float | None] = {}
    imports = b("imports")
    # The gate holds the download thread while the imports run: only its part past the imports delays.
    gate_wait = max(0.0, gate["t1"] - imports["t1"]) if gate and imports else 0.0
    if cs_ and pi and listing and imports and load and train_start:
        phases["python_start"] = cs_["_t"] - t0
        phases["imports_light"] = pi["_t"] - cs_["_t"]
        phases["s3_listing"] = listing["t1"] - listing["t0"]  # and the adapter manifest, fromCheckpoint
        # The downloads (inputs, the likely checkpoint) run on a thread beside the imports: only what
        # they take past the imports is start-up time.
        phases["imports_unsloth_trl"] = imports["t1"] - imports["t0"]
        ahead = [e for e in (fetch_dir, b("fetch_checkpoint")) if e]
        after = imports["t1"] + gate_wait
        phases["downloads_past_imports"] = max([0.0] + [e["t1"] - after for e in ahead])
        phases["dataset_and_fingerprint"] = dur(b("prepare")) or 0.0
        phases["checkpoint_download_verify"] = dur(b("fetch_candidate")) or 0.0
        phases["model_load"] = load["t1"] - load["t0"]
        phases["trainer_setup_tokenize"] = train_start["t"] - load["t1"]  # LoRA hash, SFTTrainer (tokenizes)
        phases["state_restore"] = sum(dur(e) or 0.0 for e in restore if e)
        first_batch = gb[0] if gb else None
        phases["data_positioning"] = (dur(skip) or 0.0) + (dur(first_batch) or 0.0)
        if first_batch is not None:
            # train() -> first batch fetch, less the timed parts: dataloader, optimizer, Unsloth's gc/banner
            phases["loop_setup"] = first_batch["t0"] - train_start["t"] - phases["state_restore"] - (dur(skip) or 0.0)
            phases["first_step"] = first_log - first_batch["t1"]  # batch in hand -> the step's log event
        covered = sum(v for v in phases.values() if v is not None)
        phases["other"] = first_log - t0 - gate_wait - covered  # gaps no wrapper covers
        phases = {k: rnd(v) for k, v in phases.items()}
    steady_gb = [dur(e) for e in gb[1:]]
    return {
        "total_s": rnd(first_log - t0 - gate_wait),
        "gate_wait_s": rnd(gate_wait),
        "phases_s": phases,
        "resume_step": (start_ev or {}).get("step"),
        "mode": (start_ev or {}).get("mode"),
        "skipped_batches": (skip or {}).get("batches"),
        "skip_first_batches_s": dur(skip),
        "first_get_batch_samples_s": dur(gb[0]) if gb else None,
        "steady_get_batch_samples_s": rnd(median([x for x in steady_gb if x is not None])) if steady_gb else None,
        # The trainer's own start-up phases (its `startup` events: seconds since its process started).
        "trainer_startup_s": {e["phase"]: e["seconds"] for e in child.of("startup")},
        "trainer_events_view_s": {  # what the trainer's own JSON events show without instrumentation
            "start_event": rel(child, start_ev["_t"]) if start_ev else None,
            "start_prepare_seconds": (start_ev or {}).get("prepare_seconds"),
            "model_ready_event": rel(child, ready_ev["_t"]) if ready_ev else None,
            "first_log_event": rel(child, first_log),
        },
    }


def analyze_baseline(ctx: Ctx, plan: Plan, child: Child, rc: int | None, fl: dict[str, float]) -> dict[str, Any]:
    t = log_times(child)
    intervals = {s: t[s] - t[s - 1] for s in t if s - 1 in t}
    timed_steps = [s for s in intervals if s > plan.bl_warmup]
    ready = child.first("trainer_ready") or {}
    res = {
        "step_seconds": {s: rnd(v) for s, v in sorted(intervals.items())},
        "losses": losses(child.events),
        "gpu": gpu_during(ctx, t.get(plan.bl_warmup), t[max(t)] if t else None),
        "exit_code": rc,
        "steps_logged": len(t),
        "trainer": ready.get("trainer"),
        "trainable_params": ready.get("trainable"),
        "load_s": dur(child.first("model_loaded")),
        "trainer_setup_s": dur(child.first("trainer_ready")),
        "throughput": throughput(plan, intervals, timed_steps, fl, ctx.results["meta"].get("matmul_tflops")),
        "memory": peak_mem(child),
    }
    tok = [e.get("num_tokens") for e in child.of("log") if e.get("num_tokens") is not None]
    if len(tok) >= 2:
        res["num_tokens_per_step_logged"] = rnd((tok[-1] - tok[0]) / (len(tok) - 1), 1)
    return res


# ------------------------------------------------------------------------------------ orchestration


def _build_child(ctx, size, base_root, data, plan, *, matmul: bool, var_data=None) -> Child:
    """The child that builds the base model and tokenized data (and measures the matmul rate)."""
    return Child(
        f"{size}-build",
        py(
            "--child",
            "build",
            "--size",
            size,
            "--out",
            str(base_root),
            "--data",
            str(data),
            "--seq",
            str(plan.seq),
            "--rows",
            str(plan.rows),
            "--tokenizer-vocab",
            str(plan.tokenizer_vocab),
            *(["--var-data", str(var_data)] if var_data is not None else []),
            *(["--q4"] if plan.q4 else []),
            *(["--matmul"] if matmul else []),
        ),
        ctx,
        env={"PYTHONPATH": os.pathsep.join([str(ROOT / "trainer_image"), os.environ.get("PYTHONPATH", "")])},
    )


def run_size(ctx: Ctx, plan: Plan) -> None:
    size = plan.size
    res: dict[str, Any] = ctx.results["sizes"].setdefault(size, {"plan": asdict(plan)})
    res["plan"]["sigterm_step"] = plan.sigterm_step
    sdir = ctx.work / size
    sdir.mkdir(parents=True, exist_ok=True)
    gate_build, gate_u1 = str(sdir / "build.done"), str(sdir / "unsloth.done")
    data = sdir / "train.jsonl"
    base_root = sdir / "base"
    base = base_root / ("bnb4" if plan.q4 else "model")
    want = set(plan.phases)
    if ctx.left() < plan.est.get("build", 60):
        ctx.skip(size, "all", f"{ctx.left():.0f} s left, build alone needs ~{plan.est.get('build')} s")
        return
    first_matmul = "matmul_tflops" not in ctx.results["meta"] and ctx.ns.mode != "cpu-smoke"
    build = _build_child(ctx, size, base_root, data, plan, matmul=first_matmul)
    vocab = SHAPES[size]["vocab"]
    u1 = bl = None
    skip_steps = ",".join(
        str(k * plan.save_steps)
        for k in range(1, plan.max_steps // plan.save_steps + 1)
        if not plan.uploaded(k * plan.save_steps)
    )
    u1_deadline = [math.inf]

    def u1_policy(child: Child, event: dict[str, Any]) -> None:
        if event["event"] != "log" or "loss" not in event:
            return
        step = int(event.get("step", 0))
        signalled = any(n == "SIGTERM" for n, _ in child.signals)
        if not signalled and (step >= plan.sigterm_step or time.monotonic() > u1_deadline[0]):
            ctx.log(f"{size}: SIGTERM to the trainer after step {step}")
            child.signal(signal.SIGTERM)

    if "unsloth" in want:  # pre-spawned: imports overlap the build, then it waits for the model
        cfg = job(ctx, plan, base, data, "unsloth", prefix=f"{size}-unsloth")
        u1 = trainer_child(ctx, plan, "unsloth", cfg, gate=gate_build, skip_upload=skip_steps, on_event=u1_policy)
    if "baseline" in want:
        bl = Child(
            f"{size}-baseline",
            py(
                "--child",
                "baseline",
                "--base",
                str(base),
                "--data",
                str(data),
                "--seq",
                str(plan.seq),
                "--steps",
                str(plan.bl_warmup + plan.bl_steps + 1),
                "--batch",
                str(plan.batch),
                "--grad-accum",
                str(plan.grad_accum),
                "--work",
                str(sdir / "baseline"),
                "--gate",
                gate_u1,
                *(["--q4"] if plan.q4 else []),
            ),
            ctx,
            env=trainer_env(ctx, 1),
        )

    def abort(child: Child | None, gate: str) -> None:
        if child is not None and child.proc.poll() is None:
            Path(gate + ".abort").touch()
            child.wait(20)

    rc = build.wait(max(10.0, ctx.left() - 5))
    built = build.first("built")
    mm = build.first("matmul")
    if mm:
        ctx.results["meta"]["matmul_tflops"] = mm["tflops"]
        ctx.results["meta"]["matmul"] = {k: v for k, v in mm.items() if k not in ("event", "name", "_t")}
    res["build"] = {
        "exit_code": rc,
        "seconds": rnd(build.t_end - build.t_spawn if build.t_end else None, 1),
        **{k: dur(build.first(k)) for k in ("data", "init", "save_full")},
        "quantize_load_s": rnd(build.first("quantize")["t1"] - build.first("quantize")["t0"])
        if build.first("quantize")
        else None,
        "quantized_save_s": rnd(build.first("quantize")["t2"] - build.first("quantize")["t1"])
        if build.first("quantize")
        else None,
        "full_bytes": (build.first("save_full") or {}).get("bytes"),
        "quantized_bytes": (build.first("quantize") or {}).get("bytes"),
        "params": (build.first("init") or {}).get("params"),
        "vocab": (build.first("init") or {}).get("vocab"),
        "tokenizer_vocab": (build.first("data") or {}).get("tokenizer_vocab"),
        "min_row_tokens": (build.first("data") or {}).get("min_tokens"),
    }
    vocab = res["build"]["vocab"] or vocab or 0
    fl = flops_per_token(size, vocab, plan.seq)
    res["flops_per_token"] = {k: fl[k] for k in ("useful", "hardware", "six_n", "n_matmul", "n_lora", "n_params")}
    ctx.log(f"{size}: build rc={rc} {res['build']}")
    ctx.save()
    if rc != 0 or built is None:
        ctx.error(size, "build", build, f"build failed (rc={rc})")
        abort(u1, gate_build)
        abort(bl, gate_u1)
        return

    # 1. the trainer (Unsloth path): throughput, memory, saves, upload A/B, SIGTERM
    if u1 is not None:
        if ctx.left() < plan.est.get("unsloth", 120):
            ctx.skip(size, "unsloth", f"{ctx.left():.0f} s left, needs ~{plan.est.get('unsloth')} s")
            abort(u1, gate_build)
            u1 = None
        else:
            u1_deadline[0] = ctx.deadline - 45 - (plan.est.get("baseline", 0) if bl is not None else 0)
            Path(gate_build).touch()
            rc = u1.wait(ctx.left() - 5)
            res["unsloth"] = analyze_unsloth(ctx, plan, u1, rc, fl)
            ctx.log(f"{size}: unsloth rc={rc} throughput={res['unsloth'].get('throughput')}")
            ctx.save()
            if rc not in (0, 75):
                ctx.error(size, "unsloth", u1, f"trainer exit code {rc}")
            sig = res["unsloth"].get("sigterm") or {}
            if sig and sig.get("durable_step") != sig.get("stopped_at_step"):
                ctx.error(
                    size,
                    "unsloth",
                    u1,
                    f"SIGTERM: stopped at step {sig.get('stopped_at_step')} but "
                    f"checkpoint-{sig.get('durable_step')} is the newest durable one",
                )
    else:
        Path(gate_build).touch()

    # 2. the baseline
    if bl is not None:
        if ctx.left() < plan.est.get("baseline", 90):
            ctx.skip(size, "baseline", f"{ctx.left():.0f} s left, needs ~{plan.est.get('baseline')} s")
            abort(bl, gate_u1)
        else:
            Path(gate_u1).touch()
            rc = bl.wait(ctx.left() - 5)
            res["baseline"] = analyze_baseline(ctx, plan, bl, rc, fl)
            ctx.log(f"{size}: baseline rc={rc} throughput={res['baseline'].get('throughput')}")
            ctx.save()
            if rc != 0:
                ctx.error(size, "baseline", bl, f"baseline exit code {rc}")

    # 3. resume start-up from an early and a late checkpoint (each a fresh process, nothing overlapping)
    u1_res = res.get("unsloth") or {}
    late_step = (u1_res.get("sigterm") or {}).get("durable_step")
    early_step = plan.save_steps
    for phase, step in (("resume_early", early_step), ("resume_late", late_step)):
        if phase not in want:
            continue
        if u1 is None or step is None:
            ctx.skip(size, phase, "no checkpoint from the trainer run")
            continue
        if ctx.left() < plan.est.get(phase, 90):
            ctx.skip(size, phase, f"{ctx.left():.0f} s left, needs ~{plan.est.get(phase)} s")
            continue
        if phase == "resume_early":  # another job prefix, started from the early checkpoint explicitly
            cfg = job(
                ctx,
                plan,
                base,
                data,
                phase,
                prefix=f"{size}-early",
                from_checkpoint=f"s3://{BUCKET}/{size}-unsloth/checkpoints/checkpoint-{step}/",
            )
            attempt = 1
        else:  # the preempted job relaunched: newest complete checkpoint, a fresh work dir (new pod)
            cfg = job(ctx, plan, base, data, phase, prefix=f"{size}-unsloth")
            attempt = 2

        def kill_after_first_step(child: Child, event: dict[str, Any]) -> None:
            if event["event"] == "log" and "loss" in event and not child.signals:
                child.signal(signal.SIGKILL)

        child = trainer_child(
            ctx, plan, phase, cfg, attempt=attempt, on_event=kill_after_first_step, cold=plan.cold_caches
        )
        rc = child.wait(ctx.left() - 5)
        split = startup_split(child)
        split["exit_code"] = rc
        split["expected_step"] = step
        split["cold_caches"] = plan.cold_caches
        res[phase] = split
        ctx.log(f"{size}: {phase} rc={rc} total={split.get('total_s')} phases={split.get('phases_s')}")
        if split.get("resume_step") != step or split.get("mode") != "exact":
            ctx.error(
                size,
                phase,
                child,
                f"expected an exact resume from step {step}, got {split.get('mode')} at {split.get('resume_step')}",
            )
        ctx.save()


def pack_logs(ctx: Ctx) -> None:
    path = ctx.out / "gpu_bench-logs.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for log in ctx.logs + [ctx.work / "moto.log"]:
            if log.is_file():
                data = log.read_bytes()[-400_000:]
                info = tarfile.TarInfo(log.name)
                info.size = len(data)
                import io

                tar.addfile(info, io.BytesIO(data))
    (ctx.out / "gpu_bench-console.txt").write_text("\n".join(ctx.lines) + "\n")


def orchestrate(ns: argparse.Namespace) -> int:
    ctx = Ctx(ns)
    ctx.results["meta"] = meta(ctx)
    ctx.save()
    if ns.mode != "cpu-smoke":
        ctx.gpu = GpuMonitor()
    moto = start_moto(ctx)
    try:
        selected = plans(ns.mode)
        if ns.upload_ab is not None:
            selected = [upload_ab_plan(p, ns.upload_ab) for p in selected]
        if ns.sizes:
            keep = ns.sizes.split(",")
            selected = [p for p in selected if p.size in keep]
        for plan in selected:
            run_size(ctx, plan)
    except BaseException as exc:
        ctx.error("-", "orchestrate", None, repr(exc))
        raise
    finally:
        moto.terminate()
        if ctx.gpu is not None:
            ctx.gpu.stop.set()
            ctx.results["meta"]["gpu_samples"] = len(ctx.gpu.samples)
        ctx.save()
        pack_logs(ctx)
    print(render_table(ctx.results))
    return 0 if not ctx.results["errors"] else 1


# ------------------------------------------------------------------------- speed (issue 16)


@dataclass(frozen=True)
class Variant:
    """One process of the speed comparison: the trainer in a gradient-checkpointing mode, or the baseline."""

    name: str
    kind: str = "trainer"  # "trainer" (loraresume-train) or "baseline" (transformers + peft + bitsandbytes)
    gc: str = "auto"  # trainer: the job's gradientCheckpointing; baseline: "true" / "false"
    padding_free: bool | None = None  # SFTConfig padding_free; None: the trainer's default (Unsloth's choice)
    rows: str = "full"  # "full" (every row truncated to seq) or "var" (variable-length rows)


SPEED_SETS: dict[str, tuple[Variant, ...]] = {
    # padding_free None: the trainer's default (training_args.DEFAULTS, off since issue 16's runs)
    "full": (
        Variant("baseline-gc", "baseline", "true"),
        Variant("auto"),
        Variant("unsloth", gc="unsloth"),
        Variant("baseline-nogc", "baseline", "false"),
        Variant("true", gc="true"),
        Variant("auto-pf-on", padding_free=True),
        Variant("unsloth-pf-on", gc="unsloth", padding_free=True),
    ),
    "var": (
        Variant("var-baseline-gc", "baseline", "true", rows="var"),
        Variant("var-auto", rows="var"),
        Variant("var-auto-pf-on", padding_free=True, rows="var"),
        Variant("var-unsloth", gc="unsloth", rows="var"),
        Variant("var-unsloth-pf-on", gc="unsloth", padding_free=True, rows="var"),
    ),
}


@dataclass
class SpeedPlan:
    size: str
    seq: int = 2048
    batch: int = 2
    grad_accum: int = 4
    warmup: int = 4  # steps not timed (the first compiles; variable rows can recompile)
    timed: int = 10
    bl_warmup: int = 2
    bl_timed: int = 6
    q4: bool = True
    tokenizer_vocab: int = 8000
    est: dict[str, float] = field(default_factory=dict)  # seconds a process needs: build, trainer, baseline

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.grad_accum * self.seq

    @property
    def rows(self) -> int:
        return (max(self.warmup + self.timed, self.bl_warmup + self.bl_timed) + 4) * self.batch * self.grad_accum


def speed_plan(mode: str) -> SpeedPlan:
    if mode == "cpu-smoke":
        return SpeedPlan(
            "tiny",
            seq=128,
            warmup=1,
            timed=2,
            bl_warmup=1,
            bl_timed=2,
            q4=False,
            tokenizer_vocab=600,
            est=dict(build=30, trainer=60, baseline=40),
        )
    return SpeedPlan("8b", est=dict(build=100, trainer=60, baseline=50))


def speed_job(ctx: Ctx, plan: SpeedPlan, base: Path, data: Path, v: Variant) -> Path:
    import yaml

    training: dict[str, Any] = {
        "per_device_train_batch_size": plan.batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "warmup_steps": 5,
        "max_steps": plan.warmup + plan.timed + 50,  # killed after the timed steps; no checkpoint in them
        "learning_rate": 2e-4,
        "optim": "adamw_8bit",
        "logging_steps": 1,
        "save_steps": 10_000,
        "seed": 3407,
    }
    if v.padding_free is not None:
        training["padding_free"] = v.padding_free
    cfg: dict[str, Any] = {
        "name": f"speed-{plan.size}-{v.name}",
        "baseModel": str(base),
        "maxSeqLength": plan.seq,
        "loadIn4bit": plan.q4,
        "dtype": "auto",
        "gradientCheckpointing": v.gc,
        "dataset": {"source": str(data), "template": "alpaca"},
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0},
        "training": training,
        "storage": {"uri": f"s3://{BUCKET}/speed-{v.name}/", "endpoint": ctx.endpoint, "keepCheckpoints": 100},
        "workDir": str(ctx.work / plan.size / v.name / "work"),
        "terminationLog": str(ctx.work / plan.size / v.name / "termination-log"),
    }
    path = ctx.work / plan.size / v.name / "job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def spawn_variant(ctx: Ctx, plan: SpeedPlan, v: Variant, base: Path, data: Path, gate: str) -> Child:
    last = (plan.warmup + plan.timed) if v.kind == "trainer" else (plan.bl_warmup + plan.bl_timed)

    def kill_after_last(child: Child, event: dict[str, Any]) -> None:
        if event["event"] == "log" and "loss" in event and int(event.get("step", 0)) >= last and not child.signals:
            child.signal(signal.SIGKILL)  # the steps are measured; nothing after them is

    env = {**trainer_env(ctx, 1), STEP_EVENTS_ENV: "1"}
    if v.kind == "trainer":
        cfg = speed_job(ctx, plan, base, data, v)
        argv = py("--child", "trainer", "--config", str(cfg), "--termination-log", str(cfg.parent / "termination-log"))
        argv += ["--gate", gate]
        return Child(f"{plan.size}-{v.name}", argv, ctx, on_event=kill_after_last, env=env)
    argv = py(
        "--child",
        "baseline",
        "--base",
        str(base),
        "--data",
        str(data),
        "--seq",
        str(plan.seq),
        "--steps",
        str(last + 1),
        "--batch",
        str(plan.batch),
        "--grad-accum",
        str(plan.grad_accum),
        "--work",
        str(ctx.work / plan.size / v.name),
        "--gate",
        gate,
        *(["--q4"] if plan.q4 else []),
        *(["--no-gc"] if v.gc == "false" else []),
    )
    return Child(f"{plan.size}-{v.name}", argv, ctx, on_event=kill_after_last, env=env)


def analyze_variant(ctx: Ctx, plan: SpeedPlan, v: Variant, child: Child, rc: int | None, fl: dict[str, Any]) -> dict:
    t = log_times(child)
    warm = plan.warmup if v.kind == "trainer" else plan.bl_warmup
    intervals = {s: t[s] - t[s - 1] for s in t if s - 1 in t}
    timed_steps = sorted(s for s in intervals if s > warm)
    tok_events = [e for e in child.bench("step_tokens") if "tokens" in e]
    tokens = {i + 1: e for i, e in enumerate(tok_events)}  # the n-th call fetches step n's batches
    res: dict[str, Any] = {
        "variant": asdict(v),
        "exit_code": rc,
        "killed_after_timed_steps": any(n == "SIGKILL" for n, _ in child.signals),
        "steps_logged": len(t),
        "step_seconds": {s: rnd(x) for s, x in sorted(intervals.items())},
        "losses": losses(child.events),
        "gpu": gpu_during(ctx, t.get(warm), t[max(t)] if t else None),
        "settings": {
            k: x for k, x in (child.first("train_settings") or {}).items() if k not in ("event", "name", "_t")
        },
    }
    gc_event = (child.of("gradient_checkpointing") or [None])[0]
    if gc_event:
        res["gradient_checkpointing"] = {k: x for k, x in gc_event.items() if k not in ("event", "_t", "time")}
    if timed_steps and all(s in tokens for s in timed_steps):
        secs = sum(intervals[s] for s in timed_steps)
        toks = sum(tokens[s]["tokens"] for s in timed_steps)
        tps = toks / secs
        peak = ctx.results["meta"].get("matmul_tflops")
        res["throughput"] = {
            "steps_timed": len(timed_steps),
            "seconds": rnd(secs),
            "tokens": toks,
            "positions": sum(tokens[s]["positions"] for s in timed_steps),
            "label_tokens": sum(tokens[s]["label_tokens"] for s in timed_steps),
            "tokens_per_step_mean": rnd(toks / len(timed_steps), 1),
            "s_per_step_median": rnd(median([intervals[s] for s in timed_steps])),
            "s_per_step_min": rnd(min(intervals[s] for s in timed_steps)),
            "s_per_step_max": rnd(max(intervals[s] for s in timed_steps)),
            "tokens_per_s": round(tps, 1),
            "achieved_tflops_lora": rnd(fl["useful"] * tps / 1e12, 1),
            "mfu_lora_measured": rnd(fl["useful"] * tps / (peak * 1e12), 4) if peak else None,
            "mfu_lora_datasheet": rnd(fl["useful"] * tps / (H200_DENSE_BF16_TFLOPS * 1e12), 4),
        }
    elif timed_steps:
        res["throughput"] = {"error": f"token counts for {len(tokens)} steps, timed steps {timed_steps}"}
    mems = [e.get("mem") or {} for e in child.bench("step_mem")]
    start = child.first("hf_train_start") or {}
    load = start.get("mem") or {}
    if mems and mems[-1]:
        res["memory"] = {
            "after_load_alloc_gib": rnd(load.get("alloc_gib")),
            "load_peak_alloc_gib": rnd(load.get("max_alloc_gib")),
            "train_peak_alloc_gib": rnd(max(m.get("max_alloc_gib", 0) for m in mems)),
            "train_peak_reserved_gib": rnd(max(m.get("max_reserved_gib", 0) for m in mems)),
            "steps_seen": len(mems),
        }
    first_log = t[min(t)] if t else None
    if v.kind == "trainer":
        split = startup_split(child)
        res["startup"] = {
            "total_s": split.get("total_s"),
            "first_step_s": get(split, "phases_s", "first_step"),
            "trainer_setup_tokenize_s": get(split, "phases_s", "trainer_setup_tokenize"),
            "loop_setup_s": get(split, "phases_s", "loop_setup"),
            "model_load_s": get(split, "phases_s", "model_load"),
        }
    elif first_log is not None and start.get("t"):
        res["startup"] = {"first_step_s": rnd(first_log - start["t"])}
    return res


def run_speed(ctx: Ctx, plan: SpeedPlan, sets: list[str]) -> None:
    size = plan.size
    res: dict[str, Any] = ctx.results["sizes"].setdefault(size, {"plan": asdict(plan), "variants": {}})
    sdir = ctx.work / size
    sdir.mkdir(parents=True, exist_ok=True)
    base_root = sdir / "base"
    base = base_root / ("bnb4" if plan.q4 else "model")
    data = {"full": sdir / "train.jsonl", "var": sdir / "train-var.jsonl"}
    variants = [v for s in sets for v in SPEED_SETS[s]]
    build = _build_child(
        ctx,
        size,
        base_root,
        data["full"],
        plan,
        matmul=ctx.ns.mode != "cpu-smoke",
        var_data=data["var"] if "var" in sets else None,
    )
    gates = {v.name: str(sdir / f"{v.name}.go") for v in variants}
    # The first process imports while the model is built; each later one while the one before it runs
    # (it waits at its gate before loading the model, so only imports overlap a measured run).
    pending = spawn_variant(ctx, plan, variants[0], base, data[variants[0].rows], gates[variants[0].name])
    rc = build.wait(max(10.0, ctx.left() - 5))
    mm, var_data = build.first("matmul"), build.first("var_data")
    if mm:
        ctx.results["meta"]["matmul_tflops"] = mm["tflops"]
        ctx.results["meta"]["matmul"] = {k: x for k, x in mm.items() if k not in ("event", "name", "_t")}
    res["build"] = {
        "exit_code": rc,
        "seconds": rnd(build.t_end - build.t_spawn if build.t_end else None, 1),
        "params": (build.first("init") or {}).get("params"),
        "vocab": (build.first("init") or {}).get("vocab"),
        "min_row_tokens_full": (build.first("data") or {}).get("min_tokens"),
        "var_rows": {k: x for k, x in (var_data or {}).items() if k not in ("event", "name", "_t")},
    }
    vocab = res["build"]["vocab"] or SHAPES[size]["vocab"] or 0
    fls = {"full": flops_per_token(size, vocab, plan.seq)}
    if var_data:
        fls["var"] = flops_per_token(size, vocab, int(var_data["attention_seq"]))
    res["flops_per_token"] = {
        k: {n: f[n] for n in ("useful", "hardware", "n_matmul", "n_lora")} for k, f in fls.items()
    }
    ctx.log(f"{size}: build rc={rc} {res['build']}")
    ctx.save()
    if rc != 0 or build.first("built") is None:
        ctx.error(size, "build", build, f"build failed (rc={rc})")
        Path(gates[variants[0].name] + ".abort").touch()
        pending.wait(20)
        return
    for i, v in enumerate(variants):
        child = pending
        need = plan.est["trainer" if v.kind == "trainer" else "baseline"]
        if ctx.left() < need:
            ctx.skip(size, v.name, f"{ctx.left():.0f} s left, needs ~{need:.0f} s")
            Path(gates[v.name] + ".abort").touch()
            child.wait(20)
            for rest in variants[i + 1 :]:
                ctx.skip(size, rest.name, "out of time")
            break
        Path(gates[v.name]).touch()
        if i + 1 < len(variants):
            nxt = variants[i + 1]
            pending = spawn_variant(ctx, plan, nxt, base, data[nxt.rows], gates[nxt.name])
        rc = child.wait(ctx.left() - 5)
        r = analyze_variant(ctx, plan, v, child, rc, fls.get(v.rows, fls["full"]))
        res["variants"][v.name] = r
        ctx.log(
            f"{size}/{v.name}: rc={rc} tokens/s={get(r, 'throughput', 'tokens_per_s')} "
            f"peak={get(r, 'memory', 'train_peak_alloc_gib')} GiB gc={get(r, 'gradient_checkpointing', 'mode')}"
        )
        if not r["killed_after_timed_steps"] or not get(r, "throughput", "tokens_per_s"):
            ctx.error(size, v.name, child, f"exit code {rc} before its timed steps were measured")
        ctx.save()


def orchestrate_speed(ns: argparse.Namespace) -> int:
    ctx = Ctx(ns)
    ctx.results["meta"] = {**meta(ctx), "speed_sets": ns.speed.split(",")}
    ctx.save()
    if ns.mode != "cpu-smoke":
        ctx.gpu = GpuMonitor()
    moto = start_moto(ctx)
    try:
        run_speed(ctx, speed_plan(ns.mode), ns.speed.split(","))
    except BaseException as exc:
        ctx.error("-", "orchestrate", None, repr(exc))
        raise
    finally:
        moto.terminate()
        if ctx.gpu is not None:
            ctx.gpu.stop.set()
        ctx.save()
        pack_logs(ctx)
    print("\n".join(speed_table(ctx.results)))
    return 0 if not ctx.results["errors"] else 1


# Issue 16's targets (8B, H200, the seed's settings).
SPEED_TARGETS = {"auto_speedup": 2.5, "auto_mfu_lora": 0.60, "lowest_memory_ratio": 0.6}


def speed_variants(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One run's variants by name (the first size that has them)."""
    for r in results.get("sizes", {}).values():
        if r.get("variants"):
            return r["variants"]
    return {}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _used_mode(x: dict[str, Any]) -> str:
    v = x["variant"]
    return v["gc"] if v["kind"] == "baseline" else (get(x, "gradient_checkpointing", "mode") or "?")


def _padding_free(x: dict[str, Any]) -> Any:
    return get(x, "settings", "args_padding_free")


def _baselines(vs: dict[str, dict[str, Any]], rows: str) -> tuple[dict[str, Any], dict[str, Any]]:
    of = [x for x in vs.values() if x["variant"]["kind"] == "baseline" and x["variant"]["rows"] == rows]
    gc = next((x for x in of if x["variant"]["gc"] == "true"), {})
    nogc = next((x for x in of if x["variant"]["gc"] == "false"), {})
    return gc, nogc


def speed_table(results: dict[str, Any]) -> list[str]:
    """One run, side by side: tokens/s and its ratios to the baseline with and without checkpointing."""
    vs = speed_variants(results)
    lines = [
        "| variant | rows | gradient checkpointing (job → used) | padding_free (as trained) | tokens/s | "
        "× baseline with gc | × baseline without gc | s/step (median) | LoRA-MFU % | "
        "peak allocated GiB (estimate) | × baseline-with-gc peak | first step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, x in vs.items():
        v = x["variant"]
        bgc, bno = _baselines(vs, v["rows"])
        tps = get(x, "throughput", "tokens_per_s")
        peak = get(x, "memory", "train_peak_alloc_gib")
        used = _used_mode(x)
        est = get(x, "gradient_checkpointing", "estimated_peak_gib", used)
        cells = [
            f"{name}{' (baseline)' if v['kind'] == 'baseline' else ''}",
            v["rows"],
            v["gc"] if v["kind"] == "baseline" else f"{v['gc']} → {used}",
            f"{_padding_free(x)}" + (" (job)" if v["padding_free"] is not None else " (default)"),
            fmt(tps, ",.0f"),
            fmt(_ratio(tps, get(bgc, "throughput", "tokens_per_s")), ".2f", "x"),
            fmt(_ratio(tps, get(bno, "throughput", "tokens_per_s")), ".2f", "x"),
            fmt(get(x, "throughput", "s_per_step_median")),
            fmt(pct(get(x, "throughput", "mfu_lora_measured")), ".1f"),
            f"{fmt(peak)} ({fmt(est)})",
            fmt(_ratio(peak, get(bgc, "memory", "train_peak_alloc_gib")), ".3f"),
            fmt(get(x, "startup", "first_step_s"), ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def padding_free_lines(results: dict[str, Any]) -> list[str]:
    """padding_free off against on, per mode and rows (same run): tokens/s and first-step time."""
    vs = speed_variants(results)
    trainers = [x for x in vs.values() if x["variant"]["kind"] == "trainer"]
    out = []
    for off in trainers:
        if _padding_free(off) is not False:
            continue
        on = next(
            (
                x
                for x in trainers
                if _padding_free(x) is True
                and x["variant"]["rows"] == off["variant"]["rows"]
                and x["variant"]["gc"] == off["variant"]["gc"]
            ),
            None,
        )
        if on is None:
            continue
        a, b = get(off, "throughput", "tokens_per_s"), get(on, "throughput", "tokens_per_s")
        ratio = _ratio(a, b)
        change = fmt(pct(ratio - 1) if ratio else None, "+.1f", " %")
        first = [fmt(get(x, "startup", "first_step_s"), ".1f") for x in (off, on)]
        busy = [fmt(get(x, "gpu", "utilization.gpu", "mean"), ".0f") for x in (off, on)]
        peak = [fmt(get(x, "memory", "train_peak_alloc_gib")) for x in (off, on)]
        out.append(
            f"- `{off['variant']['gc']}` → {_used_mode(off)}, {off['variant']['rows']} rows: off "
            f"{fmt(a, ',.0f')} vs on {fmt(b, ',.0f')} tokens/s ({change}); first step {first[0]} vs {first[1]} s; "
            f"GPU busy (nvidia-smi) {busy[0]} vs {busy[1]} %; peak {peak[0]} vs {peak[1]} GiB."
        )
    return out


def speed_targets(results: dict[str, Any]) -> list[str]:
    """Issue 16's targets, judged on one run with full rows."""
    vs = speed_variants(results)
    bgc, _ = _baselines(vs, "full")
    auto = vs.get("auto") or {}
    speed = _ratio(get(auto, "throughput", "tokens_per_s"), get(bgc, "throughput", "tokens_per_s"))
    mfu = get(auto, "throughput", "mfu_lora_measured")
    bpeak = get(bgc, "memory", "train_peak_alloc_gib")
    trainers = [(n, x) for n, x in vs.items() if x["variant"]["kind"] == "trainer" and x["variant"]["rows"] == "full"]
    low_name, low = min(trainers, key=lambda t: get(t[1], "memory", "train_peak_alloc_gib") or math.inf)
    low_ratio = _ratio(get(low, "memory", "train_peak_alloc_gib"), bpeak)
    default_low = next(
        ((n, x) for n, x in trainers if x["variant"]["gc"] == "unsloth" and x["variant"]["padding_free"] is None), None
    )

    def verdict(value: float | None, ok: bool | None) -> str:
        return "not measured" if value is None else ("met" if ok else "MISSED")

    lines = [
        f"- `auto` ≥ {SPEED_TARGETS['auto_speedup']}x the baseline's tokens/s (baseline with checkpointing): "
        f"**{verdict(speed, speed is not None and speed >= SPEED_TARGETS['auto_speedup'])}**, "
        f"{fmt(speed, '.2f', 'x')} (`auto` chose `{get(auto, 'gradient_checkpointing', 'mode')}`, padding_free "
        f"{_padding_free(auto)}).",
        f"- `auto` ≥ {SPEED_TARGETS['auto_mfu_lora'] * 100:.0f} % LoRA-MFU of the measured matmul rate: "
        f"**{verdict(mfu, mfu is not None and mfu >= SPEED_TARGETS['auto_mfu_lora'])}**, {fmt(pct(mfu), '.1f', ' %')}.",
        f"- the lowest-memory mode ≤ {SPEED_TARGETS['lowest_memory_ratio']} of the baseline's peak: "
        f"**{verdict(low_ratio, low_ratio is not None and low_ratio <= SPEED_TARGETS['lowest_memory_ratio'])}**, "
        f"{fmt(low_ratio, '.3f')} (`{low_name}`: {fmt(get(low, 'memory', 'train_peak_alloc_gib'))} of "
        f"{fmt(bpeak)} GiB allocated)",
    ]
    if default_low is not None and default_low[1] is not low:
        ratio = _ratio(get(default_low[1], "memory", "train_peak_alloc_gib"), bpeak)
        lines[-1] += (
            f"; with the trainer's default padding_free ({_padding_free(default_low[1])}) "
            f"`{default_low[0]}` is {fmt(ratio, '.3f')}: "
            f"**{verdict(ratio, ratio is not None and ratio <= SPEED_TARGETS['lowest_memory_ratio'])}**"
        )
    lines[-1] += "."
    return lines


def estimate_lines(results: dict[str, Any]) -> list[str]:
    """The decision module's estimate against the measured peak, per mode."""
    out = []
    for name, x in speed_variants(results).items():
        used = _used_mode(x)
        est = get(x, "gradient_checkpointing", "estimated_peak_gib", used)
        peak = get(x, "memory", "train_peak_alloc_gib")
        if x["variant"]["kind"] != "trainer" or est is None or peak is None:
            continue
        out.append(
            f"`{name}` ({used}): {est} estimated, {peak} allocated ({fmt(pct(est / peak - 1), '+.1f', ' %')}), "
            f"{fmt(get(x, 'memory', 'train_peak_reserved_gib'))} reserved"
        )
    return out


def write_speed_report(json_paths: list[Path], md_path: Path) -> str:
    """RESULTS.md's issue 16 section from speed runs, oldest first; targets from the newest full-rows run."""
    runs = []
    for path in json_paths:
        try:
            name = str(path.resolve().relative_to(ROOT))
        except ValueError:
            name = str(path)
        runs.append((name, json.loads(path.read_text())))
    m = runs[-1][1]["meta"]
    v = m.get("versions") or {}
    stack = ", ".join(
        f"{k} {v[k]}" for k in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth") if v.get(k)
    )
    full = [r for r in runs if "full" in r[1]["meta"].get("speed_sets", [])]
    lines = [
        "## GPU speed (issue 16)",
        "",
        f"{len(runs)} runs of `benchmarks/gpu_bench.py --speed` on {m.get('gpu')} ({m.get('cpus')} CPU cores), "
        f"Python {m.get('python')}; {stack}. Measured bf16 matmul rate (the MFU denominator): "
        + ", ".join(f"{r['meta'].get('matmul_tflops')}" for _, r in runs)
        + " TFLOP/s.",
        "",
    ]
    if full:
        name, newest = full[-1]
        lines += [
            f"### Targets (8B shape, seed settings; newest full-rows run, `{name}`)",
            "",
            *speed_targets(newest),
            "",
        ]
    for i, (name, r) in enumerate(runs, 1):
        meta_r = r["meta"]
        lines += [
            f"### Run {i}: `{name}` ({', '.join(meta_r.get('speed_sets', []))} rows, {meta_r.get('started')}, "
            f"{meta_r.get('wall_seconds')} s)",
            "",
            *speed_table(r),
            "",
        ]
        pf = padding_free_lines(r)
        if pf:
            lines += ["padding_free off against on, same run:", "", *pf, ""]
        est = estimate_lines(r)
        if est:
            lines += ["Estimated peak (grad_checkpointing.estimate) against measured: " + "; ".join(est) + ".", ""]
    existing = md_path.read_text() if md_path.exists() else "# Benchmark results\n\n"
    md_path.write_text(replace_section(existing, "## GPU speed (issue 16)", "\n".join(lines)))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- reporting

TARGETS = {
    "speedup": 2.0,  # Unsloth tokens/s over the baseline, 8B
    "memory_ratio": 0.5,  # Unsloth peak memory over the baseline's, 8B
    "upload_slowdown_pct": 2.0,
    "sigterm_s": 15.0,  # 8B, r=16
}


def fmt(x: Any, spec: str = ".2f", suffix: str = "") -> str:
    if x is None:
        return "—"
    if isinstance(x, (int, float)):
        return f"{x:{spec}}{suffix}"
    return str(x)


def get(d: Any, *path: Any) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def rows_for(size: str, r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, target verdict) rows for one size."""
    u, b = r.get("unsloth") or {}, r.get("baseline") or {}
    ut, bt = u.get("throughput") or {}, b.get("throughput") or {}
    um, bm = u.get("memory") or {}, b.get("memory") or {}
    rows: list[tuple[str, str, str]] = []
    speed = ut.get("tokens_per_s") / bt["tokens_per_s"] if ut.get("tokens_per_s") and bt.get("tokens_per_s") else None
    mem_ratio = (
        um["train_peak_alloc_gib"] / bm["train_peak_alloc_gib"]
        if um.get("train_peak_alloc_gib") and bm.get("train_peak_alloc_gib")
        else None
    )
    res_ratio = (
        um["process_peak_reserved_gib"] / bm["process_peak_reserved_gib"]
        if um.get("process_peak_reserved_gib") and bm.get("process_peak_reserved_gib")
        else None
    )
    is8 = size == "8b"

    def verdict(ok: bool | None, target: str) -> str:
        if ok is None:
            return f"{target}: not measured"
        return f"{target}: {'met' if ok else 'MISSED'}"

    rows.append(("trainer (Unsloth) tokens/s", fmt(ut.get("tokens_per_s"), ",.0f"), ""))
    rows.append(("baseline (HF+peft+bnb) tokens/s", fmt(bt.get("tokens_per_s"), ",.0f"), ""))
    rows.append(
        (
            "speed-up",
            fmt(speed, ".2f", "x"),
            verdict(None if speed is None else speed >= TARGETS["speedup"], "≥ 2.0x") if is8 else "",
        )
    )
    rows.append(
        (
            "s/step trainer / baseline (median)",
            f"{fmt(ut.get('s_per_step_median'), '.2f')} / {fmt(bt.get('s_per_step_median'), '.2f')}",
            "",
        )
    )
    rows.append(
        (
            "MFU, LoRA FLOPs (4N+attn), trainer / baseline",
            f"{fmt(pct(ut.get('mfu_lora_measured')))} / {fmt(pct(bt.get('mfu_lora_measured')))}",
            "",
        )
    )
    rows.append(
        (
            "HFU incl. recompute (6N+attn), trainer / baseline",
            f"{fmt(pct(ut.get('hfu_recompute_measured')))} / {fmt(pct(bt.get('hfu_recompute_measured')))}",
            "",
        )
    )
    rows.append(
        (
            "'6N' convention, trainer / baseline",
            f"{fmt(pct(ut.get('mfu_6n_measured')))} / {fmt(pct(bt.get('mfu_6n_measured')))}",
            "",
        )
    )
    ug, bg = get(u, "gpu", "utilization.gpu", "mean"), get(b, "gpu", "utilization.gpu", "mean")
    uc, bc = get(u, "gpu", "clocks.sm", "mean"), get(b, "gpu", "clocks.sm", "mean")
    rows.append(
        (
            "GPU utilization % / SM MHz (nvidia-smi means), trainer / baseline",
            f"{fmt(ug, '.0f')} / {fmt(bg, '.0f')} · {fmt(uc, '.0f')} / {fmt(bc, '.0f')}",
            "",
        )
    )
    ul, bl_ = u.get("losses") or {}, b.get("losses") or {}
    if ul and bl_:
        both = [k for k in ("1", "2", "3") if k in ul and k in bl_]
        rows.append(
            (
                "loss at steps " + ", ".join(both) + ", trainer / baseline",
                "; ".join(f"{fmt(ul[k][0], '.4f')} / {fmt(bl_[k][0], '.4f')}" for k in both),
                "",
            )
        )
    rows.append(
        (
            "peak allocated GiB in training, trainer / baseline",
            f"{fmt(um.get('train_peak_alloc_gib'))} / {fmt(bm.get('train_peak_alloc_gib'))}",
            "",
        )
    )
    rows.append(
        (
            "memory ratio (allocated, training)",
            fmt(mem_ratio, ".2f"),
            verdict(None if mem_ratio is None else mem_ratio <= TARGETS["memory_ratio"], "≤ 0.5") if is8 else "",
        )
    )
    rows.append(
        (
            "peak reserved GiB whole process, trainer / baseline",
            f"{fmt(um.get('process_peak_reserved_gib'))} / {fmt(bm.get('process_peak_reserved_gib'))} "
            f"(ratio {fmt(res_ratio, '.2f')})",
            "",
        )
    )
    save = get(u, "save_seconds", "mean")
    rows.append(("checkpoint save (HF _save_checkpoint), s", fmt(save), ""))
    rows.append(
        (
            "checkpoint size MB / upload s (MB/s)",
            f"{fmt(u.get('checkpoint_mb'), '.0f')} / {fmt(first_upload_s(u))} ({fmt(u.get('upload_mb_per_s'), '.0f')})",
            "",
        )
    )
    slow, lo, hi = slowdown(u)
    shown = fmt(slow, "+.2f", " %") + (f" (95 % CI {lo:+.1f} … {hi:+.1f})" if lo is not None else "")
    rows.append(("training slowdown, uploads on vs off", shown, slowdown_verdict(slow, lo, hi)))
    pos = position_medians(u)
    if pos:
        rows.append(
            (
                "  median step s by position in cycle (1 = with save), on − off",
                " · ".join(f"{i + 1}: {d * 1000:+.0f} ms" for i, d in enumerate(pos["diff"])),
                "",
            )
        )
    sig = u.get("sigterm") or {}
    rows.append(
        (
            "SIGTERM → checkpoint durable, s",
            fmt(sig.get("signal_to_durable_s")),
            verdict(
                None if sig.get("signal_to_durable_s") is None else sig["signal_to_durable_s"] <= TARGETS["sigterm_s"],
                "≤ 15 s",
            )
            if is8
            else "",
        )
    )
    rows.append(
        (
            "  of which: finish step / save / upload, s",
            f"{fmt(sig.get('finish_step_s'))} / {fmt(sig.get('save_s'))} / {fmt(sig.get('upload_s'))}",
            "",
        )
    )
    early, late = r.get("resume_early") or {}, r.get("resume_late") or {}
    if early or late:
        caches = "cold" if early.get("cold_caches") else "warm"
        rows.append(
            (
                "resume start-up → first step, s (early / late checkpoint)",
                f"{fmt(early.get('total_s'), '.1f')} (step {early.get('resume_step')}) / "
                f"{fmt(late.get('total_s'), '.1f')} (step {late.get('resume_step')}), {caches} compile caches",
                "",
            )
        )
        pe, pl_ = early.get("phases_s") or {}, late.get("phases_s") or {}
        for key in (
            "imports_unsloth_trl",
            "model_load",
            "checkpoint_download_verify",
            "state_restore",
            "data_positioning",
            "trainer_setup_tokenize",
            "dataset_and_fingerprint",
            "loop_setup",
            "first_step",
            "other",
        ):
            rows.append(
                (f"  {key.replace('_', ' ')}, s", f"{fmt(pe.get(key), '.3f')} / {fmt(pl_.get(key), '.3f')}", "")
            )
        dp_e, dp_l = pe.get("data_positioning"), pl_.get("data_positioning")
        ok = None
        if dp_e is not None and dp_l is not None and early.get("total_s") and late.get("total_s"):
            # independent: the late resume's positioning is within noise (50 ms or 1% of start-up) of the early one
            ok = dp_l - dp_e <= max(0.05, 0.01 * early["total_s"])
        rows.append(
            (
                "data positioning grows with the resume step?",
                f"skipped batches {early.get('skipped_batches')} vs {late.get('skipped_batches')}",
                verdict(ok, "independent of step"),
            )
        )
    return rows


def position_medians(u: dict[str, Any]) -> dict[str, list[float]]:
    """Median step time at each position of a cycle, uploads on and off, and their difference.

    Position 1 contains the checkpoint save (and the hand-off to the uploader); the upload then
    overlaps the next steps. Medians resist a single slow cycle."""
    cycles = get(u, "upload_slowdown", "cycles") or []
    on = [c["step_seconds"] for c in cycles if c.get("uploads") and c.get("step_seconds")]
    off = [c["step_seconds"] for c in cycles if not c.get("uploads") and c.get("step_seconds")]
    if not on or not off:
        return {}
    n = min(len(x) for x in on + off)
    med_on = [statistics.median(c[i] for c in on) for i in range(n)]
    med_off = [statistics.median(c[i] for c in off) for i in range(n)]
    return {
        "on": med_on,
        "off": med_off,
        "diff": [a - b for a, b in zip(med_on, med_off, strict=False)],
        "pct": 100 * (sum(med_on) / sum(med_off) - 1),
    }


def slowdown(u: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """(estimate, CI low, CI high) in %: the mean of the ABBA blocks ± 2 standard errors when there are
    several blocks, else the plain on/off ratio without an interval."""
    us = u.get("upload_slowdown") or {}
    m, se = us.get("abba_mean_pct"), us.get("abba_standard_error_pct")
    if m is not None and se is not None:
        return m, m - 2 * se, m + 2 * se
    return us.get("slowdown_pct"), None, None


def slowdown_verdict(est: float | None, lo: float | None, hi: float | None) -> str:
    t = TARGETS["upload_slowdown_pct"]
    if est is None:
        return "≤ 2 %: not measured"
    if lo is None:
        return f"≤ 2 %: not resolved (one ABBA block, no interval; point estimate {est:+.1f} %)"
    if hi <= t:
        return "≤ 2 %: met"
    if lo > t:
        return "≤ 2 %: MISSED"
    return "≤ 2 %: not resolved (interval spans 2 %)"


def pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def first_upload_s(u: dict[str, Any]) -> float | None:
    ups = u.get("uploads") or {}
    vals = [v.get("seconds") for v in ups.values() if v.get("seconds") is not None]
    return mean(vals) if vals else None


def render_table(results: dict[str, Any]) -> str:
    sizes = [s for s in ("8b", "1b", "tiny") if s in results.get("sizes", {})]
    if not sizes:
        return "(no results)"
    per = {s: rows_for(s, results["sizes"][s]) for s in sizes}
    metrics = [m for m, _, _ in per[sizes[0]]]
    for s in sizes[1:]:
        metrics += [m for m, _, _ in per[s] if m not in metrics]
    head = "| metric | " + " | ".join(SHAPE_NAMES[s] for s in sizes) + " | target |"
    lines = [head, "|" + "---|" * (len(sizes) + 2)]
    for m in metrics:
        vals, verdicts = [], []
        for s in sizes:
            hit = next(((v, t) for mm, v, t in per[s] if mm == m), ("—", ""))
            vals.append(hit[0])
            if hit[1]:
                verdicts.append(hit[1] if len(sizes) == 1 else f"{s}: {hit[1]}")
        lines.append(f"| {m} | " + " | ".join(vals) + f" | {'; '.join(verdicts)} |")
    return "\n".join(lines)


def analysis_text(results: dict[str, Any], others: list[dict[str, Any]]) -> list[str]:
    """Why each missed or unresolved target was missed and what would close it, with this run's numbers."""
    r = get(results, "sizes", "8b") or {}
    u, b = r.get("unsloth") or {}, r.get("baseline") or {}
    out = ["### Why, and what would close the gaps", ""]
    ut, bt = get(u, "throughput", "tokens_per_s"), get(b, "throughput", "tokens_per_s")
    fl = r.get("flops_per_token") or {}
    peak = get(results, "meta", "matmul_tflops")
    if ut and bt and fl and peak:
        need = 2 * bt
        mfu_need = need * fl["useful"] / (peak * 1e12)
        hfu_need = need * fl["hardware"] / (peak * 1e12)
        out.append(
            f"- **Speed ({ut / bt:.2f}x, {100 * (1 - ut / bt / 2):.0f} % short of 2.0x).** The trainer path already "
            f"runs at {100 * get(u, 'throughput', 'mfu_lora_measured'):.0f} % LoRA-MFU "
            f"({100 * get(u, 'throughput', 'hfu_recompute_measured'):.0f} % counting the recompute) of the measured "
            f"{peak:.0f} TFLOP/s; the baseline at {100 * get(b, 'throughput', 'mfu_lora_measured'):.0f} %. Twice the "
            f"baseline, {need:,.0f} tokens/s, would need {100 * mfu_need:.0f} % LoRA-MFU, "
            f"{100 * hfu_need:.0f} % of the "
            "matmul rate in hardware FLOPs, with every 4-bit weight dequantized before its matmul. The baseline is not "
            "the stack Unsloth's \"2x\" was measured against: it gets PyTorch SDPA (flash) attention and TRL 1.15's "
            "fused, tiled lm_head loss (no 128k-vocabulary logits in memory). nvidia-smi shows the GPU busy "
            f"{fmt(get(u, 'gpu', 'utilization.gpu', 'mean'), '.0f')} % of the time in the trainer's steps against "
            f"{fmt(get(b, 'gpu', 'utilization.gpu', 'mean'), '.0f')} % in the baseline's: the trainer "
            f"leaves the GPU idle "
            'in parts of each step (Unsloth\'s `use_gradient_checkpointing="unsloth"` offloads activations to host '
            "memory and back; it was ~10 % slower than `True` at 1B, notes/gpu-unsloth.md). What could close it, "
            "unmeasured here: on a 141 GB card memory is no constraint (the trainer peaks at "
            f"{fmt(get(u, 'memory', 'train_peak_alloc_gib'), '.1f')} GiB), so "
            f"`use_gradient_checkpointing=True` or none "
            '(no recompute: a third fewer FLOPs) and larger per-device batches; the trainer hard-codes "unsloth" '
            "(model_loading.py) and would have to expose it."
        )
    ua, ba = get(u, "memory", "after_load_alloc_gib"), get(b, "memory", "after_load_alloc_gib")
    up, bp = get(u, "memory", "train_peak_alloc_gib"), get(b, "memory", "train_peak_alloc_gib")
    if ua and ba and up and bp:
        out.append(
            f"- **Memory (ratio {up / bp:.2f}, target 0.5).** After loading, the trainer holds {ua:.2f} GiB (nf4 "
            f"weights, bf16 embedding and lm_head) and the baseline {ba:.2f} GiB (the same nf4 weights; "
            "`prepare_model_for_kbit_training` makes the embedding, norms and lm_head fp32). Training adds "
            f"{up - ua:.2f} GiB to the trainer and {bp - ba:.2f} GiB to the baseline, "
            f"{(bp - ba) / (up - ua):.1f}x less. "
            f"The 4-bit weights both share put a floor under the ratio: {ua:.2f} / {bp:.2f} = {ua / bp:.2f} even if "
            "the trainer needed nothing for training. At 2 × 2,048 tokens per micro-batch the weights dominate; "
            "≤ 0.5 needs work where activations dominate (longer sequences, larger batches), not measured here."
        )
    slow, lo, hi = slowdown(u)
    pos = position_medians(u)
    if slow is not None and pos:
        extra = sum(pos["diff"])
        off_step = statistics.median(pos["off"][1:]) if len(pos["off"]) > 1 else pos["off"][0]
        cyc = get(u, "upload_slowdown", "cycle_steps") or 4
        ci = f" (95 % CI {lo:+.1f} … {hi:+.1f} %)" if lo is not None else ""
        out.append(
            f"- **Upload slowdown ({slow:+.1f} %{ci}, not resolved against 2 %).** Cycle times vary by a few "
            "per cent from one cycle to the next (GPU clock and temperature drift, JSON `gpu`), more than the "
            "effect. Position by position the medians show where it is: the interval that contains the save (the "
            "upload starts right after it), and the step after it, are "
            f"{1000 * pos['diff'][0]:+.0f} ms and {1000 * pos['diff'][1]:+.0f} ms slower with the upload running "
            f"(it takes {fmt(first_upload_s(u), '.1f')} s); the later steps "
            f"{', '.join(f'{1000 * d:+.0f} ms' for d in pos['diff'][2:])}. That is ~{extra:.2f} s per uploaded "
            f"checkpoint ({pos['pct']:+.1f} % of a {cyc}-step cycle; at the seed's save_steps=10 it would be about "
            f"{100 * extra / (10 * off_step):.1f} %, an extrapolation). The upload runs as threads of the training "
            "process (sha256 of every file, boto3 with 8 concurrent parts) and competes for the CPU and the GIL with "
            "a training loop that leaves the GPU idle in parts of each step. What would close it: uploading from a "
            "separate process, fewer concurrent parts, and saving less often; more A/B blocks to resolve ±1 %."
        )
    e, l_ = r.get("resume_early") or {}, r.get("resume_late") or {}
    if e and l_:
        pe = e.get("phases_s") or {}
        warm = next(
            (
                get(o, "sizes", "8b")
                for o in others
                if get(o, "sizes", "8b", "resume_early", "total_s")
                and not get(o, "sizes", "8b", "resume_early", "cold_caches")
            ),
            None,
        )
        w = ""
        if warm and e.get("cold_caches"):
            w = (
                f" With warm compile caches (an earlier run on the same machine) the same resumes took "
                f"{get(warm, 'resume_early', 'total_s'):.1f} / {get(warm, 'resume_late', 'total_s'):.1f} s (imports "
                f"{get(warm, 'resume_early', 'phases_s', 'imports_unsloth_trl'):.1f} s, first step "
                f"{get(warm, 'resume_early', 'phases_s', 'first_step'):.1f} s): baking the Triton, inductor and "
                "`unsloth_compiled_cache` caches into the image would save most of the difference."
            )
        tv = e.get("trainer_events_view_s") or {}
        out.append(
            f"- **Resume start-up** ({e.get('total_s'):.1f} s from step {e.get('resume_step')}, "
            f"{l_.get('total_s'):.1f} s "
            f"from step {l_.get('resume_step')}): data positioning is {1000 * pe.get('data_positioning', 0):.0f} ms at "
            f"both ({e.get('skipped_batches')} vs {l_.get('skipped_batches')} skipped batches: accelerate's "
            "`skip_first_batches` skips indices in the batch sampler and loads no data), so start-up does not grow "
            "with the step; the difference in totals is import-time noise. Importing Unsloth and TRL is "
            f"{pe.get('imports_unsloth_trl', 0):.0f} s of it, model load "
            f"{pe.get('model_load', 0):.0f} s (the 1B shape, "
            f"a fifth of the bytes: "
            f"{fmt(get(results, 'sizes', '1b', 'resume_early', 'phases_s', 'model_load'), '.0f')} s; "
            f"mostly Unsloth's patching, not I/O), the first step {pe.get('first_step', 0):.0f} s (kernel "
            f"compilation), checkpoint download and verification {pe.get('checkpoint_download_verify', 0):.1f} s." + w
        )
        out.append(
            f"- **What the trainer's own events show** (without this benchmark's wrappers): `start` at "
            f"{fmt(tv.get('start_event'), '.1f')} s lumps S3 listing, imports, dataset and checkpoint download "
            f"(`prepare_seconds` {fmt(tv.get('start_prepare_seconds'), '.1f')}); `model_ready` at "
            f"{fmt(tv.get('model_ready_event'), '.1f')} s; the first `log` at "
            f"{fmt(tv.get('first_log_event'), '.1f')} s. "
            "Missing for the split: an event when imports are done, one when the checkpoint is downloaded and "
            "verified (only an INFO log line), and one between `model_ready` and the first step (trainer state "
            "restored and data positioned: tokenization, kernel compilation, state restore and the fast-forward are "
            "invisible inside that gap)."
        )
    if u and b and u.get("num_tokens_per_step_logged") is None and b.get("num_tokens_per_step_logged"):
        out.append(
            "- **Observation (trainer)**: on the GPU, Unsloth's SFTTrainer logs no `num_tokens` (TRL's baseline "
            f"logs {b['num_tokens_per_step_logged']:,.0f} per step; the CPU path logs it), so the "
            f"trainer's carried-over "
            "token count (callbacks.py `on_log`) never applies and progress.json's `num_tokens` stays null on GPUs. "
            "The trainer's tokens per step here come from the rows (all truncated to max_length); the first steps' "
            "losses agree with the baseline's to 3–4 digits."
        )
    return out + [""]


def render_markdown(results: dict[str, Any], json_rel: str, others: list[dict[str, Any]] | None = None) -> str:
    m = results.get("meta", {})
    v = m.get("versions", {})
    vers = ", ".join(
        f"{k} {v[k]}"
        for k in (
            "torch",
            "transformers",
            "trl",
            "peft",
            "bitsandbytes",
            "unsloth",
            "unsloth_zoo",
            "accelerate",
            "datasets",
        )
        if v.get(k)
    )
    plan8 = get(results, "sizes", "8b", "plan") or {}
    lines = [
        "## GPU (issue 6)",
        "",
        f"Run of {m.get('date')} on {m.get('gpu') or 'no GPU'} ({m.get('cpus')} CPU cores), "
        f"Python {m.get('python')}; {vers}. Mode `{m.get('mode')}`, {m.get('wall_seconds')} s of device wall time "
        f"for the script. Raw numbers: `{json_rel}`. Measured bf16 matmul rate: "
        f"{fmt(m.get('matmul_tflops'), '.0f')} TFLOP/s (datasheet dense bf16 {H200_DENSE_BF16_TFLOPS:.0f}).",
        "",
        "Models are random-init and built offline in the same run: Llama-3-8B shape (hidden 4096, MLP 14336, "
        "32 layers, 32 heads / 8 KV heads, vocab 128,256, untied) and Llama-3.2-1B shape (2048, 8192, 16, 32/8, "
        "vocab 128,256, tied). The tokenizer is a BPE trained on the fly with "
        f"{get(results, 'sizes', '8b', 'build', 'tokenizer_vocab') or 8000} tokens; the embedding and lm_head keep "
        "all 128,256 rows, so lm_head FLOPs and memory are Llama-3's. The bf16 weights are saved once and quantized "
        "once into a pre-quantized bitsandbytes nf4 checkpoint (double quant, bf16 compute), which both trainers load. "
        f"Every training row is longer than {plan8.get('seq', 2048)} tokens and truncated to it, so a step is "
        f"{plan8.get('batch', 2)} × {plan8.get('grad_accum', 4)} × {plan8.get('seq', 2048)} = "
        f"{(plan8.get('batch', 2) * plan8.get('grad_accum', 4) * plan8.get('seq', 2048)):,} tokens.",
        "",
        render_table(results),
        "",
        *[
            f"{SHAPE_NAMES[k]} numbers come from {v['source']}."
            for k, v in results.get("sizes", {}).items()
            if v.get("source")
        ],
        "",
        "### Targets",
        "",
    ]
    lines += targets_text(results)
    lines += [""] + analysis_text(results, others or [])
    lines += [
        "",
        "### How it was measured",
        "",
        "- **Trainer path**: the package's own `loraresume-train` (Unsloth `FastLanguageModel`, 4-bit, LoRA r=16 "
        'alpha 16 on all 7 projections, `use_gradient_checkpointing="unsloth"`, the seed\'s SFTConfig: batch 2, '
        "grad accumulation 4, adamw_8bit, lr 2e-4, max_seq_length 2048), against a moto S3 server on the same machine. "
        "A wrapper (`gpu_bench.py --child trainer`) runs its `cli.main` in-process and wraps functions to emit "
        "timestamps; no trainer code changes.",
        "- **Baseline**: transformers + peft + bitsandbytes, `BitsAndBytesConfig(nf4, double quant, bf16 compute)`, "
        "`prepare_model_for_kbit_training` (which casts the embedding, norms and lm_head to fp32, as the usual "
        "recipe does) with gradient checkpointing, the same LoRA, rows, batch and optimizer, TRL `SFTTrainer` "
        "(with TRL 1.15's fused, tiled lm_head loss). Separate processes; peak memory is "
        '`torch.cuda.max_memory_allocated/reserved`, reset after model load ("training") and over the whole process.',
        "- **Speed**: step times are the gaps between consecutive per-step log events (logging every step syncs the "
        "GPU). The trainer's speed is the median over steps after warm-up that contain no checkpoint save and follow "
        "a checkpoint that was not uploaded (JSON `throughput_all_nonsave_steps` includes the upload cycles); the "
        "baseline's is the median after its warm-up steps. The bf16 matmul rate is the best of square 4096, 8192 "
        "and 16384 `torch.matmul`s timed with CUDA events in the same run.",
        "- **MFU**: N = parameters in matmuls (decoder linears + lm_head). Per token: LoRA training FLOPs = 4N "
        "(forward 2N + input gradients 2N; frozen weights get no weight gradients) + 3A (attention scores and values, "
        "causal: A = 2 · layers · seq · width forward, twice that backward) + 6·N_lora. HFU adds the recompute of "
        "gradient checkpointing (+2N + A). The '6N' column is the pre-training convention, which counts weight "
        "gradients that LoRA never computes, shown for comparison. Denominator: the measured bf16 matmul rate "
        "(JSON also has the datasheet-based values). 4-bit dequantization is not counted as useful work.",
        "- **Upload slowdown**: one trainer run; after the warm-up checkpoint, checkpoints are either uploaded by "
        "the `BackgroundUploader` or not submitted at all (the wrapper drops `submit_checkpoint` for those steps; "
        "every checkpoint is still saved locally, progress.json puts continue), in ABBA order (off, on, on, off, "
        "...). The steps after each checkpoint, up to the next one, form a cycle (it includes the save). Each ABBA "
        "block gives one estimate with a linear drift of step times cancelled; the table shows their mean and "
        "± 2 standard errors. GPU clock, temperature and power are sampled every 2 s (JSON, `gpu`).",
        "- **SIGTERM**: sent right after a step's log event (so the trainer first finishes a whole optimizer step, the "
        "worst case), to the `checkpoint_durable`/`preempted` event; the trainer's own measure (signal received → "
        "manifest in S3) is in the JSON too.",
        "- **Resume start-up**: a fresh process (new work dir and, where the JSON says `cold_caches`, empty "
        "Triton / inductor / Unsloth compile caches, as a new pod on a new node; the OS page cache still holds the "
        "base model file) resuming from the early checkpoint "
        "(explicit `resume.fromCheckpoint` in another job prefix) and from the late one (the preempted job "
        "relaunched), killed after its first optimizer step. Phases come from the wrapper's timestamps: python start, "
        "S3 listing, `import unsloth` and TRL, dataset load + fingerprint, checkpoint download + verification, model "
        "load (4-bit base + new LoRA), trainer setup (tokenization), state restore (adapter, optimizer/scheduler, "
        "RNG), data positioning (`skip_first_batches` + the first batch fetch after it), first step.",
        "",
    ]
    lines += missing_text(results)
    lines += [
        "### Re-run",
        "",
        "```sh",
        "# on the H200 machine (run tool, carry .gpu; see benchmarks/README.md for .gpu/)",
        "source benchmarks/gpu_env.sh && python3 benchmarks/gpu_bench.py            # ~9 min, writes "
        "$OUT/gpu_bench.json",
        "# here",
        "cp <files_at>/gpu_bench.json benchmarks/results/gpu_bench-<date>.json",
        "python benchmarks/gpu_bench.py --report benchmarks/results/gpu_bench-<date>.json   # rewrites this section",
        "```",
        "",
    ]
    return "\n".join(lines)


def targets_text(results: dict[str, Any]) -> list[str]:
    r = get(results, "sizes", "8b") or {}
    u, b = r.get("unsloth") or {}, r.get("baseline") or {}
    out = []
    ut, bt = get(u, "throughput", "tokens_per_s"), get(b, "throughput", "tokens_per_s")
    if ut and bt:
        sp = ut / bt
        out.append(
            f"- Unsloth ≥ 2.0x the baseline's tokens/s on the 8B shape: **{'met' if sp >= 2 else 'missed'}** "
            f"({sp:.2f}x{'' if sp >= 2 else f', {100 * (2 - sp) / 2:.0f} % short'})."
        )
    else:
        out.append("- Unsloth ≥ 2.0x the baseline's tokens/s on the 8B shape: not measured.")
    um, bm = get(u, "memory", "train_peak_alloc_gib"), get(b, "memory", "train_peak_alloc_gib")
    if um and bm:
        ratio = um / bm
        out.append(
            f"- Peak memory ≤ half the baseline's: **{'met' if ratio <= 0.5 else 'missed'}** "
            f"({um:.1f} vs {bm:.1f} GiB allocated in training, ratio {ratio:.2f})."
        )
    else:
        out.append("- Peak memory ≤ half the baseline's: not measured.")
    slow, lo, hi = slowdown(u)
    if slow is None:
        out.append("- Background upload slows training by ≤ 2 %: not measured.")
    else:
        verdict = slowdown_verdict(slow, lo, hi).split(": ", 1)[1]
        ci = f", 95 % CI {lo:+.1f} … {hi:+.1f} %" if lo is not None else ""
        out.append(
            f"- Background upload slows training by ≤ 2 % (8B): **{verdict}** ({slow:+.2f} %{ci}; "
            f"1B: {fmt(slowdown(get(results, 'sizes', '1b', 'unsloth') or {})[0], '+.2f', ' %')})."
        )
    sig = get(u, "sigterm", "signal_to_durable_s")
    out.append(
        "- SIGTERM → durable checkpoint ≤ 15 s for 8B r=16: "
        + (f"**{'met' if sig <= 15 else 'missed'}** ({sig:.1f} s)." if sig is not None else "not measured.")
    )
    early = get(r, "resume_early", "phases_s", "data_positioning")
    late = get(r, "resume_late", "phases_s", "data_positioning")
    if early is not None and late is not None:
        te, tl = get(r, "resume_early", "total_s"), get(r, "resume_late", "total_s")
        ok = late - early <= max(0.05, 0.01 * te)
        out.append(
            f"- Resume start-up independent of the resume step: **{'met' if ok else 'missed'}**: data "
            f"positioning {early * 1000:.0f} ms at step {get(r, 'resume_early', 'resume_step')} vs "
            f"{late * 1000:.0f} ms "
            f"at step {get(r, 'resume_late', 'resume_step')}; total {te:.1f} s vs {tl:.1f} s, of which "
            f"imports {fmt(get(r, 'resume_early', 'phases_s', 'imports_unsloth_trl'), '.1f')} s vs "
            f"{fmt(get(r, 'resume_late', 'phases_s', 'imports_unsloth_trl'), '.1f')} s."
        )
    else:
        out.append("- Resume start-up independent of the resume step: not measured.")
    return out


def missing_text(results: dict[str, Any]) -> list[str]:
    out = []
    if results.get("skipped") or results.get("errors"):
        out += ["### Not measured in this run", ""]
        for s in results.get("skipped", []):
            out.append(f"- {s['size']}/{s['phase']}: skipped ({s['why']}).")
        for e in results.get("errors", []):
            out.append(f"- {e['size']}/{e['phase']}: error: {e['why']}.")
        out.append("")
    return out


def load_results(paths: list[Path]) -> tuple[dict[str, Any], list[str]]:
    """The first file's results; sizes it lacks are taken from the later files (noted per size)."""
    names = []
    for path in paths:
        try:
            names.append(str(path.resolve().relative_to(ROOT)))
        except ValueError:
            names.append(str(path))
    results = json.loads(paths[0].read_text())
    for path, name in zip(paths[1:], names[1:], strict=True):
        other = json.loads(path.read_text())
        for size, r in other.get("sizes", {}).items():
            if size not in results.get("sizes", {}) or not (results["sizes"][size].get("unsloth")):
                results["sizes"][size] = {
                    **r,
                    "source": f"{name} (mode {other['meta'].get('mode')}, {other['meta'].get('date')})",
                }
                results["skipped"] = [x for x in results.get("skipped", []) if x["size"] != size]
                results["errors"] = [x for x in results.get("errors", []) if x["size"] != size]
                results["skipped"] += [x for x in other.get("skipped", []) if x["size"] == size]
                results["errors"] += [x for x in other.get("errors", []) if x["size"] == size]
    return results, names


def runs_table(paths: list[Path], names: list[str]) -> list[str]:
    """Headline numbers of every run given, to show how far they repeat."""
    lines = [
        "### All runs",
        "",
        "| run | size | trainer tok/s | baseline tok/s | speed-up | memory ratio | upload slowdown | "
        "SIGTERM → durable s | resume start-up s (early / late) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path, name in zip(paths, names, strict=True):
        d = json.loads(path.read_text())
        for size in ("8b", "1b"):
            r = get(d, "sizes", size)
            if not r or not r.get("unsloth"):
                continue
            ut, bt = get(r, "unsloth", "throughput", "tokens_per_s"), get(r, "baseline", "throughput", "tokens_per_s")
            um, bm = (
                get(r, "unsloth", "memory", "train_peak_alloc_gib"),
                get(r, "baseline", "memory", "train_peak_alloc_gib"),
            )
            slow = slowdown(r["unsloth"])[0]
            cold = get(r, "resume_early", "cold_caches")
            lines.append(
                f"| `{name}` ({d['meta'].get('mode')}) | {size} | {fmt(ut, ',.0f')} | {fmt(bt, ',.0f')} | "
                f"{fmt(ut / bt if ut and bt else None, '.2f', 'x')} | {fmt(um / bm if um and bm else None, '.2f')} | "
                f"{fmt(slow, '+.1f', ' %')} | {fmt(get(r, 'unsloth', 'sigterm', 'signal_to_durable_s'), '.1f')} | "
                f"{fmt(get(r, 'resume_early', 'total_s'), '.1f')} / {fmt(get(r, 'resume_late', 'total_s'), '.1f')}"
                f"{'' if not get(r, 'resume_early') else ' (cold caches)' if cold else ' (warm caches)'} |"
            )
    return lines + [""]


def attach_logs(json_path: Path, tarball: Path) -> None:
    """Add the first steps' losses to a results JSON written before `losses` existed, from its logs archive."""
    results = json.loads(json_path.read_text())
    with tarfile.open(tarball) as tar:
        for size, r in results.get("sizes", {}).items():
            for role in ("unsloth", "baseline"):
                if not r.get(role) or r[role].get("losses"):
                    continue
                try:
                    member = tar.extractfile(f"{size}-{role}.stdout")
                except KeyError:
                    continue
                events = []
                for line in member.read().decode(errors="replace").splitlines():  # type: ignore[union-attr]
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(event, dict):
                        events.append(event)
                r[role]["losses"] = losses(events)
    json_path.write_text(json.dumps(results, indent=2, default=str))


def write_report(json_paths: list[Path], md_path: Path) -> str:
    results, names = load_results(json_paths)
    json_rel = "`, `".join(names)
    others = [json.loads(p.read_text()) for p in json_paths[1:]]
    section = render_markdown(results, json_rel, others)
    if len(json_paths) > 1:
        section = section.replace("### Re-run", "\n".join(runs_table(json_paths, names)) + "\n### Re-run", 1)
    existing = md_path.read_text() if md_path.exists() else "# Benchmark results\n\n"
    md_path.write_text(replace_section(existing, "## GPU (issue 6)", section))
    return render_table(results)


def replace_section(text: str, heading: str, section: str) -> str:
    """Replace `heading`'s section (up to the next `## ` heading) or append it; other sections stay."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        body = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
        return body
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    new = lines[:start] + section.rstrip("\n").splitlines() + ([""] if end < len(lines) else []) + lines[end:]
    return "\n".join(new).rstrip("\n") + "\n"


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="short GPU run: the 1B shape only, fewer steps")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (no 4-bit, no Unsloth kernels)")
    p.add_argument(
        "--report",
        type=Path,
        nargs="+",
        help="render RESULTS.md's GPU section from this JSON (sizes it lacks: from the next ones)",
    )
    p.add_argument(
        "--speed",
        help="issue 16: gradient-checkpointing modes, padding_free and the baseline with and without "
        "checkpointing, side by side (8B; with --cpu-smoke the tiny model): a comma list of row sets, "
        "full (every row seq tokens) and/or var (variable-length rows)",
    )
    p.add_argument("--report-speed", type=Path, nargs="+", help="render RESULTS.md's issue 16 section from these")
    p.add_argument("--results-md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument(
        "--attach-logs",
        nargs=2,
        type=Path,
        metavar=("JSON", "LOGS_TAR_GZ"),
        help="add first-step losses to a results JSON from its gpu_bench-logs.tar.gz",
    )
    p.add_argument("--sizes", help="comma list of sizes to run (default: the mode's plan)")
    p.add_argument(
        "--upload-ab",
        type=int,
        metavar="CYCLES",
        help="only the upload slowdown: build and the trainer run, with CYCLES compared cycles (a multiple of "
        "4; as many whole ABBA blocks as the budget allows are kept)",
    )
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the script")
    p.add_argument("--out", help="result folder (default $OUT)")
    p.add_argument("--work", default="/tmp/gpu-bench")
    p.add_argument("--keep-work", action="store_true")
    # child modes (internal)
    p.add_argument("--child", choices=["trainer", "baseline", "build"])
    p.add_argument("--spawn", help=argparse.SUPPRESS)
    p.add_argument("--config")
    p.add_argument("--termination-log")
    p.add_argument("--skip-upload", default="")
    p.add_argument("--gate")
    p.add_argument("--size")
    p.add_argument("--base")
    p.add_argument("--data")
    p.add_argument("--seq", type=int)
    p.add_argument("--rows", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--tokenizer-vocab", type=int, default=8000)
    p.add_argument("--q4", action="store_true")
    p.add_argument("--matmul", action="store_true")
    p.add_argument("--no-gc", action="store_true", help=argparse.SUPPRESS)  # baseline without checkpointing
    p.add_argument("--var-data", help=argparse.SUPPRESS)  # build: also write variable-length rows here
    ns = p.parse_args(argv)
    if ns.child == "trainer":
        return child_trainer(ns)
    if ns.child == "baseline":
        return child_baseline(ns)
    if ns.child == "build":
        return child_build(ns)
    if ns.attach_logs:
        attach_logs(*ns.attach_logs)
        return 0
    if ns.report_speed:
        print(write_speed_report(ns.report_speed, ns.results_md))
        return 0
    if ns.report:
        print(write_report(ns.report, ns.results_md))
        return 0
    if ns.speed:
        ns.mode = "cpu-smoke" if ns.cpu_smoke else "speed"
        unknown = set(ns.speed.split(",")) - set(SPEED_SETS)
        if unknown:
            p.error(f"--speed takes a comma list of {', '.join(SPEED_SETS)}")
        ns.budget_s = ns.budget_s or {"cpu-smoke": 900.0, "speed": 560.0}[ns.mode]
        return orchestrate_speed(ns)
    ns.mode = "cpu-smoke" if ns.cpu_smoke else "smoke" if ns.smoke else "full"
    if ns.upload_ab is not None and (ns.upload_ab < 4 or ns.upload_ab % 4):
        p.error(f"--upload-ab takes a positive multiple of 4 (whole ABBA blocks), got {ns.upload_ab}")
    if ns.budget_s is None:
        ns.budget_s = {"cpu-smoke": 900.0, "smoke": 250.0, "full": 540.0}[ns.mode]
    return orchestrate(ns)


if __name__ == "__main__":
    sys.exit(main())

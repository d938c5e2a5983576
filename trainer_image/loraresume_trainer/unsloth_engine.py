"""The trainer's engine: Unsloth's API, TRL's SFTTrainer, checkpoints streaming to S3.

1. load_stack: `import unsloth` first (it patches transformers, trl, peft), then check the
   training fields against SFTConfig.
2. prepare: rows to texts with the template, the LoRA shape (the adapter's, or the job's), the
   gradient-checkpointing mode (kept on a resume), the fingerprint.
3. train: load base + adapter through Unsloth (or create the LoRA), train with SFTTrainer from the
   start point, stop and save on SIGTERM, save the adapter and tokenizer.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .attempt_plan import StartPoint, StoreView, saved_fingerprints
from .checkpoint_store import check_pickles_safe
from .compile_cache import SAVE_AFTER_STEPS
from .fingerprint import job_fingerprint, texts_sha256
from .grad_checkpointing import FINGERPRINT_KEY, Decision, kept_mode
from .outcome import TerminationMessage
from .progress import emit_event
from .seams import Inputs, Prepared

if TYPE_CHECKING:
    from .pipeline import Pipeline

log = logging.getLogger(__name__)

COMPILE_CACHE_WAIT_S = 120.0  # a successful attempt waits this long, at most, for its compile cache upload


class _State:
    """What prepare() derived, for train()."""

    def __init__(self, texts: Any, base_path: str, adapter_in: tuple[Path, str] | None, checkpointing: Decision):
        self.texts = texts
        self.base_path = base_path
        self.adapter_in = adapter_in  # (local directory, the URI it came from, for messages)
        self.checkpointing = checkpointing


class UnslothEngine:
    fetches_inputs = True
    compiles = True
    event_fields: Mapping[str, Any] = MappingProxyType({})

    def load_stack(self, run: Pipeline) -> None:
        import unsloth  # noqa: F401  (must come before transformers/trl/peft: it patches them)

        from .training_args import check_training_fields

        check_training_fields(run.job.training)

    def prepare(self, run: Pipeline, inputs: Inputs, view: StoreView) -> Prepared:
        from .model_loading import job_lora_shape, lora_shape, read_adapter_config

        job = run.job
        assert inputs.base_path is not None
        adapter_in = (inputs.adapter_dir, job.adapter) if inputs.adapter_dir is not None and job.adapter else None
        lora = lora_shape(read_adapter_config(*adapter_in)) if adapter_in else job_lora_shape(job)
        tokenizer_dir = str(adapter_in[0]) if adapter_in and _has_tokenizer(adapter_in[0]) else inputs.base_path
        texts = prepare_texts(run, tokenizer_dir, inputs.dataset_file)
        fingerprint = job_fingerprint(job, dataset_sha256=texts_sha256(texts["text"]), lora=lora)
        # `auto` keeps the mode of the run it continues (the job's own adapter and checkpoints, else an
        # explicit checkpoint): a resume never changes mode silently.
        kept = kept_mode(saved_fingerprints(view, fingerprint, extend=job.resume.extend), fingerprint)
        decision = choose_checkpointing(run, inputs.base_path, lora, kept)
        fingerprint = {**fingerprint, FINGERPRINT_KEY: decision.mode}
        return Prepared(fingerprint, _State(texts, inputs.base_path, adapter_in, decision))

    def verify_checkpoint(self, path: Path) -> None:
        check_pickles_safe(path)

    def train(self, run: Pipeline, prepared: Prepared, start: StartPoint) -> TerminationMessage:
        from transformers import PrinterCallback
        from trl import SFTTrainer

        from .callbacks import DurableCheckpointCallback
        from .model_loading import check_adapter_fits, load_model, stage_adapter
        from .training_args import build_sft_config
        from .upload_process import ChildPublisher
        from .uploader import BackgroundUploader

        job, state = run.job, prepared.state
        assert isinstance(state, _State)
        fingerprint = prepared.fingerprint
        on_gpu, bf16_ok = accelerator()
        # A warm start takes the checkpoint's adapter weights as its adapter.
        model_adapter = start.warm_adapter or state.adapter_in
        staged = None
        if model_adapter is not None:
            adapter_dir, adapter_ref = model_adapter
            check_adapter_fits(adapter_dir, state.base_path, adapter_ref=adapter_ref, base_ref=job.base_model)
            staged = stage_adapter(adapter_dir, run.dirs.root / "adapter-in", state.base_path)
        resume_dir = start.resume_dir

        mode = state.checkpointing.mode
        args = build_sft_config(
            job,
            run.dirs.output,
            on_gpu=on_gpu,
            bf16_supported=bf16_ok,
            tensorboard=job.tensorboard,
            gradient_checkpointing=mode,
        )
        if job.tensorboard:
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.dirs.tensorboard / f"attempt-{job.attempt}")
        run.hooks.before_model_load()
        with run.timed("load_model"):
            model, tokenizer = load_model(job, state.base_path, staged, on_gpu=on_gpu, gradient_checkpointing=mode)
        run.hooks.model_loaded(model)
        run.clock.mark("model_loaded")
        emit_event(
            "model_ready", lora_sha256=lora_weights_sha256(model), resume_from=str(resume_dir) if resume_dir else None
        )
        uploader = BackgroundUploader(
            run.store,
            keep=job.storage.keep_checkpoints,
            fingerprint=fingerprint,
            staging_dir=run.dirs.staging,
            durable_step=run.durable_step,
            on_durable=run.on_durable,
            observe=run.hooks.phase,
            # a checkpoint's bytes go from a child process: on a thread they slowed training (upload_process.py)
            publisher=ChildPublisher(job.storage.endpoint, job.storage.region, run.store.root),
        )
        logs = (run.dirs.tensorboard, run.store.logs_uri()) if job.tensorboard else None
        callback = DurableCheckpointCallback(
            uploader,
            run.stop,
            attempt=job.attempt,
            logs=logs,
            foreign_checkpoints=run.foreign_steps,
            clock=run.clock,
            upload=run.hooks.upload_checkpoint,
            # The first steps compiled what this attempt needs: keep it for the next (once per key).
            on_warm=cache.save_in_background if (cache := run.compile_cache) and cache.should_save else None,
            warm_steps=SAVE_AFTER_STEPS,
        )
        trainer = SFTTrainer(
            model=model, processing_class=tokenizer, train_dataset=state.texts, args=args, callbacks=[callback]
        )
        trainer.remove_callback(PrinterCallback)
        run.hooks.trainer_ready(trainer)

        run.stop.phase = "training"
        try:
            with run.timed("train"):
                trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
        finally:
            run.stop.phase = "finishing"
        step = trainer.state.global_step

        if run.stop.requested:
            t_flush = time.monotonic()
            uploader.close(timeout=None)
            run.durable_step = uploader.durable_step
            return run.preempted(
                step,
                trainer.state.max_steps,
                {},
                save=callback.last_save_seconds or 0.0,
                upload=time.monotonic() - t_flush,
            )

        uploader.close(timeout=None)
        run.durable_step = uploader.durable_step
        save_adapter(run, model, tokenizer, fingerprint)
        if run.compile_cache is not None:
            run.compile_cache.wait(timeout=COMPILE_CACHE_WAIT_S)  # the result is out; let the cache land too
        if job.tensorboard:
            run.store.upload_files(run.dirs.tensorboard, run.store.logs_uri())
        last = next((e for e in reversed(trainer.state.log_history) if "loss" in e), {})
        run.put_progress(step, trainer.state.max_steps, last, "Succeeded")
        return run.succeeded(step)


def prepare_texts(run: Pipeline, tokenizer_dir: str, dataset_file: Path | None) -> Any:
    from transformers import AutoTokenizer

    from .dataset_prep import load_rows, to_texts

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = load_rows(run.job.dataset, dataset_file, run.dirs.cache / "datasets")
    return to_texts(rows, run.job.dataset, tokenizer)


def choose_checkpointing(run: Pipeline, base_path: str, lora: dict[str, Any], kept: str | None) -> Decision:
    """The gradient-checkpointing mode (grad_checkpointing.choose), logged and emitted as an event."""
    from .grad_checkpointing import ModelShape, Workload, choose
    from .training_args import effective_training

    job = run.job
    shape = None
    try:
        from transformers import AutoConfig

        shape = ModelShape.from_config(AutoConfig.from_pretrained(base_path).to_dict())
    except (OSError, ValueError) as exc:
        log.warning("gradient checkpointing: cannot read the model's shape from %s: %s", base_path, exc)
    on_gpu, bf16_ok = accelerator()
    dtype = job.dtype if job.dtype != "auto" else ("bfloat16" if bf16_ok else "float16")
    training = effective_training(job)
    work = Workload(
        tokens=int(training["per_device_train_batch_size"]) * job.max_seq_length,
        dtype=dtype,
        load_in_4bit=job.load_in_4bit,
        lora_r=int(lora.get("r") or job.lora.r),
        lora_targets=tuple(lora.get("target_modules") or job.lora.target_modules),
        optim=str(training.get("optim", "adamw_torch")),
    )
    decision = choose(job.gradient_checkpointing, shape, work, gpu_total_bytes() if on_gpu else None, kept=kept)
    summary = decision.summary()
    log.info(
        "gradient checkpointing: %s (requested %s: %s; estimated peak GiB %s)",
        decision.mode,
        decision.requested,
        decision.reason,
        summary["estimated_peak_gib"] or "unknown",
    )
    emit_event("gradient_checkpointing", tokens_per_micro_batch=work.tokens, **summary)
    return decision


def save_adapter(run: Pipeline, model: Any, tokenizer: Any, fingerprint: dict[str, Any]) -> None:
    out = run.dirs.final / "adapter"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    run.publish_adapter(out, fingerprint)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file()


def accelerator() -> tuple[bool, bool]:
    """(a CUDA GPU is there, it does bf16)."""
    import torch

    if torch.cuda.is_available():
        return True, torch.cuda.is_bf16_supported()
    return False, False


def gpu_total_bytes() -> int:
    import torch

    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def lora_weights_sha256(model: Any) -> str:
    """Hash of the adapter weights as PEFT saves them (to show which weights a run starts from)."""
    from peft import get_peft_model_state_dict

    from .fingerprint import tensors_sha256

    return tensors_sha256(get_peft_model_state_dict(model))

"""The seed pipeline, step by step, with durable checkpoints and exact resume.

1. Fetch inputs (base model, adapter, dataset) from S3 or local paths.
2. Turn rows into texts with the template; fingerprint what makes resume exact.
3. Plan the resume: newest complete checkpoint with this fingerprint (verified on
   download, falling back past damaged ones), a warm start, or a fresh start.
4. Load base + adapter through Unsloth (or create a new LoRA).
5. Train with TRL's SFTTrainer; checkpoints stream to S3 in the background.
6. Save the adapter and tokenizer to <storage>/adapter/ with a manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from .checkpoint_store import CHECKPOINTS_DIR, PROGRESS_NAME, CheckpointStore
from .config import JobConfig
from .errors import ConfigError, DamagedCheckpoint, TrainerError
from .fingerprint import job_fingerprint, texts_sha256, unchecked_keys, with_length_of
from .grad_checkpointing import FINGERPRINT_KEY, Decision, kept_mode
from .local_checkpoints import local_steps, prune_older_than
from .manifest import parse_checkpoint_name
from .outcome import Outcome, TerminationMessage
from .progress import emit_event, progress_record
from .resume_plan import (
    Candidate,
    ResumeMode,
    ResumePlan,
    check_extension,
    plan_resume,
    refuse_other_adapter,
    refuse_overwriting_foreign,
)
from .s3client import is_not_found, make_s3_client, s3_errors
from .s3uri import S3Uri
from .stop_signal import StopRequest

log = logging.getLogger(__name__)

# Files that are pickles in an HF checkpoint; HF loads them with weights_only=True and
# so do we, once, before the Trainer sees the checkpoint (an unsafe one is "damaged").
PICKLED_STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt")
# Without any of these HF resumes silently inexact (notes/training-stack.md) or crashes.
REQUIRED_CHECKPOINT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
)


class WorkDirs:
    """Local scratch space of one attempt (an emptyDir in the pod)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "cache"  # downloaded base models, adapters, datasets (kept across attempts)
        self.output = root / "output"  # the Trainer's output_dir
        self.staging = root / "staging"  # hard-link snapshots waiting for upload
        self.resume = root / "resume"  # the verified checkpoint this attempt resumes from
        self.final = root / "final"  # the adapter before upload
        self.tensorboard = root / "tensorboard"
        # Leftovers of an earlier attempt on the same disk must not leak into new checkpoints.
        for path in (self.output, self.staging, self.resume, self.final):
            shutil.rmtree(path, ignore_errors=True)
        for path in (self.cache, self.output, self.staging, self.resume, self.final, self.tensorboard):
            path.mkdir(parents=True, exist_ok=True)


def _cache_name(kind: str, uri: str) -> str:
    return f"{kind}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"


class Pipeline:
    """One attempt of one job. `run()` returns the termination message; errors propagate typed."""

    def __init__(self, job: JobConfig, stop: StopRequest) -> None:
        self.job = job
        self.stop = stop
        self.dirs = WorkDirs(job.work_dir)
        self.client = make_s3_client(job.storage.endpoint, job.storage.region)
        self.store = CheckpointStore(self.client, S3Uri.parse(job.storage.uri))
        self.durable_step: int | None = None
        self.checkpointing: Decision | None = None  # the gradient-checkpointing mode, decided in run()
        self.foreign_steps: tuple[int, ...] = ()  # ResumePlan.foreign, reported in progress.json

    # 1. inputs ---------------------------------------------------------------------------
    def fetch_dir(self, ref: str, kind: str, field: str) -> str:
        """A local directory for `ref` (s3:// downloaded once into the cache), or a hub id as is."""
        if ref.startswith("s3://"):
            dest = self.dirs.cache / _cache_name(kind, ref)
            if not dest.is_dir():
                self.store.fetch_tree(S3Uri.parse(ref), dest)
            return str(dest)
        if Path(ref).is_dir():
            return ref
        if kind == "adapter" or ref.startswith(("/", "./", "../")):
            raise ConfigError(f"{ref} does not exist (expected an s3:// URI or a local directory)", field=field)
        return ref  # a hub id

    def fetch_dataset_file(self) -> Path | None:
        source = self.job.dataset.source
        if source is None:
            return None
        if not source.startswith("s3://"):
            return Path(source)
        uri = S3Uri.parse(source)
        name = Path(uri.key).name
        if not name:
            raise ConfigError(f"{source} names a prefix, not a file", field="dataset.source")
        dest = self.dirs.cache / _cache_name("dataset", source) / name
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(dest.suffix + ".part")
            with s3_errors("downloading the dataset", source):
                try:
                    self.client.download_file(uri.bucket, uri.key, str(tmp))
                except ClientError as exc:
                    if is_not_found(exc):
                        raise ConfigError(f"{source} does not exist", field="dataset.source") from None
                    raise
            os.replace(tmp, dest)
        return dest

    # 2. texts and fingerprint ------------------------------------------------------------
    def prepare_texts(self, tokenizer_dir: str) -> Any:
        from transformers import AutoTokenizer

        from .dataset_prep import load_rows, to_texts

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        rows = load_rows(self.job.dataset, self.fetch_dataset_file(), self.dirs.cache / "datasets")
        return to_texts(rows, self.job.dataset, tokenizer)

    def fingerprint(self, texts: Any, lora: dict[str, Any]) -> dict[str, Any]:
        return job_fingerprint(self.job, dataset_sha256=texts_sha256(texts["text"]), lora=lora)

    def choose_checkpointing(self, base_path: str, lora: dict[str, Any], kept: str | None) -> Decision:
        """The gradient-checkpointing mode (grad_checkpointing.choose), logged and emitted as an event."""
        from .grad_checkpointing import ModelShape, Workload, choose
        from .training_args import effective_training

        job = self.job
        shape = None
        try:
            from transformers import AutoConfig

            shape = ModelShape.from_config(AutoConfig.from_pretrained(base_path).to_dict())
        except (OSError, ValueError) as exc:
            log.warning("gradient checkpointing: cannot read the model's shape from %s: %s", base_path, exc)
        on_gpu, bf16_ok = _accelerator()
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
        decision = choose(job.gradient_checkpointing, shape, work, _gpu_total_bytes() if on_gpu else None, kept=kept)
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

    # 3. resume plan ----------------------------------------------------------------------
    def explicit_candidate(self) -> Candidate | None:
        ref = self.job.resume.from_checkpoint
        if ref is None:
            return None
        uri = S3Uri.parse(ref)
        parts = uri.key.rstrip("/").split("/")
        step = parse_checkpoint_name(parts[-1]) if len(parts) >= 2 and parts[-2] == "checkpoints" else None
        if step is None:
            raise ConfigError(
                f"{ref} is not a checkpoint URI (expected s3://bucket/<job>/checkpoints/checkpoint-<step>/)",
                field="resume.fromCheckpoint",
            )
        store = CheckpointStore(self.client, S3Uri(uri.bucket, "/".join(parts[:-2]) + "/" if parts[:-2] else ""))
        manifest = store.read_manifest(step)
        if manifest is None:
            raise ConfigError(f"{ref} is not a complete checkpoint (no manifest)", field="resume.fromCheckpoint")
        return Candidate(step, str(uri.as_dir()), manifest.fingerprint)

    def download_verified(self, cand: Candidate) -> Path:
        """Download one candidate checked against its manifest; raises DamagedCheckpoint."""
        uri = S3Uri.parse(cand.uri)
        root = uri.key.rstrip("/").rsplit("/", 2)[0]
        store = CheckpointStore(self.client, S3Uri(uri.bucket, root + "/" if root else ""))
        manifest = store.read_manifest(cand.step)
        if manifest is None:
            raise DamagedCheckpoint(f"{cand.uri} lost its manifest")
        listed = {f.path for f in manifest.files}
        missing = [name for name in REQUIRED_CHECKPOINT_FILES if name not in listed]
        if missing:
            raise DamagedCheckpoint(f"{cand.uri} lacks {', '.join(missing)}: it cannot resume exactly")
        return store.download_checkpoint(cand.step, manifest, self.dirs.resume)

    def fetch_candidate(self, plan: ResumePlan) -> tuple[Candidate, Path] | None:
        """Download the first candidate that verifies; damaged ones are skipped with a warning."""
        for cand in plan.candidates:
            try:
                path = self.download_verified(cand)
                check_pickles_safe(path)
                return cand, path
            except DamagedCheckpoint as exc:
                log.warning("skipping damaged checkpoint %s: %s", cand.uri, exc)
                emit_event("checkpoint_damaged", uri=cand.uri, reason=str(exc))
        return None

    # the whole attempt ------------------------------------------------------------------
    def run(self) -> TerminationMessage:
        job = self.job
        t_start = time.monotonic()
        # Listing first: bad credentials or an unreachable endpoint fail before the slow imports.
        complete = [
            Candidate(s, str(self.store.checkpoint_uri(s)), m.fingerprint) for s, m in self.store.complete_checkpoints()
        ]
        if complete:
            self.durable_step = complete[0].step
        aborted = self.store.abort_unfinished_uploads()  # an earlier attempt's, killed mid-upload
        if aborted:
            log.info("aborted %d unfinished multipart upload(s) under %s", len(aborted), self.store.root)
            emit_event("uploads_aborted", keys=aborted)
        import unsloth  # noqa: F401  (must come before transformers/trl/peft: it patches them)

        from .training_args import check_training_fields

        check_training_fields(job.training)

        from .model_loading import (
            check_adapter_fits,
            job_lora_shape,
            lora_shape,
            read_adapter_config,
            stage_adapter,
        )

        base_path = self.fetch_dir(job.base_model, "base", "base_model")
        # An adapter to continue: (local directory, the URI it came from, for messages).
        adapter_in = (Path(self.fetch_dir(job.adapter, "adapter", "adapter")), job.adapter) if job.adapter else None
        lora = lora_shape(read_adapter_config(*adapter_in)) if adapter_in else job_lora_shape(job)
        texts = self.prepare_texts(str(adapter_in[0]) if adapter_in and _has_tokenizer(adapter_in[0]) else base_path)
        fingerprint = self.fingerprint(texts, lora)

        done = self.store.read_adapter_manifest()
        # `auto` keeps the mode of the run it continues (the job's own adapter and checkpoints, else
        # an explicit checkpoint): a resume never changes mode silently.
        saved = ([done.fingerprint] if done is not None else []) + [c.fingerprint for c in complete]
        explicit = None
        if job.gradient_checkpointing == "auto" and kept_mode(saved, fingerprint) is None:
            explicit = self.explicit_candidate()
            if explicit is not None:
                # An extension keeps the mode of the run it extends, whose length differs.
                extended = with_length_of(explicit.fingerprint, fingerprint) if job.resume.extend else None
                saved.append(extended or explicit.fingerprint)
        self.checkpointing = self.choose_checkpointing(base_path, lora, kept_mode(saved, fingerprint))
        fingerprint = {**fingerprint, FINGERPRINT_KEY: self.checkpointing.mode}
        if done is not None:
            refuse_other_adapter(done.fingerprint, fingerprint, adapter_uri=str(self.store.adapter_uri()))
            warn_unchecked(done.fingerprint, fingerprint, str(self.store.adapter_uri()))
            log.info("adapter already complete in %s: nothing to do", self.store.adapter_uri())
            return self._succeeded(None)

        explicit = explicit if explicit is not None else self.explicit_candidate()
        plan = plan_resume(
            complete, fingerprint, explicit=explicit, warm_start=job.resume.warm_start, extend=job.resume.extend
        )
        fetched = self.fetch_candidate(plan) if plan.candidates else None
        if plan.candidates and fetched is None:
            # Never start over silently on top of work that exists: a retry may read them intact
            # (a transient fault); if not, the job fails with this message and the checkpoints stay.
            raise TrainerError(
                f"none of the {len(plan.candidates)} complete checkpoints under "
                f"{self.store.root.child(CHECKPOINTS_DIR)} "
                "verified (see the checkpoint_damaged events); not starting over on top of them. Inspect or "
                "delete them to start from scratch"
            )
        mode = plan.mode if fetched else ResumeMode.FRESH
        if fetched and mode is ResumeMode.EXACT:
            warn_unchecked(fetched[0].fingerprint, fingerprint, fetched[0].uri)
        self.report_foreign(plan)
        start_step = fetched[0].step if fetched and mode is ResumeMode.EXACT else 0
        refuse_overwriting_foreign(plan, start_step=start_step, max_steps=int(fingerprint["max_steps"]))
        resume_dir = fetched[1] if fetched and mode is ResumeMode.EXACT else None
        # Extending another run's checkpoint (not continuing this job's own): by epochs, whether the
        # job goes past it is known from its trainer state only.
        extending = fetched is not None and resume_dir is not None and fetched[0] == plan.extends
        if extending and fetched is not None:
            check_extension(fetched[0], fingerprint, epochs_done=trained_epochs(fetched[1]))
        # A warm start takes the checkpoint's adapter weights as its adapter.
        model_adapter = (fetched[1], fetched[0].uri) if fetched and mode is ResumeMode.WARM else adapter_in
        emit_event(
            "start",
            attempt=job.attempt,
            mode=mode.value,
            checkpoint=fetched[0].uri if fetched else None,
            step=fetched[0].step if fetched else 0,
            prepare_seconds=round(time.monotonic() - t_start, 3),
        )
        if resume_dir is not None and not extending and training_finished(resume_dir, int(fingerprint["max_steps"])):
            # Killed after the last checkpoint was durable but before the adapter was: HF would
            # train one step past max_steps, so publish the checkpoint's adapter instead.
            self.durable_step = fetched[0].step  # type: ignore[index]
            self.publish_adapter(adapter_from_checkpoint(resume_dir, self.dirs.final / "adapter"), fingerprint)
            self._put_progress(self.durable_step, self.durable_step, {}, "Succeeded")
            return self._succeeded(self.durable_step)

        on_gpu, bf16_ok = _accelerator()
        staged = None
        if model_adapter is not None:
            adapter_dir, adapter_ref = model_adapter
            check_adapter_fits(adapter_dir, base_path, adapter_ref=adapter_ref, base_ref=job.base_model)
            staged = stage_adapter(adapter_dir, self.dirs.root / "adapter-in", base_path)
        return self.train(texts, fingerprint, staged, base_path, resume_dir, on_gpu, bf16_ok)

    def train(
        self,
        texts: Any,
        fingerprint: dict[str, Any],
        adapter_dir: Path | None,
        base_path: str,
        resume_dir: Path | None,
        on_gpu: bool,
        bf16_ok: bool,
    ) -> TerminationMessage:
        from transformers import PrinterCallback
        from trl import SFTTrainer

        from .callbacks import DurableCheckpointCallback
        from .model_loading import load_model
        from .training_args import build_sft_config
        from .uploader import BackgroundUploader

        job = self.job
        mode = self.checkpointing.mode if self.checkpointing is not None else "unsloth"
        args = build_sft_config(
            job,
            self.dirs.output,
            on_gpu=on_gpu,
            bf16_supported=bf16_ok,
            tensorboard=job.tensorboard,
            gradient_checkpointing=mode,
        )
        if job.tensorboard:
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.dirs.tensorboard / f"attempt-{job.attempt}")
        model, tokenizer = load_model(job, base_path, adapter_dir, on_gpu=on_gpu, gradient_checkpointing=mode)
        emit_event(
            "model_ready", lora_sha256=lora_weights_sha256(model), resume_from=str(resume_dir) if resume_dir else None
        )
        uploader = BackgroundUploader(
            self.store,
            keep=job.storage.keep_checkpoints,
            fingerprint=fingerprint,
            staging_dir=self.dirs.staging,
            durable_step=self.durable_step,
            on_durable=self._on_durable,
        )
        logs = (self.dirs.tensorboard, self.store.logs_uri()) if job.tensorboard else None
        callback = DurableCheckpointCallback(
            uploader, self.stop, attempt=job.attempt, logs=logs, foreign_checkpoints=self.foreign_steps
        )
        trainer = SFTTrainer(
            model=model, processing_class=tokenizer, train_dataset=texts, args=args, callbacks=[callback]
        )
        trainer.remove_callback(PrinterCallback)

        self.stop.phase = "training"
        try:
            trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
        finally:
            self.stop.phase = "finishing"
        step = trainer.state.global_step

        if self.stop.requested:
            t_flush = time.monotonic()
            uploader.close(timeout=None)
            self.durable_step = uploader.durable_step
            since_signal = time.monotonic() - (self.stop.received_at or t_flush)
            log.warning(
                "preempted: checkpoint-%s durable %.2f s after %s (save %.2f s, upload %.2f s)",
                self.durable_step,
                since_signal,
                self.stop.signal_name,
                callback.last_save_seconds or 0.0,
                time.monotonic() - t_flush,
            )
            emit_event("preempted", step=step, durable_step=self.durable_step, seconds=round(since_signal, 3))
            self._put_progress(step, trainer.state.max_steps, {}, "Preempted")
            return TerminationMessage(
                outcome="preempted",
                reason=f"SIGTERM: stopped at step {step}; checkpoint-{self.durable_step} is durable",
                exit_code=Outcome.PREEMPTED.code,
                step=step,
                durable_step=self.durable_step,
                checkpoint=str(self.store.checkpoint_uri(self.durable_step)) if self.durable_step is not None else None,
            )

        uploader.close(timeout=None)
        self.durable_step = uploader.durable_step
        self.save_adapter(model, tokenizer, fingerprint)
        if job.tensorboard:
            self.store.upload_files(self.dirs.tensorboard, self.store.logs_uri())
        last = next((e for e in reversed(trainer.state.log_history) if "loss" in e), {})
        self._put_progress(step, trainer.state.max_steps, last, "Succeeded")
        return self._succeeded(step)

    def save_adapter(self, model: Any, tokenizer: Any, fingerprint: dict[str, Any]) -> None:
        out = self.dirs.final / "adapter"
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        self.publish_adapter(out, fingerprint)

    def publish_adapter(self, out: Path, fingerprint: dict[str, Any]) -> None:
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = self.job.base_model  # not this pod's cache path
        config_path.write_text(json.dumps(config, indent=2))
        manifest = self.store.upload_adapter(out, fingerprint)
        emit_event("adapter_saved", uri=str(self.store.adapter_uri()), files=len(manifest.files))

    def _on_durable(self, step: int, _manifest: Any) -> None:
        """On the upload thread: report the checkpoint, and free the local disk of older ones."""
        pruned = prune_older_than(self.dirs.output, step)
        emit_event(
            "checkpoint_durable",
            step=step,
            uri=str(self.store.checkpoint_uri(step)),
            local_checkpoints=local_steps(self.dirs.output),
            pruned=pruned,
        )

    def _put_progress(self, step: int, max_steps: int, logs: dict[str, Any], phase: str) -> None:
        record = progress_record(
            step=step,
            max_steps=max_steps,
            logs=logs,
            attempt=self.job.attempt,
            durable_step=self.durable_step,
            phase=phase,
            foreign_checkpoints=self.foreign_steps,
        )
        self.store.put_json(PROGRESS_NAME, record)

    def report_foreign(self, plan: ResumePlan) -> None:
        """Checkpoints another job left under this prefix: said once per attempt, kept (retention only
        deletes this run's own), and carried in progress.json for the operator's status."""
        self.foreign_steps = tuple(sorted(c.step for c in plan.foreign))
        if plan.foreign:
            log.warning(
                "%d checkpoint(s) under %s were made by a different job (steps %s): left in place, not resumed "
                "from; delete them or use a new storage.uri",
                len(plan.foreign),
                self.store.root.child(CHECKPOINTS_DIR),
                list(self.foreign_steps),
            )
            emit_event("foreign_checkpoints", steps=list(self.foreign_steps), uris=[c.uri for c in plan.foreign])

    def _succeeded(self, step: int | None) -> TerminationMessage:
        return TerminationMessage(
            outcome="succeeded",
            reason="adapter saved",
            exit_code=Outcome.SUCCEEDED.code,
            step=step,
            durable_step=self.durable_step,
            adapter=str(self.store.adapter_uri()),
        )


# Trainer state in a checkpoint; everything else in it is the adapter + tokenizer as saved.
TRAINER_STATE_FILES = frozenset(PICKLED_STATE_FILES) | {"trainer_state.json", "training_args.bin"}


def training_finished(checkpoint_dir: Path, max_steps: int) -> bool:
    """Whether the checkpoint is at the end of this job's run. `max_steps` is the job's (its trainer
    state records the length of the run that saved it: an extended run's is shorter); by epochs
    (< 1) the checkpoint's own total counts, which is the job's for a checkpoint of its fingerprint."""
    state = json.loads((checkpoint_dir / "trainer_state.json").read_text())
    total = max_steps if max_steps >= 1 else int(state.get("max_steps", 0))
    return total > 0 and int(state["global_step"]) >= total


def trained_epochs(checkpoint_dir: Path) -> float:
    """The epochs a checkpoint's run has trained, as its trainer state records them."""
    state = json.loads((checkpoint_dir / "trainer_state.json").read_text())
    return float(state.get("epoch") or 0.0)


def adapter_from_checkpoint(checkpoint_dir: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(checkpoint_dir, dest, ignore=lambda _d, names: [n for n in names if n in TRAINER_STATE_FILES])
    return dest


def warn_unchecked(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """A resume from a fingerprint older than some of the current keys: say what went unchecked."""
    keys = unchecked_keys(saved, current)
    if keys:
        log.warning(
            "%s was saved by an older trainer that did not record %s: resuming without checking them "
            "(a change there since would go unnoticed)",
            where,
            ", ".join(keys),
        )
        emit_event("fingerprint_unchecked", uri=where, keys=keys)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file()


def _accelerator() -> tuple[bool, bool]:
    import torch

    if torch.cuda.is_available():
        return True, torch.cuda.is_bf16_supported()
    return False, False


def _gpu_total_bytes() -> int:
    import torch

    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def lora_weights_sha256(model: Any) -> str:
    """Hash of the adapter weights as PEFT saves them (to show which weights a run starts from)."""
    from peft import get_peft_model_state_dict

    from .fingerprint import tensors_sha256

    return tensors_sha256(get_peft_model_state_dict(model))


def check_pickles_safe(checkpoint_dir: Path) -> None:
    """Load each pickled state file with torch's weights-only unpickler; refuse anything else.

    Uses transformers' allow-list (numpy RNG state) exactly as its resume does.
    """
    import pickle

    import torch
    from transformers.trainer import safe_globals

    for name in PICKLED_STATE_FILES:
        path = checkpoint_dir / name
        if not path.is_file():
            continue
        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DamagedCheckpoint(f"{name} is not a plain tensor/state file ({first[:200]})") from None

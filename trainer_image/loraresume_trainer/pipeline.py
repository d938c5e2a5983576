"""One attempt of a job, carried out: observe the store, download while importing, plan, train, publish.

1. Observe the job's storage (before the slow imports: bad credentials or an unreachable endpoint
   fail fast): complete checkpoints, a finished adapter, resume.fromCheckpoint.
2. Start the downloads the plan needs anyway (attempt_plan.plan_prefetch: base model, adapter,
   dataset, the likely checkpoint) on a thread, and run the heavy imports meanwhile (Engine.load_stack).
3. Derive the fingerprint (Engine.prepare), plan the attempt (attempt_plan.plan_attempt): nothing
   to do, or the checkpoints to try; fetch the first that verifies (checkpoint_store.fetch_first_verified).
4. Decide where training starts (attempt_plan.plan_start); a run already at its end publishes the
   checkpoint's adapter.
5. Train (Engine.train: Unsloth + TRL's SFTTrainer, checkpoints streaming to S3 in the background),
   then save the adapter and tokenizer to <storage>/adapter/ with a manifest.

The decisions are attempt_plan's (pure); this module does the I/O. The Engine and the Hooks are
handed in (seams.py): the trainer's own engine by default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from botocore.exceptions import ClientError

from . import compile_cache
from .attempt_plan import (
    CheckpointState,
    Prefetch,
    StoreView,
    plan_attempt,
    plan_prefetch,
    plan_start,
    refuse_early,
)
from .checkpoint_store import (
    CHECKPOINTS_DIR,
    PROGRESS_NAME,
    TRAINER_STATE_FILES,
    CheckpointStore,
    fetch_first_verified,
    fetch_verified,
    parse_checkpoint_uri,
    read_checkpoint_state,
)
from .compile_cache import CompileCache
from .config import JobConfig
from .errors import ConfigError, DamagedCheckpoint
from .fingerprint import unchecked_keys
from .local_checkpoints import local_steps, prune_older_than
from .manifest import Manifest
from .outcome import Outcome, TerminationMessage
from .progress import StartupClock, emit_event, progress_record
from .resume_plan import Candidate, ResumeMode, ResumePlan
from .s3client import is_not_found, make_s3_client, s3_errors
from .s3uri import S3Uri
from .seams import Engine, Hooks, Inputs
from .stop_signal import StopRequest
from .training_args import determinism_env

log = logging.getLogger(__name__)

T = TypeVar("T")


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


class _Background:
    """A function on a thread; result() re-raises its exception in the caller."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._result = fn()
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


class Pipeline:
    """One attempt of one job. `run()` returns the termination message; errors propagate typed."""

    def __init__(
        self,
        job: JobConfig,
        stop: StopRequest,
        *,
        engine: Engine | None = None,
        hooks: Hooks | None = None,
        clock: StartupClock | None = None,
    ) -> None:
        if engine is None:
            from .unsloth_engine import UnslothEngine

            engine = UnslothEngine()
        self.job = job
        self.stop = stop
        self.engine: Engine = engine
        self.hooks = hooks or Hooks()
        self.clock = clock or StartupClock(attempt=job.attempt)
        self.dirs = WorkDirs(job.work_dir)
        self.client = make_s3_client(job.storage.endpoint, job.storage.region)
        self.store = CheckpointStore(self.client, S3Uri.parse(job.storage.uri))
        self.durable_step: int | None = None
        self.foreign_steps: tuple[int, ...] = ()  # ResumePlan.foreign, reported in progress.json
        self.manifests: dict[str, Manifest] = {}  # checkpoint URI -> its manifest, as observe() read it
        self.compile_cache: CompileCache | None = None

    @contextmanager
    def timed(self, name: str, **fields: Any) -> Iterator[None]:
        """Report the enclosed part to the hooks (benchmarks time the attempt through this)."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.hooks.phase(name, t0, time.monotonic(), **fields)

    # 1. what the store holds -------------------------------------------------------------
    def observe(self) -> StoreView:
        """One read of each: the listing with every manifest, the adapter's manifest, the explicit
        checkpoint's manifest (kept in `manifests`: the downloads verify against them, unread again)."""
        with self.timed("observe"):
            listed = self.store.complete_checkpoints()
            self.manifests.update({str(self.store.checkpoint_uri(s)): m for s, m in listed})
            complete = tuple(Candidate(s, str(self.store.checkpoint_uri(s)), m.fingerprint) for s, m in listed)
            done = self.store.read_adapter_manifest()
            explicit, error = None, None
            try:
                explicit = self.explicit_candidate(own_newest=complete[0] if complete else None)
            except ConfigError as exc:
                error = exc
        return StoreView(complete, done.fingerprint if done is not None else None, explicit, error)

    def explicit_candidate(self, own_newest: Candidate | None = None) -> Candidate | None:
        """resume.fromCheckpoint resolved to its manifest. One of this job's own checkpoints that is not
        complete (the operator relaunches a preempted attempt from the checkpoint its trainer said was
        durable, without reading S3 first) is no error while the job has a complete one: `own_newest`,
        from which it resumes, as from any damaged checkpoint. Raises ConfigError otherwise."""
        ref = self.job.resume.from_checkpoint
        if ref is None:
            return None
        parsed = parse_checkpoint_uri(ref)
        if parsed is None:
            raise ConfigError(
                f"{ref} is not a checkpoint URI (expected s3://bucket/<job>/checkpoints/checkpoint-<step>/)",
                field="resume.fromCheckpoint",
            )
        root, step = parsed
        store = CheckpointStore(self.client, root)
        manifest = store.read_manifest(step)
        if manifest is None and own_newest is not None and root.as_dir() == self.store.root.as_dir():
            log.warning(
                "resume.fromCheckpoint %s is not a complete checkpoint (no manifest); resuming from this job's "
                "newest complete checkpoint, %s",
                ref,
                own_newest.uri,
            )
            return None
        if manifest is None:
            raise ConfigError(f"{ref} is not a complete checkpoint (no manifest)", field="resume.fromCheckpoint")
        uri = str(store.checkpoint_uri(step))
        self.manifests[uri] = manifest
        return Candidate(step, uri, manifest.fingerprint)

    # 2. inputs, fetched while the imports run ----------------------------------------------
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

    def fetch_inputs(self, prefetch: Prefetch) -> Inputs:
        """The job's inputs and the likely checkpoint; run on the prefetch thread (boto3 clients are
        thread-safe). A damaged checkpoint is recorded, not raised: the plan decides what it means."""
        job = self.job
        self.hooks.before_inputs()
        emit_event(
            "prefetch",
            seconds=round(self.clock.seconds(), 3),
            sources=[d.source for d in prefetch.inputs],
            checkpoint=prefetch.checkpoint.uri if prefetch.checkpoint else None,
        )
        checkpoints: dict[str, Path | DamagedCheckpoint] = {}
        if prefetch.checkpoint is not None:
            cand = prefetch.checkpoint
            with self.timed("fetch_checkpoint", step=cand.step, ahead=True):
                try:
                    checkpoints[cand.uri] = fetch_verified(
                        self.client,
                        cand,
                        self.dirs.resume / "ahead",
                        verify=None,  # the engine's own check (torch) runs after the imports
                        manifest=self.manifests.get(cand.uri),
                    )
                except DamagedCheckpoint as exc:
                    checkpoints[cand.uri] = exc
        inputs = Inputs(checkpoints=checkpoints)
        if self.engine.fetches_inputs:
            with self.timed("fetch_inputs", sources=[d.source for d in prefetch.inputs]):
                base_path = self.fetch_dir(job.base_model, "base", "base_model")
                adapter_dir = Path(self.fetch_dir(job.adapter, "adapter", "adapter")) if job.adapter else None
                dataset_file = self.fetch_dataset_file()
            inputs = Inputs(base_path, adapter_dir, dataset_file, checkpoints)
        emit_event("prefetch_done", seconds=round(self.clock.seconds(), 3))
        return inputs

    def restore_compile_cache(self) -> CompileCache | None:
        """Point the compile caches into the work dir and fill them (compile_cache.py); None when the
        engine compiles nothing or $LORARESUME_COMPILE_CACHE is off. Never fails the attempt."""
        if not self.engine.compiles or not compile_cache.enabled():
            return None
        with self.timed("restore_compile_cache"):
            cache = CompileCache(self.store, self.dirs.root / "compile-cache", compile_cache.key_inputs(self.job))
            cache.point_env()
            source = cache.restore()
        if source != "miss":
            self.clock.mark("compile_cache_restored", source=source, files=cache.file_count())
        return cache

    # 3. the checkpoint to start from ---------------------------------------------------------
    def fetch_candidate(
        self, plan: ResumePlan, ready: Mapping[str, Path | DamagedCheckpoint] | None = None
    ) -> tuple[Candidate, Path, CheckpointState] | None:
        """The first candidate that downloads and verifies (the checkpoint contract, then the engine's
        own check); damaged ones are skipped with a warning and a checkpoint_damaged event."""
        found = None
        if plan.candidates:
            with self.timed("fetch_candidate"):
                found = fetch_first_verified(
                    self.client,
                    plan.candidates,
                    self.dirs.resume,
                    verify=self.engine.verify_checkpoint,
                    ready=ready,
                    manifests=self.manifests,
                )
        for uri, path in (ready or {}).items():  # a prefetched checkpoint the plan did not take: free the disk
            if (found is None or uri != found.candidate.uri) and isinstance(path, Path):
                shutil.rmtree(path, ignore_errors=True)
        if found is None:
            return None
        return found.candidate, found.path, read_checkpoint_state(found.path)

    # the whole attempt ------------------------------------------------------------------
    def run(self) -> TerminationMessage:
        job = self.job
        t_start = time.monotonic()
        with self.timed("run"):
            view = self.observe()
            refuse_early(view)  # a bad resume.fromCheckpoint fails in a second, not after the imports
            self.durable_step = view.durable_step
            aborted = self.store.abort_unfinished_uploads()  # an earlier attempt's, killed mid-upload
            if aborted:
                log.info("aborted %d unfinished multipart upload(s) under %s", len(aborted), self.store.root)
                emit_event("uploads_aborted", keys=aborted)
            prefetch = plan_prefetch(job, view, inputs=self.engine.fetches_inputs)
            # The downloads run while the heavy imports do (nothing on that thread imports them).
            fetching = _Background(lambda: self.fetch_inputs(prefetch), "loraresume-prefetch")
            self.compile_cache = self.restore_compile_cache()  # before the imports: they read its variables
            os.environ.update(determinism_env(job.training, os.environ))  # before the imports, likewise
            with self.timed("load_stack"):
                self.engine.load_stack(self)
            if self.engine.compiles:  # nothing has compiled yet: only the imports ran
                compile_cache.after_imports(self.compile_cache)
            self.clock.mark("imports_done")
            inputs: Inputs = fetching.result()
            self.clock.mark("inputs_ready")
            with self.timed("prepare"):
                prepared = self.engine.prepare(self, inputs, view)
            fingerprint = prepared.fingerprint
            plan = plan_attempt(job, view, fingerprint, adapter_uri=str(self.store.adapter_uri()))
            if plan.done:
                assert view.adapter_fingerprint is not None
                warn_unchecked(view.adapter_fingerprint, fingerprint, str(self.store.adapter_uri()))
                log.info("adapter already complete in %s: nothing to do", self.store.adapter_uri())
                return self.succeeded(None)

            fetched = self.fetch_candidate(plan.resume, inputs.checkpoints)
            if fetched is not None and plan.resume.mode is ResumeMode.EXACT:
                warn_unchecked(fetched[0].fingerprint, fingerprint, fetched[0].uri)
            self.report_foreign(plan.resume)
            start = plan_start(plan, fingerprint, fetched, checkpoints_uri=str(self.store.root.child(CHECKPOINTS_DIR)))
            ahead = fetched is not None and isinstance(inputs.checkpoints.get(fetched[0].uri), Path)
            self.clock.mark("checkpoint_verified", step=start.step, prefetched=ahead)
            emit_event(
                "start",
                attempt=job.attempt,
                mode=start.mode.value,
                checkpoint=start.checkpoint.uri if start.checkpoint else None,
                step=start.checkpoint.step if start.checkpoint else 0,
                prepare_seconds=round(time.monotonic() - t_start, 3),
                **self.engine.event_fields,
            )
            if start.finished:
                # Killed after the last checkpoint was durable but before the adapter was: HF would
                # train one step past max_steps, so publish the checkpoint's adapter instead.
                assert start.checkpoint_dir is not None
                self.durable_step = start.step
                self.publish_adapter(
                    adapter_from_checkpoint(start.checkpoint_dir, self.dirs.final / "adapter"), fingerprint
                )
                self.put_progress(start.step, start.step, {}, "Succeeded")
                return self.succeeded(start.step)
            return self.engine.train(self, prepared, start)

    # publishing --------------------------------------------------------------------------
    def publish_adapter(self, out: Path, fingerprint: dict[str, Any]) -> None:
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = self.job.base_model  # not this pod's cache path
        config_path.write_text(json.dumps(config, indent=2))
        manifest = self.store.upload_adapter(out, fingerprint)
        emit_event("adapter_saved", uri=str(self.store.adapter_uri()), files=len(manifest.files))

    def on_durable(self, step: int, _manifest: Any) -> None:
        """On the upload thread: report the checkpoint, and free the local disk of older ones."""
        pruned = prune_older_than(self.dirs.output, step)
        emit_event(
            "checkpoint_durable",
            step=step,
            uri=str(self.store.checkpoint_uri(step)),
            local_checkpoints=local_steps(self.dirs.output),
            pruned=pruned,
        )

    def progress(self, step: int, max_steps: int, logs: Mapping[str, Any], phase: str) -> dict[str, Any]:
        """The progress.json record of this attempt now (start-up phases included)."""
        return progress_record(
            step=step,
            max_steps=max_steps,
            logs=logs,
            attempt=self.job.attempt,
            durable_step=self.durable_step,
            phase=phase,
            foreign_checkpoints=self.foreign_steps,
            startup=self.clock.phases,
        )

    def put_progress(self, step: int, max_steps: int, logs: Mapping[str, Any], phase: str) -> None:
        self.store.put_json(PROGRESS_NAME, self.progress(step, max_steps, logs, phase))

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

    def preempted(self, step: int, max_steps: int, logs: Mapping[str, Any], **timing: float) -> TerminationMessage:
        """After a SIGTERM stop with `durable_step` durable: report, and the termination message."""
        since_signal = time.monotonic() - (self.stop.received_at or time.monotonic())
        log.warning(
            "preempted: checkpoint-%s durable %.2f s after %s%s",
            self.durable_step,
            since_signal,
            self.stop.signal_name,
            "".join(f" ({k} {v:.2f} s)" for k, v in timing.items()),
        )
        emit_event("preempted", step=step, durable_step=self.durable_step, seconds=round(since_signal, 3))
        self.put_progress(step, max_steps, logs, "Preempted")
        return TerminationMessage(
            outcome="preempted",
            reason=f"SIGTERM: stopped at step {step}; checkpoint-{self.durable_step} is durable",
            exit_code=Outcome.PREEMPTED.code,
            step=step,
            durable_step=self.durable_step,
            checkpoint=str(self.store.checkpoint_uri(self.durable_step)) if self.durable_step is not None else None,
        )

    def succeeded(self, step: int | None) -> TerminationMessage:
        return TerminationMessage(
            outcome="succeeded",
            reason="adapter saved",
            exit_code=Outcome.SUCCEEDED.code,
            step=step,
            durable_step=self.durable_step,
            adapter=str(self.store.adapter_uri()),
        )


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

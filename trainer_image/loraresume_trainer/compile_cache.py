"""Compile caches that survive attempts: Triton's kernels, inductor's graphs, Unsloth's generated modules,
the CUDA driver's and torch's JIT-compiled kernels.

A pod starts with an empty scratch volume, so every relaunch used to compile again (on the H200:
first step 10 s cold against 3 s warm, start-up 58.6 s against 43.6 s; issue 16). Here:

1. Before the heavy imports, the caches are pointed into the attempt's work dir (TRITON_CACHE_DIR,
   TORCHINDUCTOR_CACHE_DIR, UNSLOTH_COMPILE_LOCATION, CUDA_CACHE_PATH, PYTORCH_KERNEL_CACHE_PATH: each
   reader takes its variable when it first needs the directory, so they must be set before the
   imports). After the imports, `after_imports` points back what an import changed and fixes
   Triton's ptxas (either would otherwise make a relaunch miss what it restored).
2. They are restored from `<storage.uri>/compile-cache/<key>/` (one tar per cache plus a
   `_COMPLETE.json` manifest with sizes and sha256, written last: checkpoint_store's manifest and
   verified download), else from a directory baked into the image ($LORARESUME_COMPILE_CACHE_SEED).
   The key hashes what makes compiled code reusable: the GPU model, the library versions, the model
   and adapter named by the job, and the training settings that shape the kernels. A cache whose
   manifest records other key inputs, or that fails verification or extraction, is ignored with a
   warning and a `compile_cache` event: a relaunch then compiles, as it would have anyway.
3. After the first steps of an attempt that found none in storage, the caches are archived and
   uploaded on a thread (best effort: a preemption meanwhile leaves no manifest, so nothing half
   written is ever read).

`python -m loraresume_trainer.compile_cache export <cache URI> <dir>` writes a verified cache out as
the directory the image bakes in (docs/trainer-image.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import JobConfig
from .errors import TrainerError
from .progress import emit_event
from .s3uri import S3Uri

log = logging.getLogger(__name__)

# Cache name -> the variable its library reads (Triton's own kernels, inductor's FX graph and kernel
# cache, Unsloth's generated trainer and model modules, the CUDA driver's JIT of kernels shipped as PTX
# only (default ~/.nv/ComputeCache), torch's NVRTC-compiled kernels (default ~/.cache/torch/kernels)).
# The last two live under $HOME by default, which a relaunched pod starts without: an 8B run left
# ~0.9 MB there on every node (RESULTS.md, "A relaunch on a clean node").
CACHES: Mapping[str, str] = {
    "triton": "TRITON_CACHE_DIR",
    "inductor": "TORCHINDUCTOR_CACHE_DIR",
    "unsloth": "UNSLOTH_COMPILE_LOCATION",
    "cuda": "CUDA_CACHE_PATH",
    "torch_kernels": "PYTORCH_KERNEL_CACHE_PATH",
}
PTXAS_VAR = "TRITON_PTXAS_PATH"
# Settings the caches need to be of use, set unless the pod's env sets them. AOTAutograd's cache (under
# inductor's dir) refuses graphs holding custom autograd.Functions unless allowed, and Unsloth's decoder
# blocks hold them: without it every relaunch traces and partitions the joint graph again (an 8B
# relaunch's first step on an H100: 10.2 s refused, 5.6 s allowed; RESULTS.md). PyTorch keeps it off
# because the key does not cover a Function's Python code; ours does (the library versions and the
# model), and the graph itself is in it.
# Unsloth's own persistent compile cache ("mega cache") is off: it lives under $HOME, which a relaunched
# pod starts without, and saves at a normal exit only (a preempted trainer ends with os._exit); this cache
# holds the same artifacts (inductor's dir).
ENV_DEFAULTS: Mapping[str, str] = {
    "TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD": "1",
    "UNSLOTH_MEGA_CACHE": "0",
}
ENV_SEED = "LORARESUME_COMPILE_CACHE_SEED"  # a directory in the image: one subdirectory per CACHES name, key.json
ENV_SWITCH = "LORARESUME_COMPILE_CACHE"  # "off": neither restore nor save
KEY_FILE = "key.json"
# Libraries whose versions decide whether compiled code can be reused.
VERSIONED = ("torch", "triton", "transformers", "trl", "peft", "accelerate", "unsloth", "unsloth_zoo", "bitsandbytes")
# Training settings that shape the compiled kernels (batch shapes, precision, checkpointing, optimizer).
SHAPING = ("per_device_train_batch_size", "padding_free", "packing", "optim", "bf16", "fp16")
SAVE_AFTER_STEPS = 3  # the first steps compile (and recompile once); archive after them
# Caches kept per job: one per key a job ran with (GPU models of a mixed fleet, a library upgrade);
# older ones are deleted when a new one is saved.
KEEP_KEYS = 3
_SKIP_SUFFIXES = (".lock", ".tmp")


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "false", "no")


def gpu_identity() -> str:
    """The GPU model without importing torch: the NVIDIA driver's /proc entry, else nvidia-smi, else 'cpu'."""
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            continue
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "cpu"


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def key_inputs(
    job: JobConfig, *, gpu: str | None = None, versions: Mapping[str, str | None] | None = None
) -> dict[str, Any]:
    """What a compile cache is keyed by (known before the imports: from the job and package metadata)."""
    from .training_args import effective_training

    training = effective_training(job)
    return {
        "gpu": gpu if gpu is not None else gpu_identity(),
        "versions": dict(versions if versions is not None else library_versions()),
        "model": {
            "base_model": job.base_model,
            "adapter": job.adapter,
            "max_seq_length": job.max_seq_length,
            "load_in_4bit": job.load_in_4bit,
            "dtype": job.dtype,
            "lora": job.lora.model_dump(mode="json"),
        },
        "training": {
            "gradient_checkpointing": job.gradient_checkpointing,
            **{k: training[k] for k in SHAPING if k in training},
        },
    }


def cache_key(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _normalized(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _files(root: Path) -> list[Path]:
    """Regular files under `root`, sorted, without locks and temporaries (symlinks are not followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(_SKIP_SUFFIXES) or path.is_symlink() or not path.is_file():
                continue
            found.append(path)
    return found


def archive(src: Path, dest: Path) -> int:
    """Write the regular files under `src` to the tar `dest`; returns how many. A file that vanishes
    while archived (a library replacing it) is left out."""
    count = 0
    with tarfile.open(dest, "w") as tar:
        for path in _files(src):
            try:
                tar.add(str(path), arcname=path.relative_to(src).as_posix(), recursive=False)
                count += 1
            except FileNotFoundError:
                continue
    return count


def extract(tar_path: Path, dest: Path) -> None:
    """Unpack a cache tar into the empty or missing directory `dest`, all or nothing. tarfile's "data"
    filter refuses absolute paths, `..`, links leaving the tree and device files (TarError)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        with tarfile.open(tar_path, "r") as tar:
            tar.extractall(tmp, filter="data")
        if dest.exists():
            dest.rmdir()  # empty (checked by the caller): replaced whole
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class CompileCache:
    """The compile caches of one attempt: where they live, their restore and their save."""

    def __init__(self, store: Any, root: Path, inputs: Mapping[str, Any]) -> None:
        self.store = store
        self.root = Path(root)
        self.inputs = _normalized(inputs)
        self.key = cache_key(self.inputs)
        self.uri: S3Uri = store.compile_cache_uri(self.key)
        self.dirs = {name: self.root / name for name in CACHES}
        self.in_storage = False  # a complete cache for this key was found in storage
        self._saver: threading.Thread | None = None

    def point_env(self) -> None:
        """Point each library at its cache directory here (before the imports)."""
        for directory in self.dirs.values():
            directory.mkdir(parents=True, exist_ok=True)
        self._point()
        for var, value in ENV_DEFAULTS.items():
            os.environ.setdefault(var, value)

    def _point(self) -> None:
        for name, var in CACHES.items():
            os.environ[var] = str(self.dirs[name])

    def repoint(self) -> list[str]:
        """After the heavy imports: point back the variables an import changed, and name them. `import
        unsloth` drops TORCHINDUCTOR_CACHE_DIR (unsloth_zoo's patch_torch_compile), which left inductor's
        FX-graph and AOTAutograd caches in the node's /tmp, outside what is saved and restored."""
        changed = [var for name, var in CACHES.items() if os.environ.get(var) != str(self.dirs[name])]
        self._point()
        if changed:
            log.info("compile cache: %s changed by the imports; pointed back into %s", ", ".join(changed), self.root)
        return changed

    def _empty(self) -> bool:
        return not any(_files(d) for d in self.dirs.values() if d.is_dir())

    def restore(self) -> str:
        """Fill the caches: 'local' (this node's work dir has them), 'storage', 'seed' (the image's), or
        'miss'. Never raises: a damaged or mismatched cache is a warning, and the run compiles."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self._empty():
            emit_event("compile_cache", result="local", key=self.key, files=self.file_count())
            return "local"
        try:
            source = self._restore_from_storage()
        except (TrainerError, OSError, tarfile.TarError, ValueError) as exc:
            self._clear()
            log.warning("compile cache %s not used: %s", self.uri, exc)
            emit_event("compile_cache", result="damaged", key=self.key, uri=str(self.uri), reason=str(exc)[:300])
            source = None
        if source is None:
            source = self._restore_from_seed()
        emit_event("compile_cache", result=source or "miss", key=self.key, uri=str(self.uri), files=self.file_count())
        return source or "miss"

    def _restore_from_storage(self) -> str | None:
        manifest = self.store.read_tree_manifest(self.uri)
        if manifest is None:
            return None
        if manifest.kind != "compile-cache" or _normalized(manifest.fingerprint) != self.inputs:
            raise TrainerError(f"its manifest was made for other key inputs ({manifest.kind})")
        self.in_storage = True
        with tempfile.TemporaryDirectory(prefix="compile-cache-", dir=self.root) as tmp:
            fetched = self.store.download_tree(self.uri, manifest, Path(tmp) / "archives")
            for entry in manifest.files:
                name = entry.path.removesuffix(".tar")
                if name not in CACHES or not entry.path.endswith(".tar"):
                    raise TrainerError(f"unexpected file {entry.path}")
            for entry in manifest.files:
                extract(fetched / entry.path, self.dirs[entry.path.removesuffix(".tar")])
        return "storage"

    def _restore_from_seed(self) -> str | None:
        seed = os.environ.get(ENV_SEED, "").strip()
        if not seed:
            return None
        root = Path(seed)
        try:
            recorded = json.loads((root / KEY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("compile cache seed %s not used: no readable %s (%s)", root, KEY_FILE, exc)
            return None
        if _normalized(recorded) != self.inputs:
            log.warning("compile cache seed %s not used: it was made for other key inputs", root)
            emit_event("compile_cache", result="seed_mismatch", key=self.key, seed=str(root))
            return None
        try:
            for name, dest in self.dirs.items():
                if (root / name).is_dir():
                    shutil.copytree(root / name, dest, dirs_exist_ok=True, symlinks=False)
        except OSError as exc:
            self._clear()
            log.warning("compile cache seed %s not used: %s", root, exc)
            return None
        return "seed"

    def _clear(self) -> None:
        for path in self.dirs.values():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True, exist_ok=True)

    def file_count(self) -> int:
        return sum(len(_files(d)) for d in self.dirs.values() if d.is_dir())

    @property
    def should_save(self) -> bool:
        return not self.in_storage

    def save(self) -> bool:
        """Archive the caches and publish them under the key (manifest last). Best effort: False (and a
        warning) when there is nothing to save or the upload failed."""
        if self.in_storage:
            return False
        started = time.monotonic()
        staging = self.root.parent / "compile-cache-out"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            counts = {name: archive(d, staging / f"{name}.tar") for name, d in self.dirs.items() if d.is_dir()}
            for name, count in counts.items():
                if count == 0:
                    (staging / f"{name}.tar").unlink()
            if not any(counts.values()):
                emit_event("compile_cache_saved", key=self.key, files=0, skipped="nothing compiled")
                return False
            manifest = self.store.upload_tree(
                staging, self.uri, kind="compile-cache", step=None, fingerprint=dict(self.inputs)
            )
        except (TrainerError, OSError, tarfile.TarError) as exc:
            log.warning("compile cache not saved to %s: %s", self.uri, exc)
            emit_event("compile_cache_saved", key=self.key, error=str(exc)[:300])
            return False
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.in_storage = True
        emit_event(
            "compile_cache_saved",
            key=self.key,
            uri=str(self.uri),
            files=sum(counts.values()),
            bytes=manifest.total_bytes,
            seconds=round(time.monotonic() - started, 3),
            pruned=self.prune(),
        )
        return True

    def prune(self, keep: int = KEEP_KEYS) -> list[str]:
        """Delete this job's oldest compile caches beyond the newest `keep` (never this attempt's);
        returns their keys. Best effort: a failure is a warning."""
        try:
            keys = [key for key, _ in self.store.compile_cache_keys() if key != self.key]
            doomed = keys[max(0, keep - 1) :]
            for key in doomed:
                self.store.delete_tree(self.store.compile_cache_uri(key))
        except (TrainerError, ValueError) as exc:
            log.warning("old compile caches under %s not pruned: %s", self.uri, exc)
            return []
        return doomed

    def save_in_background(self) -> None:
        """save() on a daemon thread, once (a preemption meanwhile leaves it without a manifest: unused)."""
        if self._saver is None and self.should_save:
            self._saver = threading.Thread(target=self.save, name="compile-cache-save", daemon=True)
            self._saver.start()

    def wait(self, timeout: float | None = None) -> None:
        if self._saver is not None:
            self._saver.join(timeout)


def after_imports(cache: CompileCache | None) -> None:
    """What a compiling attempt sets once the heavy imports ran and before anything compiles: the cache
    variables an import changed pointed back (when the caches are kept), one ptxas, Triton's builds
    counted."""
    if cache is not None:
        cache.repoint()
    pin_ptxas()
    watch_triton_compiles()


def pin_ptxas() -> str | None:
    """Have every Triton compile of this process use the ptxas inductor uses (torch's bundled one, unless
    the pod sets TRITON_PTXAS_PATH), from the first kernel on; returns the path, None for Triton's own.

    Triton's cache key holds the ptxas version. Inductor sets the variable in the trainer's process
    only when it first builds a kernel there: on a cold attempt that is after Unsloth's own kernels
    compiled with Triton's bundled ptxas (inductor builds its kernels in worker processes), on a
    relaunch that found inductor's graphs in the cache it is before them. So no Unsloth kernel a
    relaunch compiled ever matched a saved one (an H100: ptxas 12.8 against 13.0; RESULTS.md, "Why a
    relaunch compiled Unsloth's kernels again"). Calls inductor's own rule, so it stays torch's."""
    try:
        from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path
    except ImportError:  # no inductor, or a torch without the rule: Triton picks its own, every time
        return os.environ.get(PTXAS_VAR)
    before = os.environ.get(PTXAS_VAR)
    try:
        _set_triton_ptxas_path()
    except Exception as exc:  # a private function: a torch that changed it costs recompiles, not the attempt
        log.warning("compile cache: Triton's ptxas not pinned (%s); a relaunch may compile Triton kernels again", exc)
    chosen = os.environ.get(PTXAS_VAR)
    if chosen != before:
        log.info("compile cache: Triton's ptxas pinned to %s (inductor's)", chosen)
    return chosen


class TritonCompiles:
    """Counts this process's Triton kernel builds, found in Triton's cache or compiled, through Triton's
    compilation listener (`triton.knobs.compilation.listener`). torch's counters cover inductor's graphs
    only: a relaunch whose every Unsloth kernel missed the restored cache showed all hits there (RESULTS.md,
    "Why a relaunch compiled Unsloth's kernels again"). Builds in inductor's worker processes are not
    seen; those are inductor's own kernels, whose graphs torch counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def __call__(self, **build: Any) -> None:
        # Triton calls it inside every compile (keywords: src, metadata, metadata_group, times, cache_hit):
        # it must never raise, whatever a later Triton passes.
        name = "triton_cache_hit" if build.get("cache_hit") else "triton_compiled"
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


TRITON_COMPILES = TritonCompiles()


def watch_triton_compiles() -> bool:
    """Listen to Triton's builds (after the imports, before the first kernel), unless another listener
    is set or this Triton has none; whether it listens now."""
    try:
        from triton import knobs
    except ImportError:
        return False
    compilation = getattr(knobs, "compilation", None)
    if compilation is None or not hasattr(compilation, "listener"):
        return False
    if compilation.listener is None:
        compilation.listener = TRITON_COMPILES
    return compilation.listener is TRITON_COMPILES


def lookup_counts() -> dict[str, int]:
    """This process's compile-cache lookups so far: as torch counts them (inductor's FX graphs,
    AOTAutograd's joint graphs: hits, misses, bypasses) and Triton's kernel builds (TritonCompiles);
    empty when nothing was compiled. Shows whether a restored cache spared the first step its
    compilation."""
    utils = sys.modules.get("torch._dynamo.utils")
    counters = getattr(utils, "counters", None) or {}
    wanted = (("inductor", "fxgraph_cache_"), ("aot_autograd", "autograd_cache_"))
    counts = {
        name: int(count)
        for group, prefix in wanted
        for name, count in sorted(counters.get(group, {}).items())
        if name.startswith(prefix) and count
    }
    return counts | TRITON_COMPILES.snapshot()


def export(store: Any, uri: S3Uri, dest: Path) -> Path:
    """Write the verified cache at `uri` out as a seed directory for an image (triton/, inductor/,
    unsloth/ and key.json). Raises TrainerError when it is missing or damaged."""
    manifest = store.read_tree_manifest(uri)
    if manifest is None or manifest.kind != "compile-cache":
        raise TrainerError(f"no complete compile cache at {uri}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compile-cache-export-") as tmp:
        fetched = store.download_tree(uri, manifest, Path(tmp) / "archives")
        for entry in manifest.files:
            name = entry.path.removesuffix(".tar")
            if name not in CACHES:
                raise TrainerError(f"unexpected file {entry.path} in {uri}")
            target = dest / name
            if target.exists() and any(target.iterdir()):
                raise TrainerError(f"{target} is not empty")
            extract(fetched / entry.path, target)
    (dest / KEY_FILE).write_text(json.dumps(manifest.fingerprint, sort_keys=True, indent=1) + "\n", encoding="utf-8")
    return dest


def main(argv: list[str] | None = None) -> int:
    """`python -m loraresume_trainer.compile_cache export [--endpoint URL] s3://.../compile-cache/<key>/ DIR`."""
    import argparse

    from .checkpoint_store import CheckpointStore
    from .s3client import make_s3_client

    parser = argparse.ArgumentParser(prog="python -m loraresume_trainer.compile_cache")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write a verified compile cache out as an image's seed directory")
    exp.add_argument("uri", help="s3://bucket/<job>/compile-cache/<key>/")
    exp.add_argument("dest", type=Path)
    exp.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL") or None)
    exp.add_argument("--region", default=None)
    args = parser.parse_args(argv)
    uri = S3Uri.parse(args.uri).as_dir()
    store = CheckpointStore(make_s3_client(args.endpoint, args.region), S3Uri(uri.bucket))
    try:
        out = export(store, uri, args.dest)
    except TrainerError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} (set {ENV_SEED}={out} in the image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

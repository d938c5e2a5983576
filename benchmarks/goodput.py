"""Goodput, measured end to end (issue 16): what a preemption costs the seed job, and in what parts.

The seed job (8B shape on the H200: 4-bit, LoRA r=16 on 7 projections, batch 2 x grad accumulation 4,
2048-token rows, adamw_8bit) is run with the project's own `loraresume-train`, every attempt a fresh
process in a fresh work dir (a new pod on a new node), against a moto S3 server on the machine:

1. uninterrupted, once (a new job: no compile cache in its storage, so it compiles and saves one);
2. for each variant, the same job under a new storage prefix with K SIGTERM preemptions at random
   steps (seeded), each followed at once by a relaunch that resumes from the checkpoint the SIGTERM
   saved:
   - `restored`: the compile caches the first attempt saved are restored by every relaunch;
   - `cold`: `LORARESUME_COMPILE_CACHE=off`, every relaunch compiles, as before issue 16.

Per preemption it reports the overhead, the extra wall time of the preempted story over the
uninterrupted run divided by K, and its parts from the trainer's own events: the JIT save (SIGTERM to
the process's exit, the checkpoint durable in S3 on the way), the relaunch's start-up (process start
to its first step done, less one steady step: its split by phase from the `startup` events), and the
work lost (steps trained again after the resume, times the steady step time; none with SIGTERM);
the rest is what the parts do not explain (slower first steps after a restart, the S3 upload's
interference). From it, goodput at one preemption every 20 minutes and every hour, 1 - overhead / T;
and whether each preempted story's adapter equals the uninterrupted run's, bitwise.

    source benchmarks/gpu_env.sh && python3 benchmarks/goodput.py            # H200 (benchmarks/README.md)
    python benchmarks/goodput.py --cpu-smoke                                 # here: the tiny model on the CPU

Results go to $OUT/goodput.json (partial results after every attempt) and a table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "trainer_image"), str(ROOT / "sandbox")]

from tests.support.trainer_runs import Attempt, Kill, job_config, run_attempt  # noqa: E402
from tests.support.waiting import free_port  # noqa: E402

BUCKET = "goodput"
PERIODS = {"per_20_min": 1200.0, "per_hour": 3600.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="the tiny model on the CPU (a few minutes)")
    p.add_argument("--size", default=None, help="model shape: 8b (default on a GPU), 1b, tiny (CPU smoke)")
    p.add_argument("--steps", type=int, default=None, help="max_steps of the job (default 40; CPU smoke 30)")
    p.add_argument("--preemptions", type=int, default=3, help="K: SIGTERMs per preempted story")
    p.add_argument("--variants", default="restored,cold", help="comma list of restored, cold")
    p.add_argument(
        "--repeat-uninterrupted",
        action="store_true",
        help="run the uninterrupted job a second time (fresh node, own prefix) and compare: is training "
        "on this machine deterministic run to run?",
    )
    p.add_argument("--seed", type=int, default=20261205, help="seeds the preemption steps")
    p.add_argument(
        "--training",
        type=json.loads,
        default={},
        help="extra fields for every job's `training` (JSON), e.g. '{\"full_determinism\": true}'",
    )
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("GOODPUT_BUDGET_S", "560")))
    p.add_argument(
        "--trainer-python",
        default=None,
        help="the interpreter every attempt runs under (default this one's); on the GPU machine "
        "$LOCK_PYTHON from gpu_lock.py install: the trainer image's packages and no others",
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/goodput"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/goodput-out")))
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- setup


def start_s3(work: Path) -> tuple[subprocess.Popen[bytes], str, Any]:
    os.environ.update(AWS_ACCESS_KEY_ID="goodput", AWS_SECRET_ACCESS_KEY="goodput", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    log = open(work / "moto.log", "wb")
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for _ in range(100):
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            time.sleep(0.2)
    return moto, endpoint, client


def build(ns: argparse.Namespace, size: str, steps: int, seq: int, batch: int, accum: int) -> tuple[Path, Path]:
    """The base model and full-length rows, by gpu_bench's builder (random init, 4-bit on a GPU)."""
    out = ns.work / f"base-{size}"
    data = ns.work / f"rows-{size}-{seq}.jsonl"
    q4 = not ns.cpu_smoke
    model = out / ("bnb4" if q4 else "model")
    if not (model / "config.json").is_file() or not data.is_file():
        argv = [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_bench.py"),
            "--child",
            "build",
            "--size",
            size,
            "--out",
            str(out),
            "--data",
            str(data),
            "--seq",
            str(seq),
            "--rows",
            str(steps * batch * accum),
            "--tokenizer-vocab",
            "600" if size == "tiny" else "8000",
            *(["--q4"] if q4 else []),
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "trainer_image"), os.environ.get("PYTHONPATH", "")]),
        }
        subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return model, data


def make_job(ns: argparse.Namespace, endpoint: str, base: Path, data: Path, name: str, setup: dict[str, Any]) -> dict:
    cfg = job_config(
        ns.work / name,
        endpoint=endpoint,
        storage_uri=f"s3://{BUCKET}/{name}/",
        base_model=str(base),
        dataset_file=str(data),
        training={
            "per_device_train_batch_size": setup["batch"],
            "gradient_accumulation_steps": setup["accum"],
            "warmup_steps": 5,
            "max_steps": setup["steps"],
            "learning_rate": 2e-4,
            "optim": setup["optim"],
            "logging_steps": 1,
            "save_steps": setup["save_steps"],
            "seed": 3407,
            **setup["training"],
        },
        lora={"r": 16, "alpha": 16, "dropout": 0.0},
    )
    cfg.update(loadIn4bit=setup["q4"], maxSeqLength=setup["seq"], dtype=setup["dtype"])
    cfg["storage"]["keepCheckpoints"] = 3
    return cfg


def new_node(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """The job as a new pod on a new node sees it: its scratch volume mounted at the same path as on
    every node (the pod's workDir is fixed, operator/pods.py), and empty. The path may matter: the
    compile caches live under it, Unsloth's compiled modules among them (RESULTS.md, issue 16)."""
    scratch = work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    return {**cfg, "workDir": str(scratch / "work")}


def node_env(node: Path) -> dict[str, str]:
    """A new node's own $HOME and $TMPDIR, empty: what libraries cache there by default (inductor's
    /tmp/torchinductor_<user>, Unsloth's ~/.cache/unsloth/mega_cache, Triton's ~/.triton) would otherwise
    carry from one attempt to the next on this one machine, as no relaunched pod has them."""
    env = {}
    for var, name in (("HOME", "home"), ("TMPDIR", "tmp")):
        shutil.rmtree(node / name, ignore_errors=True)
        (node / name).mkdir(parents=True)
        env[var] = str(node / name)
    return env


def cold_env(caches: Path) -> dict[str, str]:
    """Without the trainer's compile cache: each library's cache in an empty directory of this node
    (the machine's own, e.g. gpu_lock's TRITON_CACHE_DIR, would be warm from the runs before)."""
    from loraresume_trainer.compile_cache import CACHES, ENV_SWITCH

    env = {ENV_SWITCH: "off"}
    for name, var in CACHES.items():
        (caches / name).mkdir(parents=True, exist_ok=True)
        env[var] = str(caches / name)
    return env


def kill_steps(rng: random.Random, steps: int, k: int) -> list[int]:
    """K distinct steps at which to send SIGTERM, increasing, each attempt training at least 2 steps."""
    candidates = list(range(3, steps - 1))
    while True:
        chosen = sorted(rng.sample(candidates, k))
        if all(b - a >= 2 for a, b in itertools.pairwise(chosen)):
            return chosen


# ------------------------------------------------------------------------------------------ measuring


def log_times(attempt: Attempt) -> dict[int, float]:
    return {int(e["step"]): float(e["_t"]) for e in attempt.of("log") if "loss" in e}


def steady_step_s(attempt: Attempt, skip: int = 5) -> float | None:
    """Median seconds per step once compilation is over (the log line follows each step at once)."""
    t = log_times(attempt)
    steps = sorted(t)
    gaps = [t[b] - t[a] for a, b in itertools.pairwise(steps) if b == a + 1 and a > steps[0] + skip]
    return statistics.median(gaps) if gaps else None


def startup_phases(attempt: Attempt) -> dict[str, float]:
    return {e["phase"]: float(e["seconds"]) for e in attempt.of("startup")}


def attempt_record(attempt: Attempt) -> dict[str, Any]:
    start = (attempt.of("start") or [{}])[0]
    cache = (attempt.of("compile_cache") or [{}])[0]
    saved = (attempt.of("compile_cache_saved") or [{}])[0]
    t = log_times(attempt)
    logged = [e for e in attempt.of("log") if "loss" in e]
    return {
        "exit_code": attempt.exit_code,
        "killed_with": attempt.killed_with,
        "seconds": round(attempt.seconds, 3),
        "resumed_from_step": start.get("step"),
        "steps": [min(t), max(t)] if t else None,
        "startup_s": startup_phases(attempt),
        "compile_cache": cache.get("result"),
        # torch's cache lookups by the first step: what the restored caches spared it
        "compiled": next((e.get("compiled") for e in attempt.of("startup") if e["phase"] == "first_step"), None),
        "compile_cache_saved": {k: saved.get(k) for k in ("files", "bytes", "seconds") if k in saved} or None,
        "preempted": (attempt.of("preempted") or [None])[0],
        # the Trainer's cumulative token count at this attempt's first and last logged step (issue 16:
        # filled on the GPU path too, and continuing across a resume)
        "num_tokens": [logged[0].get("num_tokens"), logged[-1].get("num_tokens")] if logged else None,
        "losses": {int(e["step"]): e["loss"] for e in logged},
    }


def keep_stderr(out: Path, label: str, attempt: Attempt) -> None:
    """An attempt's stderr tail beside the results (the trainer's log and the libraries' warnings)."""
    (out / f"stderr-{label}.txt").write_text(attempt.stderr[-200_000:], encoding="utf-8")


def first_difference(a: Attempt, b: Attempt) -> int | None:
    """The first step both logged whose losses differ (bitwise), or None."""
    la, lb = a.losses(), b.losses()
    return next((step for step in sorted(set(la) & set(lb)) if la[step] != lb[step]), None)


def preemption_parts(killed: Attempt, relaunch: Attempt, step_s: float) -> dict[str, float | None]:
    """One preemption: the killed attempt's JIT save and the relaunch's start-up and lost work."""
    (pre,) = killed.of("preempted")
    jit_save = float(pre["seconds"]) + (killed.seconds - float(pre["_t"]))  # signal -> durable, then -> exit
    first_step = startup_phases(relaunch).get("first_step")
    startup = first_step - step_s if first_step is not None else None
    resumed = (relaunch.of("start") or [{}])[0].get("step") or 0
    lost_steps = max(0, int(pre["step"]) - int(resumed))
    return {
        "jit_save_s": round(jit_save, 3),
        "sigterm_to_durable_s": round(float(pre["seconds"]), 3),
        "startup_s": round(startup, 3) if startup is not None else None,
        "lost_steps": lost_steps,
        "lost_work_s": round(lost_steps * step_s, 3),
    }


def summarize(story: list[Attempt], baseline: Attempt, step_s: float) -> dict[str, Any]:
    k = len(story) - 1
    total = sum(a.seconds for a in story)
    overhead = (total - baseline.seconds) / k if k else 0.0
    parts = [preemption_parts(story[i], story[i + 1], step_s) for i in range(k)]

    def mean(key: str) -> float | None:
        values = [p[key] for p in parts if p[key] is not None]
        return round(statistics.mean(values), 3) if values else None

    explained = sum(mean(key) or 0.0 for key in ("jit_save_s", "startup_s", "lost_work_s"))
    relaunch_phases: dict[str, list[float]] = {}
    for attempt in story[1:]:
        previous = 0.0
        for phase, seconds in sorted(startup_phases(attempt).items(), key=lambda kv: kv[1]):
            relaunch_phases.setdefault(phase, []).append(seconds - previous)
            previous = seconds
    return {
        "preemptions": k,
        "wall_s": round(total, 3),
        "overhead_per_preemption_s": round(overhead, 3),
        "parts_mean_s": {
            "jit_save": mean("jit_save_s"),
            "startup": mean("startup_s"),
            "lost_work": mean("lost_work_s"),
            "unexplained": round(overhead - explained, 3),
        },
        "relaunch_startup_split_mean_s": {p: round(statistics.mean(v), 3) for p, v in relaunch_phases.items()},
        "goodput": {name: round(1.0 - overhead / period, 4) for name, period in PERIODS.items()},
        "per_preemption": parts,
    }


def _kept_paths(work: Path, setup: dict[str, Any]) -> tuple[Path, Path]:
    tag = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:12]
    return work / f"uninterrupted-{tag}.json", work / f"uninterrupted-{tag}.safetensors"


def keep_uninterrupted(work: Path, setup: dict[str, Any], baseline: Attempt, adapter: bytes) -> None:
    """Keep the uninterrupted run (its events and adapter) in the work dir, so that a later call on the
    same machine (the device's 10-minute limit per command) measures another story against it."""
    record, weights = _kept_paths(work, setup)
    weights.write_bytes(adapter)
    record.write_text(json.dumps(dataclasses.asdict(baseline), default=str))


def load_uninterrupted(work: Path, setup: dict[str, Any]) -> tuple[Attempt, bytes] | None:
    record, weights = _kept_paths(work, setup)
    if not (record.is_file() and weights.is_file()):
        return None
    return Attempt(**json.loads(record.read_text())), weights.read_bytes()


# ------------------------------------------------------------------------------------------------ run


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    started = time.monotonic()
    os.environ["LORARESUME_TEST_TRAINER_LAUNCH"] = "spawn"  # every attempt a fresh interpreter, as a new pod
    ns.work.mkdir(parents=True, exist_ok=True)
    ns.out.mkdir(parents=True, exist_ok=True)
    size = ns.size or ("tiny" if ns.cpu_smoke else "8b")
    setup = (
        dict(
            steps=ns.steps or 30,
            seq=128,
            batch=2,
            accum=1,
            q4=False,
            dtype="float32",
            optim="adamw_torch",
            save_steps=5,
        )
        if ns.cpu_smoke
        else dict(
            steps=ns.steps or 40, seq=2048, batch=2, accum=4, q4=True, dtype="auto", optim="adamw_8bit", save_steps=10
        )
    )
    setup["training"] = ns.training  # part of the setup: the kept uninterrupted run is keyed by it
    setup["trainer_python"] = ns.trainer_python or sys.executable
    variants = [v for v in ns.variants.split(",") if v]
    rng = random.Random(ns.seed)
    plan = {v: kill_steps(rng, setup["steps"], ns.preemptions) for v in variants}
    result: dict[str, Any] = {
        "mode": "cpu-smoke" if ns.cpu_smoke else "gpu",
        "size": size,
        "setup": setup,
        "kill_steps": plan,
        "seed": ns.seed,
        "variants": {},
    }

    def write() -> None:
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        (ns.out / "goodput.json").write_text(json.dumps(result, indent=1, default=str))

    moto, endpoint, client = start_s3(ns.work)
    try:
        t0 = time.monotonic()
        base, data = build(ns, size, setup["steps"], setup["seq"], setup["batch"], setup["accum"])
        result["build_s"] = round(time.monotonic() - t0, 1)

        def adapter(name: str) -> bytes:
            return client.get_object(Bucket=BUCKET, Key=f"{name}/adapter/adapter_model.safetensors")["Body"].read()

        kept = load_uninterrupted(ns.work, setup)
        if kept is not None:  # an earlier call on this machine ran it: each call then fits one story
            baseline, uninterrupted_adapter = kept
            result["uninterrupted_reused"] = True
        else:
            cfg = make_job(ns, endpoint, base, data, "uninterrupted", setup)
            baseline = run_attempt(
                new_node(cfg, ns.work),
                ns.work / "uninterrupted" / "node-1",
                env=node_env(ns.work / "uninterrupted" / "node-1"),
                timeout=ns.budget_s,
                python=ns.trainer_python,
            )
            keep_stderr(ns.out, "uninterrupted", baseline)
            if baseline.exit_code != 0:
                result["error"] = f"uninterrupted run failed: {baseline.stderr[-2000:]}"
                write()
                return 1
            uninterrupted_adapter = adapter("uninterrupted")
            keep_uninterrupted(ns.work, setup, baseline, uninterrupted_adapter)
        step_s = steady_step_s(baseline) or 0.0
        result["uninterrupted"] = {**attempt_record(baseline), "steady_step_s": round(step_s, 4)}
        write()
        if ns.repeat_uninterrupted:
            cfg = make_job(ns, endpoint, base, data, "uninterrupted-again", setup)
            again = run_attempt(
                new_node(cfg, ns.work),
                ns.work / "uninterrupted-again" / "node-1",
                env=node_env(ns.work / "uninterrupted-again" / "node-1"),
                timeout=ns.budget_s,
                python=ns.trainer_python,
            )
            result["uninterrupted_again"] = {
                **attempt_record(again),
                "adapter_bitwise_equal": again.exit_code == 0
                and adapter("uninterrupted-again") == uninterrupted_adapter,
                "first_differing_loss_step": first_difference(baseline, again),
            }
            write()
        # The time guard's guess at one story: the uninterrupted run plus a cold start-up per preemption.
        per_story = 1.2 * (baseline.seconds + ns.preemptions * startup_phases(baseline).get("first_step", 60.0))

        for variant in variants:
            if time.monotonic() - started + per_story > ns.budget_s:
                result["variants"][variant] = {"skipped": f"over the budget of {ns.budget_s:.0f} s"}
                write()
                continue
            name = f"preempted-{variant}"
            cfg = make_job(ns, endpoint, base, data, name, setup)
            story: list[Attempt] = []
            entry: dict[str, Any] = {"kill_steps": plan[variant], "attempts": []}
            result["variants"][variant] = entry
            kills = list(plan[variant])
            for number in range(1, len(kills) + 2):
                node = ns.work / name / f"node-{number}"  # a new node: empty scratch, cold caches
                attempt_cfg = new_node(cfg, ns.work)
                kill = Kill(signal.SIGTERM, kills[number - 1], after_durable=False) if number <= len(kills) else None
                env = {**node_env(node), **(cold_env(node / "caches") if variant == "cold" else {})}
                attempt = run_attempt(
                    attempt_cfg, node, kill=kill, env=env, attempt=number, timeout=ns.budget_s, python=ns.trainer_python
                )
                story.append(attempt)
                keep_stderr(ns.out, f"{name}-{number}", attempt)
                entry["attempts"].append(attempt_record(attempt))
                write()
                expected = 75 if kill else 0
                if attempt.exit_code != expected:
                    entry["error"] = f"attempt {number} exited {attempt.exit_code}: {attempt.stderr[-2000:]}"
                    write()
                    break
            else:
                entry.update(summarize(story, baseline, step_s))
                entry["adapter_bitwise_equal"] = adapter(name) == uninterrupted_adapter
                entry["first_differing_loss_step"] = [first_difference(baseline, a) for a in story]
                write()
    finally:
        moto.terminate()
        write()
    print(report(result))
    return 0 if all("error" not in v for v in result["variants"].values()) else 1


def report(result: dict[str, Any]) -> str:
    """A markdown summary of one goodput.json."""
    u = result.get("uninterrupted", {})
    lines = [
        f"mode {result['mode']}, shape {result['size']}, {result['setup']['steps']} steps, "
        f"uninterrupted {u.get('seconds')} s (first step done at {u.get('startup_s', {}).get('first_step')} s, "
        f"steady step {u.get('steady_step_s')} s)",
        "",
        "| variant | K | overhead per preemption s | JIT save s | start-up s | lost work s | unexplained s "
        "| goodput 1/20 min | goodput 1/h | adapter bitwise equal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in result.get("variants", {}).items():
        if "overhead_per_preemption_s" not in v:
            lines.append(f"| {name} | - | {v.get('skipped') or v.get('error', '')[:80]} | | | | | | | |")
            continue
        p = v["parts_mean_s"]
        lines.append(
            f"| {name} | {v['preemptions']} | {v['overhead_per_preemption_s']} | {p['jit_save']} | {p['startup']} "
            f"| {p['lost_work']} | {p['unexplained']} | {v['goodput']['per_20_min']:.2%} "
            f"| {v['goodput']['per_hour']:.2%} | {v['adapter_bitwise_equal']} |"
        )
    for name, v in result.get("variants", {}).items():
        if "relaunch_startup_split_mean_s" in v:
            split = ", ".join(f"{k} {s}" for k, s in v["relaunch_startup_split_mean_s"].items())
            lines.append(f"\n{name}: relaunch start-up by phase (mean s, each since the one before): {split}")
        for attempt in v.get("attempts", [])[1:]:  # the relaunches: what their first step found compiled
            lines.append(f"{name}: relaunch from step {attempt.get('resumed_from_step')}: {attempt.get('compiled')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""The trainer's import phase (issue 16), side by side under two Pythons on the GPU machine.

A relaunch spends most of its start-up importing Unsloth and what it patches. What transformers, peft
and Unsloth import depends on which packages are installed (they import optional integrations they
find: scikit-learn, scipy, timm, sentence-transformers, ...), so the import phase of a run on the
GPU machine, whose image has many more packages than the trainer image, is not the image's. This
runs the trainer's own import step (`UnslothEngine.load_stack`: `import unsloth`, then the training
fields' check, which imports TRL's SFTConfig) in fresh processes, alternating A B A B:

- `machine`: the machine's Python with the lock's difference on PYTHONPATH (as the GPU benchmarks ran);
- `lock`: `gpu_lock.py install`'s LOCK_PYTHON, which sees exactly the trainer image's lock.

It prints each run's seconds, the medians and their ratio, and writes `-X importtime` of one more run
of each (the entries over 0.2 s) and the modules imported by one but not the other.

    eval "$(python3 benchmarks/gpu_lock.py install)" && python3 benchmarks/import_phase.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

STEP = (
    "import time, sys; t = time.monotonic(); import unsloth; "
    "from trl import SFTConfig; "
    "print(round(time.monotonic() - t, 3)); print(len(sys.modules), file=sys.stderr)"
)
LIST = "import unsloth, sys; from trl import SFTConfig; print('\\n'.join(sorted(sys.modules)))"


def run(python: str, code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, *flags, "-c", code], capture_output=True, text=True, timeout=300)


def seconds(python: str) -> tuple[float, int]:
    done = run(python, STEP)
    if done.returncode != 0:
        sys.exit(f"{python}: the import step failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1]), int(done.stderr.strip().splitlines()[-1])


def top_importtime(python: str, over_us: int = 200_000) -> list[str]:
    done = run(python, "import unsloth; from trl import SFTConfig", "-X", "importtime")
    return [
        line for line in done.stderr.splitlines() if line.startswith("import time:") and _cumulative(line) > over_us
    ]


def _cumulative(line: str) -> int:
    try:
        return int(line.split("|")[1])
    except (IndexError, ValueError):
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="A B pairs")
    p.add_argument("--lock-python", default=os.environ.get("LOCK_PYTHON"), help="default: $LOCK_PYTHON")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/import-phase-out")))
    ns = p.parse_args(argv)
    if not ns.lock_python:
        sys.exit('no lock Python: run `eval "$(python3 benchmarks/gpu_lock.py install)"` first (LOCK_PYTHON)')
    pythons = {"machine": sys.executable, "lock": ns.lock_python}
    ns.out.mkdir(parents=True, exist_ok=True)
    for python in pythons.values():  # warm-up, not counted: the first process reads every file from disk
        seconds(python)
    times: dict[str, list[float]] = {k: [] for k in pythons}
    modules: dict[str, int] = {}
    for r in range(ns.rounds):
        order = list(pythons) if r % 2 == 0 else list(reversed(pythons))
        for name in order:
            s, n = seconds(pythons[name])
            times[name].append(s)
            modules[name] = n
            print(f"round {r + 1} {name}: {s:.2f} s ({n} modules)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    listed = {k: set(run(py, LIST).stdout.split()) for k, py in pythons.items()}
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pythons": pythons,
        "seconds": times,
        "median_s": med,
        "lock_over_machine": round(med["lock"] / med["machine"], 3),
        "modules": modules,
        "only_machine_top": sorted({m.split(".")[0] for m in listed["machine"] - listed["lock"]}),
        "only_lock_top": sorted({m.split(".")[0] for m in listed["lock"] - listed["machine"]}),
        "importtime_top": {k: top_importtime(py) for k, py in pythons.items()},
    }
    (ns.out / "import_phase.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "importtime_top"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

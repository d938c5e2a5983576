"""Run the GPU benchmarks from exactly the trainer image's lock (trainer_image/requirements-gpu.lock).

The H200 machine's image already has most of the lock (torch, triton, transformers, ...: the lock
is resolved under its `pip freeze`, trainer_image/h200-constraints.txt). What it lacks or has at
another version travels as wheels, at most 64 MiB per call:

    python benchmarks/gpu_lock.py prepare       # here: .gpu/lock/ (wheels, subset lock, repacked archive)

- every wheel of the difference is downloaded with `pip download --require-hashes` against the
  lock's hashes;
- most travel intact and are installed there with `pip install --require-hashes --no-deps` from a
  subset of the lock (the same hashes, so pip checks them again there);
- the two too large to carry whole (bitsandbytes: builds for other CUDA versions; unsloth: its
  bundled web app) are unpacked here after the hash check, the unused files dropped, and packed
  into one .tar.xz; there, every file left is checked against the
  sha256 in the wheel's own RECORD (so against the hash-checked wheel), and the dropped ones are listed;
- the benchmark's own tools (moto's S3 server and what it needs; not part of the image) go to
  .gpu/lock/tools/ and a separate directory on the path.

On the GPU machine, from the repository root:

    eval "$(python3 benchmarks/gpu_lock.py install)"    # installs into /tmp/site, prints `export ...`
    python3 benchmarks/gpu_lock.py verify               # every lock package at its version? -> $OUT

`verify` compares what Python sees (importlib.metadata over sys.path) with every package of the lock,
lists each mismatch and runs `pip check`; it exits 1 when a lock package is missing or differs.
"""

from __future__ import annotations

import base64
import compileall
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "trainer_image" / "requirements-gpu.lock"
CONSTRAINTS = ROOT / "trainer_image" / "h200-constraints.txt"
DIR = ROOT / ".gpu" / "lock"
SITE = Path("/tmp/site")
TOOLS_SITE = Path("/tmp/gpu-tools")
LOCK_VENV = Path("/tmp/lock-venv")  # a Python that sees the lock's packages and nothing else
LOCK_PYTHON = LOCK_VENV / "bin" / "lock-python"

# Not carried whole: (what to drop from the unpacked wheel, why).
REPACK = {
    "bitsandbytes": (r"bitsandbytes/libbitsandbytes_(?!cuda130|cpu)[^/]*\.so", "builds for other CUDA versions"),
    "unsloth": (r"studio/.*", "Unsloth's bundled web app, not imported by training"),
}

# moto's S3 server for the benchmarks (not in the image): pinned, installed with --no-deps.
TOOLS = [
    "moto==5.2.5",
    "cryptography==50.0.2",
    "cffi==2.1.1",
    "pycparser==3.12",
    "xmltodict==1.0.4",
    "responses==0.26.3",
    "flask==3.1.3",
    "flask-cors==6.0.5",
    "itsdangerous==2.2.0",
    "blinker==1.9.0",
    "py-partiql-parser==0.6.3",
]

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]  # fmt: skip


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_entries() -> dict[str, tuple[str, str]]:
    """canonical name -> (version, the entry's text with its hashes)."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    result = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split()[0].split("==")
            result[norm(name)] = (version, line)
    return result


def freeze(path: Path) -> dict[str, str]:
    result = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            result[norm(name)] = version
    return result


def pip_download(args: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
           *[f"--platform={p}" for p in PLATFORMS], "-d", str(dest), *args]  # fmt: skip
    subprocess.run(cmd, check=True)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare() -> int:
    h200 = freeze(CONSTRAINTS)
    lock = lock_entries()
    differ = {n: v for n, (v, _) in lock.items() if h200.get(n) != v}
    shutil.rmtree(DIR, ignore_errors=True)
    (DIR / "whl").mkdir(parents=True)
    subset = DIR / "difference.lock"
    subset.write_text("".join(lock[n][1] + "\n" for n in sorted(differ)))
    download = DIR / "download"
    pip_download(["--require-hashes", "-r", str(subset)], download)  # checks every wheel's sha256
    whole, repacked = [], []
    stage = DIR / "repack-site"
    for wheel in sorted(download.glob("*.whl")):
        name = norm(wheel.name.split("-")[0])
        if name not in REPACK:
            shutil.move(str(wheel), DIR / "whl" / wheel.name)
            whole.append(name)
            continue
        drop = re.compile(REPACK[name][0])
        dropped = []
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if drop.fullmatch(member):
                    dropped.append(member)
                else:
                    zf.extract(member, stage)
        repacked.append({"name": name, "version": differ[name], "wheel": wheel.name,
                         "wheel_sha256": sha256_file(wheel), "dropped": dropped, "why": REPACK[name][1]})  # fmt: skip
    (DIR / "intact.lock").write_text("".join(lock[n][1] + "\n" for n in sorted(whole)))
    with tarfile.open(DIR / "repacked.tar.xz", "w:xz") as tar:
        tar.add(stage, arcname=".")
    shutil.rmtree(stage)
    shutil.rmtree(download)
    (DIR / "repacked.json").write_text(json.dumps(repacked, indent=1))
    pip_download(TOOLS, DIR / "tools")
    sizes = {p.name: p.stat().st_size for p in DIR.rglob("*") if p.is_file()}
    print(json.dumps({"differ_from_h200": differ, "whole": whole, "repacked": [r["name"] for r in repacked],
                      "carried_bytes": sum(sizes.values())}, indent=1))  # fmt: skip
    return 0


def install() -> int:
    """On the GPU machine: installs the difference into /tmp/site; prints the environment to eval."""
    SITE.mkdir(parents=True, exist_ok=True)
    log = sys.stderr
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(DIR / "whl"),
         "--require-hashes", "--no-deps", "--only-binary=:all:", "--target", str(SITE),
         "-r", str(DIR / "intact.lock")],
        check=True, stdout=log,
    )  # fmt: skip
    with tarfile.open(DIR / "repacked.tar.xz") as tar:
        tar.extractall(SITE, filter="data")
    # Bytecode, as the image's `pip install` compiles it: the machine sets PYTHONDONTWRITEBYTECODE=1,
    # so a module without its .pyc is compiled from source in every process (issue 16's import phase).
    compileall.compile_dir(str(SITE), quiet=2, workers=0)
    report = verify_records(json.loads((DIR / "repacked.json").read_text()))
    print(json.dumps(report), file=log)
    if not report["ok"]:
        return 1
    TOOLS_SITE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
         str(TOOLS_SITE), *map(str, sorted((DIR / "tools").glob("*.whl")))],
        check=True, stdout=log,
    )  # fmt: skip
    view = lock_view()
    print(json.dumps(view), file=log)
    path = f"{SITE}:{ROOT / 'trainer_image'}:{ROOT / 'sandbox'}:{ROOT}:{TOOLS_SITE}"
    print(f"export PYTHONPATH={path} PATH={SITE}/bin:{TOOLS_SITE}/bin:$PATH")
    if not view["missing"] and not view["other_version"]:  # else the lock's set is not all here
        print(f"export LOCK_PYTHON={LOCK_PYTHON}")
    print("export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1")
    print("export HF_HUB_DISABLE_TELEMETRY=1 TRITON_CACHE_DIR=/tmp/triton_cache HF_HOME=/tmp/hf_home")
    print("export PYTHONUNBUFFERED=1")
    return 0


def lock_view() -> dict:
    """A venv whose Python sees exactly the lock's packages, as the trainer image does: the machine's
    image has many more (scikit-learn, scipy, timm, jax, sentence-transformers, ...), and transformers,
    peft and Unsloth import what they find installed, so a trainer run with them all in sight imports
    more than one in the image (issue 16's import phase). The lock's packages that the machine has at
    the lock's version are linked in from its site-packages (their top-level files, from the
    distribution's RECORD), their site-packages compiled to bytecode where the machine's image has none, as the trainer
    image's `pip install` does; the difference comes from SITE, first on the path. `lock-python` runs it
    with only SITE and the trainer package on PYTHONPATH (none of the benchmark's own tools)."""
    import importlib.metadata as md

    in_site = {norm(d.metadata["Name"]) for d in md.distributions(path=[str(SITE)])}
    shutil.rmtree(LOCK_VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(LOCK_VENV)], check=True)
    (site_packages,) = LOCK_VENV.glob("lib/python3*/site-packages")
    missing, other_version, linked = [], [], 0
    linked_from: dict[Path, set[str]] = {}  # site-packages -> the top-level names linked from it
    for name, (version, _) in sorted(lock_entries().items()):
        if name in in_site:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
            continue
        if dist.version != version:
            other_version.append(f"{name}: lock {version}, machine {dist.version}")
            continue
        base = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")} - {"__pycache__"}
        if not tops:
            missing.append(f"{name} (no RECORD to link it by)")
        for top in sorted(tops):
            target = site_packages / top
            if (base / top).exists() and not target.exists():
                target.symlink_to(base / top)
                linked += 1
                linked_from.setdefault(base, set()).add(top)
    # The machine's image ships some (torch) without bytecode: what was linked is compiled, in one pass (one
    # pool of workers) over each site-packages, skipping what was not linked.
    uncompiled = []
    for base, tops in sorted(linked_from.items()):
        other = re.compile(rf"^{re.escape(str(base))}/(?!(?:{'|'.join(map(re.escape, sorted(tops)))})(?:/|$))")
        if not compileall.compile_dir(str(base), quiet=2, workers=0, rx=other):
            uncompiled.append(str(base))
    LOCK_PYTHON.write_text(
        f'#!/bin/sh\nPYTHONPATH={SITE}:{ROOT / "trainer_image"} exec {LOCK_VENV / "bin" / "python3"} "$@"\n'
    )
    LOCK_PYTHON.chmod(0o755)
    return {
        "lock_python": str(LOCK_PYTHON),
        "linked": linked,
        "missing": missing,
        "other_version": other_version,
        "not_all_compiled": uncompiled,  # site-packages a linked file of which has no bytecode (read-only?)
    }


def verify_records(repacked: list[dict]) -> dict:
    """Every file of a repacked wheel left in /tmp/site matches the sha256 in that wheel's RECORD."""
    result: dict = {"ok": True, "wheels": []}
    for entry in repacked:
        dist = f"{entry['wheel'].split('-')[0]}-{entry['version']}.dist-info"
        record = (SITE / dist / "RECORD").read_text().splitlines()
        checked, bad, missing = 0, [], []
        dropped = set(entry["dropped"])
        for line in record:
            path, digest, _ = line.rsplit(",", 2)
            if not digest or path in dropped:
                continue
            algo, _, want = digest.partition("=")
            file = SITE / path
            if not file.is_file():
                missing.append(path)
                continue
            got = base64.urlsafe_b64encode(hashlib.new(algo, file.read_bytes()).digest()).rstrip(b"=").decode()
            checked += 1
            if got != want:
                bad.append(path)
        ok = not bad and not missing
        result["ok"] &= ok
        result["wheels"].append({"wheel": entry["wheel"], "wheel_sha256_checked_here": entry["wheel_sha256"],
                                 "files_checked": checked, "mismatched": bad, "missing": missing,
                                 "dropped": len(dropped), "why_dropped": entry["why"]})  # fmt: skip
    return result


def verify() -> int:
    """What Python sees on sys.path against every package of the lock; then `pip check`."""
    import importlib.metadata as md

    seen: dict[str, tuple[str, str]] = {}
    for dist in md.distributions():
        name = norm(dist.metadata["Name"])
        seen.setdefault(name, (dist.version, str(getattr(dist, "_path", "?"))))  # first on sys.path wins
    lock = lock_entries()
    mismatches = []
    for name, (version, _) in sorted(lock.items()):
        have = seen.get(name)
        if have is None or have[0] != version:
            mismatches.append({"package": name, "lock": version, "installed": have[0] if have else None,
                               "where": have[1] if have else None})  # fmt: skip
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    lock_names = set(lock)
    check_lines = check.stdout.strip().splitlines()
    involving_lock = [line for line in check_lines if norm(line.split()[0]) in lock_names]
    import torch

    imports = {}
    for module in ("triton", "xformers", "bitsandbytes"):
        try:
            imports[module] = __import__(module).__version__
        except Exception as exc:  # reported, not raised
            imports[module] = f"failed: {type(exc).__name__}: {exc}"
    report = {
        "lock_packages": len(lock),
        "matching": len(lock) - len(mismatches),
        "mismatches": mismatches,
        "pip_check_exit": check.returncode,
        "pip_check_lines_for_lock_packages": involving_lock,
        "pip_check_other_lines": len(check_lines) - len(involving_lock),
        "imports": imports,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    out = Path(os.environ.get("OUT", tempfile.gettempdir()))
    (out / "gpu_lock_verify.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 1 if mismatches else 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    actions = {"prepare": prepare, "install": install, "verify": verify}
    if command not in actions:
        sys.exit(f"usage: {sys.argv[0]} prepare|install|verify")
    sys.exit(actions[command]())

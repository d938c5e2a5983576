"""The trainer image can compile Triton's launcher and installs a reproducible environment.

Checked from `trainer_image/Dockerfile` and `trainer_image/requirements-gpu.lock` alone (no container
engine runs here):

- the final stage installs a C compiler, the C library's headers and the headers of the venv's
  Python version, in one apt transaction (Triton builds a C extension on the first kernel);
- pip installs nothing but the lock (`--require-hashes --no-deps --only-binary=:all:`, then
  `pip check`) and the local package (`--no-index --no-deps`); no other index anywhere;
- the lock pins every package exactly with sha256 hashes, keeps requirements-gpu.txt's pins, matches
  the H200 machine's torch/triton (h200-constraints.txt) and stays inside Unsloth 2026.10.9's pins;
- lock.sh resolves for the venv's Python version;
- the venv ships bytecode (no `--no-compile` or PIP_NO_COMPILE).

`TRAINER_DOCKERFILE=path pytest tests/trainer/test_trainer_image.py` checks another Dockerfile
against the same lock (e.g. an older revision's).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support import dockerfiles
from tests.support.dockerfiles import REPO, exact_pin

IMAGE_DIR = REPO / "trainer_image"
DOCKERFILE = Path(os.environ.get("TRAINER_DOCKERFILE", IMAGE_DIR / "Dockerfile"))
LOCK = IMAGE_DIR / "requirements-gpu.lock"
REQUIREMENTS = IMAGE_DIR / "requirements-gpu.txt"
CONSTRAINTS = IMAGE_DIR / "h200-constraints.txt"
LOCK_SCRIPT = IMAGE_DIR / "lock.sh"

# Packages whose version the H200 machine fixes for the GPU runs (its image has them, compiled
# against one another): the lock must hold exactly the same.
H200_FIXED = (
    "torch",
    "triton",
    "torchvision",
    "transformers",
    "accelerate",
    "numpy",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
)

# Unsloth 2026.10.9's own requirements on the stack (its METADATA), which the lock must keep.
UNSLOTH_PINS = {
    "transformers": SpecifierSet("<=5.17.0"),
    "trl": SpecifierSet("<=1.15.0"),
    "datasets": SpecifierSet("<5,!=4.0.*,!=4.1.0,!=4.4.*,!=4.5.0"),
    "peft": SpecifierSet(">=0.18"),
    "torch": SpecifierSet("<2.15"),
}

# A first kernel compile needs these; Unsloth imports xformers unconditionally.
REQUIRED_IN_LOCK = ("torch", "triton", "unsloth", "unsloth-zoo", "xformers", "bitsandbytes", "trl", "peft")

INDEX_OPTIONS = ("--index-url", "--extra-index-url", "-i", "--find-links", "-f", "--trusted-host")

C_COMPILERS = {"gcc", "clang", "build-essential"}
LIBC_HEADERS = {"libc6-dev", "build-essential"}


# --- parsing ------------------------------------------------------------------------------------


def final_stage() -> list[tuple[str, str]]:
    return dockerfiles.stages(DOCKERFILE)[-1]


def run_commands() -> list[list[str]]:
    """The final stage's RUN instructions, each split into its `&&`/`;`-separated commands."""
    commands = []
    for keyword, args in final_stage():
        if keyword == "RUN":
            for part in re.split(r"&&|;|\|\|", args):
                words = shlex.split(part)
                if words:
                    commands.append(words)
    return commands


def apt_installs() -> list[list[str]]:
    """Package lists of each `apt-get install` in the final stage."""
    result = []
    for words in run_commands():
        if words[:1] in (["apt-get"], ["apt"]) and "install" in words:
            after = words[words.index("install") + 1 :]
            result.append([w.split("=", 1)[0] for w in after if not w.startswith("-")])
    return result


def is_pip(words: list[str]) -> bool:
    return words[:2] == ["pip", "install"] or (
        len(words) >= 4
        and re.fullmatch(r"python3(\.\d+)?|.*/python3?(\.\d+)?", words[0]) is not None
        and words[1:4] == ["-m", "pip", "install"]
    )


def pip_installs() -> list[list[str]]:
    return [words for words in run_commands() if is_pip(words) or (words[:1] == ["pip"] and "install" in words)]


def venv_python_version() -> str:
    """X.Y of the interpreter that creates the image's venv (`python3.X -m venv ...`)."""
    for words in run_commands():
        if "-m" in words and "venv" in words:
            match = re.fullmatch(r"(?:.*/)?python(\d+\.\d+)", words[0])
            assert match, f"the venv is made by {words[0]!r}: name the Python version (python3.X) it uses"
            return match.group(1)
    raise AssertionError("the final stage creates no venv (`python3.X -m venv`)")


def copy_destination(source: str) -> str:
    for keyword, args in final_stage():
        if keyword == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            if source in words[:-1]:
                return words[-1]
    raise AssertionError(f"the final stage does not COPY {source}")


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """name -> (requirement as written, its sha256 hashes), from the lock's continuation lines."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"the lock has an option line: {line!r}"
        requirement, *options = line.split()
        hashes = [o.removeprefix("--hash=sha256:") for o in options if o.startswith("--hash=sha256:")]
        assert len(hashes) == len(options), f"{requirement}: options other than sha256 hashes: {options}"
        name = canonicalize_name(re.split(r"[=<>!~;\[ @]", requirement, maxsplit=1)[0])
        assert name not in entries, f"{name} is in the lock twice"
        entries[name] = (requirement, hashes)
    return entries


def lock_versions() -> dict[str, str]:
    result: dict[str, str] = {}
    for name, (requirement, _) in lock_entries().items():
        match = re.fullmatch(r"[A-Za-z0-9._-]+==([A-Za-z0-9.+!_-]+)", requirement)
        assert match, f"{requirement!r} is not an exact `name==version` pin"
        result[name] = match.group(1)
    return result


def constraint_versions() -> dict[str, str]:
    result: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            result[canonicalize_name(name)] = version
    return result


# --- what Triton's first compile needs ------------------------------------------------------------


def test_final_stage_installs_compiler_libc_and_python_headers_in_one_transaction() -> None:
    installs = apt_installs()
    assert installs, "the final stage installs no system packages"
    with_compiler = [p for p in installs if set(p) & C_COMPILERS and set(p) & LIBC_HEADERS]
    assert with_compiler, (
        f"no apt-get install in the final stage has a C compiler ({sorted(C_COMPILERS)}) and the C library's "
        f"headers ({sorted(LIBC_HEADERS)}): {installs}"
    )
    version = venv_python_version()
    headers = {f"python{version}-dev", f"libpython{version}-dev"}
    complete = [p for p in with_compiler if set(p) & headers and f"python{version}" in p]
    assert complete, f"Python {version} and its headers ({sorted(headers)}) are not installed with the compiler"


def test_nothing_removes_the_build_tools_afterwards() -> None:
    for words in run_commands():
        if words[:1] in (["apt-get"], ["apt"], ["dpkg"]) and {"remove", "purge", "autoremove", "-r", "-P"} & set(words):
            pytest.fail(f"the final stage removes system packages: {' '.join(words)}")


def test_venv_python_matches_the_lock_resolution() -> None:
    script = LOCK_SCRIPT.read_text()
    match = re.search(r"--python-version[ =](\d+\.\d+)", script)
    assert match, "lock.sh does not name the Python version it resolves for"
    assert match.group(1) == venv_python_version()
    assert re.search(r"--python-platform[ =]x86_64-manylinux_2_\d+", script), "lock.sh resolves for no Linux x86-64"
    assert "--generate-hashes" in script and "--only-binary" in script


# --- pip installs only the lock -------------------------------------------------------------------


def test_pip_installs_only_the_lock_with_hashes_and_no_resolution() -> None:
    installs = pip_installs()
    assert installs, "the final stage runs no pip install"
    lock_path = copy_destination("trainer_image/requirements-gpu.lock")
    from_lock = []
    for words in installs:
        files = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-r", "--requirement")]
        files += [w.split("=", 1)[1] for w in words if w.startswith("--requirement=")]
        if files:
            assert files == [lock_path], f"pip installs requirements other than the lock: {' '.join(words)}"
            for flag in ("--require-hashes", "--no-deps", "--only-binary=:all:"):
                assert flag in words, f"the lock install lacks {flag}: {' '.join(words)}"
            from_lock.append(words)
        else:
            # The local package: built and installed with no index and no dependency resolution.
            for flag in ("--no-index", "--no-deps"):
                assert flag in words, f"a pip install besides the lock lacks {flag}: {' '.join(words)}"
            targets = [w for w in words[2:] if not w.startswith("-") and w not in ("-m", "pip", "install")]
            assert targets and all(t.startswith("/") for t in targets), f"installs more than a local path: {words}"
    assert len(from_lock) == 1, "the lock is not installed exactly once"


def test_pip_check_runs_after_the_lock_install() -> None:
    commands = run_commands()
    lock_at = next(i for i, w in enumerate(commands) if is_pip(w) and ("-r" in w or "--requirement" in w))
    assert any(w[:2] == ["pip", "check"] or w[1:4] == ["-m", "pip", "check"] for w in commands[lock_at + 1 :])


def test_the_image_ships_bytecode() -> None:
    """Every module imports from the .pyc compiled at build (pip's default): the trainer runs as a user
    who cannot write to the venv, so a module without one is compiled from source at every start of
    every attempt (measured on the GPU machine, whose image lacks them: 10-16 s of a relaunch's import
    phase, benchmarks/RESULTS.md "Import phase")."""
    for words in pip_installs():
        assert "--no-compile" not in words, f"a pip install skips the bytecode: {' '.join(words)}"
    for keyword, args in final_stage():
        if keyword in ("ENV", "ARG"):
            assert "PIP_NO_COMPILE" not in args, f"{keyword} PIP_NO_COMPILE: the venv's modules would have no bytecode"


@pytest.mark.parametrize("path", [DOCKERFILE, LOCK], ids=["Dockerfile", "lock"])
def test_no_other_package_index(path: Path) -> None:
    words = shlex.split(
        re.sub(
            r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.strip().startswith("#"))
        )
    )
    used = [w for w in words if w.split("=", 1)[0] in INDEX_OPTIONS]
    assert not used, f"{path.name} names another package index or source: {used}"
    assert "download.pytorch.org" not in path.read_text()


# --- the lock itself ------------------------------------------------------------------------------


def test_every_lock_entry_is_exact_and_sha256_hashed() -> None:
    entries = lock_entries()
    assert len(entries) > 50, f"the lock has only {len(entries)} packages: not a full environment"
    lock_versions()  # every one an exact pin
    for name, (_, hashes) in entries.items():
        assert hashes, f"{name} has no sha256 hash in the lock"
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), f"{name}: malformed hash"


def test_every_requirements_pin_is_in_the_lock_at_the_same_version() -> None:
    locked = lock_versions()
    for name, req in dockerfiles.requirements_pins(REQUIREMENTS).items():
        assert name in locked, f"{name} (requirements-gpu.txt) is not in the lock"
        assert locked[name] == exact_pin(req), f"{name}: requirements {exact_pin(req)}, lock {locked[name]}"


@pytest.mark.parametrize("name", REQUIRED_IN_LOCK)
def test_the_gpu_stack_is_in_the_lock(name: str) -> None:
    assert canonicalize_name(name) in lock_versions()


@pytest.mark.parametrize("name", H200_FIXED)
def test_lock_matches_the_h200_machine(name: str) -> None:
    key = canonicalize_name(name)
    h200 = constraint_versions()
    assert key in h200, f"{name} is not in {CONSTRAINTS.name}"
    assert lock_versions()[key] == h200[key], f"{name}: lock {lock_versions()[key]}, H200 {h200[key]}"


@pytest.mark.parametrize("name", sorted(UNSLOTH_PINS))
def test_lock_stays_inside_unsloth_pins(name: str) -> None:
    version = lock_versions()[canonicalize_name(name)]
    assert UNSLOTH_PINS[name].contains(Version(version)), f"{name} {version} is outside {UNSLOTH_PINS[name]}"

